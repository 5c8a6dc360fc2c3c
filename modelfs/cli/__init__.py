"""The ``modelfs`` command: a click group whose verbs load on first use.

Each verb lives in the module of its family (``models``, ``access``, ``pull``, ``adopt``,
``status``, ``mount``, ``trust``, ``doctor``, ``service``, ``config``, ``pulls``) and only
parses, calls the store (or ``modelfs.mount`` for the daemon), and prints. :func:`main`
runs the command in this process and returns its exit code, so tests and scripts can
call it without a subprocess.

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
from typing import NamedTuple

import click

from modelfs_store.errors import InternalError, StoreError
from modelfs_store.redact import redact_text

from . import _context
from ._context import Ctx, setup_logging

log = logging.getLogger("modelfs")

EX_SOFTWARE = 70
EX_INTERRUPTED = 130

class Verb(NamedTuple):
    target: str   # "module:attribute" inside this package, imported when the verb runs
    summary: str  # the first sentence of its help, shown by `modelfs --help` (tests/test_cli.py keeps them equal)


#: Every verb: where it lives, and its line in ``modelfs --help`` (which imports no verb).
VERBS: dict[str, Verb] = {
    "adopt": Verb("adopt:adopt", "Take the models of other tools' caches (Hugging Face, Ollama, LM Studio, a "
                  "directory) into the store without a second copy on disk."),
    "activate": Verb("models:activate", "Make VERSION the active version of NAME (atomic)."),
    "apps": Verb("access:apps", "Apps that use the store (for per-app visibility)."),
    "channels": Verb("trust:channels", "Trusted manifest URLs, each bound to the keys allowed to sign it."),
    "config": Verb("config:config", "The store's settings: what apps and other users may pull through the "
                   "daemon, and how many pulls run at once."),
    "doctor": Verb("doctor:doctor", "Check the machine and the store; exit non-zero when something is wrong."),
    "grant": Verb("access:grant", "Let APP_ID (running as --uid, by default the store owner) see model NAME."),
    "import": Verb("models:import_cmd", "Copy a local GGUF (and its mmproj) into the store as model NAME."),
    "init": Verb("status:init", "Make PATH a store (a new or empty directory)."),
    "keys": Verb("trust:keys", "Trusted publisher keys (user keyring + system directory)."),
    "list": Verb("models:list_cmd", "List the models in the store."),
    "manifest": Verb("trust:manifest", "Sign and check signed manifests (packs)."),
    "mark-good": Verb("models:mark_good", "End the probation of NAME's candidate version: it is good."),
    "mount": Verb("mount:mount", "Mount the store at MOUNTPOINT: one read-only directory per model."),
    "pin": Verb("models:pin", "Keep NAME and all its versions through prune."),
    "prune": Verb("models:prune", "Remove old versions (not active, last-good or pinned), orphan blobs and "
                  "quarantine."),
    "pull": Verb("pull:pull", "Download a model from SOURCE (https://… with --sha256, "
                 "hf://org/repo[@rev]/file.gguf, or hf://org/repo[:QUANT][@rev], or oci://HOST/REPO:TAG), verify "
                 "it, and make it the active version of NAME."),
    "pulls": Verb("pulls:pulls", "Pull jobs of the store's daemon: state, bytes, rate, reason."),
    "push": Verb("push:push", "Publish model NAME's active version (weights, shards and mmproj) to an OCI "
                 "registry as one artifact."),
    "revoke": Verb("access:revoke", "Take back a grant of NAME from APP_ID (the one for --uid, by default the "
                   "owner's)."),
    "rm": Verb("models:rm", "Remove a model (or one version)."),
    "rollback": Verb("models:rollback", "Go back to the last-good version of NAME (atomic)."),
    "service": Verb("service:service", "Install or remove the systemd units that mount the store."),
    "show": Verb("models:show", "Show a model's metadata card, versions and files."),
    "status": Verb("status:status", "Show the store: models, blobs, partial downloads, quarantine, downloads "
                   "that failed verification (not tried again before the time shown), and the mount: what is "
                   "open through it and why recent opens failed (the reasons behind an EIO, an ENETUNREACH or an "
                   "ETIMEDOUT a reader saw)."),
    "unmount": Verb("mount:unmount", "Unmount MOUNTPOINT."),
    "unpin": Verb("models:unpin", "Let prune consider NAME again."),
    "update": Verb("trust:update", "Fetch every channel once and install newer signed versions."),
    "verify": Verb("models:verify", "Re-hash every local blob (of NAME, or of all models); quarantine corrupt ones."),
    "visibility": Verb("access:visibility", "Make model NAME private (its app, granted apps and the owner's "
                       "shell see it) or shared."),
    "whoami": Verb("access:whoami", "The identity the mount resolves for a process, by which rule, and what it "
                   "sees."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported when asked for, so ``modelfs list`` never
    loads trio, httpx or pyfuse3, and ``modelfs --help`` loads no verb at all."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(VERBS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        verb = VERBS.get(cmd_name)
        if verb is None:
            return None
        module, attr = verb.target.split(":")
        command = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's own listing, from the summaries: a stand-in command per verb, shortened
        by click as it would shorten the verb's help."""
        limit = formatter.width - 6 - max(len(verb) for verb in VERBS)
        rows = [(verb, click.Command(verb, help=VERBS[verb].summary).get_short_help_str(limit))
                for verb in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


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
