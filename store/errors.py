"""The store's exception tree. Every error the store raises on purpose is one of these.

    StoreError                  base; ``str(exc)`` is one clear line, never a secret
    ├── UsageError              the caller asked for something malformed (bad name, bad flag)
    ├── NotFound                no such model, version, file, key or partial download
    ├── Conflict                the request contradicts the store's state (name taken, in use)
    ├── IntegrityError          bytes do not match their size or SHA-256
    ├── FormatError             a file or document is malformed
    │   ├── GGUFError           a GGUF header the bounded parser refused
    │   ├── ManifestError       an envelope or payload refused before any download
    │   └── ArchiveError        a zip artifact refused by the extractor
    ├── TrustError              signature, key, expiry or version-floor refusal
    │   └── Forbidden           the store's policy refuses this caller (an app, another
    │                           user): the control socket answers 403
    ├── SpaceError              not enough free space to finish
    └── FetchError              a download failed (network, HTTP status, stall, too slow)
        ├── OfflineError        the store is set offline, or the host is unreachable
        └── FetchTimeout        a configured deadline passed

    InternalError               not a StoreError: a broken invariant, i.e. a bug. It is
                                never caught as a user error; the CLI logs its traceback
                                and exits 70 (EX_SOFTWARE), the mount answers EIO.

Errors carry structured fields (``exc.fields``) so callers can act on them without
parsing text. The CLI maps each class to an exit code; the FUSE adapter maps each
class to an errno in one table (``modelfs/errnos.py``). This module must never put a
token, Authorization header, signed query string or userinfo into a message: callers
pass URLs through ``store.redact`` before they reach an exception.
"""

from __future__ import annotations

from typing import Any


class StoreError(Exception):
    """Base of every deliberate store error."""

    exit_code = 1

    def __init__(self, message: str, **fields: Any) -> None:
        # One line only: the CLI prints str(exc) as the whole error.
        super().__init__(" ".join(message.split("\n")))
        self.fields = fields


class UsageError(StoreError):
    exit_code = 2


class NotFound(StoreError):
    exit_code = 3


class Conflict(StoreError):
    exit_code = 4


class IntegrityError(StoreError):
    exit_code = 5


class FormatError(StoreError):
    exit_code = 6


class GGUFError(FormatError):
    pass


class ManifestError(FormatError):
    pass


class ArchiveError(FormatError):
    pass


class TrustError(StoreError):
    exit_code = 7


class Forbidden(TrustError):
    """What a caller asked for is not its to ask: the store owner's policy refuses it."""


class SpaceError(StoreError):
    exit_code = 8


class FetchError(StoreError):
    exit_code = 9


class OfflineError(FetchError):
    pass


class FetchTimeout(FetchError):
    pass


class InternalError(Exception):
    """An invariant of the store does not hold: a bug, not a user error."""

    exit_code = 70
