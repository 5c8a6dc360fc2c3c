"""Other tools' model caches: where each keeps them, and what models they hold.

    hf        the Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
              ``~/.cache/huggingface/hub``. ``models--ORG--REPO/snapshots/COMMIT/FILE``
              are relative links to ``../../blobs/NAME``, NAME being the file's SHA-256
              (an LFS file) or git's SHA-1 (a small one); ``refs/main`` holds the commit.
              The snapshot ``refs/main`` names is read (else the newest one). Each
              weights file (or split set) is one model, with the repository's projector.
    ollama    ``$OLLAMA_MODELS``, else ``~/.ollama/models``:
              ``manifests/REGISTRY/NAMESPACE/NAME/TAG`` (JSON) whose layers name
              ``blobs/sha256-HEX``. One model per manifest: its ``...image.model`` layer
              and its ``...image.projector`` layer. The other layers (template, params,
              system, license, adapter) are not GGUF files and are left out.
    lmstudio  LM Studio's models folder: ``downloadsFolder`` of its ``settings.json``
              (in its home: ``~/.lmstudio-home-pointer`` names it, else
              ``~/.lmstudio``; older releases: ``~/.cache/lm-studio``), else
              ``HOME/models``. ``PUBLISHER/REPO/*.gguf``, a projector beside the weights.
    dir       any directory of ``.gguf`` files (not its subdirectories); one that holds
              ``models--*`` folders is read as a Hugging Face cache, one with
              ``manifests/`` and ``blobs/`` as Ollama's, one with no ``.gguf`` of its
              own but ``PUBLISHER/REPO/*.gguf`` as LM Studio's.

A projector is a GGUF whose header says so (``is_mmproj``). A repository's goes with each
of its models (where it offers several, the one with ``f16`` in its name, else the first
by name); a plain directory's with the model whose name it shares the most with (at
least 3 characters: ``Tiny-mmproj-f16.gguf`` goes with ``Tiny-Q4_K_M.gguf``), or with
the only model there is. Split sets
(``-00001-of-00003.gguf``) are one model (``store.shards``: whole, headers agree).

Every cache is read as if it were hostile: each directory below the cache's root is
opened relative to its parent with ``O_NOFOLLOW`` (a link where a directory should be
is refused, never followed), a snapshot's link must name a file of its own
repository's ``blobs/`` (the link is read, never followed), and each file is opened
``O_NOFOLLOW`` and must be a regular file. A folder or file name that becomes part of
a model's name, source, hub path or hub repository must be one safe path component
(``names.filename_problem``: no control or escape character). Reading is bounded: at
most :data:`MAX_ENTRIES` names per cache (a directory is read no further), 1 MiB of
JSON, nesting the parser can follow. What is refused is reported with its reason
(escaped, :func:`printable`), and the rest goes on. This module only reads: it never writes, renames or
deletes anything, and it commits nothing (:mod:`.adopt` does).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import posixpath
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import shards
from .errors import NotFound, StoreError
from .gguf import GGUFInfo, parse_gguf_file
from .names import filename_problem

TOOLS = ("hf", "ollama", "lmstudio")
WEIGHTS_MEDIA = "application/vnd.ollama.image.model"
PROJECTOR_MEDIA = "application/vnd.ollama.image.projector"
MAX_MANIFEST = 1 << 20
MAX_DEPTH = 8          # directories below a snapshot
MAX_ENTRIES = 100_000  # names read in one cache
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class Refusal(Exception):
    """A path of a cache this module will not use, and why."""

    def __init__(self, path: str, reason: str) -> None:
        path, reason = printable(path), printable(reason)  # a hostile name is shown, never acted out
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def printable(text: str) -> str:
    """``text`` with what a terminal would act on (controls, escapes, invisible and
    unassigned characters) written as Python escapes."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class Located:
    """One file of another tool's cache: how to reach it without following a link, and
    what its cache says it is."""
    root: str                  # the cache's root (the one path followed as given)
    parts: tuple[str, ...]     # directories below it, each opened with O_NOFOLLOW
    name: str                  # the file in the last of them
    shown: str                 # the path people know it by (a snapshot's link, for hf)
    size: int
    dev: int
    ino: int
    uid: int
    sha256: str | None = None           # the SHA-256 its cache names it by
    git_sha1: str | None = None         # hf: git's SHA-1 of a small (non-LFS) file
    content_addressed: bool = False     # a blob its tool names by content and never rewrites
    mode: int = 0o644                   # its permission bits (st_mode & 0o7777)
    nlink: int = 1                      # its names (a hard link elsewhere: more than one)

    def open(self) -> int:
        """A read-only descriptor of the file, reached as at discovery; Refusal if
        anything on the way is now a link, or the file is another one."""
        fd = _open_root(self.root)
        try:
            for part in self.parts:
                fd = _swap(fd, _subdir(fd, part, self.shown))
            ffd = _file(fd, self.name, self.shown)
        finally:
            os.close(fd)
        st = os.fstat(ffd)
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):
            os.close(ffd)
            raise Refusal(self.shown, "replaced since the plan was made")
        return ffd


