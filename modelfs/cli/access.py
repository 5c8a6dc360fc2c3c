"""The verbs about who sees what: ``apps`` (``add``, ``list``), ``grant`` and ``revoke``."""

from __future__ import annotations

import click

from modelfs_store.errors import UsageError

from ._context import Ctx, json_option, pass_ctx
from ._output import print_json


@click.group()
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


@click.command()
@click.argument("app_id")
@click.argument("name")
@pass_ctx
def grant(c: Ctx, app_id: str, name: str) -> None:
    """Let APP_ID see model NAME."""
    c.store.catalog.grant(app_id, name, actor=c.store.actor)
    click.echo(f"granted {name} to {app_id}")


@click.command()
@click.argument("app_id")
@click.argument("name")
@pass_ctx
def revoke(c: Ctx, app_id: str, name: str) -> None:
    """Take back a grant of NAME from APP_ID."""
    if not c.store.catalog.revoke(app_id, name, actor=c.store.actor):
        raise UsageError(f"{app_id!r} has no grant for {name!r}")
    click.echo(f"revoked {name} from {app_id}")
