"""How long ``modelfs list``, ``status`` and ``--help`` take to start, and what they import.

    python bench/cli_start.py [--modelfs PATH] [--runs 30]

Runs the installed console script (default: the ``modelfs`` beside this Python) against
an empty store in a temporary directory, ``--runs`` times per command, alternating the
commands, and prints the best and the median wall time of each, beside ``python -c
pass`` of the same interpreter (the floor no command goes below). Then, for each
command, the number of modules it imported and the heavy ones among them (the list
``tests/test_cli.py`` forbids), from ``python -X importtime``. Byte code is written on a
first untimed run, as an installed command has it.

The target: each at most 150 ms (best of the runs) on the machine of
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = (["list"], ["status"], ["--help"])
#: Modules a listing, a status or the help must not load (tests/test_cli.py).
HEAVY = ("trio", "httpx", "httpcore", "pyfuse3", "cryptography", "rich", "sqlite_utils", "numpy", "gguf",
         "modelfs.mount.openfiles", "modelfs.mount.tree")


def wall_times(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return times


def imported(python: str, args: list[str], env: dict[str, str]) -> list[str]:
    code = ("from modelfs.cli import main\nimport sys\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n")
    r = subprocess.run([python, "-X", "importtime", "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, check=True)
    return [line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")][1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modelfs", default=str(Path(sys.executable).with_name("modelfs")))
    ap.add_argument("--runs", type=int, default=30)
    opts = ap.parse_args()
    python = Path(opts.modelfs).read_text().splitlines()[0].removeprefix("#!").split()[0]
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
        env["MODELFS_STORE"] = str(Path(tmp) / "store")
        subprocess.run([opts.modelfs, "init", env["MODELFS_STORE"]], env=env, check=True, capture_output=True)
        runs: dict[str, list[float]] = {" ".join(c): [] for c in [["python -c pass"], *COMMANDS]}
        for _ in range(opts.runs):  # alternating, so a burst of load hits every command alike
            runs["python -c pass"] += wall_times([python, "-c", "pass"], env, 1)
            for c in COMMANDS:
                runs[" ".join(c)] += wall_times([opts.modelfs, *c], env, 1)
        print(f"{opts.modelfs} ({python}), {opts.runs} runs each")
        print(f"{'command':16} {'best':>8} {'median':>8}  modules  heavy modules imported")
        for name, times in runs.items():
            line = f"{name:16} {min(times) * 1e3:6.0f} ms {statistics.median(times) * 1e3:5.0f} ms"
            if name != "python -c pass":
                mods = imported(python, name.split(), env)
                heavy = sorted(m for m in mods if m in HEAVY)
                line += f"  {len(mods):7d}  {', '.join(heavy) or '-'}"
            print(line)


if __name__ == "__main__":
    main()
