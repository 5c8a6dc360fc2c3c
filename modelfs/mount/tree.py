"""What the mount looks like: the tree of directories and files, here and only here.

Built from a catalog snapshot, with no kernel and no pyfuse3 (a test enforces it)::

    /                                   root: one directory per logical model, sorted
    /<model>/                           the active version's files, under their manifest names
    /<model>/model.json                 generated, redacted metadata card
    /<model>/.versions/<N>/             every installed version, each at a stable path
    /<model>/<dir>/<file>               archive members ('/' in a filename) become nested dirs
    /.hf/hub/, /.lmstudio/              views of the same files in other tools' layouts (:mod:`.views`,
                                        plugged in as a :class:`ViewBuilder`): found by lookup, never listed

Inode numbers. An :class:`InodeMap` gives every node a key and remembers key -> inode
across rebuilds, so an unchanged file keeps its number (and the kernel keeps its page
cache). A file's key holds its model, version, path *and SHA-256*: different bytes
always get a new inode, so cached pages of old bytes are never served for new ones.
The active path and ``.versions/<active>/`` name the same file, so they share one
inode (a hard link, nlink 2) and one page cache. Numbers are never reused.

Timeouts. Everything below a model directory is immutable for a given inode, so its
entries and attributes are cached for long (:data:`LONG_TIMEOUT`) and invalidated
explicitly when a rebuild changes them (:func:`diff`). Only top-level model entries can
depend on the caller (per-app visibility). When the policy says a model's answer
differs by caller (``Visibility.uniform`` is False), its entry timeout is 0: the
kernel asks ``lookup`` again on every path walk and never serves one caller's answer
to another. A model every caller sees alike is cached like the rest (``ls -l`` of
10,000 models would otherwise cost ~4 lookups per entry).

Links. With a link chooser (:mod:`.links`), every file has a twin: a symbolic link to
its committed blob, with an inode number of its own (one number never changes type:
the kernel would mark the inode bad and open descriptors would get EIO). The twin is
not a child of any directory; lookup and listing answer it instead of the file for a
caller the chooser allows, and ``readlink`` asks the chooser again. Both variants are
entries that depend on the caller, so their entry timeout is 0; the link's attributes
are never cached either. The regular file keeps long attribute timeouts: its
attributes are the same for everyone who holds its inode, and with the kernel's
auto-invalidation every ``read()`` of a file whose attributes expired costs a GETATTR
round trip (see docs/performance.md).

Views. Nodes of a view belong to no single model: ``Node.seen_by`` names the models a
node shows, and a caller sees it if it may see any of them (decided here, on lookup,
listing, open and readlink, like a model directory). One name may have several
candidates chained by ``Node.alt``, best first: the caller gets the first it may see.
Their inode keys begin with the view's name, so they never meet a model's numbers.

Lookup counts. The kernel holds on to inodes it was told about (lookup, readdirplus)
until it sends ``forget``. :class:`Namespace` counts them, so a node that left the tree
(``rm`` while a reader still has the file open) stays answerable until forgotten.

This module decides; it never touches the kernel, blobs on disk, or the catalog's SQL.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NewType, Protocol

from modelfs_store.catalog import Catalog, FileRecord, ModelRecord, VersionRecord
from modelfs_store.errors import NotFound, StoreError
from modelfs_store.redact import redact_text, redact_url

Inode = NewType("Inode", int)

ROOT_INODE = Inode(1)
#: Seconds the kernel may cache entries and attributes that only change through an
#: explicit invalidation (everything whose inode number pins its content).
LONG_TIMEOUT = 3600.0
#: Entry timeout of caller-dependent entries (top-level models): never cached.
CALLER_TIMEOUT = 0.0
#: Attribute timeout of the root, whose nlink and mtime change with every import or rm
#: (invalidated too; this bounds the damage of a lost invalidation). Model directories
#: are listed 10,000 at a time by ``ls -l``, so theirs is long, and invalidated.
DIR_ATTR_TIMEOUT = 1.0

CARD_NAME = "model.json"
VERSIONS_DIR = ".versions"
XATTR_PREFIX = "user.modelfs."
XATTRS = ("sha256", "state", "version", "source")

DIGEST = re.compile(r"[0-9a-f]{64}")

DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
LINK_MODE = stat.S_IFLNK | 0o777


class NoAttribute(StoreError):
    """The node has no such extended attribute (ENODATA, not ENOENT)."""


class UnsupportedAttribute(StoreError):
    """An xattr namespace the mount does not implement (security.*, system.*, trusted.*):
    EOPNOTSUPP, which tells ``ls -l`` to stop asking for every other file of the mount
    (a FUSE round trip each: 3 per entry, 1.5 s for 10,000 models)."""


class NotALink(StoreError):
    """readlink of something that is not a link (EINVAL)."""


@dataclass(frozen=True)
class Caller:
    """Who is asking: the kernel's request context, without pyfuse3."""
    uid: int
    gid: int
    pid: int


