"""Views: the same blobs laid out as other tools' caches expect, in hidden directories at
the root of the mount. The models' own directories are :mod:`.tree`'s; this module adds::

    /.hf/hub/                                     a Hugging Face hub cache (HF_HUB_CACHE)
        models--<org>--<repo>/refs/main           the commit, as the hub cache writes it (no newline)
        models--<org>--<repo>/blobs/<sha256>      the bytes (a regular read-only file)
        models--<org>--<repo>/snapshots/<commit>/<hub_path>
                                                  a relative symbolic link to ../../blobs/<sha256>
    /.lmstudio/<org>/<repo>/<file>                LM Studio's publisher/repo/file tree
    /.lmstudio/modelfs/<model>/<file>             a model with no hub source

Only the active version of each model counts. A version is in the hub view when the
catalog knows its hub repository (``versions.hub_repo``, migration 7); each of its files
with a ``hub_path`` shows under that path. A version with a hub repository but no commit
(adopted from LM Studio) gets a *stand-in commit*: :func:`standin_commit`, the first 40
hex digits of a SHA-256 over the repository and the sorted (path, sha256) pairs of its
files, so it is stable, changes when the files do, and looks like a commit to the hub
library. Several models from one repository (different quants) share its
``models--org--repo`` directory; ``refs/main`` names the newest of their commits that
the caller may see.

Visibility. Every node of a view carries the models it shows (``Node.seen_by``); the
caller sees it if it may see any of them (``tree.Namespace`` asks on lookup, listing,
open and readlink). A node some caller may not see has a zero entry timeout, like a
private model's directory. A file, link or ``refs/main`` is one model's: when several
models offer one name (two commits of one LM Studio file, ``refs/main`` of a repository
whose models were pinned at different commits, a blob two quants share), each model's
node is a candidate, the candidates are chained (``Node.alt``), best first, and the
caller gets the first it may see: a hidden model's bytes, commit, name, version or
source (``user.modelfs.*``) never show. A chain stops at the first candidate everyone
sees; every node of a longer chain has a zero entry timeout (its answer is per caller).

Files here are inodes of their own (keyed by view, place, SHA-256 and model), with the model's
file record: opening one materialises it exactly as the model's own file does, and with
the fast path the owner gets it as a link to the blob. The two dot-directories are found
by lookup only; the root's listing stays the list of models.

Plain logic, no pyfuse3, no I/O.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelfs_store.catalog import FileRecord, ModelRecord, VersionRecord
from modelfs_store.names import RESERVED_MODEL_NAMES, filename_problem

from .tree import ROOT_INODE, Inode, InodeMap, ModelEntry, Node, is_digest, redacted

HF_DIR = ".hf"
HUB_DIR = "hub"
LMSTUDIO_DIR = ".lmstudio"
#: The publisher directory of ``.lmstudio`` for models that came from no hub repository.
LOCAL_PUBLISHER = "modelfs"
VIEW_DIRS = (HF_DIR, LMSTUDIO_DIR)
assert set(VIEW_DIRS) == RESERVED_MODEL_NAMES  # no model can take a view's name

COMMIT = re.compile(r"[0-9a-f]{40}")
# The hub's repo id rules (huggingface_hub.utils.validate_repo_id): 1-96 of these per
# part, no '--' or '..' anywhere, not beginning or ending with '-' or '.'.
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
MAX_PATH_BYTES = 1024


def standin_commit(repo: str, files: Iterable[tuple[str, str]]) -> str:
    """The commit id shown for a version from ``repo`` whose commit is unknown: the first
    40 hex digits of SHA-256 over ``modelfs stand-in commit``, NUL, the repository, NUL,
    then ``path NUL sha256 LF`` for each (hub path, SHA-256) pair, sorted."""
    h = hashlib.sha256(b"modelfs stand-in commit\0" + repo.encode() + b"\0")
    for path, sha in sorted(files):
        h.update(f"{path}\0{sha}\n".encode())
    return h.hexdigest()[:40]


def repo_parts(repo: object) -> tuple[str, ...] | None:
    """``('org', 'name')`` (or ``('name',)``) of a valid hub repo id, else None."""
    if not isinstance(repo, str) or "--" in repo or ".." in repo:
        return None
    parts = tuple(repo.split("/"))
    if len(parts) > 2 or not all(_REPO_PART.fullmatch(p) for p in parts):
        return None
    return parts


def repo_folder(parts: tuple[str, ...]) -> str:
    """The hub cache's directory of a model repository (``repo_folder_name``)."""
    return "models--" + "--".join(parts)


