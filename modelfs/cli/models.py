"""The verbs about models in the store: ``import``, ``list``, ``show``, ``verify``,
``rm``, ``prune``, ``activate``, ``rollback``, ``mark-good``, ``pin`` and ``unpin``.

Parsing and printing only; the work is ``modelfs_store.core.Store``'s. ``rm`` and
``prune`` warn about readers that still hold a model open: through the mount (its
run-state) or through a link to the blob (``modelfs.mount.holders``).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import click

from modelfs.mount.holders import readers
from modelfs.mount.runstate import OpenFile, open_files_of
from modelfs_store.catalog import Action, ModelRecord
from modelfs_store.core import RemovalPlan
from modelfs_store.errors import UsageError
from modelfs_store.owner import user_name
from modelfs_store.prune import PrunePolicy
from modelfs_store.shards import find_siblings

from ._context import Ctx, json_option, pass_ctx
from ._output import human_size, info, print_json, progress_bar, table
from .status import rollout_line


# -- import ---------------------------------------------------------------------
@click.command("import")
@click.argument("name")
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--mmproj", type=click.Path(dir_okay=False), help="Multimodal projector for these weights.")
@click.option("--license", "license_", help="Licence of the model.")
@click.option("--source-url", help="Upstream page of the model.")
@click.option("--app", "owner_app", help="App that owns the model.")
@click.option("--private", is_flag=True, help="Only its app, apps granted it and your own shell see it in the mount.")
@json_option
@pass_ctx
def import_cmd(c: Ctx, name: str, weights: str, mmproj: str | None, license_: str | None,
               source_url: str | None, owner_app: str | None, private: bool, as_json: bool) -> None:
    """Copy a local GGUF (and its mmproj) into the store as model NAME.

    The first file of a split model (m-00001-of-00003.gguf) brings the others beside it:
    all of them are checked together and stored as one model."""
    total = None
    with contextlib.suppress(UsageError, OSError):  # the import itself says what is wrong
        total = sum(p.stat().st_size for p in find_siblings(Path(weights))) if Path(weights).is_file() else None
    if total is not None and mmproj and Path(mmproj).is_file():
        total += Path(mmproj).stat().st_size
    with progress_bar(total, f"importing {name}") as advance:
        res = c.store.import_model(name, Path(weights), mmproj=Path(mmproj) if mmproj else None,
                                   license=license_, source_url=source_url, owner_app=owner_app, private=private,
                                   progress=advance)
    if as_json:
        print_json({"name": res.model, "version": res.version, "new_version": res.new_version,
                    "new_bytes": res.new_bytes, "files": [f.__dict__ for f in res.files]})
        return
    what = f"version {res.version}" if res.new_version else f"version {res.version} (unchanged)"
    click.echo(f"imported {res.model} {what}: {len(res.files)} file(s), "
               f"{human_size(res.new_bytes)} new in the store")


# -- list / show ------------------------------------------------------------------
@click.command("list")
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
        state = ("-" if not states else "missing" if "missing" in states else "local" if states == {"local"} else
                 "dehydrated" if "local" not in states else "partly local")
        # A lazily pulled pack has no GGUF header read yet: its signed family stands in.
        arch = m.get("architecture") or m.get("family") or "-"
        version = str(m["active_version"] or "-") + (" (candidate)" if m.get("rollout") else "")
        rows.append((m["name"], version, arch, m.get("quantization") or "-",
                     str(m.get("context_length") or "-"), human_size(m.get("size")), state))
    table(rows)


@click.command()
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
                "source"):
        if d.get(key) is not None:
            click.echo(f"  {key}: {d[key]}")
    if d.get("chat_template") is not None:  # None: the weights' header was not read yet (a lazy pack)
        click.echo(f"  chat_template: {'yes' if d['chat_template'] else 'no'}")
    owner = d["owner_app"] or "-"
    if d["owner_app"] and d.get("owner_uid") is not None:
        owner += f" (as {user_name(d['owner_uid'])})"
    grants = ", ".join(f"{g['app_id']} (" + ("any uid" if g["any_uid"] else
                                            user_name(g["uid"] if g["uid"] is not None else os.geteuid())) + ")"
                       for g in d["grants"])
    click.echo(f"  visibility: {d['visibility']}; owner app: {owner}; granted to: {grants or '-'}")
    if d.get("rollout"):
        click.echo(f"  rollout: {rollout_line(d['rollout'])}")
    for v in d["versions"]:
        signed = f"signed by {v.get('key_id')}" if v["signed"] else "unsigned"
        state = v["state"] + (", candidate" if d.get("rollout") and v["version"] == d["rollout"]["version"] else "")
        click.echo(f"  version {v['version']}  {state}  {signed}  {human_size(v['size'])}")
        for f in v["files"]:
            click.echo(f"    {f['filename']}  {f['role']}  {f['size']} bytes  sha256:{f['sha256']}  {f['state']}")


# -- verify -------------------------------------------------------------------------
@click.command()
@click.argument("name", required=False)
@json_option
@pass_ctx
def verify(c: Ctx, name: str | None, as_json: bool) -> None:
    """Re-hash every local blob (of NAME, or of all models); quarantine corrupt ones."""
    results = c.store.verify(name)
    corrupt = [r for r in results if r.status == "corrupt"]
    lost = [r for r in results if r.failed and r.status == "missing"]
    if as_json:
        print_json([r.__dict__ for r in results])
    else:
        for r in results:
            click.echo(f"{r.status.upper():8} {r.model} v{r.version} {r.filename}")
        if corrupt:
            info(f"{len(corrupt)} corrupt file(s); their blobs were moved to quarantine")
        if lost:
            info(f"{len(lost)} file(s) of active versions have no bytes and no source to fetch them from; "
                 "import them again (the quarantined copies failed their SHA-256)")
    if corrupt or lost:
        raise SystemExit(5)


# -- removal ---------------------------------------------------------------------------
def _print_plan(plan: RemovalPlan, verb: str) -> None:
    for s in plan.steps:  # a policy prune: one line per step, least recently used first
        when = time.strftime("%Y-%m-%d", time.localtime(s.last_used_at))
        click.echo(f"{verb} {s.model} version {s.version} (last used {when}, {s.reason}): frees "
                   f"{human_size(s.freed_bytes)}, keeps {human_size(s.kept_shared_bytes)} shared")
    for model, version in plan.versions if not plan.steps else ():
        click.echo(f"{verb} {model} version {version}")
    for sha, size in plan.blobs:
        click.echo(f"  delete blob {sha[:16]}…  {human_size(size)}")
    for sha, model in plan.kept_shared:
        click.echo(f"  keep blob {sha[:16]}…  (still used by {model})")
    for q in plan.quarantine:
        click.echo(f"  delete quarantined {q}")
    click.echo(f"frees {human_size(plan.freed_bytes)}")


def _warn_in_use(c: Ctx, plan: RemovalPlan, targets: list[tuple[str, int | None]], dry_run: bool) -> list[OpenFile]:
    """Warn about every target (a model, or one version of it) a reader holds open,
    through the mount or through a link. Not refused: the daemon's descriptors, or the
    reader's own, pin the bytes. But whoever removes should know that readers still
    hold them, and that the space comes back only after their last close. Returns the
    open files concerned."""
    everything = _readers(c)
    freed = {sha for sha, _ in plan.blobs}
    concerned: list[OpenFile] = []
    for name, version in targets:
        in_use = open_files_of(everything, name, version)
        if not in_use:
            continue
        concerned += in_use
        pids = sorted({f["pid"] for f in in_use})
        what = name if version is None else f"{name} version {version}"
        deleted = any(f["sha256"] in freed for f in in_use)
        leaves, stay, go = ("would leave", "would stay", "be") if dry_run else ("leaves", "stay", "are")
        fate = f"it {leaves} the mount now; its bytes {stay} readable to them" + (
            f" and {go} deleted after the last close" if deleted else "")
        click.echo(f"modelfs: warning: {what} is open by {len(pids)} reader(s) "
                   f"(pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))}): {fate}", err=True)
    return concerned


def _readers(c: Ctx) -> list[OpenFile]:
    return readers(c.store.layout, c.store.blobs, c.store.catalog.all_files())


@click.command()
@click.argument("name", required=False)
@click.option("--version", "version", type=int, help="Remove only this (inactive) version.")
@click.option("--partial", "partial", metavar="SHA256", help="Discard this partial download instead.")
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@json_option
@pass_ctx
def rm(c: Ctx, name: str | None, version: int | None, partial: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove a model (or one version). Blobs shared with other models stay."""
    if partial is not None:
        _discard_partial(c, partial, as_json)
        return
    if name is None:
        raise UsageError("rm needs a model NAME (or --partial SHA256)")
    plan = c.store.plan_remove(name, version)
    in_use = _warn_in_use(c, plan, [(name, version)], dry_run)
    if as_json:
        print_json({**plan.as_dict(), "dry_run": dry_run, "in_use": in_use})
    else:
        _print_plan(plan, "remove")
    if not dry_run:
        c.store.execute(plan)


