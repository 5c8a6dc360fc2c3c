"""Readers of a blob outside the mount (modelfs/mount/holders.py), found in the real
``/proc``: a process holding the blob open, one that only maps it (its descriptor
closed), and what is not counted: another file, the daemon's own descriptors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufgen import write_model
from modelfs.mount.holders import link_readers
from modelfs_store.core import Store

HOLD = """
    import mmap, os, sys
    fd = os.open(sys.argv[2], os.O_RDONLY)
    if sys.argv[1] == "map":
        m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        os.close(fd)  # only the mapping holds it now
    print("ready", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store")
    for n in (1, 2):
        s.import_model(f"m{n}", write_model(tmp_path / f"w{n}.gguf", tensor_bytes=8192, seed=n))
    s.import_model("twin", tmp_path / "w2.gguf")  # the same bytes under a second name
    yield s
    s.close()


def hold(how: str, path: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), how, str(path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_readers_by_descriptor_and_by_mapping_and_only_them(store, tmp_path):
    rows = store.catalog.all_files()
    sha = {m: r.sha256 for m, _, r in rows}
    opened = hold("open", store.blobs.path(sha["m1"]))
    mapped = hold("map", store.blobs.path(sha["m2"]))
    other = hold("open", tmp_path / "w1.gguf")  # the same bytes, not the blob
    try:
        found = {(f["model"], f["pid"], f["via"]) for f in link_readers(store.blobs, rows)}
        assert found == {("m1", opened.pid, "link"), ("m2", mapped.pid, "link"), ("twin", mapped.pid, "link")}
        skipped = link_readers(store.blobs, rows, skip=[opened.pid])  # a daemon's own descriptors
        assert {f["pid"] for f in skipped} == {mapped.pid}
    finally:
        for p in (opened, mapped, other):
            p.stdin.close()
            p.wait(timeout=30)
    assert link_readers(store.blobs, rows) == []
