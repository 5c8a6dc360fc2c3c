"""Named crash points for crash-safety tests.

``crash_point("import-mid-copy")`` kills the process with SIGKILL when the
environment variable ``MODELFS_CRASH_AT`` names that point, so a test can build
exactly the on-disk state a ``kill -9`` at that step leaves. ``NAME@N`` kills the
N-th time the point is reached (``download-before-checkpoint@4``: just before the
fourth checkpoint). Costs one dict lookup otherwise; never used on a per-read path.
"""

from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    target = os.environ.get("MODELFS_CRASH_AT")
    if not target:
        return
    point, _, nth = target.partition("@")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