class Visibility(Protocol):
    """Decides whether ``caller`` may see ``model``; asked on lookup, opendir and open
    of anything inside a model. The daemon plugs in ``access.AppVisibility`` (per-app rules).

    ``uniform(model)`` says whether every caller gets the same answer for ``model``;
    only then may the kernel cache its top-level entry. It is asked when the tree is
    built, so a policy whose answers change must make the daemon rebuild."""

    def allows(self, caller: Caller, model: ModelRecord) -> bool: ...

    def for_caller(self, caller: Caller) -> Callable[[ModelRecord], bool]:
        """``allows`` for one caller over many models (a listing): whatever the answer
        needs to know about the caller is found once, for this request only."""
        ...

    def uniform(self, model: ModelRecord) -> bool: ...


class LinkChooser(Protocol):
    """Decides who gets a file as a link to its blob (the daemon plugs in
    ``links.FastPath``). ``enabled`` is read when the tree is built: only then do files
    get link twins."""

    @property
    def enabled(self) -> bool: ...

    def target(self, rec: FileRecord) -> str: ...

    def for_caller(self, caller: Caller) -> Callable[[Node], bool]: ...


class ViewBuilder(Protocol):
    """Builds the views (the daemon plugs in ``views.Views``). ``key`` says what they
    depend on: while it is unchanged, a rebuild keeps the previous view nodes."""

    def key(self, entries: Mapping[str, ModelEntry]) -> tuple[Any, ...]: ...

    def build(self, entries: Mapping[str, ModelEntry], inodes: InodeMap, uniform: Callable[[ModelRecord], bool],
              link_target: Callable[[FileRecord], str] | None, mtime: int) -> BuiltViews: ...


class BuiltViews(Protocol):
    @property
    def hidden(self) -> Mapping[str, Inode]: ...

    @property
    def nodes(self) -> Mapping[Inode, Node]: ...


class AllowAll:
    """Every caller sees every model (trees built without a policy, in tests and benchmarks)."""

    def allows(self, caller: Caller, model: ModelRecord) -> bool:
        return True

    def for_caller(self, caller: Caller) -> Callable[[ModelRecord], bool]:
        return lambda model: True

    def uniform(self, model: ModelRecord) -> bool:
        return True


# -- snapshot -----------------------------------------------------------------------------
class ModelEntry(NamedTuple):
    """One model as the catalog had it: the input of one model's subtree (a tuple:
    ten thousand of these are made on every catalog change)."""
    model: ModelRecord
    versions: tuple[VersionRecord, ...]
    pinned: bool = False

    def same_tree(self, other: ModelEntry | None) -> bool:
        """Whether ``other`` yields the same subtree (``last_used_at`` never shows)."""
        if other is None:
            return False
        a, b = self.model, other.model
        return (a.name, a.active_version, a.last_good_version, a.owner_app, a.visibility,
                a.created_at, self.pinned, self.versions) == (
                b.name, b.active_version, b.last_good_version, b.owner_app, b.visibility,
                b.created_at, other.pinned, other.versions)


Snapshot = tuple[ModelEntry, ...]