@dataclass(frozen=True)
class Found:
    """A file of a model found in a cache: where, and its name and role in the store."""
    where: Located
    filename: str
    role: str                  # 'weights', 'shard', 'mmproj'
    hub_path: str | None = None


@dataclass(frozen=True)
class Candidate:
    """One logical model a cache holds."""
    tool: str                  # 'hf', 'ollama', 'lmstudio', 'dir'
    name: str                  # the model name it would get (before conflicts)
    origin: str                # where it is, for people
    source: str                # the catalog's source identity
    files: tuple[Found, ...]
    info: GGUFInfo             # the weights' header
    source_url: str | None = None
    hub_repo: str | None = None
    hub_commit: str | None = None


@dataclass(frozen=True)
class Place:
    """A cache looked at: which tool's, where, and why there."""
    tool: str
    path: str
    found: bool
    reason: str                # 'HF_HUB_CACHE', 'default', '--from', ...


@dataclass
class Discovery:
    places: list[Place] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    def extend(self, other: Discovery) -> None:
        self.places += other.places
        self.candidates += other.candidates
        self.refused += other.refused


# -- where each tool keeps its models -----------------------------------------------------
def hf_cache(env: Mapping[str, str], home: Path) -> tuple[Path, str]:
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser(), "HF_HUB_CACHE"
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub", "HF_HOME"
    return home / ".cache" / "huggingface" / "hub", "default"


def ollama_models(env: Mapping[str, str], home: Path) -> tuple[Path, str]:
    if env.get("OLLAMA_MODELS"):
        return Path(env["OLLAMA_MODELS"]).expanduser(), "OLLAMA_MODELS"
    return home / ".ollama" / "models", "default"


def lmstudio_models(home: Path) -> tuple[Path, str]:
    """LM Studio's models folder, as LM Studio finds it (module docstring)."""
    lms_home = home / ".lmstudio"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        pointer = (home / ".lmstudio-home-pointer").read_text().strip()
        if pointer and os.path.isabs(pointer):
            lms_home = Path(pointer)
    for settings in (lms_home / "settings.json", home / ".cache" / "lm-studio" / "settings.json"):
        folder = _downloads_folder(settings)
        if folder is not None:
            return Path(folder).expanduser(), f"downloadsFolder in {settings}"
    if not (lms_home / "models").exists() and (home / ".cache" / "lm-studio" / "models").exists():
        return home / ".cache" / "lm-studio" / "models", "default (older LM Studio)"
    return lms_home / "models", "default"


def _downloads_folder(settings: Path) -> str | None:
    try:
        with open(settings, "rb") as f:
            doc = json.loads(f.read(MAX_MANIFEST))
    except (OSError, ValueError, RecursionError):  # nested deeper than the parser's stack
        return None
    value = doc.get("downloadsFolder") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and value.strip() else None


