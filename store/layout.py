"""Where things live inside a store directory. Paths only: directories are created and
checked by ``store.owner``.

    <root>/
      catalog.db            SQLite catalog (WAL); all metadata
      blobs/sha256/ab/<hex> committed blobs, 0444, named by their SHA-256
      tmp/                  private temp files of commits in flight (import, extract)
      partial/<key>/        resumable downloads: data + state.json (kept across restarts)
      quarantine/           bytes that failed verification, kept for inspection
      run/                  daemon state: control socket, open-file table, locks
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NewType

from .errors import UsageError

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: Everything a store directory may hold (what an interrupted init may have left, too).
STORE_ENTRIES = frozenset({"catalog.db", "catalog.db-wal", "catalog.db-shm", "catalog.db-journal", "blobs", "tmp",
                           "partial", "quarantine", "run"})

#: A checked SHA-256 hex digest (64 lowercase hex digits): what names a blob. Only
#: :func:`check_sha256` makes one from an unchecked string.
Sha256 = NewType("Sha256", str)


def default_root() -> Path:
    """``$MODELFS_STORE``, else ``$XDG_DATA_HOME/modelfs``, else ``~/.local/share/modelfs``."""
    env = os.environ.get("MODELFS_STORE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(xdg) / "modelfs"


def check_sha256(hexdigest: str) -> Sha256:
    if not _HEX64.fullmatch(hexdigest):
        raise UsageError(f"not a SHA-256 hex digest: {hexdigest[:80]!r}")
    return Sha256(hexdigest)


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.db"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def partial(self) -> Path:
        return self.root / "partial"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def blob(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.blobs / sha256[:2] / sha256

    def problem(self) -> str | None:
        """Why ``root`` cannot become a store without ``init``, or None: it does not exist,
        is not a directory, or holds things a store never does (a mistyped path to a
        directory of other files must not be filled with a store)."""
        try:
            names = set(os.listdir(self.root))
        except FileNotFoundError:
            return "does not exist"
        except NotADirectoryError:
            return "is not a directory"
        if "catalog.db" in names or not names - STORE_ENTRIES:
            return None
        return "is not a modelfs store (no catalog.db) and is not empty"