class SnapshotReader:
    """Reads snapshots from one catalog connection, turning only the models whose rows
    changed since the previous read into records (10,000 models: ~60 ms, not ~500)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._cache: dict[str, tuple[tuple[Any, ...], ModelEntry]] = {}

    def read(self) -> Snapshot:
        pinned, groups = self.catalog.snapshot_rows()
        cache: dict[str, tuple[tuple[Any, ...], ModelEntry]] = {}
        out = []
        for name, raw in groups.items():
            hit = self._cache.get(name)
            if hit is not None and hit[0] == raw and hit[1].pinned == (name in pinned):
                e = hit[1]
            else:
                m, versions = self.catalog.model_from_rows(raw)
                e = ModelEntry(m, tuple(versions), name in pinned)
            cache[name] = (raw, e)
            out.append(e)
        self._cache = cache
        return tuple(out)


def load_snapshot(catalog: Catalog) -> Snapshot:
    """Everything the tree needs, read in one consistent catalog transaction."""
    return SnapshotReader(catalog).read()


# -- nodes --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Node:
    ino: Inode
    parent: Inode
    kind: str                       # 'dir', 'file' (a blob), 'card' (generated bytes), 'link' (to a blob),
                                    # 'symlink' (a view's relative link, the same for every caller)
    size: int
    mtime_ns: int
    nlink: int = 1
    model: str | None = None        # owning model; None for the root
    version: int | None = None      # version the bytes belong to
    file: FileRecord | None = None  # for 'file'
    data: bytes | None = None       # for 'card'
    source: str | None = None       # redacted source of the version
    children: Mapping[str, Inode] = field(default_factory=dict)  # sorted by name
    top_level: bool = False         # a model directory, where visibility is decided
    per_caller: bool = False        # its visibility differs by caller: never cached
    twin: Inode = Inode(0)          # a file's link twin, a link's file (0: none): never cached
    target: str | None = None       # for 'link': the blob's absolute path; for 'symlink': its target
    seen_by: frozenset[str] = frozenset()  # a view's node: the models it shows (visible if any is)
    alt: Inode = Inode(0)           # a view's node: the next candidate for the same name (0: none)

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def sha256(self) -> str | None:
        if self.file is not None:
            return self.file.sha256
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        return None

    def same_attrs(self, other: Node) -> bool:
        return (self.kind, self.size, self.mtime_ns, self.nlink, self.per_caller) == (
            other.kind, other.size, other.mtime_ns, other.nlink, other.per_caller)


@dataclass(frozen=True)
class Attr:
    """What ``stat`` shows, plus how long the kernel may cache it."""
    ino: Inode
    mode: int
    nlink: int
    size: int
    mtime_ns: int
    entry_timeout: float
    attr_timeout: float

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


def attr(node: Node) -> Attr:
    if node.is_dir:
        entry = CALLER_TIMEOUT if node.per_caller else LONG_TIMEOUT
        return Attr(node.ino, DIR_MODE, node.nlink, 0, node.mtime_ns, entry,
                    DIR_ATTR_TIMEOUT if node.ino == ROOT_INODE else LONG_TIMEOUT)
    if node.kind == "link":
        return Attr(node.ino, LINK_MODE, node.nlink, node.size, node.mtime_ns, CALLER_TIMEOUT, CALLER_TIMEOUT)
    if node.kind == "symlink":
        entry = CALLER_TIMEOUT if node.per_caller else LONG_TIMEOUT
        return Attr(node.ino, LINK_MODE, node.nlink, node.size, node.mtime_ns, entry, LONG_TIMEOUT)
    entry = CALLER_TIMEOUT if node.twin or node.per_caller else LONG_TIMEOUT
    return Attr(node.ino, FILE_MODE, node.nlink, node.size, node.mtime_ns, entry, LONG_TIMEOUT)


def xattrs(node: Node, state: Callable[[str], str]) -> dict[str, bytes]:
    """``user.modelfs.*`` of a file; ``state(sha256)`` says 'local' or 'dehydrated'.
    A link has none (the kernel keeps ``user.*`` off symlinks; its blob carries the
    digest itself)."""
    if node.is_dir or node.kind in ("link", "symlink"):
        return {}
    sha = node.sha256 or ""
    values = {
        "sha256": sha,
        "state": "generated" if node.kind == "card" else state(sha),
        "version": "" if node.version is None else str(node.version),
        "source": node.source or "",
    }
    return {XATTR_PREFIX + k: v.encode() for k, v in values.items()}


def xattr(node: Node, name: str, state: Callable[[str], str]) -> bytes:
    if not name.startswith("user."):
        raise UnsupportedAttribute(f"extended attributes {name.split('.')[0][:40]}.* are not supported")
    try:
        return xattrs(node, state)[name]
    except KeyError:
        raise NoAttribute(f"no extended attribute {name[:80]!r}") from None


# -- inode numbers ----------------------------------------------------------------------------
class InodeMap:
    """Key -> inode number, kept across rebuilds; numbers are handed out once."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[Any, ...], Inode] = {("root",): ROOT_INODE}
        self._next = ROOT_INODE + 1

    def __call__(self, *key: Any) -> Inode:
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._by_key[key] = Inode(self._next)
            self._next += 1
        return ino

    def __len__(self) -> int:
        return len(self._by_key)


