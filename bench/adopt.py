"""Benchmark: ``modelfs adopt --from hf`` of a Hugging Face cache against hashing the
file (``sha256sum``, ``openssl dgst -sha256``) and copying it (``cp``), same file system.

    python bench/adopt.py                        # 1 GiB model, 3 rounds, warm and cold
    python bench/adopt.py --rounds 3 --write-doc # also update docs/performance.md
    python bench/adopt.py --no-cold              # warm only (no root needed)

The cold variant needs root (``sync; echo 3 > /proc/sys/vm/drop_caches`` before every
cold run). Everything lives in a temporary directory under ``--dir`` (default /tmp),
removed at the end. What it does:

* builds a Hugging Face cache fixture in its real layout,
  ``hub/models--bench--tiny-GGUF/{blobs/<sha256>, snapshots/<commit>/tiny-Q4_K_M.gguf ->
  ../../blobs/<sha256>, refs/main}``, holding a ~``--size-mib`` MiB GGUF
  (``tests/ggufgen.py``), on the same file system as the stores, so adopt takes the
  hard-link way (the file system has no reflinks: ext4 here);
* runs, alternating in an order that rotates every round, each with an untimed ``sync``
  first and the file in the page cache (warm: read once, untimed) or not (cold: caches
  dropped):

  - ``modelfs --store FRESH adopt --from hf`` with ``HF_HUB_CACHE`` pointing at the
    fixture, in its own process, into a fresh store with no model (created untimed by
    ``modelfs list`` just before): it hashes every byte once, links the blob, parses the
    header and writes the catalog;
  - the same with ``--dry-run``: start-up, discovery and the header, no hashing (adopt's
    fixed cost);
  - ``sha256sum FILE`` (coreutils' own SHA-256: adopt must hash every byte once) and
    ``openssl dgst -sha256 FILE`` (OpenSSL's, the one Python's hashlib uses);
  - ``cp FILE DEST`` (the copy in the page cache, written back later) and ``cp`` then
    ``sync DEST`` (the copy on disk: what a second copy really costs);

* the allocated bytes (st_blocks) each way adds to the file system: for adopt, of the
  store and the fixture together, every inode counted once (a hard link adds no data
  blocks), and what a naive ``du -s STORE`` says (it counts the shared blob); for cp,
  of the copy.

The fixture is reused across rounds (a fresh store each time): adopt's hard link
leaves the cache's file 0444 with the store's digest xattr, and neither makes a later
adopt skip a byte (every adopt hashes the file again). Reported: medians of seconds,
MB/s (10^6 bytes a second) and the ratios to ``sha256sum``, ``openssl`` and ``cp``.
``--write-doc`` replaces the measured block of the "Adopting a cache" section of
docs/performance.md (the reading around it is written by hand).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
SECTION = "## Adopting a cache"
BEGIN, END = "<!-- bench/adopt.py: begin -->", "<!-- bench/adopt.py: end -->"
MIB = 1 << 20
GIB = 1 << 30
COMMIT = "0123456789abcdef0123456789abcdef01234567"

RUNS = {
    "adopt": "`modelfs adopt --from hf` (own process, a fresh store: hash, hard link, catalog)",
    "dry-run": "`modelfs adopt --from hf --dry-run` (the plan only: start-up, discovery, header; no hashing)",
    "sha256sum": "`sha256sum FILE` (coreutils' SHA-256)",
    "openssl": "`openssl dgst -sha256 FILE` (OpenSSL's SHA-256, as hashlib)",
    "cp": "`cp FILE DEST` (page cache; written back later)",
    "cp+sync": "`cp FILE DEST` then `sync DEST` (the second copy on disk)",
}


@dataclass
class Variant:
    """One cache state's runs: seconds and allocated bytes added, per kind of run."""
    cold: bool
    seconds: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in RUNS})
    added: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in RUNS})
    naive_du: list[int] = field(default_factory=list)   # `du -s STORE` after adopt
    ways: list[str] = field(default_factory=list)       # how adopt took the file in
    loads: list[float] = field(default_factory=list)


