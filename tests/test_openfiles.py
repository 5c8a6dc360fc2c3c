"""The open-file table without a kernel mount: real blobs on disk, the real page cache.

The daemon drops the blob's page-cache copy behind what it serves (the mount's copy is
the one kept), which ``mincore`` on a mapping of the blob shows.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from modelfs.mount.openfiles import Materialiser, OpenFiles
from modelfs.mount.tree import Caller, Inode, Node
from modelfs_store.catalog import FileRecord
from modelfs_store.core import Store

MB = 1 << 20
PAGE = mmap.PAGESIZE
SIZE = 96 * MB
ME = Caller(os.getuid(), os.getgid(), os.getpid())

_libc = ctypes.CDLL(None, use_errno=True)


def resident(path: Path, start: int, end: int) -> float:
    """The fraction of the pages of ``path`` in [start, end) that are in the page cache."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m)) + start
        pages = (end - start) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(end - start), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec) / pages


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def blob(tmp_path: Path) -> Iterator[tuple[Store, Node, Path, bytes]]:
    src = tmp_path / "m.gguf"
    data = os.urandom(SIZE)  # what the reads must return; reading the blob would cache it
    src.write_bytes(data)
    store = Store.open(tmp_path / "store")
    committed = store.blobs.import_file(src)
    path = store.blobs.path(committed.sha256)
    node = Node(Inode(2), Inode(1), "file", SIZE, 0, model="m", version=1,
                file=FileRecord("m.gguf", "weights", SIZE, committed.sha256))
    yield store, node, path, data
    store.close()


def test_a_sequential_pass_leaves_one_copy_in_memory(blob) -> None:
    """What the daemon serves lives on in the mount's page cache; its own reads of the
    blob are dropped behind it, so a model is not cached twice ('inline-keep' is the
    benchmark's control)."""
    store, node, path, data = blob
    drop(path)
    if resident(path, 0, SIZE) > 0.01:
        pytest.skip(f"{path.parent} keeps every page in memory (tmpfs?): residency says nothing here")
    shares = {}
    for mode in ("inline", "inline-keep"):
        files = OpenFiles(Materialiser(store, None), read_mode=mode)

        async def main(files: OpenFiles) -> None:
            fh = await files.open(node, ME)
            for off in range(0, SIZE, MB):
                assert bytes(await files.read(fh, off, MB)) == data[off:off + MB]
            files.release(fh)

        trio.run(main, files)
        files.close_all()
        shares[mode] = resident(path, 0, SIZE)
        drop(path)
    assert shares["inline"] < 0.1 and shares["inline-keep"] > 0.9, shares


def test_every_read_mode_keeps_no_descriptor_after_release(blob) -> None:
    store, node, path, data = blob
    for mode in ("inline", "inline-keep", "direct", "thread", "mmap"):
        files = OpenFiles(Materialiser(store, None), read_mode=mode)
        before = open_fds()

        async def main(files: OpenFiles) -> None:
            fh = await files.open(node, ME)
            assert bytes(await files.read(fh, SIZE - MB, MB)) == data[-MB:]
            files.release(fh)

        trio.run(main, files)
        files.close_all()
        assert open_fds() == before, mode
