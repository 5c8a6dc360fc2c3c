"""``modelfs doctor``: checks of the machine and the store, each one line."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from modelfs_store.core import Store


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
    integrity = store.catalog.conn.execute("PRAGMA integrity_check").fetchone()[0]
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
