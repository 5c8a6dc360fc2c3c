"""The link fast path as plain logic, no kernel (modelfs/mount/links.py and the tree's
link twins): who gets a local file as a symbolic link to its blob, each condition on
its own against a fake ``/proc``; which blobs may stand behind a link; the two inode
numbers, their timeouts, listing and readlink; the re-announcement of a file that
became local and the last-used time recorded at lookup.

tests/test_link_mount.py replays the same rules through a real mount.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import pyfuse3
import pytest
import trio

from modelfs.mount.fuse_ops import ModelOps
from modelfs.mount.identity import Place, Resolver
from modelfs.mount.links import FastPath
from modelfs.mount.openfiles import Materialiser, OpenFiles
from modelfs.mount.tree import CALLER_TIMEOUT, LINK_MODE, LONG_TIMEOUT, Caller, Namespace, NotALink, attr
from modelfs_store import seal
from modelfs_store.catalog import FileRecord
from modelfs_store.core import Store
from modelfs_store.download import FetchResult
from modelfs_store.errors import NotFound
from test_tree import entry, version

OWNER = 1000
PID = 4242


# -- a fake /proc ------------------------------------------------------------------------------------
class Proc:
    """``self`` (the daemon) and one process at a time, with a root and a mount namespace."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.dir = top / "proc"
        (top / "realroot").mkdir()
        (top / "elsewhere").mkdir()
        (top / "mnt-ns").write_text("")
        (top / "other-ns").write_text("")
        self._task("self", root=top / "realroot", mnt=top / "mnt-ns")

    def _task(self, name: str, *, root: Path, mnt: Path, cgroup: str = "0::/user.slice/session-2.scope\n",
              flatpak: bool = False) -> None:
        d = self.dir / name
        (d / "ns").mkdir(parents=True, exist_ok=True)
        for link, to in (("root", root), ("ns/mnt", mnt)):
            (d / link).unlink(missing_ok=True)
            (d / link).symlink_to(to)
        (d / "status").write_text(f"Name:\tx\nTgid:\t{name}\n")
        (d / "stat").write_text(f"{name} (x) S " + " ".join(["0"] * 18) + " 100 0 0\n")
        (d / "cgroup").write_text(cgroup)
        if flatpak:
            info = root / ".flatpak-info"
            info.write_text("[Application]\nname=org.example.Flat\n")

    def process(self, **kw: object) -> Resolver:
        """Process PID as described (default: the daemon's place, no app id)."""
        kw.setdefault("root", self.top / "realroot")
        kw.setdefault("mnt", self.top / "mnt-ns")
        self._task(str(PID), **kw)  # type: ignore[arg-type]
        return Resolver(proc=self.dir)


@pytest.fixture
def proc(tmp_path: Path) -> Proc:
    return Proc(tmp_path)


