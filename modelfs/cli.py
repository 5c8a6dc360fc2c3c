"""The ``modelfs`` command. Each verb parses its arguments, calls the store, prints.

No logic that another front end would need lives here: that belongs to ``store`` (or
``modelfs.daemon`` for the mount). User errors are ``StoreError``s; :func:`main` turns
them into one line on stderr and the exit code the error class carries.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from modelfs_store.core import Store
from modelfs_store.errors import StoreError, UsageError
from modelfs_store.redact import redact_text

from .output import human_size, info, print_json, progress_bar

log = logging.getLogger("modelfs")


class Ctx:
    def __init__(self, root: str | None, verbose: int) -> None:
        self.root = root
        self.verbose = verbose
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.root)
            rec = self._store.recovery
            if rec.stale_temps:
                info(f"recovered: removed {len(rec.stale_temps)} stale temp file(s) "
                     f"({human_size(rec.freed_bytes)}) left by an interrupted import")
        return self._store


pass_ctx = click.make_pass_decorator(Ctx)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", "root", envvar="MODELFS_STORE", type=click.Path(file_okay=False),
              help="Store directory (default: $MODELFS_STORE, else the XDG data dir).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="modelfs")
@click.pass_context
def cli(ctx: click.Context, root: str | None, verbose: int) -> None:
    """One verified copy of every model, shared by every app on this machine."""
    setup_logging(verbose)
    ctx.obj = Ctx(root, verbose)
    ctx.call_on_close(lambda: ctx.obj._store and ctx.obj._store.close())


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request with its full URL at INFO; signed URLs must not leak.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


# -- import ---------------------------------------------------------------------
@cli.command("import")
@click.argument("name")
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--mmproj", type=click.Path(dir_okay=False), help="Multimodal projector for these weights.")
@click.option("--license", "license_", help="Licence of the model.")
@click.option("--source-url", help="Upstream page of the model.")
@click.option("--app", "owner_app", help="App that owns the model.")
@json_option
@pass_ctx
def import_cmd(c: Ctx, name: str, weights: str, mmproj: str | None, license_: str | None,
               source_url: str | None, owner_app: str | None, as_json: bool) -> None:
    """Copy a local GGUF (and its mmproj) into the store as model NAME."""
    total = Path(weights).stat().st_size if Path(weights).is_file() else None
    if total is not None and mmproj and Path(mmproj).is_file():
        total += Path(mmproj).stat().st_size
    with progress_bar(total, f"importing {name}") as advance:
        res = c.store.import_model(name, Path(weights), mmproj=Path(mmproj) if mmproj else None,
                                   license=license_, source_url=source_url, owner_app=owner_app,
                                   progress=advance)
    if as_json:
        print_json({"model": res.model, "version": res.version, "new_version": res.new_version,
                    "new_bytes": res.new_bytes, "files": [f.__dict__ for f in res.files]})
        return
    what = f"version {res.version}" if res.new_version else f"version {res.version} (unchanged)"
    click.echo(f"imported {res.model} {what}: {len(res.files)} file(s), "
               f"{human_size(res.new_bytes)} new in the store")


# -- list / show ------------------------------------------------------------------
@cli.command("list")
@json_option
@pass_ctx
def list_cmd(c: Ctx, as_json: bool) -> None:
    """List the models in the store."""
    models = c.store.list_models()
    if as_json:
        print_json(models)
        return
    if not models:
        click.echo("no models")
        return
    rows = [("NAME", "VERSION", "ARCH", "QUANT", "CONTEXT", "SIZE", "STATE")]
    for m in models:
        states = {f["state"] for f in m.get("files", [])}
        state = ("-" if not states else "local" if states == {"local"} else
                 "dehydrated" if "local" not in states else "partly local")
        # A lazily pulled pack has no GGUF header read yet: its signed family stands in.
        arch = m.get("architecture") or m.get("family") or "-"
        rows.append((m["name"], str(m["active_version"] or "-"), arch, m.get("quantization") or "-",
                     str(m.get("context_length") or "-"), human_size(m.get("size")), state))
    _table(rows)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


@cli.command()
@click.argument("name")
@json_option
@pass_ctx
def show(c: Ctx, name: str, as_json: bool) -> None:
    """Show a model's metadata card, versions and files."""
    d = c.store.show(name)
    if as_json:
        print_json(d)
        return
    click.echo(f"{d['name']}  (active: {d['active_version']}, last-good: {d['last_good_version'] or '-'}"
               f"{', pinned' if d['pinned'] else ''}, {d['visibility']})")
    for key in ("architecture", "quantization", "context_length", "family", "license", "source_url",
                "source", "owner_app"):
        if d.get(key) is not None:
            click.echo(f"  {key}: {d[key]}")
    for v in d["versions"]:
        signed = f"signed by {v.get('key_id')}" if v["signed"] else "unsigned"
        click.echo(f"  version {v['version']}  {v['state']}  {signed}  {human_size(v['size'])}")
        for f in v["files"]:
            click.echo(f"    {f['filename']}  {f['role']}  {f['size']} bytes  sha256:{f['sha256']}  {f['state']}")