def hub_path_parts(path: object) -> list[str] | None:
    """The components of a file's path in its repository, each one safe, else None."""
    if not isinstance(path, str) or not path or len(path.encode()) > MAX_PATH_BYTES:
        return None
    parts = path.split("/")
    return parts if all(filename_problem(p) is None for p in parts) else None


@dataclass(frozen=True)
class HubFiles:
    """Where a version's files are on the hub: its repository, commit, and each file's path."""
    parts: tuple[str, ...]
    commit: str
    standin: bool
    files: tuple[tuple[tuple[str, ...], FileRecord], ...]


def hub_files(v: VersionRecord) -> HubFiles | None:
    parts = repo_parts(v.card.get("hub_repo"))
    if parts is None:
        return None
    files = [(tuple(p), f) for f in v.files if (p := hub_path_parts(f.hub_path)) is not None and is_digest(f.sha256)]
    if not files:
        return None
    commit = v.card.get("hub_commit")
    standin = not (isinstance(commit, str) and COMMIT.fullmatch(commit))
    if standin:
        commit = standin_commit("/".join(parts), (("/".join(p), f.sha256) for p, f in files))
    return HubFiles(parts, str(commit), standin, tuple(files))


# -- building -------------------------------------------------------------------------------
@dataclass
class _Leaf:
    key: tuple[Any, ...]
    kind: str                       # 'file', 'symlink' or 'card'
    size: int
    rank: tuple[Any, ...]           # lower is preferred among the candidates of one name
    model: str                      # the preferred model: version, source and use are its
    version: int
    mtime: int
    source: str | None
    seen_by: set[str] = field(default_factory=set)
    file: FileRecord | None = None
    data: bytes | None = None
    target: str | None = None


class _Dir(dict[str, "_Dir | dict[tuple[Any, ...], _Leaf]"]):
    """name -> a sub-directory, or the candidate leaves of that name (by key)."""

    def sub(self, name: str) -> _Dir | None:
        d = self.setdefault(name, _Dir())
        return d if isinstance(d, _Dir) else None  # a file already took the name

    def leaf(self, name: str, leaf: _Leaf) -> None:
        got = self.setdefault(name, {})
        if isinstance(got, _Dir):
            return  # a directory already took the name
        have = got.get(leaf.key)
        if have is None:
            got[leaf.key] = leaf
            return
        have.seen_by |= leaf.seen_by
        if leaf.rank < have.rank:
            leaf.seen_by = have.seen_by
            got[leaf.key] = leaf


def _ns(t: Any) -> int:
    return int(float(t or 0) * 1e9)


@dataclass(frozen=True)
class ViewTree:
    hidden: Mapping[str, Inode]     # the root's lookup-only names
    nodes: Mapping[Inode, Node]


Group = tuple[str, ...]  # ('hf', folder) or ('lms', publisher, repo): one directory a model lands in


