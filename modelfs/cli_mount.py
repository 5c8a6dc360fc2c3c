"""``modelfs mount`` and ``modelfs unmount``: argument parsing only; the daemon lives in
:mod:`modelfs.daemon`. Registered on the main group at the bottom of ``modelfs.cli``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from modelfs_store.layout import Layout, default_root

from .openfiles import READ_MODES

DEFAULT_FETCH_TIMEOUT = 3600.0


def _root(obj: Any) -> Path:
    return Path(obj.root if obj.root else default_root()).absolute()


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-f", "--foreground", is_flag=True, help="Serve in this process (systemd, debugging).")
@click.option("--offline", is_flag=True, help="Never download: opening a file that is not local fails "
              "with ENETUNREACH.")
@click.option("--fetch-timeout", type=float, default=DEFAULT_FETCH_TIMEOUT, show_default=True,
              metavar="SECONDS", help="How long open() of a file that is not local may wait for its "
              "download before failing with ETIMEDOUT (0: no limit).")
@click.option("--read-mode", type=click.Choice(READ_MODES), default="inline", hidden=True,
              help="How reads are served (benchmarks only).")
@click.pass_obj
def mount(obj: Any, mountpoint: str, foreground: bool, offline: bool, fetch_timeout: float,
          read_mode: str) -> None:
    """Mount the store at MOUNTPOINT: one read-only directory per model."""
    from .daemon import MountConfig, log_to_stderr, run_foreground, start_background

    cfg = MountConfig(Path(mountpoint).absolute(), _root(obj), offline=offline,
                      fetch_timeout=fetch_timeout or None, read_mode=read_mode, verbose=obj.verbose)
    if foreground:
        log_to_stderr(obj.verbose)
        sys.exit(run_foreground(cfg))
    prefix = [sys.executable, "-m", "modelfs", "--store", str(cfg.store_root), *["-v"] * obj.verbose]
    pid = start_background(cfg, prefix)
    click.echo(f"mounted {cfg.store_root} at {cfg.mountpoint} (daemon pid {pid})")


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.pass_obj
def unmount(obj: Any, mountpoint: str) -> None:
    """Unmount MOUNTPOINT. Files already open stay readable until they are closed."""
    from .daemon import unmount as do_unmount

    click.echo(do_unmount(Path(mountpoint).absolute(), Layout(_root(obj))))