# -- building -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tree:
    nodes: Mapping[Inode, Node]
    entries: Mapping[str, ModelEntry]                    # by model name
    subtrees: Mapping[str, tuple[Node, ...]]            # every node of one model
    total_bytes: int = 0
    linked: bool = False                                # files have link twins
    hidden: Mapping[str, Inode] = field(default_factory=dict)  # the root's lookup-only names (views)
    views: Mapping[Inode, Node] = field(default_factory=dict)  # every node of the views (apart: a
    view_key: tuple[Any, ...] | None = None             # rebuild that keeps them costs nothing)

    @property
    def root(self) -> Node:
        return self.nodes[ROOT_INODE]

    def node(self, ino: Inode) -> Node | None:
        return self.nodes.get(ino) or self.views.get(ino)

    def has(self, ino: Inode) -> bool:
        return ino in self.nodes or ino in self.views


EMPTY = Tree({ROOT_INODE: Node(ROOT_INODE, ROOT_INODE, "dir", 0, 0, nlink=2)}, {}, {})


def build(snapshot: Snapshot, inodes: InodeMap, previous: Tree = EMPTY, *,
          visibility: Visibility | None = None, now: float | None = None,
          link_target: Callable[[FileRecord], str] | None = None, views: ViewBuilder | None = None) -> Tree:
    """The tree for ``snapshot``. Models whose catalog rows did not change since
    ``previous`` keep their node objects (cheap rebuilds of large stores). With
    ``link_target``, every file gets a link twin pointing there. With ``views``, the
    root also answers the views' hidden names."""
    visibility = visibility or AllowAll()
    linked = link_target is not None
    reuse = previous.subtrees if previous.linked == linked else {}
    nodes: dict[Inode, Node] = {}
    entries: dict[str, ModelEntry] = {}
    subtrees: dict[str, tuple[Node, ...]] = {}
    top: dict[str, Inode] = {}
    mtime = 0
    counted = True
    total = 0
    for entry in sorted(snapshot, key=lambda e: e.model.name):
        name = entry.model.name
        sub = reuse.get(name)
        per_caller = not visibility.uniform(entry.model)
        before = previous.entries.get(name)
        if sub is None or (before is not entry and not entry.same_tree(before)) or sub[0].per_caller != per_caller:
            sub = _Subtree(entry, inodes, per_caller, link_target).build()
        entries[name] = entry
        subtrees[name] = sub
        for n in sub:
            nodes[n.ino] = n
        top[name] = sub[0].ino
        if per_caller:
            counted = False
        else:
            mtime = max(mtime, sub[0].mtime_ns)
        total += sum(n.size for n in sub if n.kind == "file")
    # The root's attributes are the same for every caller, so only the models every
    # caller sees count: its mtime is the newest of them, and its nlink 1 ("not counted",
    # as on btrfs: find then looks at every entry) unless every model is everyone's, so a
    # stat of the root tells no one how many private models there are, or when one came.
    if not mtime:
        mtime = int((now if now is not None else time.time()) * 1e9) if previous is EMPTY \
            else previous.root.mtime_ns
    nodes[ROOT_INODE] = Node(ROOT_INODE, ROOT_INODE, "dir", 0, mtime, nlink=2 + len(top) if counted else 1,
                             children=top)
    hidden: Mapping[str, Inode] = {}
    view_nodes: Mapping[Inode, Node] = {}
    view_key = None
    if views is not None:
        view_key = (linked, views.key(entries))
        if view_key == previous.view_key:
            hidden, view_nodes = previous.hidden, previous.views
        else:
            built = views.build(entries, inodes, visibility.uniform, link_target, mtime)
            hidden, view_nodes = built.hidden, built.nodes
    return Tree(nodes, entries, subtrees, total, linked, hidden, view_nodes, view_key)


def _ns(t: float | None) -> int:
    return int((t or 0) * 1e9)


