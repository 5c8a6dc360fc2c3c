"""The ``modelfs`` command: a click group whose verbs load on first use.

Each verb lives in the module of its family (``models``, ``access``, ``pull``,
``status``, ``mount``, ``trust``, ``doctor``, ``config``, ``pulls``) and only parses, calls the store (or
``modelfs.mount`` for the daemon), and prints. :func:`main` runs the command in this
process and returns its exit code, so tests and scripts can call it without a
subprocess.

Exit codes: a user error (a ``StoreError``) is one line on stderr and the code its
class carries (see ``modelfs_store.errors``); a usage error from click is 2; Ctrl-C is
130; anything else is a bug: its traceback goes to the log (stderr) and the exit code
is 70 (``EX_SOFTWARE``), distinct from every user-error code.

Nothing imports this package but ``modelfs.__main__`` and the console script.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

import click

from modelfs_store.errors import InternalError, StoreError
from modelfs_store.redact import redact_text

from . import _context
from ._context import Ctx, setup_logging

log = logging.getLogger("modelfs")

EX_SOFTWARE = 70
EX_INTERRUPTED = 130

#: verb -> "module:attribute" inside this package; imported when the verb runs.
VERBS: dict[str, str] = {
    "activate": "models:activate",
    "apps": "access:apps",
    "channels": "trust:channels",
    "config": "config:config",
    "doctor": "doctor:doctor",
    "grant": "access:grant",
    "import": "models:import_cmd",
    "init": "status:init",
    "keys": "trust:keys",
    "list": "models:list_cmd",
    "manifest": "trust:manifest",
    "mount": "mount:mount",
    "pin": "models:pin",
    "prune": "models:prune",
    "pull": "pull:pull",
    "pulls": "pulls:pulls",
    "revoke": "access:revoke",
    "rm": "models:rm",
    "rollback": "models:rollback",
    "show": "models:show",
    "status": "status:status",
    "unmount": "mount:unmount",
    "unpin": "models:unpin",
    "update": "trust:update",
    "verify": "models:verify",
    "visibility": "access:visibility",
    "whoami": "access:whoami",
}


class LazyGroup(click.Group):
    """A group whose commands are imported when asked for, so ``modelfs list`` never
    loads trio, httpx or pyfuse3."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(VERBS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = VERBS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        command = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", "root", envvar="MODELFS_STORE", type=click.Path(file_okay=False, readable=False),
              help="Store directory (default: $MODELFS_STORE, else the XDG data dir).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="modelfs")
@click.pass_context
def cli(ctx: click.Context, root: str | None, verbose: int) -> None:
    """One verified copy of every model, shared by every app on this machine."""
    setup_logging(verbose)
    ctx.obj = Ctx(root, verbose)
    ctx.call_on_close(ctx.obj.close)


def _leaf(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups, or the group itself.

    trio >= 0.25 wraps whatever leaves a nursery in an ExceptionGroup; a user error
    raised under ``trio.run`` must still become one line and its exit code."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``modelfs`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = list(argv) if argv is not None else sys.argv[1:]
    _context.ARGV[:] = args
    try:
        try:
            rv = cli.main(args=args, prog_name="modelfs", standalone_mode=False)
        except BaseExceptionGroup as group:
            leaf = _leaf(group)
            if leaf is group:
                raise
            raise leaf from None
    except SystemExit as exc:
        return _exit_code(exc.code)
    except StoreError as exc:
        click.echo(f"modelfs: error: {redact_text(str(exc))}", err=True)
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("modelfs: interrupted", err=True)
        return EX_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except InternalError as exc:
        return _bug(exc)
    except OSError as exc:
        # Environment problems (permissions, a missing directory) are user errors too.
        click.echo(f"modelfs: error: {redact_text(str(exc))}", err=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - the one place a bug becomes an exit code
        return _bug(exc)
    return _exit_code(rv)


def _bug(exc: BaseException) -> int:
    log.critical("internal error (a bug in modelfs; please report it with this traceback)", exc_info=exc)
    click.echo(f"modelfs: internal error: {redact_text(str(exc)) or type(exc).__name__}", err=True)
    return EX_SOFTWARE
