"""The pyfuse3 operations class without a kernel (S3QL's ``t3_fs_api.py`` is the model).

A :class:`Namespace` built from a small catalog snapshot, a real :class:`OpenFiles` over
a store with one local blob, and :class:`ModelOps` awaited under ``trio.run``
with a fake request context. ``readdir_reply`` needs a kernel's token, so the adapter
takes the reply function as an argument; here it is a reply buffer with room for a
chosen number of entries, as the kernel's page-sized buffer has.

What is checked: every way to write answers EROFS; readdir offsets resume where a full
buffer stopped; lookup, getattr and getxattr errors arrive as ``FUSEError`` with the
errno a reader expects; and cached attributes go when the kernel forgets the inode.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from modelfs.mount.fuse_ops import BLKSIZE, ModelOps
from modelfs.mount.openfiles import Materialiser, OpenFiles
from modelfs.mount.tree import CARD_NAME, ROOT_INODE, VERSIONS_DIR, Namespace, Snapshot
from modelfs_store.catalog import FileRecord
from modelfs_store.core import Store
from test_tree import entry, fr, version

DATA = bytes(range(256)) * 64  # the one local blob's bytes
SHA = hashlib.sha256(DATA).hexdigest()


@dataclass(frozen=True)
class Ctx:
    """What a handler reads of pyfuse3's RequestContext."""
    uid: int = 1000
    gid: int = 1000
    pid: int = 4242
    umask: int = 0o022


CTX = Ctx()
TOKEN = object()  # stands for pyfuse3.ReaddirToken, which only the kernel makes


