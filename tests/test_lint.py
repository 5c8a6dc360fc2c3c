"""Types and lint are part of the suite: mypy and ruff, as configured in pyproject.toml,
report nothing.

The folder ``store/`` installs as ``modelfs_store`` (setuptools ``package-dir``), which
mypy cannot follow through the editable install's import hook. So mypy checks a
directory of two symlinks, ``modelfs -> modelfs/`` and ``modelfs_store -> store/``: the
module names it sees are the installed ones, and the overrides in pyproject.toml
(``--strict`` for ``modelfs_store.*``) apply. To run it by hand::

    python -m pytest tests/test_lint.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYPY")}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_mypy_reports_nothing(tmp_path: Path) -> None:
    farm = tmp_path / "src"
    farm.mkdir()
    (farm / "modelfs").symlink_to(REPO / "modelfs")
    (farm / "modelfs_store").symlink_to(REPO / "store")
    cache = REPO / ".mypy_cache"  # reused between local runs; CI starts cold
    r = _run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
              "--cache-dir", str(cache), "-p", "modelfs", "-p", "modelfs_store"], farm)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success: no issues found" in r.stdout


def test_ruff_reports_nothing() -> None:
    r = _run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
              "store", "modelfs", "tests", "bench"], REPO)
    assert r.returncode == 0, r.stdout + r.stderr
