"""The verbs about who sees what: ``apps`` (``add``, ``list``, ``rm``), ``grant``,
``revoke``, ``visibility`` and ``whoami``.

An identity is (uid, app id): a grant names an app *and* the uid it must run as (the
store owner's by default; ``--any-uid`` only when asked, and advisory, since any uid
can claim any app id). The rules are ``modelfs_store.policy``'s; how a process's app id
is found is ``modelfs.mount.identity``'s. All of it takes effect in a live mount within
a second.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import click

from modelfs_store.errors import NotFound, UsageError
from modelfs_store.owner import user_name
from modelfs_store.policy import VISIBILITIES

from ._context import Ctx, json_option, pass_ctx
from ._output import print_json

APP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def check_app_id(app_id: str) -> str:
    if not APP_ID.fullmatch(app_id):
        raise UsageError(f"invalid app id {app_id[:80]!r}: use letters, digits, '.', '_' and '-' "
                         "(a reverse-DNS name such as org.example.Chat)")
    return app_id


def _grant_target(uid: int | None, any_uid: bool) -> str:
    if any_uid:
        return "running as any uid (advisory)"
    return f"running as {user_name(uid if uid is not None else os.geteuid())}"


# -- apps -------------------------------------------------------------------------------------
@click.group()
def apps() -> None:
    """Apps that use the store (for per-app visibility)."""


@apps.command("add")
@click.argument("app_id")
@click.option("--exe", "exes", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An executable that identifies the app when it runs (repeatable); its device and inode "
                   "are recorded now.")
@click.option("--uid", type=int, help="Unix uid the app runs as (informational).")
@json_option
@pass_ctx
def apps_add(c: Ctx, app_id: str, exes: tuple[str, ...], uid: int | None, as_json: bool) -> None:
    """Register APP_ID, optionally with the executables that identify it."""
    recorded = []
    for exe in exes:
        path = Path(exe).absolute()
        st = path.stat()
        recorded.append((str(path), st.st_dev, st.st_ino))
    c.store.catalog.add_app(check_app_id(app_id), uid, recorded, actor=c.store.actor)
    if as_json:
        print_json({"app_id": app_id, "uid": uid, "exes": [p for p, _, _ in recorded]})
        return
    click.echo(f"app {app_id} registered" + (f" (uid {uid})" if uid is not None else "") +
               "".join(f"\n  identified by {p}" for p, _, _ in recorded))


@apps.command("list")
@json_option
@pass_ctx
def apps_list(c: Ctx, as_json: bool) -> None:
    """List registered apps, their executables and their grants."""
    cat = c.store.catalog
    grants, exes = cat.grants(), cat.app_exes()
    rows = [{**a, "exes": [e["path"] for e in exes if e["app_id"] == a["app_id"]],
             "grants": [{"model": g["model"], "uid": g["uid"], "any_uid": g["any_uid"]}
                        for g in grants if g["app_id"] == a["app_id"]]}
            for a in cat.apps()]
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no apps")
    for a in rows:
        held = ", ".join(f"{g['model']} ({_grant_target(g['uid'], g['any_uid'])})" for g in a["grants"])
        click.echo(f"{a['app_id']}  uid={a['uid'] if a['uid'] is not None else '-'}  grants: {held or '-'}")
        for exe in a["exes"]:
            click.echo(f"  identified by {exe}")


@apps.command("rm")
@click.argument("app_id")
@pass_ctx
def apps_rm(c: Ctx, app_id: str) -> None:
    """Forget APP_ID, its executables and its grants (the models it owns stay)."""
    if not c.store.catalog.remove_app(app_id, actor=c.store.actor):
        raise NotFound(f"no app named {app_id!r}", app=app_id)
    click.echo(f"app {app_id} removed")


# -- grants -----------------------------------------------------------------------------------
uid_option = click.option("--uid", type=int, help="The uid the app must run as (default: the store owner's).")
any_uid_option = click.option("--any-uid", is_flag=True,
                              help="Any uid running the app (advisory: any uid can claim an app id).")


def _uid(uid: int | None, any_uid: bool) -> int | None:
    if uid is not None and any_uid:
        raise UsageError("give --uid or --any-uid, not both")
    return None if uid == os.geteuid() else uid  # the owner's uid is the default: stored as such


@click.command()
@click.argument("app_id")
@click.argument("name")
@uid_option
@any_uid_option
@json_option
@pass_ctx
def grant(c: Ctx, app_id: str, name: str, uid: int | None, any_uid: bool, as_json: bool) -> None:
    """Let APP_ID (running as --uid, by default the store owner) see model NAME."""
    uid = _uid(uid, any_uid)
    new = c.store.catalog.grant(app_id, name, uid=uid, any_uid=any_uid, actor=c.store.actor)
    if as_json:
        print_json({"app_id": app_id, "model": name, "uid": uid, "any_uid": any_uid, "new": new})
        return
    click.echo(f"granted {name} to {app_id} {_grant_target(uid, any_uid)}" + ("" if new else " (already)"))


@click.command()
@click.argument("app_id")
@click.argument("name")
@uid_option
@any_uid_option
@pass_ctx
def revoke(c: Ctx, app_id: str, name: str, uid: int | None, any_uid: bool) -> None:
    """Take back a grant of NAME from APP_ID (the one for --uid, by default the owner's)."""
    uid = _uid(uid, any_uid)
    if not c.store.catalog.revoke(app_id, name, uid=uid, any_uid=any_uid, actor=c.store.actor):
        raise UsageError(f"{app_id!r} has no grant for {name!r} {_grant_target(uid, any_uid)}")
    click.echo(f"revoked {name} from {app_id} {_grant_target(uid, any_uid)}")


@click.command()
@click.argument("name")
@click.argument("visibility", type=click.Choice(VISIBILITIES))
@click.option("--app", "owner_app", help="The app that owns the model (it sees a private model).")
@json_option
@pass_ctx
def visibility(c: Ctx, name: str, visibility: str, owner_app: str | None, as_json: bool) -> None:
    """Make model NAME private (its app, granted apps and the owner's shell see it) or shared."""
    c.store.catalog.set_visibility(name, visibility, owner_app=check_app_id(owner_app) if owner_app else None,
                                   actor=c.store.actor)
    m = c.store.catalog.get_model(name)
    if as_json:
        print_json({"name": m.name, "visibility": m.visibility, "owner_app": m.owner_app})
        return
    click.echo(f"{m.name} is {m.visibility}" + (f" (owned by {m.owner_app})" if m.owner_app else ""))


# -- whoami -----------------------------------------------------------------------------------
@click.command()
@click.option("--pid", type=int, help="The process to identify (default: the one that ran modelfs).")
@json_option
@pass_ctx
def whoami(c: Ctx, pid: int | None, as_json: bool) -> None:
    """The identity the mount resolves for a process, by which rule, and what it sees."""
    from modelfs.mount.access import AppVisibility
    from modelfs.mount.tree import Caller

    pid = os.getppid() if pid is None else pid
    cat = c.store.catalog
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        raise NotFound(f"no process {pid}", pid=pid) from None
    access = AppVisibility(os.geteuid())
    access.update(cat.grants(), {(e["dev"], e["ino"]): e["app_id"] for e in cat.app_exes()})
    ident = access.identify(Caller(uid, 0, pid))
    models = cat.list_models()
    seen = [m.name for m in models if access.allows(Caller(uid, 0, pid), m)]
    hidden = len(models) - len(seen)
    out: dict[str, Any] = {**ident.as_dict(), "user": user_name(uid), "sees": seen, "hidden": hidden}
    if as_json:
        print_json(out)
        return
    app = f"app {ident.app} (by {ident.rule})" if ident.app else f"no app id ({ident.rule})"
    click.echo(f"pid {ident.pid or pid}: {user_name(uid)} (uid {uid}), {app}"
               + ("" if ident.sure else "; not identified: sees shared models only"))
    click.echo(f"sees {len(seen)} model(s)" + (f"; {hidden} private model(s) hidden" if hidden else "")
               + (f": {', '.join(seen)}" if seen else ""))
