"""``modelfs doctor``: checks of the machine and the store, each one line."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import click

from modelfs_store.core import Store

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
    integrity = store.catalog.integrity_check()
    checks.append(Check("catalog integrity", integrity == "ok", integrity))
    checks.append(Check("catalog schema", True, f"version {store.catalog.schema_version()}"))
    referenced = store.catalog.referenced_shas()
    missing = sorted(s for s in referenced if not store.blobs.has(s))
    checks.append(Check("blobs", True, f"{len(referenced) - len(missing)} local, "
                        f"{len(missing)} dehydrated (fetched on open)"))
    quarantined = list(store.layout.quarantine.iterdir())
    checks.append(Check("quarantine", not quarantined,
                        f"{len(quarantined)} item(s); inspect, then `modelfs prune`" if quarantined else "empty"))
    return checks


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
