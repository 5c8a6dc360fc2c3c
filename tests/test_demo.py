"""The README's demo command runs end to end: a store, a signed pack served from
127.0.0.1, a lazy pull, a real mount, real readers through it, an unmount.

It mounts, so it is skipped (loudly) only where /dev/fuse is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                       reason="!!! /dev/fuse is missing: the demo's mount step CANNOT run on this machine !!!"),
]


def test_the_readme_demo_reads_a_lazily_pulled_pack_through_the_mount(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFS_")}
    p = subprocess.run([sys.executable, "-m", "modelfs.demo", "--keep", str(work)], capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    # Listed with its exact size before a byte is local; the open through the mount fetched it.
    assert "vision/vision-Q4_K_M.gguf: 33554656 bytes, state dehydrated" in out
    assert "state now local" in out
    assert "1 tensor(s), identical to the publisher's file: True" in out
    assert "matches user.modelfs.sha256: True" in out
    # `modelfs status` saw the mount and the file the reader held open.
    assert "open: vision: vision-Q4_K_M.gguf" in out
    # Only the projector, which nobody opened, was left to fetch.
    assert "fetched 4.0 MiB of files that were not local" in out
    assert not os.path.ismount(work / "models")
    status = run_cli("--store", str(work / "store"), "status", "--json")
    assert status.returncode == 0, status.stderr
    assert status.json()["mount"] is None  # the daemon is gone too
