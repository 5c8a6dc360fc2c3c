"""The mount's tree as pure logic, and the adapter's error translation, with no kernel
(DESIGN §7, layer 1)."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from dataclasses import replace

import pytest
import trio

from modelfs.mount import tree
from modelfs.mount.errnos import errno_for
from modelfs.mount.tree import (
    CARD_NAME,
    LONG_TIMEOUT,
    ROOT_INODE,
    VERSIONS_DIR,
    Caller,
    InodeMap,
    ModelEntry,
    Namespace,
    NoAttribute,
    build,
    diff,
    load_snapshot,
)
from modelfs_store.catalog import Catalog, FileRecord, ModelRecord, VersionRecord
from modelfs_store.errors import (
    Conflict,
    FetchError,
    FetchTimeout,
    IntegrityError,
    InternalError,
    NotFound,
    OfflineError,
    SpaceError,
    StoreError,
    TrustError,
    UsageError,
)

ME = Caller(1000, 1000, 4242)


def sha(n: int) -> str:
    return f"{n:064x}"


def fr(name: str, n: int, size: int = 100, role: str = "weights", url: str | None = None) -> FileRecord:
    return FileRecord(name, role, size, sha(n), url)


def version(model: str, v: int, files: list[FileRecord], state: str = "installed", **card) -> VersionRecord:
    base = {k: None for k in ("key_id", "payload_sha256", "source", "license", "source_url", "family",
                              "architecture", "quantization", "context_length", "min_device",
                              "compat_notes", "runtime_params", "expires")}
    base.update(created_at=1000.0 + v, installed_at=1000.0 + v if state == "installed" else None,
                source=f"import:{model}.gguf")
    base.update(card)
    return VersionRecord(model, v, state, False, base, tuple(sorted(files, key=lambda f: f.filename)))


def entry(name: str, versions: list[VersionRecord], active: int | None = None, last_good: int | None = None,
          pinned: bool = False, last_used: float | None = None) -> ModelEntry:
    active = active if active is not None else (versions[-1].version if versions else None)
    return ModelEntry(ModelRecord(name, active, last_good, None, "shared", 999.0, last_used),
                      tuple(versions), pinned)


def names(ns: Namespace, ino: int) -> list[str]:
    return [n for n, _ in ns.listing(ino, ME)]


def walk(ns: Namespace, path: str) -> tree.Node:
    node = ns.tree.root
    for part in filter(None, path.split("/")):
        node = ns.lookup(node.ino, part, ME)
    return node


@pytest.fixture
def ns() -> Namespace:
    n = Namespace()
    n.replace((
        entry("llama", [version("llama", 1, [fr("llama.gguf", 1, 1000)]),
                        version("llama", 2, [fr("llama.gguf", 2, 2000), fr("mmproj-llama.gguf", 3, 30, "mmproj")]),
                        version("llama", 3, [fr("llama.gguf", 9, 5)], state="partial")], active=2, last_good=1),
        entry("coreml", [version("coreml", 1, [fr("enc.mlmodelc/model.mil", 4, 10, "aux"),
                                                fr("enc.mlmodelc/weights/weight.bin", 5, 20, "aux"),
                                                fr("base.gguf", 6, 40)])]),
        entry("Alpha", [version("Alpha", 1, [fr("a.gguf", 7, 7)])]),
    ))
    return n


# -- layout ---------------------------------------------------------------------------------
def test_root_lists_one_sorted_dir_per_model(ns):
    assert names(ns, ROOT_INODE) == ["Alpha", "coreml", "llama"]
    assert all(n.is_dir and n.top_level for _, n in ns.listing(ROOT_INODE, ME))


def test_model_dir_shows_active_version_card_and_versions(ns):
    m = walk(ns, "llama")
    assert names(ns, m.ino) == [VERSIONS_DIR, "llama.gguf", "mmproj-llama.gguf", CARD_NAME]
    assert walk(ns, "llama/llama.gguf").file.sha256 == sha(2)
    # installed versions only; the partial one (3) is not a path yet
    assert names(ns, walk(ns, f"llama/{VERSIONS_DIR}").ino) == ["1", "2"]
    assert walk(ns, f"llama/{VERSIONS_DIR}/1/llama.gguf").file.sha256 == sha(1)
    assert names(ns, walk(ns, f"llama/{VERSIONS_DIR}/2").ino) == ["llama.gguf", "mmproj-llama.gguf"]


def test_listings_are_sorted_everywhere(ns):
    for node in ns.tree.nodes.values():
        if node.is_dir:
            listed = names(ns, node.ino)
            assert listed == sorted(listed)


def test_archive_members_become_nested_dirs(ns):
    assert names(ns, walk(ns, "coreml").ino) == [VERSIONS_DIR, "base.gguf", "enc.mlmodelc", CARD_NAME]
    assert names(ns, walk(ns, "coreml/enc.mlmodelc").ino) == ["model.mil", "weights"]
    w = walk(ns, "coreml/enc.mlmodelc/weights/weight.bin")
    assert (w.size, w.file.sha256) == (20, sha(5))
    assert walk(ns, f"coreml/{VERSIONS_DIR}/1/enc.mlmodelc/weights/weight.bin") is w
    assert walk(ns, "coreml/enc.mlmodelc").nlink == 3  # '.', its entry, and 'weights/..'


def test_dot_and_dotdot_lookups(ns):
    d = walk(ns, "coreml/enc.mlmodelc")
    assert ns.lookup(d.ino, ".", ME) is d
    assert ns.lookup(d.ino, "..", ME) is walk(ns, "coreml")
    assert ns.lookup(ROOT_INODE, "..", ME).ino == ROOT_INODE


def test_missing_names_are_not_found(ns):
    with pytest.raises(NotFound):
        ns.lookup(ROOT_INODE, "nope", ME)
    with pytest.raises(NotFound):
        walk(ns, "llama/.versions/3")  # partial
    with pytest.raises(NotFound):
        ns.get(10**9)


def test_a_model_without_an_active_version_still_lists_its_card():
    ns = Namespace()
    ns.replace((entry("pending", [version("pending", 1, [fr("p.gguf", 1)], state="partial")], active=None),))
    assert names(ns, walk(ns, "pending").ino) == [VERSIONS_DIR, CARD_NAME]


# -- attributes ---------------------------------------------------------------------------
def test_exact_sizes_modes_and_mtimes(ns):
    f = tree.attr(walk(ns, "llama/llama.gguf"))
    assert (f.size, f.mode, f.blocks) == (2000, stat.S_IFREG | 0o444, 4)
    assert f.mtime_ns == int(1002.0 * 1e9)
    d = tree.attr(walk(ns, "llama"))
    assert d.mode == stat.S_IFDIR | 0o555
    card = walk(ns, f"llama/{CARD_NAME}")
    assert tree.attr(card).size == len(card.data)


def test_caller_dependent_entries_are_never_cached_and_immutable_ones_are(ns):
    assert tree.attr(walk(ns, "llama")).entry_timeout == LONG_TIMEOUT  # AllowAll: same for everyone
    ns.visibility = OnlyOwnUid()
    change = ns.replace(tuple(ns.tree.entries.values()))
    assert tree.attr(ns.lookup(ROOT_INODE, "llama", Caller(0, 0, 1))).entry_timeout == 0
    assert tree.attr(walk(ns, "Alpha")).entry_timeout == LONG_TIMEOUT  # uniform under the policy
    ns.visibility = tree.AllowAll()
    # the kernel may hold 'llama' with the old long timeout: it must be told to forget it
    assert [(p, n) for p, n, _ in change.entries] == [(ROOT_INODE, "llama")]
    ns.replace(tuple(ns.tree.entries.values()))
    for path in ("llama/llama.gguf", f"llama/{CARD_NAME}", f"llama/{VERSIONS_DIR}", f"llama/{VERSIONS_DIR}/1",
                 "coreml/enc.mlmodelc", "coreml/enc.mlmodelc/model.mil"):
        a = tree.attr(walk(ns, path))
        assert a.entry_timeout == LONG_TIMEOUT, path
        if not walk(ns, path).is_dir:
            assert a.attr_timeout == LONG_TIMEOUT, path


def test_active_path_and_version_path_share_one_inode(ns):
    active = walk(ns, "llama/llama.gguf")
    assert walk(ns, f"llama/{VERSIONS_DIR}/2/llama.gguf") is active
    assert active.nlink == 2
    assert walk(ns, f"llama/{VERSIONS_DIR}/1/llama.gguf").nlink == 1


# -- inode stability ---------------------------------------------------------------------------
def test_inodes_are_stable_across_rebuilds(ns):
    before = {ino: (n.kind, n.sha256) for ino, n in ns.tree.nodes.items()}
    snapshot = tuple(ns.tree.entries.values())
    fresh = build(snapshot, ns.inodes)  # no reuse of node objects: numbers from the map alone
    assert {ino: (n.kind, n.sha256) for ino, n in fresh.nodes.items()} == before
    assert not ns.swap(fresh)


def test_changed_bytes_get_a_new_inode_and_numbers_are_never_reused():
    inodes = InodeMap()
    a = build((entry("m", [version("m", 1, [fr("m.gguf", 1)])]),), inodes)
    b = build((entry("m", [version("m", 1, [fr("m.gguf", 2)])]),), inodes, a)
    ino_a = a.nodes[a.root.children["m"]].children["m.gguf"]
    ino_b = b.nodes[b.root.children["m"]].children["m.gguf"]
    assert ino_a != ino_b
    assert b.root.children["m"] == a.root.children["m"]  # the model dir keeps its number
    c = build((entry("m", [version("m", 1, [fr("m.gguf", 3)])]),), inodes, b)
    assert c.nodes[c.root.children["m"]].children["m.gguf"] not in (ino_a, ino_b)


def test_unchanged_models_keep_their_node_objects():
    inodes = InodeMap()
    e1, e2 = entry("a", [version("a", 1, [fr("a.gguf", 1)])]), entry("b", [version("b", 1, [fr("b.gguf", 2)])])
    t1 = build((e1, e2), inodes)
    # last_used_at changes on every open: it must not rebuild (or re-card) a model
    t2 = build((e1._replace(model=replace(e1.model, last_used_at=5.0)), e2), inodes, t1)
    assert t2.subtrees["a"] is t1.subtrees["a"]
    assert not diff(t1, t2)


# -- diff / invalidation ---------------------------------------------------------------------------
def test_activate_invalidates_the_swapped_names(ns):
    old = ns.tree
    model_ino = walk(ns, "llama").ino
    llama = ns.tree.entries["llama"]
    change = ns.replace(tuple(e if e.model.name != "llama" else
                              llama._replace(model=replace(llama.model, active_version=1, last_good_version=2))
                              for e in old.entries.values()))
    inval = {(p, n) for p, n, _ in change.entries}
    assert (model_ino, "llama.gguf") in inval          # other bytes now
    assert (model_ino, "mmproj-llama.gguf") in inval   # gone from v1
    assert (model_ino, CARD_NAME) in inval             # the card changed
    assert walk(ns, "llama/llama.gguf").file.sha256 == sha(1)
    # the file still reachable under .versions is not reported deleted (no inotify delete)
    assert all(d == 0 for p, n, d in change.entries if n == "llama.gguf")


def test_removing_a_model_invalidates_only_its_top_entry(ns):
    gone = walk(ns, "coreml").ino
    change = ns.replace(tuple(e for e in ns.tree.entries.values() if e.model.name != "coreml"))
    assert [(p, n) for p, n, _ in change.entries] == [(ROOT_INODE, "coreml")]
    assert ROOT_INODE in change.inodes  # nlink of the root changed
    assert gone not in ns.tree.nodes


def test_import_of_a_new_model_needs_no_entry_invalidation(ns):
    snapshot = (*ns.tree.entries.values(), entry("zeta", [version("zeta", 1, [fr("z.gguf", 11)])]))
    change = ns.replace(snapshot)
    assert change.entries == ()  # negative lookups are never cached (ENOENT, not ino 0)
    assert names(ns, ROOT_INODE)[-1] == "zeta"


# -- kernel references --------------------------------------------------------------------------------
def test_a_removed_file_stays_answerable_until_the_kernel_forgets_it(ns):
    f = walk(ns, "Alpha/a.gguf")  # counted once by walk's lookup
    ns.replace(tuple(e for e in ns.tree.entries.values() if e.model.name != "Alpha"))
    assert ns.get(f.ino) is f
    ns.forget([(f.ino, 1)])
    with pytest.raises(NotFound):
        ns.get(f.ino)


def test_a_listing_replied_after_a_rebuild_keeps_its_nodes_answerable(ns):
    alpha = walk(ns, "Alpha")
    listing = ns.listing(alpha.ino, ME)              # opendir
    ns.replace(tuple(e for e in ns.tree.entries.values() if e.model.name != "Alpha"))
    for _, node in listing:                          # readdirplus replies after the rebuild
        ns.remember(node)
    assert all(ns.get(n.ino) is n for _, n in listing)
    ns.forget([(n.ino, 1) for _, n in listing] + [(alpha.ino, 1)])
    assert not ns.retired


def test_a_never_looked_up_node_is_dropped_at_once(ns):
    ino = walk(ns, "llama").children["llama.gguf"]  # listed, never looked up
    ns.replace(tuple(e for e in ns.tree.entries.values() if e.model.name != "llama"))
    with pytest.raises(NotFound):
        ns.get(ino)
    assert ino not in ns.retired


# -- xattrs and card ------------------------------------------------------------------------------------
def test_xattrs_of_a_file(ns):
    f = walk(ns, "llama/llama.gguf")
    x = tree.xattrs(f, lambda s: "local" if s == sha(2) else "dehydrated")
    assert x == {"user.modelfs.sha256": sha(2).encode(), "user.modelfs.state": b"local",
                 "user.modelfs.version": b"2", "user.modelfs.source": b"import:llama.gguf"}
    assert tree.xattr(walk(ns, f"llama/{VERSIONS_DIR}/1/llama.gguf"), "user.modelfs.state",
                      lambda s: "dehydrated") == b"dehydrated"
    with pytest.raises(NoAttribute):
        tree.xattr(f, "user.other", lambda s: "local")
    for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
        with pytest.raises(tree.UnsupportedAttribute):  # EOPNOTSUPP: ls -l stops asking
            tree.xattr(f, name, lambda s: "local")
    assert tree.xattrs(walk(ns, "llama"), lambda s: "local") == {}


def test_card_is_redacted_and_holds_no_volatile_fields():
    secret = "https://user:pw@cdn.example/m.gguf?X-Amz-Signature=s3cr3t&download=1"
    e = entry("m", [version("m", 1, [fr("m.gguf", 1, url=secret), fr("mmproj-m.gguf", 2, role="mmproj")],
                            source=secret, license="MIT", source_url="https://example.org/m?token=abc")],
              last_used=123.0, pinned=True)
    ns = Namespace()
    ns.replace((e,))
    card = walk(ns, f"m/{CARD_NAME}")
    text = card.data.decode()
    assert "s3cr3t" not in text and "pw@" not in text and "abc" not in text
    doc = json.loads(text)
    assert doc["name"] == "m" and doc["active_version"] == 1 and doc["pinned"] is True
    assert doc["mmproj"] == {"files": ["mmproj-m.gguf"], "for": ["m.gguf"]}
    assert doc["files"][0]["url"] == "https://cdn.example/m.gguf?X-Amz-Signature=REDACTED&download=1"
    assert "last_used_at" not in doc
    assert "s3cr3t" not in tree.xattr(walk(ns, "m/m.gguf"), "user.modelfs.source", str).decode()


# -- visibility ---------------------------------------------------------------------------------------------
class OnlyOwnUid:
    """A stand-in per-app rule: uid 1000 may not see 'llama'."""

    def allows(self, caller: Caller, model: ModelRecord) -> bool:
        return not (caller.uid == 1000 and model.name == "llama")

    def for_caller(self, caller: Caller):
        return lambda model: self.allows(caller, model)

    def uniform(self, model: ModelRecord) -> bool:
        return model.name != "llama"


def test_visibility_hides_a_model_from_one_caller_only(ns):
    ns.visibility = OnlyOwnUid()
    other = Caller(0, 0, 1)
    assert names(ns, ROOT_INODE) == ["Alpha", "coreml"]
    assert [n for n, _ in ns.listing(ROOT_INODE, other)] == ["Alpha", "coreml", "llama"]
    with pytest.raises(NotFound):
        ns.lookup(ROOT_INODE, "llama", ME)
    llama = ns.lookup(ROOT_INODE, "llama", other)
    with pytest.raises(NotFound):  # a handle obtained by another caller does not help
        ns.listing(llama.ino, ME)
    f = ns.lookup(llama.ino, "llama.gguf", other)
    with pytest.raises(NotFound):
        ns.check_visible(f, ME)
    ns.check_visible(f, other)


# -- snapshot from a real catalog -------------------------------------------------------------------------------
def test_load_snapshot_reads_the_catalog(tmp_path):
    cat = Catalog(tmp_path / "catalog.db")
    cat.add_version("b", 1, [fr("b.gguf", 1, 10)], signed=False, source="import:b.gguf")
    cat.add_version("b", 2, [fr("b.gguf", 2, 20), fr("sub/x.bin", 3, 3, "aux")], signed=False)
    cat.activate("b", 2, actor="test")
    cat.add_version("a", 1, [fr("a.gguf", 4, 40)], signed=False, state="partial")
    cat.pin("b")
    snap = load_snapshot(cat)
    assert [e.model.name for e in snap] == ["a", "b"]
    b = snap[1]
    assert b.pinned and b.model.active_version == 2
    assert [v.version for v in b.versions] == [1, 2]
    assert b.versions[1].files == tuple(cat.get_version("b", 2).files)
    assert b.versions == tuple(cat.versions("b"))
    ns = Namespace()
    ns.replace(snap)
    assert walk(ns, "b/sub/x.bin").size == 3
    cat.close()


# -- the errno table ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc, number", [
    (NotFound("x"), errno.ENOENT), (OfflineError("x"), errno.ENETUNREACH),
    (FetchTimeout("x"), errno.ETIMEDOUT), (trio.TooSlowError(), errno.ETIMEDOUT),
    (FetchError("x"), errno.EIO), (IntegrityError("x"), errno.EIO), (SpaceError("x"), errno.ENOSPC),
    (TrustError("x"), errno.EACCES), (Conflict("x"), errno.EBUSY), (UsageError("x"), errno.EINVAL),
    (StoreError("x"), errno.EIO), (NoAttribute("x"), errno.ENODATA),
    (tree.UnsupportedAttribute("x"), errno.EOPNOTSUPP),
    (FileNotFoundError(errno.ENOENT, "gone"), errno.ENOENT), (OSError(errno.EIO, "disk"), errno.EIO),
])
def test_errno_table(exc, number):
    assert errno_for(exc) == number


@pytest.mark.parametrize("bug", [KeyError("bug"), InternalError("hashed 5 bytes but wrote 6")])
def test_unknown_errors_are_logged_with_traceback_and_become_eio(caplog, bug):
    try:
        raise bug
    except Exception as exc:
        with caplog.at_level(logging.ERROR, logger="modelfs.mount.errnos"):
            assert errno_for(exc) == errno.EIO
    assert caplog.records and caplog.records[0].exc_info is not None


# -- the adapter, without a kernel ------------------------------------------------------------------------------------
def test_adapter_handlers_only_ever_raise_fuse_errors(ns, caplog):
    """pyfuse3's loop dies on any other exception; every handler translates."""
    pyfuse3 = pytest.importorskip("pyfuse3")
    from modelfs.mount.fuse_ops import ModelOps

    class Ctx:
        uid, gid, pid, umask = 1000, 1000, 1, 0o22

    class Broken:
        async def open(self, node, caller):
            raise KeyError("a bug")

        def note_lookup(self, node):
            pass

    ops = ModelOps(ns, Broken(), lambda sha: "local")

    async def main():
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(ROOT_INODE, b"nope", Ctx())
        assert e.value.errno == errno.ENOENT
        f = walk(ns, "Alpha/a.gguf")
        with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(f.ino, os.O_RDONLY, Ctx())
        assert e.value.errno == errno.EIO and "a bug" in caplog.text
        for call in (ops.open(f.ino, os.O_WRONLY, Ctx()), ops.unlink(ROOT_INODE, b"Alpha", Ctx()),
                     ops.setxattr(f.ino, b"user.x", b"1", Ctx())):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call
            assert e.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getxattr(f.ino, b"security.selinux", Ctx())
        assert e.value.errno == errno.EOPNOTSUPP
        assert (await ops.lookup(ROOT_INODE, b"Alpha", Ctx())).st_ino == walk(ns, "Alpha").ino

    trio.run(main)