# -- verify -------------------------------------------------------------------------
@cli.command()
@click.argument("name", required=False)
@json_option
@pass_ctx
def verify(c: Ctx, name: str | None, as_json: bool) -> None:
    """Re-hash every local blob (of NAME, or of all models); quarantine corrupt ones."""
    results = c.store.verify(name)
    bad = [r for r in results if r.status == "corrupt"]
    if as_json:
        print_json([r.__dict__ for r in results])
    else:
        for r in results:
            click.echo(f"{r.status.upper():8} {r.model} v{r.version} {r.filename}")
        if bad:
            info(f"{len(bad)} corrupt file(s); their blobs were moved to quarantine")
    if bad:
        sys.exit(5)


# -- removal ---------------------------------------------------------------------------
def _print_plan(plan: Any, verb: str) -> None:
    for model, version in plan.versions:
        click.echo(f"{verb} {model} version {version}")
    for sha, size in plan.blobs:
        click.echo(f"  delete blob {sha[:16]}…  {human_size(size)}")
    for sha, model in plan.kept_shared:
        click.echo(f"  keep blob {sha[:16]}…  (still used by {model})")
    for q in plan.quarantine:
        click.echo(f"  delete quarantined {q}")
    click.echo(f"frees {human_size(plan.freed_bytes)}")