class _Subtree:
    """Builds one model's nodes. A directory is first described as {name: child inode or
    nested dict}; its nodes are made afterwards, children before their parents."""

    def __init__(self, entry: ModelEntry, ino: InodeMap, per_caller: bool,
                 link_target: Callable[[FileRecord], str] | None = None) -> None:
        self.entry, self.ino, self.per_caller, self.link_target = entry, ino, per_caller, link_target
        self.name = entry.model.name
        self.installed = [v for v in entry.versions if v.state == "installed"]
        self.active = next((v for v in self.installed if v.version == entry.model.active_version), None)
        self.out: list[Node] = []
        self.links: dict[Inode, int] = {}      # file inode -> number of names
        self.files: dict[Inode, tuple[FileRecord, VersionRecord]] = {}
        self.dir_inos: set[Inode] = set()
        self.parents: dict[Inode, Inode] = {}  # file inode -> its first directory

    def file_ino(self, v: VersionRecord, rec: FileRecord) -> Inode:
        i = self.ino("file", self.name, v.version, rec.filename, rec.sha256)
        self.links[i] = self.links.get(i, 0) + 1
        self.files[i] = (rec, v)
        return i

    def layout(self, v: VersionRecord) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for rec in v.files:
            *dirs, leaf = rec.filename.split("/")
            d = tree
            for part in dirs:
                d = d.setdefault(part, {})
                if not isinstance(d, dict):
                    break  # a file and a dir of the same name: the file wins
            else:
                d.setdefault(leaf, self.file_ino(v, rec))
        return tree

    def make_dirs(self, tree: dict[str, Any], key: tuple[Any, ...], parent: Inode, d_ino: Inode,
                  mtime: int, extra: dict[str, Inode] | None = None, is_top: bool = False) -> Node:
        children: dict[str, Inode] = dict(extra or {})
        subdirs = 0
        for child, value in tree.items():
            if isinstance(value, dict):
                c_ino = self.ino("dir", *key, child)
                self.make_dirs(value, (*key, child), d_ino, c_ino, mtime)
                children[child] = c_ino
                subdirs += 1
            else:
                children[child] = value
                self.parents.setdefault(value, d_ino)
        subdirs += sum(1 for c in (extra or {}).values() if c in self.dir_inos)
        node = Node(d_ino, parent, "dir", 0, mtime, nlink=2 + subdirs, model=self.name,
                    children=dict(sorted(children.items())), top_level=is_top,
                    per_caller=is_top and self.per_caller)
        self.out.append(node)
        self.dir_inos.add(d_ino)
        return node

    def build(self) -> tuple[Node, ...]:
        """Nodes of one model; the first is the model directory itself."""
        m, name, ino, active = self.entry.model, self.name, self.ino, self.active
        model_ino = ino("model", name)
        version_dirs: dict[str, Any] = {str(v.version): self.layout(v) for v in self.installed}
        top: dict[str, Any] = self.layout(active) if active is not None else {}
        card = render_card(self.entry)
        card_ino = ino("card", name, hashlib.sha256(card).hexdigest())
        card_mtime = _ns(active.card.get("installed_at") if active else m.created_at) or _ns(m.created_at)
        vmtimes = {str(v.version): _ns(v.card.get("installed_at") or v.card.get("created_at"))
                   for v in self.installed}
        versions_ino = ino("versions", name)
        version_children: dict[str, Inode] = {}
        for vname, vtree in version_dirs.items():
            v_ino = ino("vdir", name, int(vname))
            self.make_dirs(vtree, ("v", name, int(vname)), versions_ino, v_ino, vmtimes[vname])
            version_children[vname] = v_ino
        newest = max([*vmtimes.values(), _ns(m.created_at)])
        self.make_dirs({}, ("versions", name), model_ino, versions_ino, newest, extra=version_children)
        model_node = self.make_dirs(top, ("a", name, m.active_version), ROOT_INODE, model_ino,
                                    max(newest, card_mtime),
                                    extra={CARD_NAME: card_ino, VERSIONS_DIR: versions_ino}, is_top=True)
        for i, (rec, v) in self.files.items():
            self.file_nodes(i, rec, v)
        self.out.append(Node(card_ino, model_ino, "card", len(card), card_mtime, model=name,
                             version=m.active_version, data=card,
                             source=redacted(active.card.get("source")) if active else None))
        self.out.remove(model_node)
        return (model_node, *self.out)


    def file_nodes(self, i: Inode, rec: FileRecord, v: VersionRecord) -> None:
        """A file's node and, with a link target, its link twin."""
        mtime = _ns(v.card.get("installed_at") or v.card.get("created_at"))
        source = redacted(v.card.get("source"))
        twin = Inode(0)
        if self.link_target is not None and is_digest(rec.sha256):  # a hand-written row: no link, no failed build
            twin = self.ino("link", self.name, v.version, rec.filename, rec.sha256)
            target = self.link_target(rec)
            self.out.append(Node(twin, self.parents[i], "link", len(target.encode()), mtime, nlink=self.links[i],
                                 model=self.name, version=v.version, file=rec, source=source, twin=i,
                                 target=target))
        self.out.append(Node(i, self.parents[i], "file", rec.size, mtime, nlink=self.links[i], model=self.name,
                             version=v.version, file=rec, source=source, twin=twin))