def discover(spec: str, env: Mapping[str, str], home: Path) -> Discovery:
    """What the cache ``spec`` names holds: a tool of :data:`TOOLS` at its own place, or a
    directory of GGUF files. A tool's missing cache is a Place with ``found`` False."""
    if spec in TOOLS:
        root, why = (hf_cache(env, home) if spec == "hf" else ollama_models(env, home) if spec == "ollama"
                     else lmstudio_models(home))
        tool = spec
    else:
        root, why, tool = Path(spec), "--from", "dir"
    root = Path(os.path.abspath(root))
    d = Discovery()
    if tool == "dir" and not root.is_dir():
        raise NotFound(f"--from {spec}: no such directory (nor one of {', '.join(TOOLS)})", path=str(root))
    if tool == "dir":
        tool = _layout_of(root)
    if not root.is_dir():
        d.places.append(Place(tool, str(root), False, why))
        return d
    d.places.append(Place(tool, str(root), True, why))
    scan = {"hf": _scan_hf, "ollama": _scan_ollama, "lmstudio": _scan_lmstudio, "dir": _scan_dir}[tool]
    try:
        scan(str(root), d)
    except Refusal as r:
        d.refused.append(r)
    return d


def _layout_of(root: Path) -> str:
    """A directory named with ``--from`` may be a tool's cache moved elsewhere: a Hugging
    Face cache holds ``models--*`` folders, Ollama's ``manifests/`` and ``blobs/``, LM
    Studio's ``publisher/repo/*.gguf`` (and no ``.gguf`` of its own)."""
    with os.scandir(root) as it:  # at most the budget of names of a whole cache
        names = {e.name for e in itertools.islice(it, MAX_ENTRIES + 1)}
    if any(n.startswith("models--") for n in names):
        return "hf"
    if {"manifests", "blobs"} <= names:
        return "ollama"
    if not any(n.lower().endswith(".gguf") for n in names) and _has_publisher_repo_gguf(root):
        return "lmstudio"
    return "dir"


def _has_publisher_repo_gguf(root: Path, limit: int = 4096) -> bool:
    """Whether ``root`` is laid out as LM Studio's ``publisher/repo/*.gguf`` (a models
    folder kept elsewhere): a ``.gguf`` two real directories down, found with the scans'
    descriptors (no link followed), looking at ``limit`` names at most."""
    budget, top = [limit], str(root)

    def subdirs(dfd: int) -> Iterator[int]:
        for e in _entries(dfd, budget):
            if e.is_dir(follow_symlinks=False):
                sub = _subdir(dfd, e.name, top)
                try:
                    yield sub
                finally:
                    os.close(sub)

    try:
        with _dirs(top, (), top) as rfd:
            return any(e.name.lower().endswith(".gguf") and e.is_file(follow_symlinks=False)
                       for pfd in subdirs(rfd) for rpfd in subdirs(pfd) for e in _entries(rpfd, budget))
    except (OSError, Refusal):  # the budget spent, or a folder that would not open: not that layout
        return False
    return False


# -- descriptors that never follow a link --------------------------------------------------
MAX_LINK_HOPS = 40