@cli.command()
@click.argument("name", required=False)
@click.option("--version", "version", type=int, help="Remove only this (inactive) version.")
@click.option("--partial", "partial", metavar="SHA256", help="Discard this partial download instead.")
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@json_option
@pass_ctx
def rm(c: Ctx, name: str | None, version: int | None, partial: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove a model (or one version). Blobs shared with other models stay."""
    if partial is not None:
        from .cli_pull import discard
        return discard(c, partial, as_json)
    if name is None:
        raise UsageError("rm needs a model NAME (or --partial SHA256)")
    from .daemon import open_files, open_files_of
    plan = c.store.plan_remove(name, version)
    # Not refused: the daemon's descriptors pin the bytes. But whoever runs rm should
    # know that a reader still holds them (and that the space comes back only later).
    in_use = open_files_of(open_files(c.store.layout), name, version)
    if in_use:
        pids = sorted({f["pid"] for f in in_use})
        what = name if version is None else f"{name} version {version}"
        freed = {sha for sha, _ in plan.blobs}
        deleted = any(f["sha256"] in freed for f in in_use)
        leaves, stay, go = ("would leave", "would stay", "be") if dry_run else ("leaves", "stay", "are")
        fate = f"it {leaves} the mount now; its bytes {stay} readable to them" + (
            f" and {go} deleted after the last close" if deleted else "")
        click.echo(f"modelfs: warning: {what} is open by {len(pids)} reader(s) "
                   f"(pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))}): {fate}", err=True)
    if as_json:
        print_json({**plan.as_dict(), "dry_run": dry_run, "in_use": in_use})
    else:
        _print_plan(plan, "remove")
    if not dry_run:
        c.store.execute(plan)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@json_option
@pass_ctx
def prune(c: Ctx, dry_run: bool, as_json: bool) -> None:
    """Remove old versions (not active, last-good or pinned), orphan blobs and quarantine."""
    plan = c.store.plan_prune()
    if as_json:
        print_json({**plan.as_dict(), "dry_run": dry_run})
    else:
        _print_plan(plan, "prune")
    if not dry_run:
        c.store.execute(plan, action="prune")


# -- versions -------------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@click.argument("version", type=int)
@pass_ctx
def activate(c: Ctx, name: str, version: int) -> None:
    """Make VERSION the active version of NAME (atomic)."""
    prev = c.store.activate(name, version)
    click.echo(f"{name}: version {version} active (last-good: {prev if prev is not None else '-'})")


@cli.command()
@click.argument("name")
@pass_ctx
def rollback(c: Ctx, name: str) -> None:
    """Go back to the last-good version of NAME (atomic)."""
    v = c.store.rollback(name)
    click.echo(f"{name}: rolled back to version {v}")


# -- pins, apps, grants ----------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@click.option("--reason", help="Why it is pinned.")
@pass_ctx
def pin(c: Ctx, name: str, reason: str | None) -> None:
    """Keep NAME and all its versions through prune."""
    c.store.catalog.pin(name, reason)
    click.echo(f"pinned {name}")


@cli.command()
@click.argument("name")
@pass_ctx
def unpin(c: Ctx, name: str) -> None:
    """Let prune consider NAME again."""
    if not c.store.catalog.unpin(name):
        raise UsageError(f"{name!r} is not pinned")
    click.echo(f"unpinned {name}")


@cli.group()
def apps() -> None:
    """Apps that use the store (for per-app visibility)."""


@apps.command("add")
@click.argument("app_id")
@click.option("--uid", type=int, help="Unix uid the app runs as.")
@pass_ctx
def apps_add(c: Ctx, app_id: str, uid: int | None) -> None:
    """Register APP_ID (optionally bound to a uid)."""
    c.store.catalog.add_app(app_id, uid)
    click.echo(f"app {app_id} registered" + (f" (uid {uid})" if uid is not None else ""))


@apps.command("list")
@json_option
@pass_ctx
def apps_list(c: Ctx, as_json: bool) -> None:
    """List registered apps and their grants."""
    grants = c.store.catalog.grants()
    rows = [{**a, "grants": [g["model"] for g in grants if g["app_id"] == a["app_id"]]}
            for a in c.store.catalog.apps()]
    if as_json:
        print_json(rows)
        return
    for a in rows:
        click.echo(f"{a['app_id']}  uid={a['uid'] if a['uid'] is not None else '-'}  "
                   f"grants: {', '.join(a['grants']) or '-'}")


@cli.command()
@click.argument("app_id")
@click.argument("name")
@pass_ctx
def grant(c: Ctx, app_id: str, name: str) -> None:
    """Let APP_ID see model NAME."""
    c.store.catalog.grant(app_id, name)
    c.store.catalog.audit(c.store.actor, "grant", model=name, detail={"app": app_id})
    click.echo(f"granted {name} to {app_id}")


@cli.command()
@click.argument("app_id")
@click.argument("name")
@pass_ctx
def revoke(c: Ctx, app_id: str, name: str) -> None:
    """Take back a grant of NAME from APP_ID."""
    if not c.store.catalog.revoke(app_id, name):
        raise UsageError(f"{app_id!r} has no grant for {name!r}")
    c.store.catalog.audit(c.store.actor, "revoke", model=name, detail={"app": app_id})
    click.echo(f"revoked {name} from {app_id}")


@cli.command()
@json_option
@pass_ctx
def doctor(c: Ctx, as_json: bool) -> None:
    """Check the machine and the store; exit non-zero when something is wrong."""
    from .doctor import run_checks
    checks = run_checks(c.store)
    if as_json:
        print_json([ch.__dict__ for ch in checks])
    else:
        for ch in checks:
            click.echo(f"{'ok  ' if ch.ok else 'FAIL'}  {ch.name}: {ch.detail}")
    if not all(ch.ok for ch in checks):
        sys.exit(1)


from .cli_pull import pull, status  # noqa: E402 - registered after cli is defined

cli.add_command(pull)
cli.add_command(status)


def _leaf(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups, or the group itself.

    trio >= 0.25 wraps whatever leaves a nursery in an ExceptionGroup; a user error
    raised under ``trio.run`` must still become one line and its exit code."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main() -> None:
    try:
        try:
            cli.main(standalone_mode=False)
        except BaseExceptionGroup as group:
            leaf = _leaf(group)
            if leaf is group:
                raise
            raise leaf from None
    except StoreError as exc:
        click.echo(f"modelfs: error: {redact_text(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("modelfs: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("modelfs: interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        # Environment problems (permissions, a missing directory) are user errors too.
        click.echo(f"modelfs: error: {redact_text(str(exc))}", err=True)
        sys.exit(1)


from .cli_mount import mount, unmount  # noqa: E402 - registered last, after the group exists
cli.add_command(mount)
cli.add_command(unmount)

from .cli_trust import register as _register_trust  # noqa: E402 - keys, manifest, channels, update
_register_trust(cli)


if __name__ == "__main__":
    main()
