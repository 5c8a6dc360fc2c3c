"""The daemon's ``run/`` files, read and written: what a running mount tells the CLI.

    run/daemon.lock           flock held by the one daemon of the store
    run/daemon.json           pid, mountpoint, offline, recent fetch errors
    run/open.json             the files open through the mount, by pid
    run/detached-<pid>.json   an unmounted daemon's open files, alive while it holds
    run/detached-<pid>.lock   an flock on this

Readers never trust a pid: a daemon is alive while its flock is held. Writers replace
files atomically and durably (``modelfs_store.durable``). No pyfuse3 and no trio here:
``modelfs status`` and ``rm`` read these without loading the daemon.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from modelfs_store.blobs import lock_free
from modelfs_store.durable import atomic_write
from modelfs_store.errors import Conflict
from modelfs_store.layout import Layout
from modelfs_store.owner import open_file

from .mountpoint import is_stale

OpenFile = dict[str, Any]  # one entry of open.json: pid, uid, model, version, filename, sha256, ...


def lock_path(layout: Layout) -> Path:
    return layout.run / "daemon.lock"


def detached_path(layout: Layout, pid: int, suffix: str) -> Path:
    return layout.run / f"detached-{pid}{suffix}"


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _read_json(path: Path) -> Any:
    try:
        with os.fdopen(open_file(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            return json.loads(f.read(1 << 20))
    except (FileNotFoundError, ValueError):
        return None


def daemon_alive(layout: Layout) -> bool:
    """Whether a daemon holds this store's lock (immune to pid reuse)."""
    path = lock_path(layout)
    return path.exists() and not lock_free(path)


def read_status_unlocked(layout: Layout) -> dict[str, Any] | None:
    """``daemon.json`` whether or not its daemon still runs."""
    status = _read_json(layout.run / "daemon.json")
    return status if isinstance(status, dict) else None


def read_status(layout: Layout) -> dict[str, Any] | None:
    """The running daemon's ``daemon.json`` plus ``open_files``; None when none runs.
    For ``modelfs status`` and ``rm``'s in-use warning."""
    if not daemon_alive(layout):
        return None
    status = read_status_unlocked(layout)
    if status is None:
        return None
    table = _read_json(layout.run / "open.json")
    status["open_files"] = table.get("files", []) if isinstance(table, dict) else []
    return status


def already_mounted(layout: Layout) -> Conflict:
    """The error for a second daemon of one store (exit 4)."""
    where = (read_status_unlocked(layout) or {}).get("mountpoint", "?")
    return Conflict(f"this store is already mounted (at {where}); run `modelfs unmount {where}` first",
                    mountpoint=where)


def stale_mountpoint(layout: Layout) -> str | None:
    """The mountpoint a killed daemon of this store left disconnected, if any; ``status``
    points the user at ``modelfs mount`` (which recovers it)."""
    if daemon_alive(layout):
        return None
    mp = (read_status_unlocked(layout) or {}).get("mountpoint")
    return mp if mp and is_stale(Path(mp)) else None


def detached_daemons(layout: Layout) -> list[dict[str, Any]]:
    """Daemons of this store that were unmounted but still serve open files: each
    ``{"pid", "mountpoint", "open_files"}``."""
    found = []
    for lock in sorted(layout.run.glob("detached-*.lock")):
        if lock_free(lock):
            continue  # its daemon is gone (killed before it could clean up)
        doc = _read_json(lock.with_suffix(".json"))
        if isinstance(doc, dict):
            found.append(doc)
    return found


def open_files(layout: Layout) -> list[OpenFile]:
    """Everything open through any daemon of this store, mounted or detached."""
    status = read_status(layout)
    files = list(status["open_files"]) if status else []
    for d in detached_daemons(layout):
        files += d.get("open_files", [])
    return files


def daemon_pids(layout: Layout) -> set[int]:
    """The pids of this store's live daemons, mounted or detached (their descriptors on
    blobs serve FUSE readers, who are named in ``open_files`` already)."""
    status = read_status(layout)
    pids = {status["pid"]} if status and isinstance(status.get("pid"), int) else set()
    return pids | {d["pid"] for d in detached_daemons(layout) if isinstance(d.get("pid"), int)}


def open_files_of(files: list[OpenFile], model: str, version: int | None = None) -> list[OpenFile]:
    """The open files of ``model`` (of one version when given), so ``status`` and ``rm``
    agree on what is in use. Without a version, every version counts: a reader of
    ``.versions/N/`` uses the model too."""
    return [f for f in files if f.get("model") == model and (version is None or f.get("version") == version)]