# -- helpers -----------------------------------------------------------------------------
def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def allocated(*tops: Path) -> int:
    """Bytes allocated (st_blocks) below ``tops``, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for top in tops:
        paths = [top] + [Path(d, n) for d, dirs, files in os.walk(top) for n in [*dirs, *files]]
        for path in paths:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def du_s(top: Path) -> int:
    return int(subprocess.run(["du", "-s", "-B1", str(top)], check=True, capture_output=True,
                              text=True).stdout.split()[0])


def remove_tree(top: Path) -> None:
    """A store (or anything) under the work directory, immutable blobs thawed first."""
    if not top.exists():
        return
    subprocess.run(["chattr", "-R", "-i", str(top)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(top, ignore_errors=True)


def make_fixture(hub: Path, size_mib: int) -> tuple[Path, str]:
    """The Hugging Face cache layout with one GGUF; returns the blob's path and SHA-256."""
    sys.path.insert(0, str(REPO / "tests"))
    from ggufgen import write_model

    repo = hub / "models--bench--tiny-GGUF"
    (repo / "blobs").mkdir(parents=True)
    tmp = repo / "blobs" / "incoming"
    write_model(tmp, arch="llama", name="bench", tensor_bytes=size_mib * MIB, seed=11)
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    sha = h.hexdigest()
    blob = repo / "blobs" / sha
    tmp.rename(blob)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "tiny-Q4_K_M.gguf").symlink_to(f"../../blobs/{sha}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return blob, sha


def modelfs(store: Path, *args: str, hub: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("XDG_RUNTIME_DIR", None)
    env.pop("HF_HOME", None)
    if hub is not None:
        env["HF_HUB_CACHE"] = str(hub)
    return subprocess.run([sys.executable, "-m", "modelfs", "--store", str(store), *args], check=True, env=env,
                          capture_output=True, text=True)


def run_adopt(hub: Path, store: Path) -> tuple[float, str]:
    t = time.monotonic()
    out = modelfs(store, "adopt", "--from", "hf", "--json", hub=hub)
    took = time.monotonic() - t
    doc = json.loads(out.stdout)
    ways = sorted({f"{m['status']}: {f['method']}" for m in doc["models"] for f in m["files"]})
    return took, ", ".join(ways) or "nothing"


def timed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def run(argv: list[str]) -> float:
    return timed(lambda: subprocess.run(argv, check=True, stdout=subprocess.DEVNULL))


# -- the bench ---------------------------------------------------------------------------
def one_round(v: Variant, r: int, hub: Path, blob: Path, work: Path) -> None:
    keys = list(RUNS)
    keys = keys[r % len(keys):] + keys[:r % len(keys)]
    store, dest = work / "store", work / "copy.gguf"
    for key in keys:
        remove_tree(store)
        dest.unlink(missing_ok=True)
        store.mkdir()
        modelfs(store, "list")  # untimed: the store created (its catalog), so adopt's numbers are adopt's
        if v.cold:
            drop_caches()
        else:
            subprocess.run(["cat", str(blob)], check=True, stdout=subprocess.DEVNULL)  # into the cache
            os.sync()
        if key == "adopt":
            before = allocated(store, hub)
            took, ways = run_adopt(hub, store)
            v.added[key].append(allocated(store, hub) - before)
            v.naive_du.append(du_s(store))
            v.ways.append(ways)
        elif key == "dry-run":
            took = timed(lambda: modelfs(store, "adopt", "--from", "hf", "--dry-run", hub=hub))
            v.added[key].append(0)
        elif key in ("cp", "cp+sync"):
            took = run(["cp", str(blob), str(dest)])
            if key == "cp+sync":
                t = time.monotonic()
                subprocess.run(["sync", str(dest)], check=True)
                took += time.monotonic() - t
            v.added[key].append(allocated(dest))
        else:
            took = run(["sha256sum", str(blob)] if key == "sha256sum" else ["openssl", "dgst", "-sha256", str(blob)])
            v.added[key].append(0)
        v.seconds[key].append(took)
    remove_tree(store)
    dest.unlink(missing_ok=True)
    v.loads.append(os.getloadavg()[0])


def report(variants: list[Variant], size: int, command: str, rounds: int) -> str:
    gib = size / GIB
    lines = [
        BEGIN,
        f"Measured by `{command}` on {time.strftime('%Y-%m-%d')} on this machine: {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}, Python {platform.python_version()}; a {size / MIB:.0f} MiB GGUF in a "
        "Hugging Face cache fixture on the same ext4 file system as the store (/tmp); medians of "
        f"{rounds} rounds, runs alternating in an order that rotates every round, an untimed `sync` before "
        "each; a fresh empty store for every adopt.",
        "",
    ]
    for v in variants:
        med = {k: statistics.median(s) for k, s in v.seconds.items()}
        state = ("cold: caches dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every run" if v.cold
                 else "warm: the file read once, untimed, before every run")
        lines += [
            f"Page cache {state}; load average {min(v.loads):.1f}-{max(v.loads):.1f}; adopt took the file in "
            f"by: {', '.join(sorted(set(v.ways)))}.",
            "",
            "| Run | Seconds (runs) | Median | MB/s | Speed of adopt / of this | Allocated bytes added (per GiB) |",
            "|---|---|---|---|---|---|",
        ]
        for k, secs in v.seconds.items():
            added = statistics.median(v.added[k])
            ratio = "" if k in ("adopt", "dry-run") else f"{med[k] / med['adopt']:.2f}x"
            lines.append(f"| {RUNS[k]} | {', '.join(f'{s:.2f}' for s in secs)} | {med[k]:.2f} s "
                         f"| {'' if k == 'dry-run' else f'{size / med[k] / 1e6:.0f}'} | {ratio} "
                         f"| {human(added)} ({human(added / gib)}) |")
        lines += [
            "",
            f"adopt minus its dry run (hash, link, commit): {med['adopt'] - med['dry-run']:.2f} s, "
            f"{size / (med['adopt'] - med['dry-run']) / 1e6:.0f} MB/s. "
            f"adopt / sha256sum **{med['sha256sum'] / med['adopt']:.2f}x**, / openssl "
            f"**{med['openssl'] / med['adopt']:.2f}x**, / cp **{med['cp'] / med['adopt']:.2f}x**, / cp + sync "
            f"**{med['cp+sync'] / med['adopt']:.2f}x** (higher is faster). A naive `du -s STORE` after adopt: "
            f"{human(statistics.median(v.naive_du) / gib)} per GiB (it counts the blob the cache shares).",
            "",
        ]
    lines[-1] = END
    return "\n".join(lines) + "\n"


def human(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def write_doc(block: str) -> None:
    """Replace the measured block of SECTION (adding the section at the end when it is
    missing); the reading around the block stays."""
    text = DOC.read_text()
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END) + 1
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + f"\n\n{SECTION}\n\n{block}"
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-cold", action="store_true", help="warm runs only (the cold ones need root)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp"), help="where the work directory goes (default /tmp)")
    ap.add_argument("--write-doc", action="store_true", help="update the adopt section of docs/performance.md")
    args = ap.parse_args()
    if not args.no_cold and os.geteuid() != 0:
        raise SystemExit("the cold runs drop the page cache: run as root, or pass --no-cold")
    command = "python bench/adopt.py " + " ".join(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="modelfs-bench-adopt-", dir=args.dir))
    try:
        hub = work / "hub"
        print(f"writing a {args.size_mib} MiB GGUF into a Hugging Face cache fixture ...", flush=True)
        blob, _sha = make_fixture(hub, args.size_mib)
        size = blob.stat().st_size
        variants = [Variant(cold=False)] + ([] if args.no_cold else [Variant(cold=True)])
        for v in variants:
            v.loads.append(os.getloadavg()[0])
            for r in range(args.rounds):
                one_round(v, r, hub, blob, work)
                print(f"{'cold' if v.cold else 'warm'} round {r + 1}: "
                      + "  ".join(f"{k} {s[-1]:.2f} s" for k, s in v.seconds.items())
                      + f"; load {v.loads[-1]:.1f}", flush=True)
    finally:
        remove_tree(work)
    block = report(variants, size, command.strip(), args.rounds)
    print(block)
    if args.write_doc:
        write_doc(block)
        print(f"wrote the measured block of {SECTION!r} in {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