def is_digest(text: object) -> bool:
    """A SHA-256 as the store names blobs (64 lowercase hex digits)."""
    return isinstance(text, str) and DIGEST.fullmatch(text) is not None


def redacted(text: Any) -> str | None:
    if text is None:
        return None
    text = str(text)
    return redact_url(text) if "://" in text and " " not in text else redact_text(text)


_JSON = json.JSONEncoder(sort_keys=True, default=str)


def render_card(entry: ModelEntry) -> bytes:
    """The generated ``model.json``: metadata of the active version, redacted.

    Only catalog facts that change through a catalog write appear, so the card's bytes
    (and its inode) change exactly when the catalog does; nothing volatile such as
    last-used time or whether a blob is local yet."""
    m = entry.model
    active = next((v for v in entry.versions if v.version == m.active_version), None)
    card: dict[str, Any] = {
        "name": m.name, "active_version": m.active_version, "last_good_version": m.last_good_version,
        "owner_app": m.owner_app, "visibility": m.visibility, "pinned": entry.pinned,
        "versions": [{"version": v.version, "state": v.state, "signed": v.signed,
                      "installed_at": v.card.get("installed_at")} for v in entry.versions],
    }
    if active is not None:
        meta = {k: val for k, val in active.card.items() if k not in ("created_at",)}
        for k in ("source", "source_url", "license", "compat_notes", "min_device"):
            if meta.get(k) is not None:
                meta[k] = redacted(meta[k])
        card.update(meta)
        card["signed"] = active.signed
        card["size"] = sum(f.size for f in active.files)
        card["files"] = [{"filename": f.filename, "role": f.role, "size": f.size, "sha256": f.sha256,
                          **({"url": redact_url(f.url)} if f.url else {})} for f in active.files]
        mmproj = [f.filename for f in active.files if f.role == "mmproj"]
        weights = [f.filename for f in active.files if f.role in ("weights", "shard")]
        if mmproj:
            card["mmproj"] = {"files": mmproj, "for": weights}
    # One top-level key per line: readable with cat, and the C encoder does the work
    # (indent= falls back to the pure-Python one, 10x slower for 10,000 cards).
    body = ",\n".join(f"  {_JSON.encode(k)}: {_JSON.encode(v)}" for k, v in sorted(card.items()))
    return ("{\n" + body + "\n}\n").encode()


# -- changes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Invalidation:
    """What the kernel must forget after a rebuild."""
    entries: tuple[tuple[Inode, str, Inode], ...]  # (parent, name, deleted inode or 0)
    inodes: tuple[Inode, ...]                       # attributes changed (attr-only)

    def __bool__(self) -> bool:
        return bool(self.entries or self.inodes)


def diff(old: Tree, new: Tree) -> Invalidation:
    """Entries whose name now means another inode (or nothing), and inodes whose
    attributes changed. Entries below a vanished directory are not listed: the
    kernel drops them with the directory's own entry."""
    entries: list[tuple[Inode, str, Inode]] = []
    inodes: list[Inode] = []
    for before_nodes, after_nodes in ((old.nodes, new.nodes), (old.views, new.views)):
        if before_nodes is after_nodes:
            continue  # views kept whole
        for ino, before in before_nodes.items():
            after = after_nodes.get(ino)
            if after is None or after is before:
                continue
            if not after.same_attrs(before):
                inodes.append(ino)
            if after.per_caller != before.per_caller:  # the kernel may hold it with a long timeout
                parent = old.node(before.parent)
                name = next((n for n, c in parent.children.items() if c == ino), None) if parent else None
                if name is not None:  # else a later candidate of a view's name: a chain is never cached
                    entries.append((before.parent, name, Inode(0)))
            if before.is_dir:
                for name, child in before.children.items():
                    now = after.children.get(name)
                    if now != child:
                        # 'deleted' (inotify) only for a file gone from every path; never for a
                        # directory (the kernel refuses it for a non-empty one).
                        was = old.node(child)
                        gone = not new.has(child) and not (was is not None and was.is_dir)
                        entries.append((ino, name, child if gone else Inode(0)))
    return Invalidation(tuple(entries), tuple(inodes))


