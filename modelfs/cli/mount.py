"""``modelfs mount`` and ``modelfs unmount``: argument parsing only; the daemon lives in
:mod:`modelfs.mount`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from modelfs.mount.config import DEFAULT_FETCH_TIMEOUT, MountConfig
from modelfs.mount.links import LINK_MODES
from modelfs.mount.mountpoint import check_allow_other
from modelfs.mount.openfiles import READ_MODES
from modelfs.mount.tree import AllowAll
from modelfs_store.errors import UsageError
from modelfs_store.layout import Layout

from ._context import ARGV, Ctx, pass_ctx


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-f", "--foreground", is_flag=True, help="Serve in this process (systemd, debugging).")
@click.option("--offline", is_flag=True, help="Never download: opening a file that is not local fails "
              "with ENETUNREACH.")
@click.option("--fetch-timeout", type=float, default=DEFAULT_FETCH_TIMEOUT, show_default=True,
              metavar="SECONDS", help="How long open() of a file that is not local may wait for its "
              "download before failing with ETIMEDOUT (0: no limit).")
@click.option("--allow-other", is_flag=True, help="Let other users' processes use the mount: they see shared "
              "models and what was granted to their app. As a user, needs user_allow_other in /etc/fuse.conf.")
@click.option("--links", type=click.Choice(LINK_MODES), default="auto", show_default=True,
              help="auto: your own unsandboxed processes see a local file as a symbolic link to its blob in "
              "the store (native speed); everyone else gets the regular read-only file. never: always the "
              "regular file.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Serve the control socket at PATH (default: $XDG_RUNTIME_DIR/modelfs/control.sock, else the "
                   "store's run/control.sock; a system store's daemon: /run/modelfs/control.sock).")
@click.option("--socket-mode", type=str, metavar="MODE", help="The control socket's mode, in octal (default 600; "
              "a system store's 666). Every call is judged on its caller, so 666 lets others ask, not do.")
@click.option("--no-app-rules", is_flag=True, hidden=True,
              help="Every caller sees every model (benchmarks only: the baseline of bench/visibility.py).")
@click.option("--read-mode", type=click.Choice(READ_MODES), default="inline", hidden=True,
              help="How reads are served (benchmarks only).")
@pass_ctx
def mount(c: Ctx, mountpoint: str, foreground: bool, offline: bool, fetch_timeout: float,
          read_mode: str, allow_other: bool, links: str, no_app_rules: bool, socket_path: str | None,
          socket_mode: str | None) -> None:
    """Mount the store at MOUNTPOINT: one read-only directory per model. The daemon also
    serves the control socket (docs/api.md) and runs the pulls handed to it."""
    # In the foreground, root serving another user's store (a system store) mounts first
    # and becomes that user in the daemon (modelfs.mount.caps); in the background, the
    # whole command runs as that user.
    c.check_root(become_owner=not foreground)
    cfg = MountConfig(Path(mountpoint).absolute(), c.root_path, offline=offline,
                      fetch_timeout=fetch_timeout or None, read_mode=read_mode, verbose=c.verbose,
                      allow_other=allow_other, links=links, visibility=AllowAll() if no_app_rules else None,
                      socket=Path(socket_path).absolute() if socket_path else None,
                      socket_mode=_octal(socket_mode) if socket_mode is not None else None)
    if allow_other and not (foreground and os.geteuid() == 0):  # as root, the daemon mounts first
        check_allow_other()  # refuse here, in one line, rather than in the daemon's log
    if foreground:
        from modelfs.mount.daemon import log_to_stderr, run_foreground
        log_to_stderr(c.verbose)
        raise SystemExit(run_foreground(cfg, [sys.executable, "-P", "-m", "modelfs", *ARGV]))
    from modelfs.mount.control import start_background
    pid = start_background(cfg)
    click.echo(f"mounted {cfg.store_root} at {cfg.mountpoint} (daemon pid {pid})")


def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise UsageError(f"--socket-mode takes an octal mode such as 600, not {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise UsageError(f"--socket-mode {text}: only permission bits (000 to 777)")
    return mode


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@pass_ctx
def unmount(c: Ctx, mountpoint: str) -> None:
    """Unmount MOUNTPOINT. Files already open stay readable until they are closed."""
    from modelfs.mount.control import unmount as do_unmount

    click.echo(do_unmount(Path(mountpoint).absolute(), Layout(c.root_path)))
