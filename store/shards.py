"""Split GGUF models: ``prefix-00001-of-00003.gguf`` and its siblings.

llama.cpp's ``gguf-split`` writes a large model as ``count`` files named
``{prefix}-{no:05d}-of-{count:05d}.gguf`` (``no`` from 1). Each holds some of the
tensors and three keys: ``split.no`` (0-based), ``split.count`` and
``split.tensors.count`` (the tensors of the whole set); the first also holds the model's
metadata. A runtime is handed the first file and opens the others by name beside it,
so the store keeps a split model as one entry whose files keep those names: the first
as the ``weights``, the rest as ``shard``.

This module knows the names and checks that a set is whole; it opens no file itself
except to list a directory (:func:`find_siblings`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .gguf import GGUFInfo

SPLIT_NAME = re.compile(r"(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})(?P<ext>\.gguf)", re.IGNORECASE)
MAX_SHARDS = 9999


@dataclass(frozen=True)
class SplitName:
    prefix: str
    no: int        # 1-based, as in the file name
    count: int
    ext: str       # '.gguf' as the name spells it

    def sibling(self, no: int) -> str:
        return f"{self.prefix}-{no:05d}-of-{self.count:05d}{self.ext}"

    @property
    def names(self) -> list[str]:
        """Every file name of the set, first to last."""
        return [self.sibling(i) for i in range(1, self.count + 1)]


def split_name(filename: str) -> SplitName | None:
    """The parts of a shard's file name; ``None`` for a name that is not one."""
    m = SPLIT_NAME.fullmatch(filename)
    if m is None:
        return None
    no, count = int(m["no"]), int(m["count"])
    if not 1 <= no <= count <= MAX_SHARDS:
        return None
    return SplitName(m["prefix"], no, count, m["ext"])


def group(filenames: Iterable[str]) -> tuple[list[list[str]], list[str]]:
    """Sort names into whole split sets (each first to last) and single files; a set with
    a missing member is left out of both (its names come back from :func:`incomplete`)."""
    sets: dict[tuple[str, int, str], dict[int, str]] = {}
    singles: list[str] = []
    for name in filenames:
        s = split_name(name)
        if s is None:
            singles.append(name)
        else:
            sets.setdefault((s.prefix, s.count, s.ext), {})[s.no] = name
    whole = [[members[i] for i in range(1, count + 1)]
             for (_, count, _), members in sorted(sets.items()) if len(members) == count]
    return whole, sorted(singles)


def incomplete(filenames: Iterable[str]) -> list[str]:
    """Problems with the split sets among ``filenames``: each set with a missing member."""
    sets: dict[tuple[str, int, str], set[int]] = {}
    for name in filenames:
        s = split_name(name)
        if s is not None:
            sets.setdefault((s.prefix, s.count, s.ext), set()).add(s.no)
    problems = []
    for (prefix, count, ext), present in sorted(sets.items()):
        missing = sorted(set(range(1, count + 1)) - present)
        if missing:
            first = SplitName(prefix, 1, count, ext)
            problems.append(f"{first.sibling(1)}: shard(s) {', '.join(first.sibling(i) for i in missing)} missing")
    return problems


def find_siblings(first: Path) -> list[Path]:
    """``first`` and, when it is the first file of a split set, its siblings beside it,
    first to last. Refuses a later shard (name the first), a missing shard, and a
    sibling of another count (``-of-00004`` beside ``-of-00003``): an extra shard."""
    s = split_name(first.name)
    if s is None:
        return [first]
    if s.no != 1:
        raise UsageError(f"{first.name} is shard {s.no} of {s.count}; name the first one, {s.sibling(1)}")
    directory = first.parent
    missing = [n for n in s.names if not (directory / n).is_file()]
    if missing:
        raise UsageError(f"{first.name} is split into {s.count} files, and "
                         f"{len(missing)} of them {'is' if len(missing) == 1 else 'are'} missing: "
                         f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    extra = sorted(p.name for p in directory.iterdir()
                   if (o := split_name(p.name)) is not None and o.prefix == s.prefix and o.ext.lower() == s.ext.lower()
                   and (o.count != s.count or o.no > s.count))
    if extra:
        raise UsageError(f"{first.name} is split into {s.count} files, but {', '.join(extra[:5])} "
                         "beside it claims another split of the same model; remove the stale shard(s)")
    return [directory / n for n in s.names]


def check_split(files: Sequence[tuple[str, GGUFInfo]]) -> None:
    """Check a split set's headers against each other and against its names: every file
    says ``split.count`` = the number of files and ``split.no`` = its place (0-based),
    all say the same ``split.tensors.count``, and that is the sum of their tensors. A
    single file that is not split passes."""
    if len(files) == 1 and _int(files[0][1], "split.count") in (None, 1):
        return
    total = len(files)
    declared = {_int(info, "split.tensors.count") for _, info in files}
    for index, (name, info) in enumerate(files):
        count, no = _int(info, "split.count"), _int(info, "split.no")
        if count is None or no is None:
            raise UsageError(f"{name}: not a shard of a split model (no split.count or split.no in its header)")
        if count != total:
            raise UsageError(f"{name}: its header says the model is split into {count} files, "
                             f"but the set has {total}")
        if no != index:
            raise UsageError(f"{name}: its header says it is shard {no + 1}, but its name makes it shard {index + 1}")
    if len(declared) != 1 or None in declared:
        raise UsageError(f"{files[0][0]}: the shards disagree on split.tensors.count")
    (expected,) = declared
    found = sum(info.tensor_count for _, info in files)
    if found != expected:
        raise UsageError(f"{files[0][0]}: the shards hold {found} tensors, but split.tensors.count says {expected}")


def _int(info: GGUFInfo, key: str) -> int | None:
    value = info.metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
