"""What ``modelfs pull`` was asked for, besides the source: :class:`PullOptions`.

Apart from :mod:`.pull` so that a command handing its pull to the daemon builds the
request without importing the downloader, trio and httpx (about 0.4 s of start-up).
Plain data: no I/O, no imports beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PullOptions:
    """What ``modelfs pull`` was asked for, besides the source."""
    pack: bool = False                # the source is a signed envelope (a file or an http(s) URL)
    lazy: bool = False                # signed packs only: record now, fetch each file on first open
    sha256: str | None = None         # unsigned: expected SHA-256 of the weights
    size: int | None = None
    name: str | None = None           # unsigned: model name (default: from the file name)
    mmproj: str | None = None         # unsigned: a URL, or a path in the same hf:// repository
    mmproj_sha256: str | None = None
    license: str | None = None
    owner_app: str | None = None
    owner_uid: int | None = None      # with owner_app, the uid that owns the model (None: the store owner)
    private: bool = False             # only its app, apps granted it and the owner's shell see it
    platform: str | None = None       # signed: whose artifacts to install (default: this one)
    retry: bool = False               # try files whose verification failed recently now (store.failures)
    candidate: bool = False           # signed packs only: the version it activates is on probation (store.rollout)