def _open_root(root: str) -> int:
    """A cache's root directory, walked from ``/`` one component at a time without
    following a link the kernel would resolve on its own: a symbolic link on the way is
    followed only when it is this process's user's or root's. A link another user owns
    (``/home/eve/cache -> /root/models``) is refused: that user could point it at any
    file this process may read, root's own included (the kernel's protected_symlinks
    rule, for every directory, not just sticky ones). The walk holds each directory open,
    so a component renamed or swapped meanwhile is a refusal or the old directory, never
    a detour."""
    trusted = {0, os.geteuid()}
    parts = [p for p in root.split("/") if p not in ("", ".")]
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    where, hops = "/", 0
    try:
        while parts:
            name = parts.pop(0)
            if name == "..":
                parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                fd = _swap(fd, parent)
                where = posixpath.dirname(where) or "/"
                continue
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                shown = posixpath.join(where, name)
                if st.st_uid not in trusted:
                    raise Refusal(shown, f"a symbolic link owned by uid {st.st_uid}, another user: not followed "
                                  "(adopt as that user, or name the directory it points to)")
                if hops > MAX_LINK_HOPS:
                    raise Refusal(shown, "too many symbolic links")
                target = os.readlink(name, dir_fd=fd)
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                if target.startswith("/"):
                    fd = _swap(fd, os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                    where = "/"
                continue
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            fd = _swap(fd, nxt)
            where = posixpath.join(where, name)
        return fd
    except OSError as exc:
        os.close(fd)
        raise Refusal(root, f"cannot open: {exc.strerror}") from None
    except Refusal:
        os.close(fd)
        raise


def _subdir(dfd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refusal(shown, f"{name} is a symbolic link or not a directory: not followed") from None
        raise Refusal(shown, f"cannot open {name}: {exc.strerror}") from None


def _file(dfd: int, name: str, shown: str) -> int:
    try:  # a device or a FIFO is never opened (an open alone may act on a device)
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError as exc:
        raise Refusal(shown, f"cannot open: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise Refusal(shown, "a symbolic link: not followed")
    if not stat.S_ISREG(st.st_mode):
        raise Refusal(shown, "not a regular file")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refusal(shown, "a symbolic link: not followed") from None
        raise Refusal(shown, f"cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refusal(shown, "not a regular file")
    return fd


def _swap(old: int, new: int) -> int:
    os.close(old)
    return new


@contextlib.contextmanager
def _dirs(root: str, parts: tuple[str, ...], shown: str) -> Iterator[int]:
    fd = _open_root(root)
    try:
        for part in parts:
            fd = _swap(fd, _subdir(fd, part, shown))
        yield fd
    finally:
        os.close(fd)


def _entries(dfd: int, budget: list[int]) -> list[os.DirEntry[str]]:
    """The entries of a directory, sorted; Refusal once the cache's budget of names is
    spent (the reading stops there: a directory of millions is never held whole)."""
    with os.scandir(dfd) as it:
        out = list(itertools.islice(it, max(budget[0], 0) + 1))
    budget[0] -= len(out)
    if budget[0] < 0:
        raise Refusal("(cache)", f"more than {MAX_ENTRIES} names: not read further")
    return sorted(out, key=lambda e: e.name)


def _locate(root: str, parts: tuple[str, ...], name: str, shown: str, *, sha256: str | None = None,
            git_sha1: str | None = None, content_addressed: bool = False) -> tuple[Located, GGUFInfo]:
    """The file ``root/parts/name`` and its GGUF header (Refusal if it has none)."""
    with _dirs(root, parts, shown) as dfd:
        fd = _file(dfd, name, shown)
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        try:
            info = parse_gguf_file(f, name=os.path.basename(shown), size=st.st_size)
        except StoreError as exc:
            raise Refusal(shown, str(exc)) from None
        except OSError as exc:
            raise Refusal(shown, f"read failed: {exc.strerror}") from None
    return Located(root, parts, name, shown, st.st_size, st.st_dev, st.st_ino, st.st_uid, sha256, git_sha1,
                   content_addressed, stat.S_IMODE(st.st_mode), st.st_nlink), info


# -- Hugging Face --------------------------------------------------------------------------
def _scan_hf(root: str, d: Discovery) -> None:
    budget = [MAX_ENTRIES]
    with _dirs(root, (), root) as cfd:
        repos = [e.name for e in _entries(cfd, budget) if e.name.startswith("models--")]
    for repo_dir in repos:
        try:
            _scan_hf_repo(root, repo_dir, d, budget)
        except Refusal as r:
            d.refused.append(r)


def _hf_repo_id(repo_dir: str) -> str | None:
    parts = repo_dir[len("models--"):].split("--")
    if not all(parts) or any(filename_problem(p) for p in parts):
        return None
    return parts[0] if len(parts) == 1 else f"{parts[0]}/{'--'.join(parts[1:])}"


def _hf_snapshot(root: str, repo_dir: str, budget: list[int]) -> str | None:
    shown = os.path.join(root, repo_dir)
    with _dirs(root, (repo_dir,), shown) as rfd:
        commit = None
        with contextlib.suppress(Refusal, OSError), _dirs(root, (repo_dir, "refs"), shown) as refs:
            fd = _file(refs, "main", os.path.join(shown, "refs", "main"))
            with os.fdopen(fd, "rb") as f:
                commit = f.read(128).decode("ascii", "replace").strip()
        sfd = _subdir(rfd, "snapshots", shown)
        try:
            snaps = {e.name: e.stat(follow_symlinks=False).st_mtime for e in _entries(sfd, budget)
                     if e.is_dir(follow_symlinks=False) and not filename_problem(e.name)}
        finally:
            os.close(sfd)
    if commit in snaps:
        return commit
    return max(snaps, key=lambda k: (snaps[k], k)) if snaps else None


def _scan_hf_repo(root: str, repo_dir: str, d: Discovery, budget: list[int]) -> None:
    repo_shown = os.path.join(root, repo_dir)
    repo_id = _hf_repo_id(repo_dir)
    if repo_id is None:
        raise Refusal(repo_shown, "not a Hugging Face repository folder name")
    commit = _hf_snapshot(root, repo_dir, budget)
    if commit is None:
        return
    files: list[tuple[Found, GGUFInfo]] = []
    base = ("snapshots", commit)
    for rel, is_link in _walk(root, (repo_dir, *base), repo_shown, budget, d):
        if not rel.lower().endswith(".gguf"):
            continue
        shown = os.path.join(repo_shown, *base, rel)
        try:
            if is_link:
                loc, info = _hf_blob(root, repo_dir, base, rel, shown)
            else:  # a real file in a snapshot (a copy, not the cache's own link): no name to check
                *sub, name = rel.split("/")
                loc, info = _locate(root, (repo_dir, *base, *sub), name, shown)
            files.append((Found(loc, _store_filename(rel, shown), "weights", hub_path=rel), info))
        except Refusal as r:
            d.refused.append(r)
    stem = re.sub(r"[-_.]gguf$", "", repo_id.split("/")[-1], flags=re.IGNORECASE)
    for found, info, name in _models(files, d, stem):
        d.candidates.append(Candidate(
            "hf", name, f"hf://{repo_id}@{commit[:12]} {found[0].hub_path}", f"hf://{repo_id}", tuple(found), info,
            source_url=f"https://huggingface.co/{repo_id}", hub_repo=repo_id, hub_commit=commit))


def _hf_blob(root: str, repo_dir: str, base: tuple[str, ...], rel: str, shown: str) -> tuple[Located, GGUFInfo]:
    """The blob a snapshot's link names: it must be a file of the repository's own
    ``blobs/``, named by its hash. The link is read, never followed."""
    *sub, name = rel.split("/")
    with _dirs(root, (repo_dir, *base, *sub), shown) as dfd:
        try:
            target = os.readlink(name, dir_fd=dfd)
        except OSError as exc:
            raise Refusal(shown, f"cannot read the link: {exc.strerror}") from None
    if os.path.isabs(target):  # huggingface_hub's fallback: the cache's path as it knew it, or its real one
        resolved = min((os.path.relpath(os.path.normpath(target), os.path.join(top, repo_dir))
                        for top in (os.path.normpath(root), os.path.realpath(root))), key=len)
    else:
        resolved = posixpath.normpath(posixpath.join(*base, *sub, target))
    parts = resolved.split("/")
    if len(parts) != 2 or parts[0] != "blobs" or parts[1] in ("", ".", ".."):
        raise Refusal(shown, f"links to {target!r}, outside its repository's blobs/: refused")
    blob = parts[1]
    if not (_SHA256.fullmatch(blob) or _SHA1.fullmatch(blob)):
        raise Refusal(shown, f"links to blobs/{blob}, which is not named by a hash")
    return _locate(root, (repo_dir, "blobs"), blob, shown, content_addressed=True,
                   sha256=blob if len(blob) == 64 else None, git_sha1=blob if len(blob) == 40 else None)


def _walk(root: str, parts: tuple[str, ...], shown: str, budget: list[int], d: Discovery,
          prefix: str = "", depth: int = 0) -> Iterator[tuple[str, bool]]:
    """(path relative to ``parts``, is a link) of every file and link below, never
    entering a linked directory."""
    with _dirs(root, parts, shown) as dfd:
        entries = [(e.name, e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in _entries(dfd, budget)]
    for name, is_link, is_dir in entries:
        rel = f"{prefix}{name}"
        if is_dir:
            if depth >= MAX_DEPTH:
                d.refused.append(Refusal(os.path.join(shown, *parts[1:], name), "too deep: not read"))
                continue
            yield from _walk(root, (*parts, name), shown, budget, d, f"{rel}/", depth + 1)
        else:
            yield rel, is_link


# -- Ollama ---------------------------------------------------------------------------------
def _scan_ollama(root: str, d: Discovery) -> None:
    budget = [MAX_ENTRIES]
    with _dirs(root, (), root) as rfd:
        names = {e.name for e in _entries(rfd, budget)}
    if "manifests" not in names:
        return
    levels: list[tuple[str, ...]] = [()]
    for _ in range(3):  # registry / namespace / name
        nxt = []
        for parts in levels:
            shown = os.path.join(root, "manifests", *parts)
            try:
                with _dirs(root, ("manifests", *parts), shown) as dfd:
                    for e in _entries(dfd, budget):
                        problem = filename_problem(e.name)
                        if problem is not None:
                            d.refused.append(Refusal(os.path.join(shown, e.name), f"its name {problem}"))
                        elif e.is_dir(follow_symlinks=False):
                            nxt.append((*parts, e.name))
                        elif e.is_symlink():
                            d.refused.append(Refusal(os.path.join(shown, e.name), "a symbolic link: not followed"))
            except Refusal as r:
                d.refused.append(r)
        levels = nxt
    for parts in levels:
        shown_dir = os.path.join(root, "manifests", *parts)
        try:
            with _dirs(root, ("manifests", *parts), shown_dir) as dfd:
                tags = [e.name for e in _entries(dfd, budget)]
        except Refusal as r:
            d.refused.append(r)
            continue
        for tag in tags:
            try:
                c = _ollama_model(root, parts, tag)
            except Refusal as r:
                d.refused.append(r)
                continue
            if c is not None:
                d.candidates.append(c)


def _ollama_model(root: str, parts: tuple[str, ...], tag: str) -> Candidate | None:
    registry, namespace, model = parts
    shown = os.path.join(root, "manifests", *parts, tag)
    problem = filename_problem(tag)
    if problem is not None:
        raise Refusal(shown, f"its name {problem}")
    with _dirs(root, ("manifests", *parts), shown) as dfd:
        fd = _file(dfd, tag, shown)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_MANIFEST + 1)
    if len(raw) > MAX_MANIFEST:
        raise Refusal(shown, "manifest larger than 1 MiB")
    try:
        doc = json.loads(raw)
        layers = doc["layers"]
        assert isinstance(layers, list)
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
        raise Refusal(shown, "not an Ollama manifest (JSON with layers)") from None
    weights = [la for la in layers if isinstance(la, dict) and la.get("mediaType") == WEIGHTS_MEDIA]
    projectors = [la for la in layers if isinstance(la, dict) and la.get("mediaType") == PROJECTOR_MEDIA]
    if not weights:
        return None  # an embedding-less or adapter-only manifest: nothing to adopt
    if len(weights) > 1 or len(projectors) > 1:
        raise Refusal(shown, "more than one model or projector layer")
    qualified = f"{namespace}/{model}" if namespace != "library" else model
    base = _name(model if namespace in ("library",) or registry in ("hf.co", "huggingface.co")
                 else f"{namespace}-{model}", tag)
    found: list[tuple[Found, GGUFInfo]] = []
    for layer, role, filename in ((weights[0], "weights", f"{base}.gguf"),
                                  *((p, "mmproj", f"mmproj-{base}.gguf") for p in projectors)):
        m = _DIGEST.fullmatch(str(layer.get("digest", "")))
        size = layer.get("size")
        if m is None or not isinstance(size, int) or isinstance(size, bool):
            raise Refusal(shown, f"layer {str(layer.get('digest'))[:80]!r}: no sha256 digest and size")
        blob = f"sha256-{m[1]}"
        loc, info = _locate(root, ("blobs",), blob, os.path.join(root, "blobs", blob), sha256=m[1],
                            content_addressed=True)
        if loc.size != size:
            raise Refusal(loc.shown, f"{loc.size} bytes, its manifest says {size}")
        if info.is_mmproj != (role == "mmproj"):
            raise Refusal(loc.shown, f"its header says {'a projector' if info.is_mmproj else 'weights'}, "
                                     f"its layer says {role}")
        found.append((Found(loc, filename, role), info))
    return Candidate("ollama", base, f"ollama {registry}/{qualified}:{tag}",
                     f"ollama://{registry}/{namespace}/{model}:{tag}", tuple(f for f, _ in found), found[0][1])


# -- LM Studio and plain directories ---------------------------------------------------------------
def _scan_lmstudio(root: str, d: Discovery) -> None:
    budget = [MAX_ENTRIES]
    with _dirs(root, (), root) as rfd:
        publishers = [e.name for e in _entries(rfd, budget) if e.is_dir(follow_symlinks=False)]
    for publisher in publishers:
        try:
            _check_name(root, publisher)
            with _dirs(root, (publisher,), os.path.join(root, publisher)) as pfd:
                repos = [e.name for e in _entries(pfd, budget) if e.is_dir(follow_symlinks=False)]
        except Refusal as r:
            d.refused.append(r)
            continue
        for repo in repos:
            try:
                _check_name(os.path.join(root, publisher), repo)  # both kept, as its hub repository
                files = _gguf_files(root, (publisher, repo), d, budget)
            except Refusal as r:
                d.refused.append(r)
                continue
            hub_repo = f"{publisher}/{repo}"
            stem = re.sub(r"[-_.]gguf$", "", repo, flags=re.IGNORECASE)
            for found, info, name in _models(files, d, stem):
                d.candidates.append(Candidate("lmstudio", name, f"lmstudio {hub_repo}/{found[0].filename}",
                                              f"lmstudio://{hub_repo}", tuple(found), info, hub_repo=hub_repo))


def _scan_dir(root: str, d: Discovery) -> None:
    files = _gguf_files(root, (), d, [MAX_ENTRIES])
    for found, info, name in _models(files, d, None, one_family=False):
        d.candidates.append(Candidate("dir", name, found[0].where.shown, f"file://{found[0].where.shown}",
                                      tuple(found), info))


def _gguf_files(root: str, parts: tuple[str, ...], d: Discovery, budget: list[int]) -> list[tuple[Found, GGUFInfo]]:
    """The ``.gguf`` regular files directly in ``root/parts`` (a link is refused: adopt
    its target where it is)."""
    shown_dir = os.path.join(root, *parts)
    with _dirs(root, parts, shown_dir) as dfd:
        names = [e.name for e in _entries(dfd, budget) if e.name.lower().endswith(".gguf")]
    out = []
    for name in names:
        shown = os.path.join(shown_dir, name)
        try:
            loc, info = _locate(root, parts, name, shown)
            out.append((Found(loc, _store_filename(name, shown), "weights", hub_path=name if parts else None), info))
        except Refusal as r:
            d.refused.append(r)
    return out


# -- files into models ------------------------------------------------------------------------------
def _check_name(parent: str, name: str) -> None:
    problem = filename_problem(name)
    if problem is not None:
        raise Refusal(os.path.join(parent, name), f"its name {problem}")


def _store_filename(rel: str, shown: str) -> str:
    """The last part of ``rel``; Refusal if any part is not one safe name (it is kept as
    the file's hub path, and shown)."""
    for part in rel.split("/"):
        problem = filename_problem(part)
        if problem is not None:
            raise Refusal(shown, f"its name {problem}")
    return rel.split("/")[-1]


def _models(files: list[tuple[Found, GGUFInfo]], d: Discovery, stem: str | None,
            *, one_family: bool = True) -> Iterator[tuple[list[Found], GGUFInfo, str]]:
    """One model per weights file or whole split set among ``files``; its files, its
    weights' header and a model name. ``one_family``: the files are one repository's, and
    its projector goes with every model of it. Otherwise (a plain directory) a projector
    goes with the model whose name it shares the most with (at least 3 characters), or
    with the only model there is."""
    projectors = sorted((f for f, i in files if i.is_mmproj), key=lambda f: f.filename)
    weights = {f.hub_path or f.filename: (f, i) for f, i in files if not i.is_mmproj}
    by_dir: dict[str, list[str]] = {}
    for rel in weights:
        by_dir.setdefault(posixpath.dirname(rel), []).append(posixpath.basename(rel))
    out: list[tuple[list[Found], GGUFInfo, str]] = []
    for directory, names in sorted(by_dir.items()):
        rels = {n: posixpath.join(directory, n) for n in names}
        whole, singles = shards.group(names)
        shown_dir = os.path.dirname(weights[rels[names[0]]][0].where.shown)
        for problem in shards.incomplete(names):
            d.refused.append(Refusal(shown_dir, problem))
        for members in [*whole, *([n] for n in singles)]:
            chosen = [weights[rels[n]] for n in members]
            try:
                shards.check_split([(f.filename, i) for f, i in chosen])
            except StoreError as exc:
                d.refused.append(Refusal(chosen[0][0].where.shown, str(exc)))
                continue
            found = [_role(f, "weights" if k == 0 else "shard") for k, (f, _) in enumerate(chosen)]
            split = shards.split_name(members[0])
            base = split.prefix if split is not None else re.sub(r"\.gguf$", "", members[0], flags=re.IGNORECASE)
            out.append((found, chosen[0][1], base))
    for found, info, base in out:
        mmproj = _projector(projectors, base, only=len(out) == 1) if not one_family else \
            next((p for p in projectors if "f16" in p.filename.lower()), projectors[0] if projectors else None)
        if mmproj is not None and mmproj.filename not in {f.filename for f in found}:
            found.append(_role(mmproj, "mmproj"))
        if stem and stem.lower() not in base.lower():
            base = f"{stem}-{base}"
        yield found, info, _name(base)


def _projector(projectors: list[Found], base: str, *, only: bool) -> Found | None:
    """The projector of a plain directory that goes with the weights named ``base``."""
    def shared(p: Found) -> int:
        name = re.sub(r"[-_.]?mmproj[-_.]?", "", p.filename.lower()).removesuffix(".gguf")
        return len(os.path.commonprefix([name, base.lower()]))
    best = max(projectors, key=lambda p: (shared(p), "f16" in p.filename.lower()), default=None)
    if best is not None and shared(best) >= 3:
        return best
    return projectors[0] if only and len(projectors) == 1 else None


def _role(f: Found, role: str) -> Found:
    return Found(f.where, f.filename, role, f.hub_path)


def _name(*parts: str) -> str:
    """A readable model name from ``parts``: other characters become '-', within 120."""
    text = _NAME_CHARS.sub("-", "-".join(parts)).strip("-.")[:120].rstrip("-.")
    return text or "model"
