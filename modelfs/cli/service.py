"""``modelfs service install|uninstall``: the systemd units that run the mount daemon.

Parsing, writing and printing only; what the units say is ``modelfs.mount.units``'.
``install`` writes the files and prints the ``systemctl`` commands to run next; it starts
nothing. ``uninstall`` removes only files that ``install`` wrote (they begin with
``units.MARK``), and refuses while the unit is still enabled. Neither opens the store.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from modelfs.mount import units
from modelfs_store.durable import atomic_write
from modelfs_store.errors import Conflict, UsageError
from modelfs_store.layout import default_root

from ._context import Ctx, json_option, pass_ctx
from ._output import print_json

UNIT_MODE = 0o644  # systemd and the user's manager read them; only their owner writes


def installed_command() -> Path:
    """The ``modelfs`` console script of this installation: the one beside this Python,
    named as found on PATH when that is the same file (``/usr/bin/modelfs``)."""
    here = Path(sys.executable).with_name("modelfs")
    found = shutil.which("modelfs")
    if os.access(here, os.X_OK):
        if found and os.path.samefile(found, here):
            return Path(found).absolute()
        return here
    if found:
        return Path(found).absolute()
    raise UsageError(f"cannot find the installed `modelfs` command (not beside {sys.executable}, not on PATH)")


def _config_home() -> Path:
    value = os.environ.get("XDG_CONFIG_HOME", "")
    return Path(value) if os.path.isabs(value) else Path.home() / ".config"


def _user_store(c: Ctx) -> Path | None:
    """The store the user unit names: none for the daemon's own default, so a first
    login creates it (a named store must exist already)."""
    if c.root is None and default_root() == Path.home() / ".local" / "share" / "modelfs":
        return None
    return c.root_path


def _check_scope(scope: str | None, root: str | None) -> None:
    if scope is None:
        raise UsageError("say which: --user (your store, at login) or --system (the machine's store)")
    if scope == "user" and root is not None:
        raise UsageError("--root is for --system (a user unit goes to $XDG_CONFIG_HOME)")


def _paths(scope: str | None, root: str | None) -> list[Path]:
    _check_scope(scope, root)
    if scope == "user":
        return units.user_paths(_config_home())
    return units.system_paths(Path(root or "/").absolute())


def _files(c: Ctx, scope: str | None, mountpoint: str | None, root: str | None) -> list[units.UnitFile]:
    _check_scope(scope, root)
    if scope == "user":
        where = Path(mountpoint).expanduser().absolute() if mountpoint else None
        return units.user_files(_config_home(), installed_command(), where, _user_store(c))
    if c.root is not None and c.root_path != units.SYSTEM_STORE:
        raise UsageError(f"the system store is {units.SYSTEM_STORE}; --store or MODELFS_STORE names {c.root_path}")
    where = Path(mountpoint) if mountpoint else units.SYSTEM_MOUNTPOINT
    return units.system_files(Path(root or "/").absolute(), installed_command(), where)


def _ours(path: Path) -> bool:
    """A regular file that ``install`` wrote (never a link, never someone else's file)."""
    if path.is_symlink() or not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(units.MARK) + 1) == units.MARK.encode() + b"\n"


def _check_writable(scope: str | None, root: str | None) -> None:
    if scope == "system" and root is None and os.geteuid() != 0:
        raise UsageError("the system unit lives in /etc: run this as root (or --dry-run)")


def _check_replaceable(paths: list[Path]) -> None:
    for path in paths:
        if os.path.lexists(path) and not _ours(path):
            raise Conflict(f"{path} exists and was not written by `modelfs service install`; "
                           "move it away first", path=str(path))


scope_options = [
    click.option("--user", "scope", flag_value="user", help="The unit of your own store, started at login."),
    click.option("--system", "scope", flag_value="system", help="The machine's store for every user: the unit, "
                 "sysusers.d and tmpfiles.d (as root)."),
    click.option("--root", type=click.Path(file_okay=False), help="With --system: write under DIR as if it "
                 "were / (an image being prepared)."),
]


def with_scope(f: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(scope_options):
        f = option(f)
    return f


@click.group()
def service() -> None:
    """Install or remove the systemd units that mount the store."""


@service.command()
@with_scope
@click.option("--mountpoint", type=click.Path(file_okay=False),
              help="Where to mount (default: ~/Models; with --system, /srv/models).")
@click.option("--dry-run", is_flag=True, help="Print the files instead of writing them.")
@json_option
@pass_ctx
def install(c: Ctx, scope: str | None, root: str | None, mountpoint: str | None, dry_run: bool,
            as_json: bool) -> None:
    """Write the systemd unit (and, with --system, its sysusers.d and tmpfiles.d files)."""
    files = _files(c, scope, mountpoint, root)
    _check_replaceable([f.path for f in files])
    if not dry_run:
        _check_writable(scope, root)
        for f in files:
            f.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            atomic_write(f.path, f.content.encode(), mode=UNIT_MODE)
            os.chmod(f.path, UNIT_MODE)  # whatever the umask
    steps = units.next_steps(str(scope))
    if as_json:
        print_json({"scope": scope, "dry_run": dry_run, "next": steps,
                    "files": [{"path": str(f.path), "content": f.content} for f in files]})
        return
    for f in files:
        if dry_run:
            click.echo(f"# {f.path} (not written: --dry-run)\n{f.content}")
        else:
            click.echo(f"wrote {f.path}")
    click.echo("then run: " + " && ".join(steps))


@service.command()
@with_scope
@click.option("--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
@json_option
def uninstall(scope: str | None, root: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove the files `service install` wrote (nothing else); disable the unit first."""
    paths = _paths(scope, root)
    _check_replaceable(paths)
    unit = paths[0]
    wants = unit.parent / ("default.target.wants" if scope == "user" else "multi-user.target.wants") / unit.name
    if os.path.lexists(wants):
        how = "systemctl --user disable --now modelfs" if scope == "user" else "systemctl disable --now modelfs-system"
        raise Conflict(f"{unit.name} is enabled ({wants}); run `{how}` first", path=str(wants))
    present = [path for path in paths if path.exists()]
    if not dry_run:
        _check_writable(scope, root)
        for path in present:
            path.unlink()
    if as_json:
        print_json({"scope": scope, "dry_run": dry_run, "removed": [str(p) for p in present]})
        return
    verb = "would remove" if dry_run else "removed"
    for path in present:
        click.echo(f"{verb} {path}")
    if not present:
        click.echo("nothing to remove: no unit was installed there")