class Views:
    """Builds the view nodes for ``tree.build`` (plugged into ``tree.Namespace``).

    A view is made of groups, one directory each: a ``models--org--repo`` of the hub
    view, an ``org/repo`` of the LM Studio view. A group whose models did not change
    keeps its nodes, so one pull into a store of 10,000 models rebuilds a few nodes,
    not all of them. Called from one thread at a time (the daemon's builds are); the
    groups kept are numbered by one ``InodeMap``, and forgotten if another one comes."""

    def __init__(self) -> None:
        self._inodes: InodeMap | None = None
        self._groups: dict[Group, tuple[tuple[Any, ...], Node, tuple[Node, ...]]] = {}
        self._hub: dict[int, tuple[VersionRecord, HubFiles | None]] = {}  # by id() of the version

    def key(self, entries: Mapping[str, ModelEntry]) -> tuple[Any, ...]:
        """What the views depend on: when it is unchanged, the previous nodes stand."""
        return tuple((name, e.model.visibility, e.model.owner_app, e.model.owner_uid, _active(e))
                     for name, e in entries.items())

    def build(self, entries: Mapping[str, ModelEntry], inodes: InodeMap, uniform: Callable[[ModelRecord], bool],
              link_target: Callable[[FileRecord], str] | None, mtime: int) -> ViewTree:
        if inodes is not self._inodes:
            self._inodes, self._groups = inodes, {}
        members: dict[Group, list[tuple[str, ModelRecord, VersionRecord, HubFiles | None]]] = {}
        seen_hub: dict[int, tuple[VersionRecord, HubFiles | None]] = {}
        for name, e in entries.items():
            v = _active(e)
            if v is None:
                continue
            known = self._hub.get(id(v))
            hub = known[1] if known is not None and known[0] is v else hub_files(v)  # checks every path once
            seen_hub[id(v)] = (v, hub)
            if hub is not None:
                members.setdefault(("hf", repo_folder(hub.parts)), []).append((name, e.model, v, hub))
            place = hub.parts if hub is not None and len(hub.parts) == 2 else (LOCAL_PUBLISHER, name)
            members.setdefault(("lms", *place), []).append((name, e.model, v, hub))
        self._hub = seen_hub
        linked = link_target is not None
        hf_ino, hub_ino, lms_ino = inodes("view", HF_DIR), inodes("view", HF_DIR, HUB_DIR), inodes("view", LMSTUDIO_DIR)
        groups: dict[Group, tuple[tuple[Any, ...], Node, tuple[Node, ...]]] = {}
        for gid, group in members.items():
            key = (linked, tuple((n, m.visibility, m.owner_app, m.owner_uid, v) for n, m, v, _ in group))
            hit = self._groups.get(gid)
            if hit is None or hit[0] != key:
                maker = _Maker(inodes, {n: uniform(m) for n, m, _, _ in group}, link_target, mtime)
                d = _Dir()
                for n, _m, v, hub in group:
                    if gid[0] == "hf":
                        assert hub is not None
                        _add_hf(d, gid[1], n, v, hub)
                    else:
                        _add_lms(d, gid[1:], n, v)
                if not d:
                    continue  # no file passed: no directory (an empty one would show to every caller)
                parent = hub_ino if gid[0] == "hf" else inodes("view-dir", "lms", gid[1])
                root = maker.dir(d, gid, parent, inodes("view-dir", *gid))
                hit = (key, root, tuple(maker.out))
            groups[gid] = hit
        self._groups = groups
        top = _Maker(inodes, {}, link_target, mtime)
        hub_dir = top.dir(_Dir(), ("hf",), hf_ino, hub_ino, public=True,
                          extra={g[1]: built[1] for g, built in groups.items() if g[0] == "hf"})
        top.dir(_Dir(), ("hf-top",), ROOT_INODE, hf_ino, public=True, extra={HUB_DIR: hub_dir})
        publishers: dict[str, dict[str, Node]] = {}
        for g, built in groups.items():
            if g[0] == "lms":
                publishers.setdefault(g[1], {})[g[2]] = built[1]
        pubs = {p: top.dir(_Dir(), ("lms", p), lms_ino, inodes("view-dir", "lms", p), extra=repos)
                for p, repos in publishers.items()}
        top.dir(_Dir(), ("lms",), ROOT_INODE, lms_ino, public=True, extra=pubs)
        nodes = {node.ino: node for node in top.out}
        for _, _, group_nodes in groups.values():
            for node in group_nodes:
                nodes[node.ino] = node
        return ViewTree({HF_DIR: hf_ino, LMSTUDIO_DIR: lms_ino}, nodes)


