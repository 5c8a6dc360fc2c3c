"""How a mount is configured: what ``modelfs mount`` passes to the daemon, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .tree import Visibility

#: How long ``open()`` of a file that is not local may wait for its download.
DEFAULT_FETCH_TIMEOUT = 3600.0
#: Environment variable naming the pipe a background daemon writes "ready <pid>" to.
READY_ENV = "MODELFS_READY_FD"


@dataclass
class MountConfig:
    mountpoint: Path
    store_root: Path
    offline: bool = False
    fetch_timeout: float | None = DEFAULT_FETCH_TIMEOUT
    read_mode: str = "inline"
    verbose: int = 0
    allow_other: bool = False  # let other uids use the mount (they see shared models and their grants)
    links: str = "auto"        # 'auto': a local file is a link to its blob for callers that could read it anyway
    socket: Path | None = None       # the control socket's path (default: modelfs.mount.server.socket_choice)
    socket_mode: int | None = None   # its mode (default 0600; a system store's 0666)
    visibility: Visibility | None = field(default=None, repr=False)
