"""Validation of the names that become paths: model names and file names.

A model name is a directory at the top of the mount; a file name is a component
inside it. Both come from users and from remote manifests, so both are checked here
before they touch a path. Refuse, never sanitise.
"""

from __future__ import annotations

import re

from .errors import UsageError

MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Names the mount itself puts inside a model directory.
RESERVED_FILENAMES = frozenset({"model.json", ".versions"})


def check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name) or name in (".", ".."):
        raise UsageError(
            f"invalid model name {name[:80]!r}: use 1-128 of A-Z a-z 0-9 . _ - (not '.' or '..')",
            name=name)
    return name


def check_filename(name: str, *, reserved: bool = True) -> str:
    """A single safe path component."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name
           or any(ord(c) < 32 or ord(c) == 127 for c in name)
           or len(name.encode("utf-8", "surrogatepass")) > 255)
    if bad:
        raise UsageError(f"invalid file name {name[:80]!r}: must be one safe path component", filename=name)
    if reserved and name in RESERVED_FILENAMES:
        raise UsageError(f"file name {name!r} is reserved by the mount", filename=name)
    return name


def check_relpath(path: str) -> str:
    """A relative path of safe components (files extracted from an archive)."""
    parts = path.split("/")
    check_filename(parts[0])
    for part in parts[1:]:
        check_filename(part, reserved=False)
    return path
