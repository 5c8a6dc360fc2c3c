"""Which manager an app gets: :func:`open_manager`, the shared store when its daemon
answers, the app-local cache otherwise, and why (in the manager's ``repr`` and
``reason``, and in a log line).

Where it looks: ``$MODELFS_SOCKET`` when it is set, and nowhere else; otherwise the
user's daemon (``$XDG_RUNTIME_DIR/modelfs/control.sock``), then the system store's
(``/run/modelfs/control.sock``). Inside a Flatpak sandbox the runtime directory is
the sandbox's own unless the app was granted ``--filesystem=xdg-run/modelfs``; inside
a Snap, unless a plug connects it: the reason says so. ``app_id_hint`` is the app's
own idea of its id, used only to say when the daemon sees the process differently
(it decides who the caller is from the socket's peer, never from the hint).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from modelfs.mount.socketclient import SYSTEM_SOCKET, ControlClient
from modelfs_store.errors import StoreError

from ._local import LocalModelDownloadManager
from ._manager import ModelDownloadManager
from ._shared import SharedStoreManager

log = logging.getLogger(__name__)


def candidate_sockets() -> list[Path]:
    """``$MODELFS_SOCKET`` alone when it is set (the caller chose); else the user's
    daemon's socket, then the system store's."""
    if os.environ.get("MODELFS_SOCKET"):
        return [Path(os.environ["MODELFS_SOCKET"])]
    out = []
    if os.environ.get("XDG_RUNTIME_DIR"):
        out.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "modelfs" / "control.sock")
    out.append(SYSTEM_SOCKET)
    return out


def _sandbox() -> str | None:
    if os.environ.get("FLATPAK_ID") or os.path.exists("/.flatpak-info"):
        return "flatpak"
    if os.environ.get("SNAP_NAME"):
        return "snap"
    return None


def _why_not(tried: list[Path]) -> str:
    sandbox = _sandbox()
    if sandbox == "flatpak":
        return ("shared store not reachable from this Flatpak sandbox; grant `--filesystem=xdg-run/modelfs` "
                "(and the mount's directory) to use it")
    if sandbox == "snap":
        return "shared store not reachable from this Snap; connect a plug to the modelfs socket to use it"
    return "no modelfs daemon answered at " + ", ".join(str(p) for p in tried)


def open_manager(app_id_hint: str | None = None, *, cache_directory: Path | None = None) -> ModelDownloadManager:
    """The shared store's manager when a daemon answers, else the app-local one."""
    tried = []
    for sock in candidate_sockets():
        tried.append(sock)
        if not sock.exists():
            continue
        try:
            with ControlClient(sock, timeout=5.0) as c:
                status = c.call("GET", "/v1/status")
        except (StoreError, OSError):
            continue
        caller = status.get("caller") or {}
        seen = caller.get("app_id")
        why = f"the daemon at {sock} answered; it sees this process as " + (
            f"app {seen} ({caller.get('rule')})" if seen else f"uid {caller.get('uid')} without an app id")
        if app_id_hint and seen != app_id_hint:
            log.warning("modelfs sees this process as %s, not %s: register the app (`modelfs apps add %s --exe "
                        "PATH`) for its own private entries", seen or "no app", app_id_hint, app_id_hint)
        log.info("model manager: shared store (%s)", why)
        return SharedStoreManager(sock, reason=why)
    why = _why_not(tried)
    log.info("model manager: app-local cache (%s)", why)
    return LocalModelDownloadManager(cache_directory, reason=why)
