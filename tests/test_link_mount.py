"""The link fast path through a real mount (``--links auto``), read by real processes.

A store owned by root (the test's uid: its blobs are committed immutable) in a
directory every uid may traverse, mounted with ``--allow-other``. The owner's own
process sees a local file as a symbolic link to its blob; a second uid (``nobody``,
through setpriv), a Flatpak-identified process of the owner's uid (a mount namespace
and a root of its own holding a ``.flatpak-info``) and a process in another mount
namespace (``unshare -m``) see the regular file, right after the owner's lookup too,
and every one of them reads the right bytes. A second store, owned by ``nobody`` and
served by a daemon running as nobody, shows a non-root owner the link and a 0444 blob.

tests/test_links.py holds the same rules as plain logic, each condition on its own.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CLI, remove_tree, thaw_tree, wait_for
from ggufgen import write_model
from modelfs_store.core import Store
from test_mount import LIVE, Mount, add_remote, origin, sha256_of  # noqa: F401 - origin is a fixture
from test_visibility import _fake_flatpak_root

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                       reason="!!! /dev/fuse is missing: the link mount tests CANNOT run on this machine !!!"),
    pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root to act as several users (setpriv) !!!"),
]

# What a reader reports about one path: what lstat says it is, and the SHA-256 of its bytes.
PROBE = """
import hashlib, json, os, stat, sys
path = sys.argv[1]
kind = "link" if stat.S_ISLNK(os.lstat(path).st_mode) else "file"
with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
print(json.dumps({"kind": kind, "sha256": digest}))
"""


class World:
    def __init__(self, top: Path, cli: CLI, mount: Mount, weights: Path) -> None:
        self.top, self.cli, self.mount, self.weights = top, cli, mount, weights
        self.sha = sha256_of(weights)

    @property
    def file(self) -> Path:
        return self.mount.path / "tiny" / "tiny-q4.gguf"

    def probe(self, *prefix: str, path: str | None = None) -> dict:
        r = subprocess.run([*prefix, "/usr/bin/python3", "-c", PROBE, path or str(self.file)], capture_output=True,
                           text=True, timeout=60, cwd="/")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def as_flatpak(self) -> dict:
        """The owner's uid in a mount namespace and a root of its own, with a .flatpak-info."""
        root = self.top / "fakeroot"
        script = (f"mount --bind /usr {root}/usr && mount --bind {self.mount.path} {root}/mnt && "
                  f"exec chroot {root} /usr/bin/python3 -c '{PROBE}' /mnt/tiny/tiny-q4.gguf")
        r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60,
                           cwd="/")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


def _world(owner: int) -> Iterator[tuple[Path, CLI, Path]]:
    top = Path(tempfile.mkdtemp(prefix="modelfs-links-", dir="/tmp"))
    top.chmod(0o755)
    store = top / "store"
    store.mkdir()
    cli = CLI(store)
    weights = write_model(top / "tiny-q4.gguf", name="tiny", tensor_bytes=3 << 20, seed=1)
    weights.chmod(0o644)
    cli.run("import", "tiny", str(weights))
    if owner != 0:
        thaw_tree(store)  # that owner's commits could not have set the flag
        for p in [store, *store.rglob("*")]:
            os.lchown(p, owner, owner)
    (top / "mnt").mkdir()
    os.chown(top / "mnt", owner, owner)
    try:
        yield top, cli, weights
    finally:
        thaw_tree(top)
        remove_tree(top)


@pytest.fixture
def world() -> Iterator[World]:
    for top, cli, weights in _world(0):
        _fake_flatpak_root(top / "fakeroot", "org.example.Flat")
        mount = Mount(cli, top / "mnt", "--allow-other", "--links", "auto")
        try:
            yield World(top, cli, mount, weights)
        finally:
            mount.stop()


