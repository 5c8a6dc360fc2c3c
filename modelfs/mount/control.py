"""Starting and stopping a mount from another process: the CLI's side of the daemon.

``start_background`` re-executes ``modelfs mount --foreground`` as a detached process
and returns once the mount is live (the daemon writes "ready <pid>" to a pipe).
The daemon is isolated from whoever started it: it runs with ``python -P`` (the
caller's directory is not on its import path, so a ``modelfs/`` or ``modelfs_store/``
folder there is never imported) and with ``/`` as its working directory.

``unmount`` asks the store's daemon to detach (SIGTERM): files already open stay
served until they are closed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from modelfs_store.errors import Conflict, StoreError, UsageError
from modelfs_store.layout import Layout
from modelfs_store.owner import enter, open_file, secure

from .config import READY_ENV, MountConfig
from .mountpoint import is_stale, lazy_unmount
from .runstate import already_mounted, daemon_alive, read_status


def daemon_argv(cfg: MountConfig) -> list[str]:
    """The command line of a background daemon for ``cfg``."""
    argv = [sys.executable, "-P", "-m", "modelfs", "--store", str(cfg.store_root), *["-v"] * cfg.verbose,
            "mount", str(cfg.mountpoint), "--foreground", "--fetch-timeout", str(cfg.fetch_timeout or 0),
            "--read-mode", cfg.read_mode]
    if cfg.offline:
        argv.append("--offline")
    if cfg.allow_other:
        argv.append("--allow-other")
    if cfg.socket is not None:
        argv += ["--socket", str(cfg.socket)]
    if cfg.socket_mode is not None:
        argv += ["--socket-mode", f"{cfg.socket_mode:o}"]
    return argv


def start_background(cfg: MountConfig, timeout: float = 60.0) -> int:
    """Start a detached daemon for ``cfg``; return its pid once the mount is live."""
    if not (cfg.mountpoint.is_absolute() and cfg.store_root.is_absolute()):
        raise UsageError("the mountpoint and the store must be absolute paths")  # the daemon runs in /
    layout = Layout(cfg.store_root)
    secure(layout, enter(layout))
    if daemon_alive(layout):
        raise already_mounted(layout)
    log_path = layout.run / "daemon.log"
    r, w = os.pipe()
    with os.fdopen(open_file(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as logf:
        proc = subprocess.Popen(daemon_argv(cfg), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(w,), cwd="/", env={**os.environ, READY_ENV: str(w)},
                                start_new_session=True)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        line = os.read(r, 256).decode(errors="replace") if ready else ""
    finally:
        os.close(r)
    if line.startswith("ready"):
        return proc.pid
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.terminate()
        code = 1
    with os.fdopen(open_file(log_path, os.O_RDONLY), "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
        tail = f.read().decode(errors="replace").strip().splitlines()[-5:]
    reason = tail[-1].removeprefix("modelfs: error: ") if tail else "no output"
    err = StoreError(f"the mount daemon did not start: {reason} (log: {log_path})")
    err.exit_code = code if code > 0 else 1  # the daemon's own exit code: 4 for a conflict
    raise err


@contextlib.contextmanager
def mounted(store_root: Path, mountpoint: Path, *, offline: bool = True) -> Iterator[Path]:
    """Mount ``store_root`` at ``mountpoint`` in a background daemon for the duration of a
    ``with`` block (the demo, scripts); always unmounts. Offline by default."""
    cfg = MountConfig(Path(mountpoint).absolute(), Path(store_root).absolute(), offline=offline)
    start_background(cfg)
    try:
        yield cfg.mountpoint
    finally:
        unmount(cfg.mountpoint, Layout(cfg.store_root))


def unmount(mountpoint: Path, layout: Layout, timeout: float = 30.0) -> str:
    """Stop the daemon serving ``mountpoint``; returns what happened, in words."""
    if is_stale(mountpoint):
        lazy_unmount(mountpoint)
        return f"cleaned up stale mount {mountpoint}"
    mountpoint = mountpoint.resolve()
    if not os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is not mounted")
    status = read_status(layout)
    if status is None or Path(status["mountpoint"]) != mountpoint:
        # Not this store's daemon (or another store): a plain unmount, refused while busy.
        r = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
        if r.returncode != 0:
            raise Conflict(f"could not unmount {mountpoint}: {r.stderr.strip() or 'busy'}")
        return f"unmounted {mountpoint}"
    pid = int(status["pid"])
    if os.geteuid() == 0 and _uid_of(pid) not in (0, None):
        lazy_unmount(mountpoint)  # a system store's daemon no longer may: root detaches it
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.02)
    if os.path.ismount(mountpoint):
        raise StoreError(f"daemon {pid} did not unmount {mountpoint} within {timeout:g}s")
    busy = len(status["open_files"])  # now in detached-<pid>.json: status and rm still see them
    if busy:
        return (f"unmounted {mountpoint}; {busy} file(s) still open, daemon {pid} exits when they are closed")
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return f"unmounted {mountpoint}"


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