def _active(e: ModelEntry) -> VersionRecord | None:
    active = e.model.active_version
    return next((v for v in e.versions if v.version == active and v.state == "installed"), None)


def _leaf_maker(name: str, v: VersionRecord) -> Callable[..., _Leaf]:
    mtime = _ns(v.card.get("installed_at") or v.card.get("created_at"))
    source = redacted(v.card.get("source"))

    def leaf(key: tuple[Any, ...], kind: str, rank: tuple[Any, ...], **kw: Any) -> _Leaf:
        size = len(kw["data"]) if kind == "card" else len(kw["target"].encode()) if kind == "symlink" \
            else kw["file"].size
        return _Leaf(key, kind, size, rank, name, v.version, mtime, source, {name}, **kw)

    return leaf


def _newest(name: str, v: VersionRecord) -> tuple[Any, ...]:
    return (-_ns(v.card.get("installed_at") or v.card.get("created_at")), name)


def _add_hf(repo: _Dir, folder: str, name: str, v: VersionRecord, hub: HubFiles) -> None:
    """One model's files in its ``models--org--repo`` directory."""
    leaf = _leaf_maker(name, v)
    refs, blobs, snaps = repo.sub("refs"), repo.sub("blobs"), repo.sub("snapshots")
    assert refs is not None and blobs is not None and snaps is not None  # only directories at this level
    refs.leaf("main", leaf(("ref", folder, hub.commit, name), "card", _newest(name, v), data=hub.commit.encode()))
    snap = snaps.sub(hub.commit)
    for parts, f in hub.files:
        # the first model with a source URL serves the fetch
        blobs.leaf(f.sha256, leaf(("blob", folder, f.sha256, name), "file", (f.url is None, name), file=f))
        d = snap
        for part in parts[:-1]:
            d = d.sub(part) if d is not None else None
        if d is not None:
            target = posixpath.join(*([".."] * (len(parts) + 1)), "blobs", f.sha256)
            d.leaf(parts[-1], leaf(("snap", folder, hub.commit, parts, f.sha256, name), "symlink", (name,),
                                   target=target))


def _add_lms(d: _Dir, place: tuple[str, ...], name: str, v: VersionRecord) -> None:
    """One model's files in its LM Studio ``publisher/repo`` directory."""
    leaf = _leaf_maker(name, v)
    for f in v.files:
        parts = hub_path_parts(f.filename)
        if parts is None or not is_digest(f.sha256):
            continue  # a catalog written by hand: never a '..', '' or '/' in a name
        *dirs, base = parts
        here: _Dir | None = d
        for part in dirs:
            here = here.sub(part) if here is not None else None
        if here is not None:
            here.leaf(base, leaf(("lms", *place, f.filename, f.sha256, name), "file", _newest(name, v), file=f))


def _content(lf: _Leaf) -> tuple[Any, ...]:
    return (lf.kind, lf.file.sha256 if lf.file is not None else None, lf.data, lf.target)