@click.command()
@click.option("--older-than", "older_than", metavar="DURATION",
              help="Remove what was last used longer ago than this (e.g. 30d, 12h), least recently used first.")
@click.option("--max-bytes", "max_bytes", metavar="SIZE",
              help="Remove least recently used first until the store holds at most this (e.g. 50G, 800M).")
@click.option("--app", help="With --older-than or --max-bytes: only models this app owns.")
@click.option("--include-active", is_flag=True, help="Active and last-good versions may go too (whole models).")
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@json_option
@pass_ctx
def prune(c: Ctx, older_than: str | None, max_bytes: str | None, app: str | None, include_active: bool,
          dry_run: bool, as_json: bool) -> None:
    """Remove old versions (not active, last-good or pinned), orphan blobs and quarantine.
    With --older-than or --max-bytes: remove by last use instead, never a pinned model
    nor a file a reader holds open."""
    if older_than is None and max_bytes is None:
        if app is not None or include_active:
            raise UsageError("--app and --include-active go with --older-than or --max-bytes")
        plan = c.store.plan_prune()
    else:
        policy = PrunePolicy(parse_duration(older_than) if older_than else None,
                             parse_size(max_bytes) if max_bytes else None, app, include_active)
        held = {(f["model"], f["version"]) for f in _readers(c)}
        plan = c.store.plan_policy(policy, in_use=held)
    in_use = _warn_in_use(c, plan, list(plan.versions), dry_run)
    if as_json:
        print_json({**plan.as_dict(), "dry_run": dry_run, "in_use": in_use})
    else:
        _print_plan(plan, "prune")
    if not dry_run:
        c.store.execute(plan, action=Action.PRUNE)


