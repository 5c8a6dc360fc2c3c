"""The one table from store errors to the errno a FUSE caller sees.

Order matters only between a class and its subclasses: :func:`errno_for` walks the
exception's MRO, so the most specific entry wins (``OfflineError`` before
``FetchError`` before ``StoreError``). An ``OSError`` keeps its own errno (a blob that
vanished is ENOENT, a disk error EIO). Anything else is a bug: it is logged with its
traceback and becomes EIO, and the FUSE loop carries on.

No pyfuse3 here, so the table is testable without a kernel; ``fuse_ops`` wraps the
number in ``FUSEError``.
"""

from __future__ import annotations

import errno
import logging

import trio

from modelfs_store.errors import (
    ArchiveError,
    Conflict,
    FetchError,
    FetchTimeout,
    FormatError,
    IntegrityError,
    NotFound,
    OfflineError,
    SpaceError,
    StoreError,
    TrustError,
    UsageError,
)

from .tree import NoAttribute, NotALink, UnsupportedAttribute

log = logging.getLogger(__name__)

ERRNO: dict[type[BaseException], int] = {
    NotFound: errno.ENOENT,
    NoAttribute: errno.ENODATA,      # what getxattr must say for a missing attribute
    UnsupportedAttribute: errno.EOPNOTSUPP,
    NotALink: errno.EINVAL,          # what readlink says of anything else
    OfflineError: errno.ENETUNREACH,
    FetchTimeout: errno.ETIMEDOUT,
    trio.TooSlowError: errno.ETIMEDOUT,
    FetchError: errno.EIO,
    IntegrityError: errno.EIO,       # bytes that fail verification are never served
    SpaceError: errno.ENOSPC,
    TrustError: errno.EACCES,
    ArchiveError: errno.EIO,
    FormatError: errno.EIO,
    Conflict: errno.EBUSY,
    UsageError: errno.EINVAL,
    StoreError: errno.EIO,
}


def errno_for(exc: BaseException) -> int:
    """The errno for ``exc``; unknown exceptions are logged with their traceback."""
    for cls in type(exc).__mro__:
        number = ERRNO.get(cls)
        if number is not None:
            return number
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    log.error("unexpected error in a FUSE handler, answering EIO", exc_info=exc)
    return errno.EIO
