"""Shared fixtures: a fresh store per test, and the CLI run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


class CLI:
    """Runs ``python -m modelfs`` against one store directory."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)  # a named store must exist: an empty directory becomes one
        self.env = {**os.environ, "MODELFS_STORE": str(root), "PYTHONPATH": str(REPO), **(env or {})}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "modelfs", *args]

    def run(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 300) -> Run:
        p = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                           env={**self.env, **(env or {})})
        r = Run(p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise AssertionError(f"modelfs {' '.join(args)} exited {p.returncode}\n{p.stderr}\n{p.stdout}")
        return r

    def popen(self, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), env={**self.env, **(env or {})}, **kw)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def cli(store_dir: Path) -> CLI:
    return CLI(store_dir)


def wait_for(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll ``cond`` until it returns something truthy; tests never sleep blindly."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def du_bytes(path: Path) -> int:
    """Bytes actually allocated on disk below ``path`` (what the store costs)."""
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_blocks * 512
    return total