# -- versions -------------------------------------------------------------------------------
def _echo_active(m: ModelRecord, what: str, as_json: bool) -> None:
    """One line from the model's state after the change, so it agrees with ``show``."""
    if as_json:
        print_json({"name": m.name, "active_version": m.active_version, "last_good_version": m.last_good_version})
        return
    last_good = m.last_good_version if m.last_good_version is not None else "-"
    click.echo(f"{m.name}: {what.format(v=m.active_version)} (last-good: {last_good})")


force_option = click.option("--force", is_flag=True,
                            help="Activate even a version signed by a key that is no longer trusted (audited).")


@click.command()
@click.argument("name")
@click.argument("version", type=int)
@force_option
@json_option
@pass_ctx
def activate(c: Ctx, name: str, version: int, force: bool, as_json: bool) -> None:
    """Make VERSION the active version of NAME (atomic). The version it replaces becomes
    last-good, where `rollback` goes."""
    c.store.activate(name, version, force=force)
    _echo_active(c.store.catalog.get_model(name), "version {v} active", as_json)


@click.command()
@click.argument("name")
@force_option
@json_option
@pass_ctx
def rollback(c: Ctx, name: str, force: bool, as_json: bool) -> None:
    """Go back to the last-good version of NAME (atomic). The version rolled back from
    does not become last-good: a second rollback is refused, not a toggle."""
    c.store.rollback(name, force=force)
    _echo_active(c.store.catalog.get_model(name), "rolled back to version {v}", as_json)


@click.command("mark-good")
@click.argument("name")
@json_option
@pass_ctx
def mark_good(c: Ctx, name: str, as_json: bool) -> None:
    """End the probation of NAME's candidate version: it is good. It is no longer rolled back
    on its own, and the next version activated keeps it as last-good (audited)."""
    c.store.mark_good(name)
    _echo_active(c.store.catalog.get_model(name), "version {v} marked good", as_json)


# -- pins ----------------------------------------------------------------------------------
@click.command()
@click.argument("name")
@click.option("--reason", help="Why it is pinned.")
@json_option
@pass_ctx
def pin(c: Ctx, name: str, reason: str | None, as_json: bool) -> None:
    """Keep NAME and all its versions through prune."""
    c.store.catalog.pin(name, reason)
    if as_json:
        print_json({"name": name, "pinned": True, "reason": reason})
        return
    click.echo(f"pinned {name}")


@click.command()
@click.argument("name")
@json_option
@pass_ctx
def unpin(c: Ctx, name: str, as_json: bool) -> None:
    """Let prune consider NAME again."""
    if not c.store.catalog.unpin(name):
        raise UsageError(f"{name!r} is not pinned")
    if as_json:
        print_json({"name": name, "pinned": False})
        return
    click.echo(f"unpinned {name}")


def parse_duration(text: str) -> int:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` -> seconds: the settings' syntax
    (``modelfs_store.settings``), where ``never`` means nothing."""
    from modelfs_store.settings import parse_duration as seconds

    with contextlib.suppress(UsageError):
        if text.strip().lower() not in ("never", "off"):
            return seconds(text)
    raise UsageError(f"invalid duration {text!r}: use a number and s, m, h, d or w (e.g. 30d)")


def parse_size(text: str) -> int:
    """``50G``, ``800M``, ``1.5T``, ``1024`` (binary units) -> bytes: the settings' syntax,
    where ``none`` means nothing."""
    from modelfs_store.settings import parse_size as size

    with contextlib.suppress(UsageError):
        if (n := size(text)) is not None:
            return n
    raise UsageError(f"invalid size {text!r}: use a number and K, M, G or T (e.g. 50G)")


def _discard_partial(c: Ctx, sha256: str, as_json: bool) -> None:
    """``modelfs rm --partial SHA256``."""
    from modelfs_store.partial import discard_partial
    freed = discard_partial(c.store, sha256.lower())
    if as_json:
        print_json({"partial": sha256.lower(), "freed_bytes": freed})
    else:
        info(f"discarded the partial download {sha256.lower()[:16]}… ({human_size(freed)})")
