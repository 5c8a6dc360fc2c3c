"""What installing modelfs adds to a Python environment, and what the daemon imports.

- The distribution adds only import names that begin with ``modelfs`` (the store folder
  installs as ``modelfs_store``: a generic top-level ``store`` would collide with any
  other on a user's path), and every module of the source tree.
- The mount daemon never imports from the directory ``modelfs mount`` was run in: a
  hostile ``store/``, ``modelfs/`` or ``modelfs_store/`` package there is never run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO, wait_for
from test_layering import source_modules

HOSTILE = ("store", "modelfs", "modelfs_store")


def test_installed_metadata_names_only_modelfs_packages() -> None:
    top = (metadata.distribution("modelfs").read_text("top_level.txt") or "").split()
    assert top and all(name.startswith("modelfs") for name in top), top


def test_a_real_install_adds_only_modelfs_names_and_every_module(tmp_path: Path) -> None:
    """``pip install .`` (non-editable) of a wheel built from this checkout."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    [wheel] = wheels.glob("modelfs-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    names = {p.name for p in target.iterdir()} - {"bin", "__pycache__"}
    importable = {n.removesuffix(".py") for n in names if not n.endswith(".dist-info")}
    assert importable == {"modelfs", "modelfs_store"}, names
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.endswith(".py")}
    expected = {str(p.relative_to(REPO)).replace("store/", "modelfs_store/", 1) if p.is_relative_to(REPO / "store")
                else str(p.relative_to(REPO)) for p in source_modules().values()}
    assert sorted(expected - shipped) == []
    # And it runs from there, without the checkout.
    r = subprocess.run([sys.executable, "-P", "-c", "import modelfs.cli, modelfs.mount.daemon, modelfs_store.core;"
                        "print(modelfs.cli.__file__)"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(target)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(target))


def _plant_hostile_packages(where: Path, marker: Path) -> None:
    for name in HOSTILE:
        pkg = where / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + ' ' + str(__import__('os').getuid()) + '\\n')\n")
        (pkg / "__main__.py").write_text((pkg / "__init__.py").read_text())


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                    reason="!!! /dev/fuse is missing: the mount isolation test CANNOT run on this machine !!!")
def test_mount_from_a_directory_with_hostile_packages_never_runs_them(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    caller_dir = tmp_path / "x"
    _plant_hostile_packages(caller_dir, marker)
    store, mnt = tmp_path / "store", tmp_path / "m"
    store.mkdir()
    modelfs = Path(sys.executable).with_name("modelfs")  # the console script, as a user runs it
    assert modelfs.exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFS_") and k != "PYTHONPATH"}
    env["MODELFS_STORE"] = str(store)
    r = subprocess.run([str(modelfs), "mount", "../m"], cwd=caller_dir, env=env, capture_output=True, text=True,
                       timeout=120)
    try:
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)
        assert os.listdir(mnt) == []  # served: an empty store, through a live daemon
        status = json.loads((store / "run" / "daemon.json").read_text())
        assert os.readlink(f"/proc/{status['pid']}/cwd") == "/"
    finally:
        subprocess.run([str(modelfs), "unmount", str(mnt)], env=env, capture_output=True, timeout=60)
        wait_for(lambda: not os.path.ismount(mnt), 30, "the unmount")
    assert not marker.exists(), marker.read_text()
