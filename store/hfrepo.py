"""Repo-level hub pulls: ``hf://org/repo[:QUANT][@REVISION]`` -> the files to fetch.

Like ``llama.cpp -hf org/repo:Q4_K_M`` and ``ollama pull hf.co/org/repo:Q4_K_M``, a pull
that names a repository, not a file, lists the repository's files (the hub's tree
listing, :func:`store.hf.list_tree`) and chooses:

* **the weights**: the GGUF files whose name carries QUANT, compared case-insensitively,
  as a label delimited by ``-``, ``.``, ``_`` or ``/`` (``model-Q4_K_M.gguf``,
  ``model.q4_k_m.gguf``, ``Q4_K_M/model-Q4_K_M-00001-of-00002.gguf``). A label that is
  a whole part of the name (between ``-``, ``.`` or ``/``) wins over one that is only a
  prefix of a longer label (``Q6_K`` picks ``m-Q6_K.gguf`` over ``m-Q6_K_L.gguf``; ``Q4_K``
  alone would match ``Q4_K_M`` and ``Q4_K_S``: ambiguous). Two different weights that
  match are refused with the candidates listed; no match lists the quants the repo has.
  Without QUANT, the first of :data:`DEFAULT_QUANTS` the repo has (``Q4_K_M`` first, as
  llama.cpp), else, as llama.cpp, the first weights file by path;
* **every shard** of a split model (``-00001-of-00003.gguf``; :mod:`store.shards`): a set
  with a missing member is refused;
* **the mmproj** (a GGUF with ``mmproj`` in its name), if the repo has one: the one whose
  name carries the chosen quant, else :data:`MMPROJ_PREFERENCE` (F16, then BF16, then F32),
  else the first by path.

Then each chosen file, and only those, gets a HEAD of its resolve URL
(:func:`store.hf.file_metadata`): the first at the asked revision, the rest at the commit
the hub named for it (``X-Repo-Commit``), so every file comes from one commit and its
recorded URL is pinned to it. The expected SHA-256 of each file is the listing's LFS
SHA-256, which must equal the HEAD's ``X-Linked-Etag`` (and the sizes agree): a file the
listing and its metadata disagree on is refused before a byte is fetched.

This module sends only the listing and those HEADs; it never downloads, and it never
sees a token (the HTTP layer's credential hook adds it, for the hub's origin only).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from . import hf, shards
from .errors import FetchError, IntegrityError, UsageError
from .names import check_filename

if TYPE_CHECKING:
    from .http import Http

#: The quants a pull without ``:QUANT`` takes, the first the repository has. llama.cpp's
#: ``-hf org/repo`` takes Q4_K_M, else falls back to the repo's first file; this goes on
#: through the usual balanced quants, smallest loss first, before falling back the same way.
DEFAULT_QUANTS = ("Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_XS", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0")
#: The mmproj taken when none carries the chosen quant in its name.
MMPROJ_PREFERENCE = ("F16", "BF16", "F32")

_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LABEL = re.compile(r"(?:^|(?<=[-._/]))((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32|FP16|FP32)(?=$|[-._/])",
                    re.IGNORECASE)


@dataclass(frozen=True)
class RepoRef:
    repo: str               # "org/name"
    quant: str | None       # as the user wrote it
    revision: str           # branch, tag or commit; "main" by default

    def display(self) -> str:
        quant = f":{self.quant}" if self.quant else ""
        rev = "" if self.revision == "main" else "@" + quote(self.revision, safe="")
        return f"hf://{self.repo}{quant}{rev}"


def is_repo_ref(source: str) -> bool:
    """Whether ``source`` names a hub repository (``hf://org/repo[:QUANT][@REV]``), not a file."""
    if not source.startswith("hf://"):
        return False
    return len(source[5:].rstrip("/").split("/")) == 2


def parse_repo_ref(source: str) -> RepoRef:
    """``hf://org/repo[:QUANT][@REVISION]`` -> :class:`RepoRef`. A revision with a slash
    (``refs/pr/1``) is written percent-encoded, as in a file's hf:// URL."""
    if not is_repo_ref(source):
        raise UsageError("a repository pull is hf://org/repo[:QUANT][@REVISION]")
    org, rest = source[5:].rstrip("/").split("/")
    revision = "main"
    if "@" in rest:
        rest, revision = rest.split("@", 1)
        revision = unquote(revision)
        if ":" in revision:
            raise UsageError("write the quant before the revision: hf://org/repo:QUANT@REVISION")
    name, _, quant = rest.partition(":")
    if name.lower().endswith(".gguf"):
        raise UsageError(f"hf://{org}/{name[:80]} names a file without its repository: write "
                         "hf://org/repo/FILE.gguf, or hf://org/repo:QUANT for a repository's quant")
    ref = hf.parse_hf_url(f"hf://{org}/{name}@{quote(revision, safe='')}/x.gguf")  # checks repo and revision
    if _ and not _QUANT.fullmatch(quant):
        raise UsageError(f"invalid quant {quant[:40]!r}: letters, digits, '_', '.' and '-' (e.g. Q4_K_M)")
    return RepoRef(ref.repo, quant or None, ref.revision)


# -- choosing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Unit:
    """One candidate weights: a single file, or a split set (first to last)."""
    key: str                           # the path of its (first) file
    paths: tuple[str, ...]             # present, first to last
    missing: tuple[str, ...] = ()      # a split set's absent members

    @property
    def stem(self) -> str:
        """What its quant label is read from: the path without ``.gguf`` or the split suffix."""
        s = shards.split_name(self.key)
        return s.prefix if s is not None else self.key[:-5]


@dataclass(frozen=True)
class Choice:
    label: str | None                  # the quant label chosen (as the file names spell it)
    weights: tuple[hf.TreeFile, ...]   # the weights, then its shards
    mmproj: hf.TreeFile | None

    def files(self) -> list[tuple[str, hf.TreeFile]]:
        """(role, file), the weights first."""
        out = [("weights" if i == 0 else "shard", f) for i, f in enumerate(self.weights)]
        return out + ([("mmproj", self.mmproj)] if self.mmproj is not None else [])


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _units(paths: Iterable[str]) -> list[_Unit]:
    singles: list[_Unit] = []
    sets: dict[tuple[str, int], dict[int, str]] = {}
    firsts: dict[tuple[str, int], shards.SplitName] = {}
    for path in paths:
        s = shards.split_name(path)
        if s is None:
            singles.append(_Unit(path, (path,)))
        else:
            sets.setdefault((s.prefix, s.count), {})[s.no] = path
            firsts[(s.prefix, s.count)] = s
    units = singles
    for key, members in sets.items():
        s = firsts[key]
        units.append(_Unit(s.sibling(1), tuple(members[i] for i in sorted(members)),
                           tuple(s.sibling(i) for i in range(1, s.count + 1) if i not in members)))
    return sorted(units, key=lambda u: u.key)


def _exact(quant: str, stem: str) -> bool:
    return quant.lower() in re.split(r"[-./]", stem.lower())


def _loose(quant: str, stem: str) -> bool:
    return re.search(rf"(?:^|[-._/]){re.escape(quant.lower())}(?:$|[-._/])", stem.lower()) is not None


def labels(stem: str) -> list[str]:
    """The quant labels a file name carries (``Q4_K_M``, ``IQ4_XS``, ``F16``…), upper-cased."""
    return [m.group(1).upper() for m in _LABEL.finditer(stem)]


def _matching(quant: str, units: list[_Unit]) -> list[_Unit]:
    exact = [u for u in units if _exact(quant, u.stem)]
    return exact or [u for u in units if _loose(quant, u.stem)]


def _label_of(unit: _Unit, quant: str) -> str:
    found = [lab for lab in labels(unit.stem) if _loose(quant, lab)]
    return found[0] if found else quant.upper()


def choose(files: list[hf.TreeFile], quant: str | None, shown: str) -> Choice:
    """The weights (with its shards) and mmproj of a repository pull (module docstring)."""
    ggufs = {f.path: f for f in files if f.path.lower().endswith(".gguf")}
    projectors = sorted(p for p in ggufs if "mmproj" in _basename(p).lower() and shards.split_name(p) is None)
    units = _units(p for p in ggufs if "mmproj" not in _basename(p).lower())
    if not units:
        raise UsageError(f"{shown}: the repository has no GGUF weights"
                         + (" (only a multimodal projector)" if projectors else ""))
    if quant is not None:
        found = _matching(quant, units)
        if not found:
            raise UsageError(f"{shown}: no weights match {quant!r}; the repository has: {_offer(units)}")
        label = _label_of(found[0], quant)
    else:
        found, label = [], None
        for q in DEFAULT_QUANTS:
            found = [u for u in units if _exact(q, u.stem)]
            if found:
                label = q
                break
        if not found:
            found = units[:1]
            label = next(iter(labels(found[0].stem)), None)
    if len(found) > 1:
        raise UsageError(f"{shown}: {len(found)} different weights match{'' if quant is None else ' ' + repr(quant)}: "
                         f"{', '.join(u.key for u in found[:8])}{' …' if len(found) > 8 else ''}; "
                         "name one with :QUANT (a longer label), or pull the file itself (hf://org/repo/FILE)")
    unit = found[0]
    if unit.missing:
        raise UsageError(f"{shown}: {_basename(unit.key)} is split into {len(unit.paths) + len(unit.missing)} "
                         f"files, and the repository lacks {', '.join(_basename(m) for m in unit.missing[:5])}"
                         f"{' …' if len(unit.missing) > 5 else ''}")
    return Choice(label, tuple(ggufs[p] for p in unit.paths),
                  ggufs[_mmproj(projectors, label)] if projectors else None)


def _mmproj(projectors: list[str], label: str | None) -> str:
    for q in ((label,) if label else ()) + MMPROJ_PREFERENCE:
        same = [p for p in projectors if _exact(q, p[:-5])]
        if same:
            return same[0]
    return projectors[0]


def _offer(units: list[_Unit]) -> str:
    """The quants a repository has, for a message: labels, or file names without one."""
    seen: list[str] = []
    for u in units:
        for lab in labels(u.stem)[-1:] or [_basename(u.key)]:
            if lab not in seen:
                seen.append(lab)
    return ", ".join(seen[:30]) + (" …" if len(seen) > 30 else "")


# -- resolving ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RepoFile:
    role: str                 # 'weights', 'shard' or 'mmproj'
    path: str                 # inside the repository
    filename: str             # its name in the store (the path's last part)
    meta: hf.HFFile           # the resolve URL pinned to the commit, SHA-256, size


@dataclass(frozen=True)
class RepoPlan:
    ref: RepoRef
    label: str | None
    commit: str | None        # the commit the hub resolved the revision to
    files: tuple[RepoFile, ...]


async def resolve_repo(http: Http, ref: RepoRef) -> RepoPlan:
    """List ``ref``'s repository, choose its files, and HEAD each chosen one (module
    docstring). Nothing is downloaded."""
    shown = ref.display()
    choice = choose(await hf.list_tree(http, ref.repo, ref.revision), ref.quant, shown)
    commit: str | None = None
    out: list[RepoFile] = []
    for role, f in choice.files():
        for part in f.path.split("/"):
            check_filename(part, reserved=False)
        if f.sha256 is None:
            raise FetchError(f"{shown}: {f.path} is not an LFS file: the hub gives no SHA-256 for it")
        meta = await hf.file_metadata(http, hf.HFRef(ref.repo, commit or ref.revision, f.path))
        if commit is None:
            commit = meta.commit
        elif meta.commit is not None and meta.commit != commit:
            raise FetchError(f"{shown}: the repository changed while its files were resolved; pull again")
        if (meta.sha256, meta.size) != (f.sha256, f.size):
            raise IntegrityError(f"{shown}: {f.path}: the hub's listing says SHA-256 {f.sha256[:16]}… "
                                 f"({f.size} bytes) but its file metadata says {meta.sha256[:16]}… "
                                 f"({meta.size} bytes); refused")
        out.append(RepoFile(role, f.path, _basename(f.path), meta))
    return RepoPlan(ref, choice.label, commit, tuple(out))


def default_name(plan: RepoPlan) -> str:
    """A model name from a repository and the chosen quant: ``org/tiny-GGUF`` with
    ``Q4_K_M`` -> ``tiny-GGUF-Q4_K_M``."""
    name = plan.ref.repo.split("/", 1)[1]
    return f"{name}-{plan.label}" if plan.label and plan.label.lower() not in name.lower() else name