class _Maker:
    """Turns the described directories into nodes, children before their parents."""

    def __init__(self, inodes: InodeMap, uniform: Mapping[str, bool],
                 link_target: Callable[[FileRecord], str] | None, mtime: int) -> None:
        self.ino, self.uniform, self.link_target, self.mtime = inodes, uniform, link_target, mtime
        self.out: list[Node] = []

    def everyone(self, seen_by: Iterable[str]) -> bool:
        return any(self.uniform.get(m, False) for m in seen_by)

    def dir(self, d: _Dir, key: tuple[Any, ...], parent: Inode, ino: Inode, *, public: bool = False,
            extra: Mapping[str, Node] | None = None) -> Node:
        """A directory's attributes are one inode's, the same for every caller, so they
        tell nothing of what some caller may not see: its mtime is the newest of the
        children every caller sees, and its nlink always 1 ("not counted", as on btrfs:
        find then looks at every entry; a count, or whether it is exact, would say that
        a repository has a commit or a file hidden from the caller)."""
        children: dict[str, Inode] = {}
        seen: set[str] = set()
        mtimes, shown = [0], [0]  # of every child; of those every caller sees
        for name, child in (extra or {}).items():
            children[name] = child.ino
            seen |= child.seen_by
            mtimes.append(child.mtime_ns)
            if not child.per_caller:
                shown.append(child.mtime_ns)
        for name, value in d.items():
            if isinstance(value, _Dir):
                c = self.dir(value, (*key, name), ino, self.ino("view-dir", *key, name))
                if not c.per_caller:
                    shown.append(c.mtime_ns)
            else:
                c = self.candidates(sorted(value.values(), key=lambda x: x.rank), ino)
                for lf in value.values():
                    seen |= lf.seen_by
                    if self.everyone(lf.seen_by):
                        shown.append(lf.mtime)
            children[name] = c.ino
            seen |= c.seen_by
            mtimes.append(c.mtime_ns)
        seen_by = frozenset() if public else frozenset(seen)
        everyones = len(shown) > 1  # a child every caller sees: so does everyone see this directory
        # A directory only some callers see shows its newest child to them (two private
        # models of different apps in one repository share it: docs/security.md).
        mtime = max(shown if everyones or public else mtimes) or self.mtime
        node = Node(ino, parent, "dir", 0, mtime, nlink=1,
                    children=dict(sorted(children.items())), seen_by=seen_by,
                    per_caller=bool(seen_by) and not everyones)
        self.out.append(node)
        return node

    def candidates(self, leaves: list[_Leaf], parent: Inode) -> Node:
        """The nodes of one name, best first, each pointing to the next (``alt``); a
        candidate every caller sees ends the chain. Returns the first.

        When every candidate shows the same bytes (a blob or a file several quants
        share), one every caller sees goes first (a fetchable one before one with no
        URL): the name then has one node, cached by the kernel and in one page cache."""
        if len({_content(lf) for lf in leaves}) == 1:
            leaves = sorted(leaves, key=lambda lf: (lf.file is not None and lf.file.url is None,
                                                    not self.everyone(lf.seen_by), lf.rank))
        for i, lf in enumerate(leaves):
            if self.everyone(lf.seen_by):
                leaves = leaves[:i + 1]
                break
        alt = Inode(0)
        node: Node | None = None
        chained = len(leaves) > 1  # the name's answer depends on the caller: never cached, any of them
        for lf in reversed(leaves):
            node = self.leaf(lf, parent, alt, chained)
            alt = node.ino
        assert node is not None
        return node

    def leaf(self, lf: _Leaf, parent: Inode, alt: Inode, chained: bool = False) -> Node:
        ino = self.ino("view", lf.kind, *lf.key)
        seen_by = frozenset(lf.seen_by)
        per_caller = chained or not self.everyone(seen_by)
        twin = Inode(0)
        common: dict[str, Any] = dict(model=lf.model, version=lf.version, source=lf.source, seen_by=seen_by,
                                      per_caller=per_caller)
        if lf.kind == "file" and self.link_target is not None:
            assert lf.file is not None
            twin = self.ino("view-link", *lf.key)
            target = self.link_target(lf.file)
            self.out.append(Node(twin, parent, "link", len(target.encode()), lf.mtime, file=lf.file, twin=ino,
                                 target=target, **common))
        node = Node(ino, parent, lf.kind, lf.size, lf.mtime, file=lf.file, data=lf.data, target=lf.target,
                    twin=twin, alt=alt, **common)
        self.out.append(node)
        return node
