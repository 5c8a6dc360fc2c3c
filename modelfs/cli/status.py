"""The store itself: ``modelfs init`` makes one; ``modelfs status`` shows it (models,
blobs, partial downloads, quarantine, downloads that failed verification and until when
they are not tried again, candidate versions on probation and the supervisor's
rollbacks) and its mount (the daemon and its control socket, what is open through it,
who reads a blob through a link, why recent opens failed)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from modelfs.mount.holders import link_readers
from modelfs.mount.runstate import (
    OpenFile,
    daemon_pids,
    detached_daemons,
    open_files_of,
    read_status,
    stale_mountpoint,
)
from modelfs_store.core import Store
from modelfs_store.failures import FailedVerification, list_failed, when
from modelfs_store.partial import list_partials
from modelfs_store.rollout import SUPERVISOR

from ._context import Ctx, json_option, pass_ctx
from ._output import human_size, print_json


@click.command()
@click.argument("path", type=click.Path(file_okay=False))
@json_option
def init(path: str, as_json: bool) -> None:
    """Make PATH a store (a new or empty directory). Only the default store is created
    without asking; --store and MODELFS_STORE must name one that exists."""
    store, created = Store.init(Path(path).absolute())
    root = store.layout.root
    store.close()
    if as_json:
        print_json({"store": str(root), "created": created})
    else:
        click.echo(f"initialised a store at {root}" if created else f"{root} is already a store")


@click.command()
@json_option
@pass_ctx
def status(c: Ctx, as_json: bool) -> None:
    """Show the store: models, blobs, partial downloads, quarantine, downloads that failed
    verification (not tried again before the time shown), and the mount: what is open
    through it and why recent opens failed (the reasons behind an EIO, an ENETUNREACH or
    an ETIMEDOUT a reader saw). Candidate versions on probation, and the versions the
    rollout supervisor rolled back, are listed too."""
    store = c.store
    partials = list_partials(store)
    failed = [f for f in list_failed(store.layout) if not store.blobs.has(f.sha256)]
    now = time.time()
    blobs = store.blobs.iter_blobs()
    blob_bytes = sum(store.blobs.size(s) for s in blobs)
    quarantined = sorted(p.name for p in store.layout.quarantine.iterdir())
    models = store.catalog.list_models()
    daemon = read_status(store.layout)
    stale = stale_mountpoint(store.layout) if daemon is None else None
    detached = detached_daemons(store.layout)
    linked = link_readers(store.blobs, store.catalog.all_files(), skip=daemon_pids(store.layout))
    if as_json:
        keys = ("pid", "mountpoint", "offline", "started_at", "open_files", "fetch_errors", "control_socket")
        mount = None if daemon is None else {k: daemon.get(k) for k in keys}
        print_json({"store": str(store.layout.root), "model_count": len(models), "blob_count": len(blobs),
                    "blob_bytes": blob_bytes, "quarantine": quarantined,
                    "partials": [p.as_dict() for p in partials], "mount": mount, "stale_mountpoint": stale,
                    "detached": detached, "link_readers": linked,
                    "failed_verifications": [{**f.as_dict(), "blocked": f.blocks(now)} for f in failed],
                    "rollouts": rollouts(store)})
        return
    click.echo(f"store: {store.layout.root}")
    click.echo(f"models: {len(models)}  blobs: {len(blobs)} ({human_size(blob_bytes)})  "
               f"quarantined: {len(quarantined)}")
    if stale:
        click.echo(f"mount: {stale} is stale (its daemon died); `modelfs mount {stale}` recovers it")
    else:
        _echo_mount(daemon)
    if linked:
        click.echo("read through links to the store (not through the mount):")
        _echo_open(linked)
    for d in detached:
        click.echo(f"unmounted daemon (pid {d['pid']}, was at {d['mountpoint']}) still serves "
                   f"{len(d['open_files'])} open file(s); it exits after the last close")
        _echo_open(d["open_files"])
    _echo_failed(failed, now)
    _echo_rollouts(rollouts(store))
    if not partials:
        click.echo("no partial downloads")
        return
    click.echo("partial downloads (resume with the same pull; discard with `modelfs rm --partial SHA256`):")
    for p in partials:
        pct = f"{100 * p.bytes_present / p.expected_size:5.1f}%" if p.expected_size else "    ?"
        total = human_size(p.expected_size) if p.expected_size else "?"
        state = "  [downloading]" if p.active else ""
        click.echo(f"  {p.sha256}  {human_size(p.bytes_present)} of {total} {pct}  {p.url or '-'}{state}")


SHOWN_ROLLBACKS = 5


def rollouts(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Candidate versions on probation, and the supervisor's last rollbacks (newest first)."""
    candidates = []
    for m in store.catalog.list_models():
        state = store.rollout_state(m) if m.candidate_since is not None else None
        if state is not None:
            candidates.append({"model": m.name, **state})
    rollbacks = [{"model": r["model"], "version": r["version"], "from_version": json.loads(r["detail"])["from"],
                  "rolled_back_at": r["ts"], "reason": r["reason"]}
                 for r in store.catalog.rollbacks(SUPERVISOR, SHOWN_ROLLBACKS)]
    return {"candidates": candidates, "rollbacks": rollbacks}