class Blobs:
    """A BlobStore stand-in: real files, marks set by hand, seal calls counted."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.sealed: list[str] = []
        self.can_seal = True

    def path(self, sha256: str) -> Path:
        return self.top / "blobs" / sha256

    def add(self, sha256: str, *, digest: bool = True, immutable: bool = False, mode: int = 0o444) -> Path:
        p = self.path(sha256)
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
        p.chmod(mode)
        self.marks_of = getattr(self, "marks_of", {})
        self.marks_of[sha256] = seal.Marks(digest, immutable)
        return p

    def marks(self, sha256: str) -> seal.Marks:
        if not self.path(sha256).exists():
            raise FileNotFoundError(sha256)
        return self.marks_of[sha256]

    def seal(self, sha256: str) -> seal.Marks:
        self.sealed.append(sha256)
        if self.can_seal:
            self.marks_of[sha256] = seal.Marks(True, True)
        return self.marks_of[sha256]


def fast(proc: Proc, blobs: Blobs, mode: str = "auto", **kw: object) -> FastPath:
    resolver = proc.process(**kw)
    return FastPath(mode, OWNER, resolver, blobs)


ME = Caller(OWNER, OWNER, PID)
SHA = "ab" * 32


# -- who may follow ------------------------------------------------------------------------------------
def test_the_owners_unsandboxed_process_at_the_daemons_place_follows(proc, tmp_path):
    f = fast(proc, Blobs(tmp_path))
    assert f.here == Resolver(proc=proc.dir).place(PID)
    assert f.follows(ME)
    registered = fast(proc, Blobs(tmp_path), cgroup="0::/user.slice/app-org.example.Chat-1.scope\n")
    assert registered.follows(ME)  # an app id without a sandbox: it could read the store anyway


@pytest.mark.parametrize("why", ["another uid", "another mount namespace", "another root", "a chroot into /",
                                 "flatpak", "snap", "pid 0", "unreadable", "never"])
def test_every_other_caller_gets_the_regular_file(proc, tmp_path, why):
    caller, kw, mode = ME, {}, "auto"
    if why == "another uid":
        caller = Caller(OWNER + 1, OWNER + 1, PID)
    elif why == "another mount namespace":
        kw = {"mnt": tmp_path / "other-ns"}
    elif why == "another root":
        kw = {"root": tmp_path / "elsewhere"}
    elif why == "a chroot into /":  # the same directory, named by another path
        (tmp_path / "bind").symlink_to(tmp_path / "realroot")
        kw = {"root": tmp_path / "bind"}
    elif why == "flatpak":
        kw = {"flatpak": True}
    elif why == "snap":
        kw = {"cgroup": "0::/user.slice/snap.firefox.firefox.abc.scope\n"}
    elif why == "pid 0":
        caller = Caller(OWNER, OWNER, 0)
    elif why == "never":
        mode = "never"
    f = fast(proc, Blobs(tmp_path), mode, **kw)
    if why == "unreadable":
        os.unlink(proc.dir / str(PID) / "ns" / "mnt")
    assert not f.follows(caller)


# -- which blobs may stand behind a link -----------------------------------------------------------------
def test_a_blob_stands_behind_a_link_only_when_local_read_only_and_sealed(proc, tmp_path):
    blobs = Blobs(tmp_path)
    f = fast(proc, blobs)
    assert not f.ready(SHA, as_root=False)                      # not local yet
    blobs.add(SHA, digest=True, immutable=False)
    assert f.ready(SHA, as_root=False)                          # 0444 stops a non-root owner
    assert not f.ready("cd" * 32, as_root=False)
    blobs.add("ef" * 32, mode=0o644)
    assert not f.ready("ef" * 32, as_root=False)                # writable: never behind a link


def test_root_needs_an_immutable_blob(proc, tmp_path):
    blobs = Blobs(tmp_path)
    blobs.can_seal = False  # a file system without the flag
    blobs.add(SHA, digest=True, immutable=False)
    f = fast(proc, blobs)
    assert not f.ready(SHA, as_root=True)
    blobs.add("cd" * 32, digest=True, immutable=True)
    assert f.ready("cd" * 32, as_root=True)


def test_a_blob_from_before_the_marks_is_sealed_once(proc, tmp_path):
    blobs = Blobs(tmp_path)
    blobs.add(SHA, digest=False)
    f = fast(proc, blobs)
    assert f.ready(SHA, as_root=True)
    assert f.ready(SHA, as_root=True)
    assert blobs.sealed == [SHA]
    blobs.can_seal = False
    blobs.add("cd" * 32, digest=False)
    assert not f.ready("cd" * 32, as_root=False) and not f.ready("cd" * 32, as_root=False)
    assert blobs.sealed == [SHA, "cd" * 32]  # a failed seal is not retried on every lookup


# -- the tree's two inodes ---------------------------------------------------------------------------------
class Chooser:
    """A link chooser that allows one caller and has every file local."""

    enabled = True

    def __init__(self, who: Caller | None = ME) -> None:
        self.who = who

    def target(self, rec: FileRecord) -> str:
        return f"/store/blobs/sha256/{rec.sha256[:2]}/{rec.sha256}"

    def for_caller(self, caller: Caller):
        return lambda node: caller == self.who and node.kind == "file"


def rec(n: int) -> FileRecord:
    return FileRecord(f"w{n}.gguf", "weights", 100 + n, f"{n:064x}")


def linked_ns(chooser: Chooser | None = None) -> Namespace:
    ns = Namespace(links=chooser or Chooser())
    ns.replace((entry("m", [version("m", 1, [rec(1)]), version("m", 2, [rec(2), rec(3)])]),))
    return ns


OTHER = Caller(OWNER + 1, OWNER + 1, 7)


def lookup(ns: Namespace, path: str, who: Caller):
    node = ns.tree.root
    for part in path.split("/"):
        node = ns.lookup(node.ino, part, who)
    return node


def test_the_owner_gets_the_link_and_everyone_else_the_file_two_inodes_never_cached():
    ns = linked_ns()
    link, file = lookup(ns, "m/w2.gguf", ME), lookup(ns, "m/w2.gguf", OTHER)
    assert (link.kind, file.kind) == ("link", "file") and link.ino != file.ino
    assert (link.twin, file.twin) == (file.ino, link.ino)
    a, b = attr(link), attr(file)
    assert a.mode == LINK_MODE and a.size == len(Chooser().target(rec(2)))
    assert (a.entry_timeout, a.attr_timeout) == (CALLER_TIMEOUT, CALLER_TIMEOUT) == (0, 0)
    assert b.entry_timeout == 0 and stat.S_ISREG(b.mode)
    assert b.attr_timeout == LONG_TIMEOUT  # the same for all who hold it: a read must not cost a GETATTR
    assert lookup(ns, "m/.versions/2/w2.gguf", ME) is link  # one twin for both names of the file
    assert attr(lookup(ns, "m/model.json", ME)).entry_timeout == LONG_TIMEOUT  # no twin: cached as before
    assert ns.lookup_count(link.ino) == 2 and ns.lookup_count(file.ino) == 1


def test_without_a_chooser_files_have_no_twin_and_long_timeouts():
    ns = Namespace()
    ns.replace((entry("m", [version("m", 1, [rec(1)])]),))
    f = lookup(ns, "m/w1.gguf", ME)
    assert f.kind == "file" and not f.twin and attr(f).entry_timeout == LONG_TIMEOUT
    assert not any(n.kind == "link" for n in ns.tree.nodes.values())


def test_a_listing_shows_each_caller_its_variant():
    ns = linked_ns()
    model = lookup(ns, "m", ME)
    mine = dict(ns.listing(model.ino, ME))
    theirs = dict(ns.listing(model.ino, OTHER))
    assert mine["w2.gguf"].kind == "link" and theirs["w2.gguf"].kind == "file"
    assert mine["model.json"] is theirs["model.json"]


def test_readlink_answers_only_a_caller_that_would_get_the_link():
    ns = linked_ns()
    link = lookup(ns, "m/w2.gguf", ME)
    assert ns.readlink(link.ino, ME) == Chooser().target(rec(2))
    with pytest.raises(NotFound):
        ns.readlink(link.ino, OTHER)
    with pytest.raises(NotALink):
        ns.readlink(link.twin, ME)


def test_the_names_of_a_file_to_re_announce():
    ns = linked_ns()
    f = lookup(ns, "m/w2.gguf", OTHER)
    model, v2 = lookup(ns, "m", ME), lookup(ns, "m/.versions/2", ME)
    assert sorted(ns.names_of(f.ino)) == sorted([(model.ino, "w2.gguf"), (v2.ino, "w2.gguf")])
    assert ns.names_of(10**9) == []


def test_a_held_link_stays_answerable_after_its_model_is_removed():
    ns = linked_ns()
    link = lookup(ns, "m/w2.gguf", ME)
    ns.replace(())
    assert ns.get(link.ino) is link
    ns.forget([(link.ino, 1)])
    with pytest.raises(NotFound):
        ns.get(link.ino)


# -- the adapter -------------------------------------------------------------------------------------------
DATA = b"GGUF" + bytes(range(256)) * 16


class Ctx:
    def __init__(self, who: Caller) -> None:
        self.uid, self.gid, self.pid, self.umask = who.uid, who.gid, who.pid, 0o22


def test_readlink_and_lookup_through_the_adapter_and_the_use_they_record(tmp_path):
    store = Store.open(tmp_path / "store")
    try:
        files = OpenFiles(Materialiser(store, None))
        ns = linked_ns()
        ops = ModelOps(ns, files, lambda sha: "local")
        model = lookup(ns, "m", ME)

        async def main() -> None:
            theirs = await ops.lookup(model.ino, b"w2.gguf", Ctx(OTHER))
            assert files.pending_touch == set()  # a regular file's use is recorded at open
            mine = await ops.lookup(model.ino, b"w2.gguf", Ctx(ME))
            assert stat.S_ISLNK(mine.st_mode) and stat.S_ISREG(theirs.st_mode)
            assert files.pending_touch == {"m"}  # the daemon never sees a link's reads
            assert await ops.readlink(mine.st_ino, Ctx(ME)) == Chooser().target(rec(2)).encode()
            for ino, who, number in ((mine.st_ino, OTHER, errno.ENOENT), (theirs.st_ino, ME, errno.EINVAL)):
                with pytest.raises(pyfuse3.FUSEError) as e:
                    await ops.readlink(ino, Ctx(who))
                assert e.value.errno == number

        trio.run(main)
    finally:
        store.close()


def test_a_file_fetched_on_open_is_announced_as_local(tmp_path):
    store = Store.open(tmp_path / "store")
    sha = hashlib.sha256(DATA).hexdigest()
    src = tmp_path / "w.gguf"
    src.write_bytes(DATA)
    announced = []

    class Fetcher:
        async def ensure(self, rec: FileRecord, progress: object = None) -> FetchResult:
            committed = store.blobs.import_file(src)
            return FetchResult(sha, len(DATA), committed.path, True, None, None, len(DATA))

        async def aclose(self) -> None:
            pass

    try:
        ns = Namespace()
        ns.replace((entry("m", [version("m", 1, [FileRecord("w.gguf", "weights", len(DATA), sha, "https://x/w")])]),))
        node = lookup(ns, "m/w.gguf", ME)
        files = OpenFiles(Materialiser(store, Fetcher(), on_local=announced.append))

        async def main() -> None:
            fh = await files.open(node, ME)
            assert await files.read(fh, 0, 4) == b"GGUF"
            assert announced == [node]
            files.release(fh)
            files.release(await files.open(node, ME))  # already local: nothing to announce
            assert announced == [node]

        trio.run(main)
    finally:
        store.close()


def test_the_daemons_own_place_is_read_from_proc():
    here = Resolver().place("self")
    assert isinstance(here, Place) and here.root[2] == "/"
    assert here == Resolver().place(os.getpid())