def test_the_owner_sees_a_link_and_reads_the_blobs_bytes(world: World) -> None:
    blob = Store.open(world.cli.root).blobs.path(world.sha)  # opened as its owner, root
    assert world.probe() == {"kind": "link", "sha256": world.sha}
    assert os.readlink(world.file) == str(blob)
    assert os.readlink(world.mount.path / "tiny" / ".versions" / "1" / "tiny-q4.gguf") == str(blob)
    assert os.getxattr(world.file, "user.modelfs.sha256") == world.sha.encode()  # on the blob itself
    assert os.lstat(world.file).st_ino != os.stat(world.mount.path / "tiny" / "model.json").st_ino
    # The daemon never sees a link's reads: the lookup recorded the use.
    store = Store.open(world.cli.root)
    try:
        wait_for(lambda: store.catalog.get_model("tiny").last_used_at, 5, "last_used_at to be recorded")
    finally:
        store.close()


def test_no_other_caller_ever_sees_the_link(world: World) -> None:
    for _ in range(3):  # right after the owner's lookup, every time
        assert world.probe()["kind"] == "link"
        assert world.probe(*SETPRIV) == {"kind": "file", "sha256": world.sha}           # another uid
        assert world.probe()["kind"] == "link"
        assert world.as_flatpak() == {"kind": "file", "sha256": world.sha}              # a Flatpak app
        assert world.probe()["kind"] == "link"
        assert world.probe("unshare", "-m") == {"kind": "file", "sha256": world.sha}    # a container


READ_SLOWLY = """
import hashlib, mmap, os, stat, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY)
assert stat.S_ISREG(os.fstat(fd).st_mode)
h = hashlib.sha256(os.read(fd, 1 << 20))
print("half", flush=True)
sys.stdin.readline()                      # the owner looks the entry up meanwhile
while chunk := os.read(fd, 1 << 20):
    h.update(chunk)
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
print(h.hexdigest(), hashlib.sha256(m).hexdigest(), flush=True)
"""


def test_a_reader_of_the_regular_file_keeps_reading_while_the_owner_looks_it_up(world: World) -> None:
    reader = subprocess.Popen([*SETPRIV, "/usr/bin/python3", "-c", READ_SLOWLY, str(world.file)], cwd="/",
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "half"
        for _ in range(5):
            assert os.path.islink(world.file)
            assert sha256_of(world.file) == world.sha
        reader.stdin.write("go\n")
        reader.stdin.flush()
        out, err = reader.communicate(timeout=60)
    finally:
        reader.kill()
        reader.wait()
    assert reader.returncode == 0, err  # no EIO: the regular file's inode never became a link
    assert out.split() == [world.sha, world.sha]


def test_a_write_open_through_the_link_fails_for_root_too(world: World) -> None:
    store = Store.open(world.cli.root)
    try:
        immutable = store.blobs.marks(world.sha).immutable
    finally:
        store.close()
    if not immutable:  # a file system under /tmp that refuses chattr +i: root never gets the link
        assert world.probe() == {"kind": "file", "sha256": world.sha}
        with pytest.raises(OSError) as refused:
            os.open(world.file, os.O_WRONLY)
        assert refused.value.errno == errno.EROFS
        return
    assert os.path.islink(world.file)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_APPEND, os.O_WRONLY | os.O_TRUNC):
        with pytest.raises(PermissionError) as e:
            os.open(world.file, flags)
        assert e.value.errno == errno.EPERM  # the blob is immutable: root's modes do not apply
    for change in (lambda: os.chmod(world.file, 0o644), lambda: os.truncate(world.file, 0),
                   lambda: os.setxattr(world.file, "user.x", b"1")):
        with pytest.raises(PermissionError):
            change()
    assert sha256_of(world.file) == world.sha


@pytest.fixture
def nobodys() -> Iterator[tuple[Path, CLI, Mount, str]]:
    for top, cli, weights in _world(NOBODY):
        mount = Mount(cli, top / "mnt", "--allow-other", "--links", "auto")  # the daemon becomes nobody
        try:
            yield top, cli, mount, sha256_of(weights)
        finally:
            mount.stop()