class ReplyBuffer:
    """A fake ``pyfuse3.readdir_reply``: takes entries until ``room`` is used up, then
    answers False as the real one does when the kernel's buffer is full."""

    def __init__(self) -> None:
        self.room = 0
        self.entries: list[tuple[str, int, int]] = []   # (name, st_ino, next_id)

    def fresh(self, room: int) -> ReplyBuffer:
        self.room, self.entries = room, []
        return self

    def __call__(self, token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        assert token is TOKEN
        if len(self.entries) >= self.room:
            return False
        self.entries.append((os.fsdecode(name), attr.st_ino, next_id))
        return True


def snapshot() -> Snapshot:
    local = FileRecord("llama.gguf", "weights", len(DATA), SHA)
    return (
        entry("llama", [version("llama", 1, [fr("llama.gguf", 1, 1000)]),
                        version("llama", 2, [local, fr("mmproj-llama.gguf", 3, 30, "mmproj")])], active=2),
        entry("Alpha", [version("Alpha", 1, [fr("a.gguf", 7, 7)])]),
    )


@dataclass
class Fixture:
    ns: Namespace
    files: OpenFiles
    ops: ModelOps
    reply: ReplyBuffer

    def ino(self, path: str) -> int:
        node = self.ns.tree.root
        for part in filter(None, path.split("/")):
            node = self.ns.get(node.children[part])
        return node.ino

    def run(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        return trio.run(fn)

    def call(self, handler: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        async def main() -> Any:
            return await handler(*args)
        return trio.run(main)

    def errno_of(self, handler: Callable[..., Awaitable[Any]], *args: Any) -> int:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            self.call(handler, *args)
        return exc.value.errno

    def readdir(self, path: str, start_id: int, room: int) -> list[tuple[str, int, int]]:
        fh = self.call(self.ops.opendir, self.ino(path), CTX)
        self.reply.fresh(room)
        try:
            self.call(self.ops.readdir, fh, start_id, TOKEN)
        finally:
            self.call(self.ops.releasedir, fh)
        return self.reply.entries

    def cached(self) -> set[int]:
        return set(self.ops._attrs)


@pytest.fixture
def fx(tmp_path: Path) -> Iterator[Fixture]:
    src = tmp_path / "llama.gguf"
    src.write_bytes(DATA)
    store = Store.open(tmp_path / "store")
    assert store.blobs.import_file(src).sha256 == SHA
    ns = Namespace()
    ns.replace(snapshot())
    files = OpenFiles(Materialiser(store, None))
    reply = ReplyBuffer()
    ops = ModelOps(ns, files, lambda sha: "local" if store.blobs.has(sha) else "dehydrated", readdir_reply=reply)
    yield Fixture(ns, files, ops, reply)
    files.close_all()
    store.close()


# -- a read-only file system ------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["O_WRONLY", "O_RDWR", "O_TRUNC", "O_APPEND", "O_CREAT"])
@pytest.mark.parametrize("path", ["llama/llama.gguf", f"llama/{CARD_NAME}"])
def test_open_with_any_write_flag_is_erofs(fx: Fixture, flag: str, path: str) -> None:
    assert fx.errno_of(fx.ops.open, fx.ino(path), os.O_RDONLY | getattr(os, flag), CTX) == errno.EROFS
    assert len(fx.files) == 0  # refused before anything was opened


def _write_calls(fx: Fixture) -> dict[str, tuple[Any, ...]]:
    """Every handler that would change the tree or a file, with plausible arguments."""
    f, d = fx.ino("llama/llama.gguf"), fx.ino("llama")
    return {
        "write": (1, 0, b"x"),
        "create": (d, b"new", stat.S_IFREG | 0o644, os.O_WRONLY | os.O_CREAT, CTX),
        "mkdir": (d, b"dir", 0o755, CTX),
        "mknod": (d, b"node", stat.S_IFIFO | 0o644, 0, CTX),
        "unlink": (d, b"llama.gguf", CTX),
        "rmdir": (d, VERSIONS_DIR.encode(), CTX),
        "rename": (d, b"llama.gguf", d, b"other.gguf", 0, CTX),
        "setattr": (f, pyfuse3.EntryAttributes(), None, None, CTX),
        "setxattr": (f, b"user.x", b"1", CTX),
        "removexattr": (f, b"user.modelfs.sha256", CTX),
        "symlink": (d, b"link", b"llama.gguf", CTX),
        "link": (f, d, b"hard.gguf", CTX),
    }


@pytest.mark.parametrize("name", ["write", "create", "mkdir", "mknod", "unlink", "rmdir", "rename", "setattr",
                                  "setxattr", "removexattr", "symlink", "link"])
def test_every_write_handler_is_erofs(fx: Fixture, name: str) -> None:
    before = fx.ns.tree
    assert fx.errno_of(getattr(fx.ops, name), *_write_calls(fx)[name]) == errno.EROFS
    assert fx.ns.tree is before


def test_reads_go_through_the_open_file_table(fx: Fixture) -> None:
    async def main() -> None:
        f = fx.ino("llama/llama.gguf")
        info = await fx.ops.open(f, os.O_RDONLY, CTX)
        assert (info.keep_cache, info.direct_io) == (True, False)
        assert bytes(await fx.ops.read(info.fh, 100, 50)) == DATA[100:150]
        await fx.ops.release(info.fh)
        card = await fx.ops.open(fx.ino(f"llama/{CARD_NAME}"), os.O_RDONLY, CTX)
        assert bytes(await fx.ops.read(card.fh, 0, 1 << 20)) == fx.ns.get(fx.ino(f"llama/{CARD_NAME}")).data
        await fx.ops.release(card.fh)

    fx.run(main)
    assert len(fx.files) == 0


def test_attributes_of_a_looked_up_file(fx: Fixture) -> None:
    a = fx.call(fx.ops.lookup, fx.ino("llama"), b"llama.gguf", CTX)
    assert a.st_ino == fx.ino("llama/llama.gguf") and a.st_size == len(DATA)
    assert stat.S_ISREG(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o444
    assert (a.st_nlink, a.st_uid, a.st_gid, a.st_blksize) == (2, os.getuid(), os.getgid(), BLKSIZE)
    assert fx.call(fx.ops.getattr, a.st_ino, CTX) is a  # one cached object per node


# -- readdir offsets -------------------------------------------------------------------------------------
MODEL_LISTING = [VERSIONS_DIR, "llama.gguf", "mmproj-llama.gguf", CARD_NAME]


def test_readdir_from_the_start(fx: Fixture) -> None:
    got = fx.readdir("llama", 0, room=100)
    assert [(n, i) for n, _, i in got] == [(n, i) for i, n in enumerate(MODEL_LISTING, 1)]
    assert [ino for _, ino, _ in got] == [fx.ino(f"llama/{n}") for n in MODEL_LISTING]
    assert all(fx.ns.lookup_count(ino) == 1 for _, ino, _ in got)  # readdirplus: the kernel holds them


def test_readdir_resumes_after_a_full_buffer_with_nothing_skipped_or_repeated(fx: Fixture) -> None:
    first = fx.readdir("llama", 0, room=2)
    assert [n for n, _, _ in first] == MODEL_LISTING[:2]
    refused = fx.ino(f"llama/{MODEL_LISTING[2]}")
    assert fx.ns.lookup_count(refused) == 0       # the entry that did not fit was not handed over
    assert refused not in fx.cached()
    rest = fx.readdir("llama", first[-1][2], room=1)
    rest += fx.readdir("llama", rest[-1][2], room=100)
    assert [n for n, _, _ in first + rest] == MODEL_LISTING
    assert [i for _, _, i in first + rest] == [1, 2, 3, 4]
    assert all(fx.ns.lookup_count(ino) == 1 for _, ino, _ in first + rest)


@pytest.mark.parametrize("past", [0, 1, 1000])
def test_readdir_past_the_end_is_empty(fx: Fixture, past: int) -> None:
    assert fx.readdir("llama", len(MODEL_LISTING) + past, room=100) == []


def test_readdir_of_the_root_and_a_version_dir(fx: Fixture) -> None:
    assert [n for n, _, _ in fx.readdir("", 0, room=100)] == ["Alpha", "llama"]
    assert [n for n, _, _ in fx.readdir(f"llama/{VERSIONS_DIR}", 1, room=100)] == ["2"]


# -- errnos -----------------------------------------------------------------------------------------------
def test_lookup_and_getattr_of_what_is_not_there_is_enoent(fx: Fixture) -> None:
    assert fx.errno_of(fx.ops.lookup, ROOT_INODE, b"nope", CTX) == errno.ENOENT
    assert fx.errno_of(fx.ops.lookup, fx.ino("llama"), b"llama.gguf.part", CTX) == errno.ENOENT
    assert fx.errno_of(fx.ops.getattr, 10**9, CTX) == errno.ENOENT
    assert fx.errno_of(fx.ops.getxattr, 10**9, b"user.modelfs.sha256", CTX) == errno.ENOENT
    assert fx.errno_of(fx.ops.opendir, 10**9, CTX) == errno.ENOENT


def test_getxattr_answers_enodata_and_eopnotsupp(fx: Fixture) -> None:
    f = fx.ino("llama/llama.gguf")
    assert fx.call(fx.ops.getxattr, f, b"user.modelfs.sha256", CTX) == SHA.encode()
    assert fx.call(fx.ops.getxattr, f, b"user.modelfs.state", CTX) == b"local"
    assert fx.call(fx.ops.getxattr, fx.ino(f"llama/{VERSIONS_DIR}/1/llama.gguf"), b"user.modelfs.state",
                   CTX) == b"dehydrated"
    assert fx.errno_of(fx.ops.getxattr, f, b"user.other", CTX) == errno.ENODATA
    assert fx.errno_of(fx.ops.getxattr, fx.ino("llama"), b"user.modelfs.sha256", CTX) == errno.ENODATA
    for name in (b"security.selinux", b"system.posix_acl_access", b"trusted.x"):
        assert fx.errno_of(fx.ops.getxattr, f, name, CTX) == errno.EOPNOTSUPP
    assert sorted(fx.call(fx.ops.listxattr, f, CTX)) == [
        b"user.modelfs.sha256", b"user.modelfs.source", b"user.modelfs.state", b"user.modelfs.version"]
    assert fx.call(fx.ops.listxattr, fx.ino("llama"), CTX) == []


def test_open_of_bytes_that_are_not_local_is_eio_without_a_downloader(fx: Fixture) -> None:
    assert fx.errno_of(fx.ops.open, fx.ino(f"llama/{VERSIONS_DIR}/1/llama.gguf"), os.O_RDONLY, CTX) == errno.EIO
    assert len(fx.files) == 0


# -- forget: cached attributes live as long as the kernel holds the inode -----------------------------------
def test_forget_drops_the_cached_attributes_at_a_count_of_zero(fx: Fixture) -> None:
    d = fx.ino("llama")
    f = fx.call(fx.ops.lookup, d, b"llama.gguf", CTX).st_ino
    fx.call(fx.ops.lookup, d, b"llama.gguf", CTX)
    assert f in fx.cached()
    fx.call(fx.ops.forget, [(f, 1)])
    assert f in fx.cached()                # the kernel still holds one reference
    fx.call(fx.ops.forget, [(f, 1)])
    assert f not in fx.cached()
    assert fx.call(fx.ops.lookup, d, b"llama.gguf", CTX).st_ino == f  # and comes back when asked again


def test_forget_of_a_removed_file_drops_it_everywhere(fx: Fixture) -> None:
    a = fx.call(fx.ops.lookup, fx.ino("Alpha"), b"a.gguf", CTX).st_ino
    fx.ns.replace(tuple(e for e in snapshot() if e.model.name != "Alpha"))   # rm Alpha
    assert fx.call(fx.ops.getattr, a, CTX).st_ino == a                        # still answerable
    fx.call(fx.ops.forget, [(a, 1)])
    assert a not in fx.cached()
    assert fx.errno_of(fx.ops.getattr, a, CTX) == errno.ENOENT


def test_entries_of_a_listing_are_cached_until_forgotten(fx: Fixture) -> None:
    listed = [ino for _, ino, _ in fx.readdir("llama", 0, room=100)]
    assert set(listed) <= fx.cached()
    fx.call(fx.ops.forget, [(ino, 1) for ino in listed])
    assert fx.cached() <= {ROOT_INODE}


def test_a_long_lived_daemon_keeps_only_what_the_kernel_holds(fx: Fixture) -> None:
    """Many catalog changes, each giving the file new bytes (a new inode), each looked
    up, listed and forgotten: the cache does not grow with the daemon's age."""
    for n in range(50):
        fx.ns.replace((entry("m", [version("m", 1, [fr("m.gguf", 100 + n)])]),))
        d = fx.call(fx.ops.lookup, ROOT_INODE, b"m", CTX).st_ino
        f = fx.call(fx.ops.lookup, d, b"m.gguf", CTX).st_ino
        fx.call(fx.ops.getattr, f, CTX)
        listed = [ino for _, ino, _ in fx.readdir("m", 0, room=100)]
        fx.call(fx.ops.forget, [(d, 1), (f, 1), *((ino, 1) for ino in listed)])
    assert fx.cached() <= {ROOT_INODE}
    assert not fx.ns.retired
