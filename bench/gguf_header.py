"""How fast the GGUF header parser refuses hostile headers and parses a huge valid one,
each as a ratio against a baseline measured in the same run.

    python bench/gguf_header.py [--repeats 21]

Needs the test extras (``pip install -e '.[test]'``): the hostile headers are the test
corpus of ``tests/test_gguf.py`` (every structural cut of a small valid file, and
hand-built headers with absurd counts and lengths), the big model comes from
``tests/ggufgen.py``.

* **Hostile headers.** For every corpus file, the time ``parse_gguf`` takes to refuse it
  against a valid file parsed in the same run. A cut of the small valid file is
  compared with parsing that whole file (refusing a prefix must not cost more than
  accepting all of it); a hand-built header with a valid header of the same size (one
  string value that fills it, rounded up to the 32-byte alignment, at least 64 bytes).
  A ratio far above 1 would mean the parser works on what a header claims (a
  2**63-byte string, 2**64-1 tensors) rather than on what the file holds. The tests
  once asserted 100 ms per file, which says nothing on a fast machine and flakes on a
  loaded one.
* **A 128,256-token vocabulary** (llama 3's), about 3 MiB of header: ``parse_gguf``
  against the ``gguf`` package's own ``GGUFReader`` on the same file, and against a
  valid header of the same size that is one long string (what the bytes alone cost;
  the rest is the per-entry work of 128k strings and three arrays). The tests once
  asserted under a second.

Timings alternate the case and its baseline (A B A B ...) and take the median of
``--repeats`` runs; files are on disk and in the page cache, as an import finds them.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import gguf  # noqa: E402

import test_gguf  # noqa: E402  (the corpus)
from ggufgen import write_model  # noqa: E402
from modelfs_store.errors import GGUFError  # noqa: E402
from modelfs_store.gguf import parse_gguf  # noqa: E402

ALIGN = 32
HEADER_WITH_ONE_KV = 56  # magic, version, counts, the key "general.name", type, string length


def valid_header(size: int) -> bytes:
    """A valid GGUF of ``size`` bytes, rounded up to the alignment (at least 64): one
    ``general.name`` string that fills the header, no tensors."""
    total = max(2 * ALIGN, -(-size // ALIGN) * ALIGN)
    name = "x" * (total - HEADER_WITH_ONE_KV)
    return test_gguf._hdr(0, 1) + test_gguf._kv("general.name", test_gguf._STR, test_gguf._s(name))


def refuse(path: Path) -> None:
    try:
        parse_gguf(path)
    except GGUFError:
        return
    raise AssertionError(f"{path.name} was accepted")


def alternate(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, run alternately."""
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def hostile(work: Path, repeats: int) -> list[tuple[str, int, float, float]]:
    """(case, size, refuse seconds, baseline seconds) for every corpus file."""
    whole = work / "rich.gguf"
    whole.write_bytes(test_gguf._rich_bytes())  # the valid file the truncations are cut from
    baselines: dict[int, Path] = {}
    rows = []
    for case, data, _ in test_gguf._CORPUS:
        path = work / f"{case}.gguf"
        path.write_bytes(data)
        base = whole if case.startswith("trunc-") else baselines.get(len(data))
        if base is None:
            base = baselines[len(data)] = work / f"valid-{len(data)}.gguf"
            base.write_bytes(valid_header(len(data)))
        parse_gguf(base)  # it must be valid, or the baseline measures a refusal
        t_refuse, t_valid = alternate(lambda p=path: refuse(p), lambda b=base: parse_gguf(b), repeats)
        rows.append((case, len(data), t_refuse, t_valid))
    return rows


def big_vocabulary(work: Path, repeats: int) -> dict[str, float]:
    path = write_model(work / "llama3-vocab.gguf", vocab_size=128_256)
    header = parse_gguf(path).data_offset
    same = work / "one-string.gguf"
    same.write_bytes(valid_header(header))
    t_ours, t_string = alternate(lambda: parse_gguf(path), lambda: parse_gguf(same), repeats)
    readers = max(1, repeats // 7)  # GGUFReader takes seconds here
    t_reader = statistics.median(_once(lambda: gguf.GGUFReader(path)) for _ in range(readers))
    return {"header_bytes": header, "ours": t_ours, "one_string": t_string, "gguf_reader": t_reader,
            "reader_runs": readers}


def _once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(title: str, rows: list[tuple[str, int, float, float]], worst: int) -> None:
    ratios = sorted(r / v for _, _, r, v in rows)
    p95 = ratios[min(len(ratios) - 1, math.ceil(0.95 * len(ratios)) - 1)]
    print(f"  {title}: median {statistics.median(ratios):.2f}x, p95 {p95:.2f}x, max {ratios[-1]:.2f}x; "
          f"slowest refusal {ms(max(r for _, _, r, _ in rows))}")
    for case, n, r, v in sorted(rows, key=lambda row: row[2] / row[3], reverse=True)[:worst]:
        print(f"    {case:<44} {n:>6} B  {ms(r)} / {ms(v)} = {r / v:.2f}x")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=21, help="runs per measurement (median)")
    ap.add_argument("--worst", type=int, default=5, help="how many of the slowest refusals to list")
    args = ap.parse_args()

    print(f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}; "
          f"medians of {args.repeats} alternating runs")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        rows = hostile(work, args.repeats)
        big = big_vocabulary(work, args.repeats)

    print(f"\nhostile headers: {len(rows)} files of 0 to {max(n for _, n, _, _ in rows)} bytes, each refused; "
          f"slowest refusal {ms(max(r for _, _, r, _ in rows))}")
    cuts = [row for row in rows if row[0].startswith("trunc-")]
    made = [row for row in rows if not row[0].startswith("trunc-")]
    summary(f"{len(cuts)} cuts of the valid {len(test_gguf._rich_bytes())}-byte file: refuse / parse it whole",
            cuts, args.worst)
    summary(f"{len(made)} hand-built headers: refuse / parse a valid header of the same size", made, args.worst)
    giant = [(case, r / v) for case, _, r, v in rows if "giant" in case]
    print("  claimed giant lengths and counts: " + ", ".join(f"{case} {ratio:.2f}x" for case, ratio in giant))

    print(f"\n128,256-token vocabulary, {big['header_bytes'] / (1 << 20):.1f} MiB of header:")
    print(f"  parse_gguf {ms(big['ours'])}")
    print(f"  gguf.GGUFReader on the same file {ms(big['gguf_reader'])} (median of {big['reader_runs']}): "
          f"parse_gguf takes {big['ours'] / big['gguf_reader']:.3f}x its time")
    print(f"  a valid header of the same size holding one string {ms(big['one_string'])}: "
          f"{big['ours'] / big['one_string']:.1f}x (the per-entry work of 128k strings)")


if __name__ == "__main__":
    main()
