"""The Debian package (``packaging/build-deb.sh``): built from this checkout with Debian's
``/usr/bin/python3``, installed with ``dpkg -i``, run from ``/usr/bin/modelfs``, removed.

The build makes a virtual environment in ``/usr/lib/modelfs`` from pyproject.toml's
requirements (pip downloads what its cache lacks) and takes ~35 s here with pyfuse3's
wheel in pip's cache (the README's install puts it there); it is built once per run.
Installing it runs the package's postinst, which makes the system store's ``modelfs``
user and its directories: the test refuses to run where any of that exists already
(a real install), and removes what it made.
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO

DEBIAN_PYTHON = Path("/usr/bin/python3")
SYSTEM_DIRS = (Path("/var/lib/modelfs"), Path("/srv/models"))
#: what the package ships besides its environment, from packaging/
SHIPPED = {"usr/lib/systemd/user/modelfs.service": "systemd/modelfs.service",
           "usr/lib/systemd/system/modelfs-system.service": "systemd/modelfs-system.service",
           "usr/lib/sysusers.d/modelfs.conf": "sysusers.d/modelfs.conf",
           "usr/lib/tmpfiles.d/modelfs.conf": "tmpfiles.d/modelfs.conf"}


def _missing_tools() -> str | None:
    if shutil.which("dpkg-deb") is None:
        return "dpkg-deb"
    r = subprocess.run([str(DEBIAN_PYTHON), "-c", "import ensurepip, sysconfig, os; "
                        "assert os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')"], capture_output=True)
    return None if r.returncode == 0 else "Debian's python3 with python3-venv and python3-dev"


pytestmark = pytest.mark.skipif(_missing_tools() is not None,
                                reason=f"!!! {_missing_tools()} missing: the Debian package CANNOT be built here !!!")


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{argv} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    built = Path(_run([str(REPO / "packaging" / "build-deb.sh"), str(out)], env=env).stdout.strip().splitlines()[-1])
    assert built.parent == out and built.name.startswith("modelfs_") and built.suffix == ".deb"
    return built


def test_the_package_ships_its_environment_the_units_and_no_configuration(deb: Path, tmp_path: Path) -> None:
    fields = dict(line.split(": ", 1) for line in _run(["dpkg-deb", "-f", str(deb)]).stdout.splitlines()
                  if ": " in line)
    assert fields["Package"] == "modelfs" and fields["Version"] == "0.1.0"
    assert fields["Depends"] == "python3 (>= 3.11), python3 (<< 3.12), fuse3, libfuse3-3"
    root = tmp_path / "x"
    _run(["dpkg-deb", "-x", str(deb), str(root)])
    assert os.readlink(root / "usr/bin/modelfs") == "../lib/modelfs/bin/modelfs"
    venv = root / "usr/lib/modelfs"
    assert (venv / "bin/modelfs").read_text().splitlines()[0] == "#!/usr/lib/modelfs/bin/python"
    assert os.readlink(venv / "bin/python3") == str(DEBIAN_PYTHON)
    assert "home = /usr/bin" in (venv / "pyvenv.cfg").read_text()
    assert not list(venv.glob("bin/pip*")) and not list(venv.glob("lib/python3*/site-packages/pip"))
    for rel, source in SHIPPED.items():
        assert (root / rel).read_text() == (REPO / "packaging" / source).read_text(), rel
    assert not (root / "etc").exists()  # no configuration file: /etc/fuse.conf least of all
    scripts = _run(["dpkg-deb", "-e", str(deb), str(tmp_path / "DEBIAN")]) and tmp_path / "DEBIAN"
    assert "fuse.conf" not in "".join(p.read_text() for p in scripts.iterdir() if p.name != "control")
    # Built in a scratch directory: nothing may still name it (scripts, byte code).
    leftovers = subprocess.run(["grep", "-rl", "/tmp/tmp", str(root)], capture_output=True, text=True).stdout
    assert leftovers == ""


@pytest.fixture
def installed(deb: Path) -> Iterator[None]:
    """``dpkg -i`` of the package, then ``dpkg -r``; the modelfs user and directories that
    the postinst made are removed again. One such test at a time on a machine (an flock)."""
    if os.geteuid() != 0:
        pytest.skip("!!! needs root: the Debian package CANNOT be installed !!!")
    with open("/run/lock/modelfs-deb-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        present = [str(p) for p in SYSTEM_DIRS if p.exists()]
        if _package_known() or present or _user_exists():
            pytest.skip(f"!!! modelfs is installed or set up on this machine ({present or 'package or user'}): "
                        "the package test will not touch it !!!")
        try:
            _run(["dpkg", "-i", str(deb)])
            yield
        finally:
            subprocess.run(["dpkg", "--purge", "modelfs"], capture_output=True, timeout=300)
            subprocess.run(["userdel", "modelfs"], capture_output=True)
            subprocess.run(["groupdel", "modelfs"], capture_output=True)
            for d in SYSTEM_DIRS:
                shutil.rmtree(d, ignore_errors=True)


def _package_known() -> bool:
    """Installed, or removed with its maintainer scripts still known (``dpkg -r``)."""
    return subprocess.run(["dpkg-query", "-W", "modelfs"], capture_output=True).returncode == 0


def _user_exists() -> bool:
    try:
        pwd.getpwnam("modelfs")
    except KeyError:
        try:
            grp.getgrnam("modelfs")
        except KeyError:
            return False
    return True


def test_the_installed_package_runs_doctor_mounts_and_goes_away(installed: None, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}  # nothing of this checkout's venv
    modelfs = "/usr/bin/modelfs"
    assert _run([modelfs, "--version"], env=env, cwd="/").stdout == "modelfs, version 0.1.0\n"
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    store.mkdir()
    doctor = _run([modelfs, "--store", str(store), "doctor", "--json"], env=env, cwd="/")
    assert all(check["ok"] for check in json.loads(doctor.stdout))
    # The package's postinst made the system store's user and directories.
    assert pwd.getpwnam("modelfs").pw_dir == "/var/lib/modelfs"
    assert {d.stat().st_uid for d in SYSTEM_DIRS} == {pwd.getpwnam("modelfs").pw_uid}
    # Its daemon runs from the package's environment.
    _run([modelfs, "--store", str(store), "mount", str(mnt)], env=env, cwd="/")
    try:
        pid = json.loads((store / "run" / "daemon.json").read_text())["pid"]
        assert os.readlink(f"/proc/{pid}/exe").startswith("/usr/bin/python3")
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"/usr/lib/modelfs/bin/python"
        assert os.listdir(mnt) == []
    finally:
        _run([modelfs, "--store", str(store), "unmount", str(mnt)], env=env, cwd="/")
    # Its units are what `service install` writes for it, and systemd accepts them.
    unit = json.loads(_run([modelfs, "service", "install", "--user", "--dry-run", "--json"], env=env).stdout)
    assert unit["files"][0]["content"] == Path("/usr/lib/systemd/user/modelfs.service").read_text()
    if shutil.which("systemd-analyze"):
        runtime = tmp_path / "run"
        runtime.mkdir(mode=0o700)
        for argv in (["--user", "verify", "/usr/lib/systemd/user/modelfs.service"],
                     ["verify", "/usr/lib/systemd/system/modelfs-system.service"]):
            r = _run(["systemd-analyze", *argv], env={**env, "XDG_RUNTIME_DIR": str(runtime)})
            assert "modelfs" not in r.stderr, r.stderr
    _run(["dpkg", "-r", "modelfs"])
    assert not Path("/usr/lib/modelfs").exists() and not os.path.lexists(modelfs)
    _run(["dpkg", "--purge", "modelfs"])
    assert not _package_known()