# -- the live namespace -------------------------------------------------------------------------------
class Namespace:
    """The current tree plus what the kernel still remembers of earlier ones.

    Mutated only from the daemon's event loop (no locks): ``replace`` swaps the tree,
    lookups and forgets keep the kernel's counts."""

    def __init__(self, visibility: Visibility | None = None, links: LinkChooser | None = None,
                 views: ViewBuilder | None = None) -> None:
        self.visibility: Visibility = visibility or AllowAll()
        self.links = links
        self.views = views
        self.inodes = InodeMap()
        self.tree = EMPTY
        self._lookups: dict[Inode, int] = {}
        self._retired: dict[Inode, Node] = {}

    # building
    def build(self, snapshot: Snapshot, now: float | None = None) -> Tree:
        """A new tree from the current one (not swapped in: the daemon builds in a worker thread)."""
        links = self.links
        target = links.target if links is not None and links.enabled else None
        return build(snapshot, self.inodes, self.tree, visibility=self.visibility, now=now, link_target=target,
                     views=self.views)

    def replace(self, snapshot: Snapshot, now: float | None = None) -> Invalidation:
        return self.swap(self.build(snapshot, now))

    def swap(self, new: Tree) -> Invalidation:
        old, self.tree = self.tree, new
        change = diff(old, new)
        for before_nodes in (old.nodes, old.views if old.views is not new.views else {}):
            for ino, node in before_nodes.items():
                if self._lookups.get(ino) and not new.has(ino):
                    self._retired[ino] = node
        for ino in list(self._retired):
            if new.has(ino):
                del self._retired[ino]
        return change

    # reading
    def get(self, ino: int) -> Node:
        node = self.tree.node(Inode(ino)) or self._retired.get(Inode(ino))
        if node is None:
            raise NotFound(f"no inode {ino}", inode=ino)
        return node

    def lookup(self, parent: int, name: str, caller: Caller) -> Node:
        """The child ``name`` of ``parent``, counted as known to the kernel."""
        p = self.get(parent)
        if name == ".":
            child = p
        elif name == "..":
            child = self.get(p.parent)
        else:
            ino = p.children.get(name)
            if p.ino == ROOT_INODE:
                ino = self.tree.hidden.get(name, ino)  # a view wins over an old model of its name
            if ino is None:
                raise NotFound(f"no entry {name[:80]!r}", name=name)
            child = self.get(ino)
        if child.seen_by:
            chosen = self._choose(child, self.visibility.for_caller(caller))
            if chosen is None:
                raise NotFound(f"no entry {name[:80]!r}", name=name)  # ENOENT: existence must not leak
            child = chosen
        else:
            self.check_visible(child, caller)
        if child.twin and self.links is not None and self.links.for_caller(caller)(child):
            child = self.get(child.twin)
        self.remember(child)
        return child

    def listing(self, ino: int, caller: Caller) -> list[tuple[str, Node]]:
        """Sorted entries of a directory as ``caller`` may see them."""
        d = self.get(ino)
        if not d.is_dir:
            raise NotFound("not a directory", inode=ino)
        self.check_visible(d, caller)
        out = [(name, self.tree.nodes.get(c) or self.get(c)) for name, c in d.children.items()]
        if d.ino == ROOT_INODE:
            allows = self.visibility.for_caller(caller)
            entries, hidden = self.tree.entries, self.tree.hidden
            out = [(n, c) for n, c in out if n not in hidden  # a view shadows an old model of its name
                   and ((e := entries.get(c.model or "")) is None or allows(e.model))]
        elif any(c.seen_by for _, c in out):
            allows = self.visibility.for_caller(caller)
            out = [(n, chosen) for n, c in out
                   if (chosen := self._choose(c, allows) if c.seen_by else c) is not None]
        if d.ino != ROOT_INODE and self.links is not None and any(c.twin for _, c in out):
            offers = self.links.for_caller(caller)
            out = [(n, self.get(c.twin) if c.twin and offers(c) else c) for n, c in out]
        return out

    def readlink(self, ino: int, caller: Caller) -> str:
        """A link's target, for a caller that would be given the link now."""
        node = self.get(ino)
        if node.kind == "symlink" and node.target is not None:
            self.check_visible(node, caller)
            return node.target
        if node.kind != "link" or node.target is None:
            raise NotALink("not a symbolic link", inode=ino)
        self.check_visible(node, caller)
        if self.links is None or not self.links.for_caller(caller)(self.get(node.twin)):
            raise NotFound("no such link for this caller", inode=ino)  # it was never answered to it
        return node.target

    def usage(self, caller: Caller) -> tuple[int, int]:
        """The bytes and inodes ``statfs`` reports to ``caller``: those of the models it
        may see (a private pull's size must not show in another caller's ``df``). The
        views show the same files again and are not counted."""
        t = self.tree
        size, count = t.total_bytes, len(t.nodes)
        allows = self.visibility.for_caller(caller)
        for name, e in t.entries.items():
            if not allows(e.model):
                sub = t.subtrees.get(name, ())
                size -= sum(n.size for n in sub if n.kind == "file")
                count -= len(sub)
        return size, count

    def names_of(self, ino: int) -> list[tuple[Inode, str]]:
        """Every (directory, name) under which the current tree shows ``ino``."""
        node = self.tree.node(Inode(ino))
        if node is not None and node.seen_by:
            return [(d.ino, name) for d in self.tree.views.values() if d.is_dir
                    for name, child in d.children.items() if child == ino]
        if node is None or node.model is None:
            return []
        return [(d.ino, name) for d in self.tree.subtrees.get(node.model, ()) if d.is_dir
                for name, child in d.children.items() if child == ino]

    def check_visible(self, node: Node, caller: Caller) -> None:
        if node.seen_by:
            if not self._sees(node, self.visibility.for_caller(caller)):
                raise NotFound("no such entry")  # ENOENT: existence must not leak
        elif node.model is not None and not self._allows(caller, node):
            raise NotFound(f"no model {node.model!r}")  # ENOENT: existence must not leak

    def _allows(self, caller: Caller, node: Node) -> bool:
        entry = self.tree.entries.get(node.model or "")
        if entry is None:
            return True  # a retired node: only reachable by someone who already had it
        return self.visibility.allows(caller, entry.model)

    def _sees(self, node: Node, allows: Callable[[ModelRecord], bool]) -> bool:
        """Whether a view's node shows a model ``allows`` (a retired node's models are
        gone: only someone who already had it can reach it)."""
        entries = self.tree.entries
        known = [e.model for m in node.seen_by if (e := entries.get(m)) is not None]
        return not known or any(allows(m) for m in known)

    def _choose(self, node: Node, allows: Callable[[ModelRecord], bool]) -> Node | None:
        """The first candidate of a view's name (``node``, then its ``alt`` chain) that
        the caller may see, or None."""
        while True:
            if self._sees(node, allows):
                return node
            if not node.alt:
                return None
            node = self.get(node.alt)

    # the kernel's references
    def remember(self, node: Node) -> None:
        """The kernel now holds ``node`` (lookup, or an entry of readdirplus). A listing
        taken before a rebuild may name nodes that already left the tree: they stay
        answerable until forgotten."""
        ino = node.ino
        if ino == ROOT_INODE:
            return
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        if not self.tree.has(ino):
            self._retired[ino] = node

    def forget(self, pairs: Iterable[tuple[int, int]]) -> None:
        for ino, n in pairs:
            left = self._lookups.get(Inode(ino), 0) - n
            if left > 0:
                self._lookups[Inode(ino)] = left
                continue
            self._lookups.pop(Inode(ino), None)
            self._retired.pop(Inode(ino), None)

    def lookup_count(self, ino: int) -> int:
        """How many references to ``ino`` the kernel holds (0: it may ask again, or
        never); the root is never counted."""
        return self._lookups.get(Inode(ino), 0)

    @property
    def retired(self) -> Mapping[Inode, Node]:
        return self._retired
