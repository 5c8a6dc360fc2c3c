"""Remembered verification failures: a file whose download failed its SHA-256 check is
not fetched again at once.

    partial/failed/<expected sha256>.json   one artifact's memory (below), 0600

A fetch that fails verification has already cost twice the file (the downloader
quarantines the bytes and fetches them once more from zero). Without a memory, every
later ``open`` through the mount, or every pull, would pay that again. So the expected
SHA-256 is remembered, with exponential backoff: no new attempt before
:data:`BACKOFF_FIRST` seconds after the first failure, doubling with each further
failure up to :data:`BACKOFF_MAX`. Until then a fetch of that SHA-256 is refused at
once, before any request: the mount answers EIO, a pull says until when. A verified
fetch forgets the memory; ``modelfs pull --retry`` forgets it before trying.

Why files and not the catalog: the downloader enforces the rule and writes no SQL, and
the CLI and the daemon share the store directory. The memory is advisory state, never a
trust decision: a file that does not parse is ignored (it never blocks a fetch), and
nothing here makes a byte visible. Each file is replaced atomically
(:func:`store.durable.atomic_write`).

Never holds a secret: callers pass the redacted URL, and the reason goes through
:func:`store.redact.redact_text`. No trio, no network, no SQL here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .durable import atomic_write
from .errors import UsageError
from .layout import Layout, check_sha256
from .owner import open_dir, read_small
from .redact import redact_text

__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "FailedVerification", "backoff", "failed_dir", "forget",
           "list_failed", "load", "remember", "when"]

log = logging.getLogger(__name__)

BACKOFF_FIRST = 60.0     # seconds without a new attempt after the first failure
BACKOFF_MAX = 3600.0     # the longest wait, however often it failed
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FailedVerification:
    """What the store remembers of one artifact's failed verifications."""
    sha256: str               # the expected SHA-256 (names the artifact)
    failures: int             # failed fetches so far (each one downloaded the file twice)
    first_failed_at: float    # unix time of the first
    last_failed_at: float     # unix time of the latest
    retry_at: float           # unix time before which no fetch is attempted
    reason: str               # the latest failure, one line, redacted
    url: str | None           # where it was fetched from, redacted

    def blocks(self, now: float) -> bool:
        """Whether a fetch at ``now`` is still refused."""
        return now < self.retry_at

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure: 1 minute doubling to 1 hour."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** (max(failures, 1) - 1))


def when(t: float) -> str:
    """A unix time as people read it in a message: local time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def failed_dir(layout: Layout) -> Path:
    return layout.partial / "failed"


def _path(layout: Layout, sha256: str) -> Path:
    return failed_dir(layout) / f"{check_sha256(sha256)}.json"


def load(layout: Layout, sha256: str) -> FailedVerification | None:
    """The memory of ``sha256``, or None (never failed, forgotten, or unreadable)."""
    try:
        raw = json.loads(read_small(_path(layout, sha256)))
    except (FileNotFoundError, ValueError):
        return None
    return _parse(raw, sha256)


def _parse(raw: object, sha256: str) -> FailedVerification | None:
    if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION or raw.get("sha256") != sha256:
        return None
    try:
        return FailedVerification(sha256, int(raw["failures"]), float(raw["first_failed_at"]),
                                  float(raw["last_failed_at"]), float(raw["retry_at"]), str(raw["reason"]),
                                  None if raw.get("url") is None else str(raw["url"]))
    except (KeyError, TypeError, ValueError):
        return None


def remember(layout: Layout, sha256: str, *, reason: str, url: str | None, now: float) -> FailedVerification:
    """Record one more failed verification of ``sha256``; returns the new memory."""
    prev = load(layout, sha256)
    failures = (prev.failures if prev else 0) + 1
    mem = FailedVerification(sha256, failures, prev.first_failed_at if prev else now, now,
                             now + backoff(failures), redact_text(" ".join(reason.split())), url)
    directory = failed_dir(layout)
    directory.mkdir(mode=0o700, exist_ok=True)
    os.close(open_dir(directory))  # a link planted in its place is refused, never written through
    atomic_write(_path(layout, sha256), json.dumps({"version": FORMAT_VERSION, **mem.as_dict()},
                                                   sort_keys=True).encode())
    log.warning("%s… failed verification %d time(s); no new attempt before %s", sha256[:12], failures,
                when(mem.retry_at))
    return mem


def forget(layout: Layout, sha256: str) -> bool:
    """Drop the memory of ``sha256`` (after a verified fetch, or ``pull --retry``)."""
    try:
        _path(layout, sha256).unlink()
    except FileNotFoundError:
        return False
    return True


def list_failed(layout: Layout) -> list[FailedVerification]:
    """Every remembered failure, sorted by SHA-256 (for ``modelfs status``)."""
    directory = failed_dir(layout)
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(directory.iterdir()):
            name = entry.name.removesuffix(".json")
            if not entry.name.endswith(".json") or len(name) != 64:
                continue
            try:
                mem = load(layout, name)
            except UsageError:  # not a SHA-256: not ours
                continue
            if mem is not None:
                out.append(mem)
    return out
