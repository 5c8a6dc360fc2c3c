"""A store belongs to the uid that owns its root (DESIGN §3). Replays of an outside
test that worked as root and as ``nobody``:

- root acting on another user's store drops to that user first, and a link planted
  where a store directory or file should be is refused, never followed: nothing
  outside the store is read, written, chmodded or deleted;
- modes never depend on the umask, and loose ones are repaired with a warning;
- another uid reads nothing under the store directory, and gets one clear line.

Commands that drop privileges run in a child process (the drop is for good).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, thaw_tree
from faultserver import origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs_store.core import Store

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root to act as two users (setpriv) !!!")


def modelfs(store: Path, *args: str, as_nobody: bool = False, umask: int | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFS_")}
    env["PYTHONPATH"] = str(REPO)
    argv = [sys.executable, "-P", "-m", "modelfs", "--store", str(store), *args]
    return subprocess.run([*SETPRIV, *argv] if as_nobody else argv, capture_output=True, text=True, env=env,
                          timeout=120, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
                          cwd=cwd or "/")


@pytest.fixture(scope="module")
def nobody_can_run_modelfs() -> None:
    probe = subprocess.run([*SETPRIV, sys.executable, "-P", "-c", "import modelfs.cli"], capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/")
    if probe.returncode != 0:
        pytest.skip("!!! this Python cannot be run by another uid here: the cross-user tests CANNOT run !!!")


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every uid may traverse (pytest's own tmp dirs are root's, 0700)."""
    top = Path(tempfile.mkdtemp(prefix="modelfs-world-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    thaw_tree(top)
    subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


def make_store(where: Path, owner: int) -> Path:
    root = where / "store"
    w = where / "w.gguf"
    write_model(w, tensor_bytes=4096, seed=7)
    s = Store.open(root)
    s.import_model("m", w)
    s.close()
    thaw_tree(root)  # root's commit made the blob immutable; a store of another uid's has no such flag
    for p in [root, *root.rglob("*")]:
        os.lchown(p, owner, owner)
    return root


def victim(where: Path) -> Path:
    v = where / "victim"
    v.mkdir(mode=0o755)
    (v / "precious").write_text("root's data\n")
    (v / "precious").chmod(0o644)
    return v


def snapshot(path: Path) -> dict[str, tuple[int, int, bytes | None]]:
    out = {}
    for p in [path, *path.rglob("*")]:
        st = p.lstat()
        out[str(p)] = (st.st_mode, st.st_uid, p.read_bytes() if stat.S_ISREG(st.st_mode) else None)
    return out


# -- root and another user's store --------------------------------------------------------------------
def test_root_on_a_store_with_tmp_linked_elsewhere_refuses_and_touches_nothing(world, nobody_can_run_modelfs):
    store, v = make_store(world, NOBODY), victim(world)
    before = snapshot(v)
    os.rename(store / "tmp", world / "tmp-was-here")
    os.symlink(v, store / "tmp")
    os.lchown(store / "tmp", NOBODY, NOBODY)
    r = modelfs(store, "list")
    assert r.returncode == 7, r.stderr
    assert r.stderr.strip().splitlines() == [f"modelfs: error: {store / 'tmp'} is not a directory (a symbolic link?): "
                                             "refusing to use it"]
    assert snapshot(v) == before  # not emptied, not chmodded


def test_root_on_a_store_with_a_planted_daemon_log_refuses_to_append_to_it(world, nobody_can_run_modelfs):
    store, v = make_store(world, NOBODY), victim(world)
    before = snapshot(v)
    os.symlink(v / "precious", store / "run" / "daemon.log")
    os.lchown(store / "run" / "daemon.log", NOBODY, NOBODY)
    r = modelfs(store, "mount", str(world / "mnt"))
    assert r.returncode == 7, r.stderr
    assert "daemon.log is a symbolic link" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert snapshot(v) == before


def test_root_pulling_into_a_store_with_a_planted_partial_link_refuses_it(world, origin,  # noqa: F811
                                                                          nobody_can_run_modelfs):
    store, v = make_store(world, NOBODY), victim(world)
    before = snapshot(v)
    data = (world / "w.gguf").read_bytes()
    sha = hashlib.sha256(data + b"x").hexdigest()
    origin.add("/m.gguf", data + b"x")
    partial = store / "partial" / sha
    partial.mkdir(mode=0o700)
    os.symlink(v / "precious", partial / "data")
    for p in (partial, partial / "data"):
        os.lchown(p, NOBODY, NOBODY)
    r = modelfs(store, "pull", origin.url("/m.gguf"), "--sha256", sha)
    assert r.returncode == 7, r.stderr
    assert "data is a symbolic link" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(v) == before  # not overwritten, not chmodded 0444
    # ... and a link in place of the partial directory itself
    shutil.rmtree(partial)
    os.symlink(v, partial)
    os.lchown(partial, NOBODY, NOBODY)
    r = modelfs(store, "pull", origin.url("/m.gguf"), "--sha256", sha)
    assert r.returncode == 7 and "is not a directory (a symbolic link?)" in r.stderr, r.stderr
    assert snapshot(v) == before


def test_root_works_on_another_users_store_as_that_user(world, nobody_can_run_modelfs):
    store = make_store(world, NOBODY)
    w = world / "w2.gguf"
    write_model(w, tensor_bytes=4096, seed=8)
    w.chmod(0o644)
    assert modelfs(store, "import", "m2", str(w)).returncode == 0
    # Everything the import made belongs to the store's owner, not to root.
    assert {p.lstat().st_uid for p in [store, *store.rglob("*")]} == {NOBODY}


def test_a_link_in_place_of_a_blob_is_not_followed(world):
    store = make_store(world, 0)
    s = Store.open(store)
    try:
        [sha] = s.blobs.iter_blobs()
        blob = s.blobs.path(sha)
        blob.unlink()
        os.symlink("/etc/hostname", blob)
        assert not s.blobs.has(sha)  # not a committed blob: dehydrated or missing, never /etc/hostname
        assert s.file_state(s.catalog.get_version("m", 1).files[0]) == "missing"
    finally:
        s.close()


# -- modes ----------------------------------------------------------------------------------------
def _loose(root: Path) -> list[str]:
    return [f"{p} {stat.S_IMODE(p.lstat().st_mode):04o}" for p in [root, *root.rglob("*")]
            if not p.is_symlink() and p.lstat().st_mode & 0o022]


def test_under_umask_000_nothing_in_the_store_is_writable_by_group_or_other(world, origin):  # noqa: F811
    root = world / "store"
    root.mkdir()
    w, p = world / "w.gguf", world / "p.gguf"
    write_model(w, tensor_bytes=4096, seed=9)
    write_model(p, tensor_bytes=8192, seed=10)
    origin.add("/p.gguf", p.read_bytes())
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    steps = [["import", "m", str(w)], ["pull", origin.url("/p.gguf"), "--sha256", sha], ["list"], ["verify"]]
    if os.path.exists("/dev/fuse"):
        steps += [["mount", str(world / "mnt")], ["status"], ["unmount", str(world / "mnt")]]
    for args in steps:
        r = modelfs(root, *args, umask=0)
        assert r.returncode == 0, (args, r.stderr)
    assert _loose(root) == []
    modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}
    assert modes["."] == 0o700 and modes["catalog.db"] == 0o600 and modes["blobs/sha256"] == 0o700
    assert all(m == 0o444 for name, m in modes.items() if name.count("/") == 3)  # blobs/sha256/ab/<sha>


def test_loose_modes_are_repaired_with_a_warning_and_doctor_says_so(world):
    root = make_store(world, 0)
    (root / "tmp").chmod(0o777)
    (root / "catalog.db").chmod(0o666)
    root.chmod(0o755)
    r = modelfs(root, "doctor", "--json")
    assert f"repaired {root / 'tmp'}: mode 0777 -> 0700" in r.stderr
    assert f"repaired {root / 'catalog.db'}: mode 0666 -> 0600" in r.stderr
    assert _loose(root) == []
    modes = [c for c in json.loads(r.stdout) if c["name"] == "store modes"]
    assert modes and not modes[0]["ok"] and "0777 -> 0700" in modes[0]["detail"]
    assert r.returncode == 1


# -- other users ------------------------------------------------------------------------------------
def test_another_user_reads_nothing_under_the_store(world):
    root = make_store(world, 0)
    paths = [str(p) for p in [root, *root.rglob("*")]]
    code = ("import sys\nbad = []\nfor p in sys.argv[1:]:\n"
            "    try:\n        open(p, 'rb').close()\n        bad.append(p)\n"
            "    except IsADirectoryError:\n        pass\n    except PermissionError:\n        pass\n"
            "print('\\n'.join(bad))\n")
    r = subprocess.run([*SETPRIV, "/usr/bin/python3", "-c", code, *paths], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr
    listing = subprocess.run([*SETPRIV, "ls", str(root)], capture_output=True, text=True)
    assert listing.returncode != 0 and "Permission denied" in listing.stderr


def test_another_user_gets_one_clear_line_and_exit_7(world, nobody_can_run_modelfs):
    root = make_store(world, 0)
    for verb in ("list", "status"):
        r = modelfs(root, verb, as_nobody=True)
        assert r.returncode == 7, r.stderr
        [line] = r.stderr.strip().splitlines()
        assert line.startswith("modelfs: error: ") and "mount" in line and "Errno" not in line
    root.chmod(0o711)  # traversable: the owner can be named
    r = modelfs(root, "list", as_nobody=True)
    assert r.returncode == 7 and f"{root} belongs to root; only its owner opens the store itself" in r.stderr