WRITE = """
import errno, os, sys
try:
    os.open(sys.argv[1], os.O_WRONLY)
    print("opened")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def test_a_non_root_owner_gets_the_link_to_a_read_only_blob_and_root_the_file(nobodys) -> None:
    top, cli, mount, sha = nobodys
    f = mount.path / "tiny" / "tiny-q4.gguf"
    owner = World(top, cli, mount, top / "tiny-q4.gguf")
    assert owner.probe(*SETPRIV) == {"kind": "link", "sha256": sha}
    r = subprocess.run([*SETPRIV, "/usr/bin/python3", "-c", WRITE, str(f)], capture_output=True, text=True,
                       cwd="/", timeout=60)
    assert r.stdout.strip() == "EACCES"  # 0444, its owner's
    assert owner.probe() == {"kind": "file", "sha256": sha}  # root is not this store's owner
    with pytest.raises(OSError) as e:
        os.open(f, os.O_WRONLY)
    assert e.value.errno == errno.EROFS


def test_a_lazily_pulled_file_is_a_regular_file_until_it_is_local(world: World, origin) -> None:  # noqa: F811
    data = write_model(world.top / "r.gguf", tensor_bytes=4 << 20, seed=4).read_bytes()
    want = hashlib.sha256(data).hexdigest()
    store = Store.open(world.cli.root)
    try:
        add_remote(store, "remote", "r.gguf", data, origin.url("/r.gguf"))
    finally:
        store.close()
    origin.add("/r.gguf", data)
    path = world.mount.path / "remote" / "r.gguf"
    wait_for(lambda: path.parent.exists(), LIVE, "the model to show")
    assert not os.path.islink(path) and os.getxattr(path, "user.modelfs.state") == b"dehydrated"
    with open(path, "rb") as f:  # the fetch, then the regular file
        h = hashlib.sha256(f.read(1 << 20))
        assert os.path.islink(path)  # local now: the owner's next lookup finds the link
        assert sha256_of(path) == want
        h.update(f.read())  # the reader that opened it before reads to the end
    assert h.hexdigest() == want
    assert world.probe(*SETPRIV, path=str(path)) == {"kind": "file", "sha256": want}


HOLD_MAP = """
import hashlib, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
os.close(fd)                      # only the mapping holds the blob now
print(hashlib.sha256(m).hexdigest(), flush=True)
for line in sys.stdin:
    m.madvise(mmap.MADV_DONTNEED)
    print(hashlib.sha256(m).hexdigest(), flush=True)
"""


def test_rm_warns_about_a_link_reader_by_pid_and_leaves_its_bytes_intact(world: World) -> None:
    assert os.path.islink(world.file)
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD_MAP), str(world.file)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == world.sha
        status = world.cli.run("status", "--json").json()
        assert [(f["model"], f["pid"], f["via"]) for f in status["link_readers"]] == [("tiny", reader.pid, "link")]
        assert status["mount"]["open_files"] == []  # the daemon never saw it
        assert f"open: tiny: tiny-q4.gguf (pid {reader.pid})" in world.cli.run("status").stdout
        plan = world.cli.run("prune", "--max-bytes", "0", "--include-active", "--dry-run", "--json").json()
        assert plan["versions"] == []  # prune by policy never plans what a reader holds
        dry = world.cli.run("rm", "tiny", "--dry-run", "--json").json()
        assert [(f["pid"], f["via"], f["sha256"]) for f in dry["in_use"]] == [(reader.pid, "link", world.sha)]
        err = world.cli.run("rm", "tiny").stderr
        assert f"warning: tiny is open by 1 reader(s) (pid {reader.pid})" in err
        assert "deleted after the last close" in err
        wait_for(lambda: "tiny" not in os.listdir(world.mount.path), LIVE, "the model to leave the tree")
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        reader.stdin.write("again\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == world.sha  # the unlinked blob's bytes, intact
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)
