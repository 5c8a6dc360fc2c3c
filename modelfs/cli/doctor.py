"""``modelfs doctor``: checks of the machine and the store, each one line."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import click

from modelfs.mount.mountpoint import fuse_conf_allows_other
from modelfs.mount.runstate import read_status, stale_mountpoint
from modelfs_store.core import Store
from modelfs_store.owner import user_name

from ._context import Ctx, json_option, pass_ctx
from ._output import print_json


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def run_checks(store: Store) -> list[Check]:
    checks = [
        Check("/dev/fuse", os.path.exists("/dev/fuse"),
              "present" if os.path.exists("/dev/fuse") else "missing: the mount cannot work here"),
        Check("fusermount3", shutil.which("fusermount3") is not None,
              shutil.which("fusermount3") or "not found: apt-get install fuse3"),
    ]
    try:
        import pyfuse3  # noqa: F401  (only whether it loads)
        checks.append(Check("pyfuse3", True, f"version {pyfuse3.__version__}"))
    except ImportError as exc:
        checks.append(Check("pyfuse3", False, f"cannot import: {exc}"))
    checks.append(_allow_other())
    checks.append(Check("store modes", not store.repairs,
                        "repaired at this open: " + "; ".join(store.repairs) if store.repairs else
                        f"owned by {user_name(os.geteuid())}; directories 0700, catalog 0600, no links"))
    integrity = store.catalog.integrity_check()
    checks.append(Check("catalog integrity", integrity == "ok", integrity))
    checks.append(Check("catalog schema", True, f"version {store.catalog.schema_version()}"))
    checks.append(_blobs(store))
    quarantined = list(store.layout.quarantine.iterdir())
    checks.append(Check("quarantine", not quarantined,
                        f"{len(quarantined)} item(s); inspect, then `modelfs prune`" if quarantined else "empty"))
    checks.append(_mount(store))
    checks.append(_logind())
    return checks


def _logind() -> Check:
    """Informational: without logind, ``--keep-awake`` downloads run without a sleep inhibitor."""
    from modelfs.mount.inhibit import logind_answers

    why = logind_answers()
    return Check("logind", True, "answers: --keep-awake downloads hold a sleep inhibitor" if why is None else
                 f"does not answer ({why}): downloads run, but --keep-awake cannot keep the machine awake")


def _allow_other() -> Check:
    """Other users and sandboxed apps reach the mount only with allow_other, which a
    non-root daemon gets only from ``user_allow_other`` in /etc/fuse.conf."""
    if os.geteuid() == 0:
        return Check("allow_other", True, "the daemon runs as root: other users can be let in")
    if fuse_conf_allows_other():
        return Check("allow_other", True, "user_allow_other is set in /etc/fuse.conf")
    return Check("allow_other", True, "user_allow_other is not set in /etc/fuse.conf: only your own processes "
                 "can use the mount (as root, add it there to let other users and apps in)")


def _blobs(store: Store) -> Check:
    """Every file row by state: a file with no bytes and no source is lost for good."""
    states: dict[str, set[str]] = {"local": set(), "dehydrated": set(), "missing": set()}
    for _model, _version, rec in store.catalog.all_files():
        states[store.file_state(rec)].add(rec.sha256)
    local, dehydrated, missing = (len(states[k]) for k in ("local", "dehydrated", "missing"))
    detail = f"{local} local, {dehydrated} dehydrated (fetched on open)"
    if missing:
        detail += f", {missing} missing (no bytes and no source: import them again)"
    return Check("blobs", not missing, detail)


def _mount(store: Store) -> Check:
    stale = stale_mountpoint(store.layout)
    if stale:
        return Check("mount", False, f"{stale} is stale (its daemon died); `modelfs mount {stale}` recovers it")
    status = read_status(store.layout)
    if status is None:
        return Check("mount", True, "not mounted")
    return Check("mount", True, f"mounted at {status['mountpoint']} (pid {status['pid']})")


@click.command()
@json_option
@pass_ctx
def doctor(c: Ctx, as_json: bool) -> None:
    """Check the machine and the store; exit non-zero when something is wrong."""
    checks = run_checks(c.store)
    if as_json:
        print_json([ch.__dict__ for ch in checks])
    else:
        for ch in checks:
            click.echo(f"{'ok  ' if ch.ok else 'FAIL'}  {ch.name}: {ch.detail}")
    if not all(ch.ok for ch in checks):
        raise SystemExit(1)
