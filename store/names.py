"""Validation of the names that become paths: model names and file names.

A model name is a directory at the top of the mount; a file name is a component
inside it. Both come from users and from remote manifests, so both are checked here
before they touch a path. Refuse, never sanitise.

:func:`filename_problem` is the one rule for "a single safe path component"; the
manifest parser (``store.manifest``), imports and archive-member paths all use it.
"""

from __future__ import annotations

import re
import unicodedata

from .errors import UsageError

MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Names the mount itself puts inside a model directory. Compared case-insensitively so
# a pack is portable to case-insensitive file systems (macOS).
RESERVED_FILENAMES = frozenset({"model.json", ".versions"})
# Names the mount itself puts at its root: the views of the same files in other tools'
# layouts (modelfs.mount.views). A model may not take one (compared case-insensitively).
RESERVED_MODEL_NAMES = frozenset({".hf", ".lmstudio"})
MAX_NAME_BYTES = 255


# Unicode categories no name may contain: control (Cc), format (Cf: U+202E right-to-left
# override, U+200B zero-width space), private use (Co), surrogate (Cs), unassigned (Cn),
# line and paragraph separators (Zl, Zp). A name must look like what it is.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"})


def edge_problem(name: str) -> str | None:
    """Why a name's first or last character misleads, or None: a trailing dot or space
    (dropped by some file systems and shells, invisible in listings), a leading '-'
    (read as an option by every command line tool)."""
    if name.endswith((".", " ")):
        return "ends in a dot or a space"
    if name.startswith("-"):
        return "begins with '-'"
    return None


def invisible_problem(name: str) -> str | None:
    """Why ``name`` holds a character that is not what it looks like, or None."""
    for c in name:
        category = unicodedata.category(c)
        if category == "Cc":
            return "contains a NUL byte" if c == "\x00" else "contains a control character"
        if category in INVISIBLE_CATEGORIES:
            return f"contains the invisible, unassigned or format character U+{ord(c):04X}"
    return None


def model_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        return "is not 1-128 of A-Z a-z 0-9 . _ -"
    if name in (".", ".."):
        return "is a relative path component"
    if name.casefold() in RESERVED_MODEL_NAMES:
        return "is reserved by the mount (its view of the store in another tool's layout)"
    return edge_problem(name)


def check_model_name(name: str) -> str:
    problem = model_name_problem(name)
    if problem is not None:
        raise UsageError(f"invalid model name {_shown(name)}: it {problem} (use 1-128 of A-Z a-z 0-9 . _ -, "
                         "not beginning with '-' or ending in '.', not .hf or .lmstudio)", name=name)
    return name


def filename_problem(name: object) -> str | None:
    """Why ``name`` is not one safe path component, or None if it is.

    Not a string, empty, ``.`` or ``..``; contains ``/``, ``\\``, NUL or any other
    control character (C0, DEL, C1), or an invisible, format, private-use or unassigned
    character (:data:`INVISIBLE_CATEGORIES`); ends in a dot or a space, or begins with
    ``-``; not encodable as UTF-8 (lone surrogates); longer than 255 UTF-8 bytes. Reserved names are a separate question
    (:func:`reserved_problem`), since archive members deeper in a tree may use them.
    """
    if not isinstance(name, str):
        return "is not a string"
    if name == "":
        return "is empty"
    if name in (".", ".."):
        return "is a relative path component"
    if "/" in name or "\\" in name:
        return "is not a single path component"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode"
    problem = invisible_problem(name) or edge_problem(name)
    if problem is not None:
        return problem
    if len(encoded) > MAX_NAME_BYTES:
        return f"is {len(encoded)} bytes long (at most {MAX_NAME_BYTES})"
    return None


def reserved_problem(name: str) -> str | None:
    """Why ``name`` may not sit at the top of a model directory, or None."""
    if name.casefold() in RESERVED_FILENAMES:
        return "is reserved by the mount"
    return None


def _shown(name: object) -> str:
    if not isinstance(name, str):
        return type(name).__name__
    return repr(name if len(name) <= 80 else name[:80] + "...")


def check_filename(name: str, *, reserved: bool = True) -> str:
    """A single safe path component (and, unless ``reserved=False``, not a reserved name)."""
    problem = filename_problem(name)
    if problem is not None:
        raise UsageError(f"invalid file name {_shown(name)}: it {problem}", filename=name)
    if reserved and (problem := reserved_problem(name)) is not None:
        raise UsageError(f"file name {name!r} {problem}", filename=name)
    return name


def check_relpath(path: str) -> str:
    """A relative path of safe components (files extracted from an archive)."""
    parts = path.split("/")
    check_filename(parts[0])
    for part in parts[1:]:
        check_filename(part, reserved=False)
    return path
