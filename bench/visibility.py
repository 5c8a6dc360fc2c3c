"""Per-app rules in the mount, side by side with the same mount answering AllowAll.

    sudo python bench/visibility.py                 # 10,000 models, 5 rounds
    sudo python bench/visibility.py --write-doc     # also update docs/performance.md

Needs root and /dev/fuse. One store of 10,000 private models (app A) plus a shared one,
built through the catalog API with one shared blob; a sibling store with the same
catalog for the AllowAll baseline (a hidden ``--no-app-rules`` mount flag). Both are
mounted with ``--allow-other`` at once. Measured, medians of ``--rounds``:

* uncached lookups: ``stat`` of every model directory once, as the owner, in a fresh
  mount (every first lookup reaches the daemon; private entries are never cached);
* opening a file: open + close of one model file, 2,000 times (the private model's
  entry has a zero timeout, so each open also costs a lookup);
* listing all models as a restricted caller (``nobody`` through setpriv, which sees
  only the shared model) against the same listing through AllowAll;
* how soon a grant shows: from ``modelfs grant`` to the model appearing for the
  granted app (the daemon polls the catalog every 200 ms).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from read import Daemon  # noqa: E402  (bench/read.py: a foreground daemon in a subprocess)

from modelfs_store.catalog import FileRecord  # noqa: E402
from modelfs_store.core import Store  # noqa: E402

DOC = REPO / "docs" / "performance.md"
SECTION = "## Per-app visibility"
APP = "org.example.A"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def build(root: Path, models: int) -> None:
    s = Store.open(root)
    data = b"GGUF" + bytes(252)
    sha = hashlib.sha256(data).hexdigest()
    t = s.blobs.new_temp()
    t.write(data)
    s.blobs.commit_temp(t, expected_sha256=sha)
    with s.catalog.txn():
        s.catalog.add_app(APP, None)
        for i in range(models + 1):
            name = "shared" if i == models else f"model-{i:05d}"
            s.catalog.ensure_model(name, None if name == "shared" else APP,
                                   "shared" if name == "shared" else "private")
            s.catalog.add_version(name, 1, [FileRecord(f"{name}.gguf", "weights", len(data), sha)], signed=False)
            s.catalog.activate(name, 1, actor="bench")
    s.close()


def timed(argv: list[str]) -> float:
    """Seconds the timed part of a reader script took (it prints them)."""
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd="/")
    return float(out.stdout.strip().splitlines()[-1])


STAT_ALL = "import os,sys,time\nd=sys.argv[1]\nn=[f'model-{i:05d}' for i in range(int(sys.argv[2]))]\n" \
           "t=time.perf_counter()\n[os.stat(os.path.join(d,x)) for x in n]\nprint(len(n)/(time.perf_counter()-t))\n"
OPENS = "import os,sys,time\np=sys.argv[1]\nt=time.perf_counter()\nfor _ in range(2000):\n" \
        "    os.close(os.open(p,os.O_RDONLY))\nprint((time.perf_counter()-t)/2000)\n"
LIST = "import os,sys,time\nt=time.perf_counter()\nn=os.listdir(sys.argv[1])\nprint(time.perf_counter()-t)\n"


def one_round(work: Path, models: int) -> dict[str, float]:
    rules, allow = work / "rules", work / "allow"
    for d in (rules, allow):
        shutil.rmtree(d, ignore_errors=True)
        build(d / "store", models)
    a = Daemon(rules / "store", rules / "mnt", "--allow-other")
    b = Daemon(allow / "store", allow / "mnt", "--allow-other", "--no-app-rules")
    py = "/usr/bin/python3"
    try:
        out = {
            # names, not a listing: readdirplus would hand the kernel every entry first
            "lookups_per_s_rules": timed([py, "-c", STAT_ALL, str(rules / "mnt"), str(models)]),
            "lookups_per_s_allow": timed([py, "-c", STAT_ALL, str(allow / "mnt"), str(models)]),
            "open_s_rules": timed([py, "-c", OPENS, str(rules / "mnt" / "model-00000" / "model-00000.gguf")]),
            "open_s_allow": timed([py, "-c", OPENS, str(allow / "mnt" / "model-00000" / "model-00000.gguf")]),
            "list_s_restricted": timed([*NOBODY, py, "-c", LIST, str(rules / "mnt")]),
            "list_s_allow": timed([*NOBODY, py, "-c", LIST, str(allow / "mnt")]),
        }
        env = {**os.environ, "PYTHONPATH": str(REPO), "MODELFS_STORE": str(rules / "store")}
        subprocess.run([sys.executable, "-m", "modelfs", "apps", "add", "org.example.B", "--exe", py], env=env,
                       check=True, capture_output=True)
        target = rules / "mnt" / "model-00001"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "modelfs", "grant", "org.example.B", "model-00001", "--uid",
                        "65534"], env=env, check=True, capture_output=True)
        while subprocess.run([*NOBODY, py, "-c", f"import os; os.stat({str(target)!r})"],
                             capture_output=True).returncode:
            pass
        out["grant_shows_s"] = time.perf_counter() - t0
    finally:
        a.stop()
        b.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelfs-bench-vis-", dir="/tmp"))
    work.chmod(0o755)
    try:
        rounds = [one_round(work, args.models) for _ in range(args.rounds)]
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    lines = [
        f"| uncached lookups (stat of {args.models} private models, as the owner) | "
        f"{med['lookups_per_s_rules']:,.0f}/s | {med['lookups_per_s_allow']:,.0f}/s | "
        f"{med['lookups_per_s_rules'] / med['lookups_per_s_allow']:.2f}x |",
        f"| open + close of a private model's file | {med['open_s_rules'] * 1e6:.0f} µs | "
        f"{med['open_s_allow'] * 1e6:.0f} µs | +{(med['open_s_rules'] - med['open_s_allow']) * 1e6:.0f} µs |",
        f"| listing as a restricted caller (sees 1 of {args.models + 1}) | "
        f"{med['list_s_restricted'] * 1e3:.1f} ms | {med['list_s_allow'] * 1e3:.1f} ms (all) | |",
        f"| a grant shows in the live mount | {med['grant_shows_s'] * 1e3:.0f} ms | | |",
    ]
    table = "\n".join(["| | per-app rules | AllowAll | |", "|---|---|---|---|", *lines])
    print(table)
    if args.write_doc:
        write_doc(table, args)


def write_doc(table: str, args: argparse.Namespace) -> None:
    text = DOC.read_text()
    body = (f"{SECTION}\n\nMeasured with `sudo python bench/visibility.py --models {args.models} --rounds "
            f"{args.rounds}` (medians; both mounts up at once, in the same run). The targets: at least "
            "10,000 uncached lookups a second, at most 1 ms more per open, at most 100 ms to list "
            "10,000 models as a restricted caller.\n\n" + table + "\n")
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + 1)
        text = text[:start] + body + ("" if end < 0 else text[end:])
    else:
        text = text.rstrip() + "\n\n" + body
    DOC.write_text(text)


if __name__ == "__main__":
    main()