def rollout_line(r: dict[str, Any]) -> str:
    """One line about a candidate's probation (``show``, ``status``)."""
    ends = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["ends_at"]))
    return (f"version {r['version']} is a candidate (last-good: {r['last_good_version'] or '-'}, probation until "
            f"{ends}): {r['candidate']['ok_count']} loaded, {r['candidate']['failed_count']} failed; "
            f"{r['reason']}")


def _echo_rollouts(r: dict[str, list[dict[str, Any]]]) -> None:
    for c in r["candidates"]:
        click.echo(f"rollout: {c['model']} {rollout_line(c)}")
    for b in r["rollbacks"]:
        click.echo(f"rolled back: {b['model']} from version {b['from_version']} to {b['version']} at "
                   f"{when(b['rolled_back_at'])} by the supervisor: {b['reason']}")


def _echo_failed(failed: list[FailedVerification], now: float) -> None:
    """One line per file whose download failed verification: why, and until when a fetch
    of it is refused (the mount answers EIO, a pull refuses)."""
    if not failed:
        return
    click.echo("downloads that failed verification (`modelfs pull --retry` tries again now):")
    for f in failed:
        until = f"no new attempt before {when(f.retry_at)}" if f.blocks(now) else "may be tried again"
        click.echo(f"  {f.sha256}  failed {f.failures} time(s), last at {when(f.last_failed_at)}; {until}: "
                   f"{f.reason}  {f.url or '-'}")


SHOWN_FETCH_ERRORS = 5  # the daemon keeps 20; --json and the daemon log have them all


def _echo_mount(daemon: dict[str, Any] | None) -> None:
    """The mount part of ``modelfs status``: one line for the daemon, one per model in
    use, one per recent fetch error."""
    if daemon is None:
        click.echo("mount: not mounted")
        return
    mode = "offline" if daemon.get("offline") else "online"
    up = _duration(time.time() - daemon["started_at"]) if daemon.get("started_at") else "?"
    click.echo(f"mount: {daemon['mountpoint']}  (pid {daemon['pid']}, {mode}, up {up})")
    sock = daemon.get("control_socket")
    if sock:
        where = {"runtime-dir": "in $XDG_RUNTIME_DIR", "store": "in the store (no $XDG_RUNTIME_DIR, or it was taken)",
                 "system": "the system socket", "option": "as --socket said"}.get(sock["where"], sock["where"])
        click.echo(f"  control socket: {sock['path']} ({where})")
    _echo_open(daemon["open_files"])
    errors = daemon.get("fetch_errors") or []
    if len(errors) > SHOWN_FETCH_ERRORS:
        click.echo(f"  recent fetch errors (last {SHOWN_FETCH_ERRORS} of {len(errors)}):")
    elif errors:
        click.echo("  recent fetch errors:")
    for e in errors[-SHOWN_FETCH_ERRORS:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["failed_at"]))
        where = f"{e['model']}/{e['filename']}" if e.get("model") else e["filename"]
        click.echo(f"    {when}  {where}: {e['reason']} ({e['error']})")


def _echo_open(files: list[OpenFile]) -> None:
    """One line per model in use: its open files and who holds them."""
    models = sorted({f["model"] for f in files if f.get("model")})
    if not models:
        click.echo("  no open files")
    for model in models:
        pids: dict[str, set[int]] = {}
        for f in open_files_of(files, model):
            pids.setdefault(f["filename"], set()).add(f["pid"])
        held = ", ".join(f"{name} (pid{'s' if len(p) > 1 else ''} {', '.join(map(str, sorted(p)))})"
                         for name, p in sorted(pids.items()))
        click.echo(f"  open: {model}: {held}")


def _duration(seconds: float) -> str:
    s = max(int(seconds), 0)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {s % 60:02d}s" if m else f"{s}s"
