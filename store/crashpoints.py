"""Named crash points for crash-safety tests.

``crash_point("import-mid-copy")`` kills the process with SIGKILL when the
environment variable ``MODELFS_CRASH_AT`` names that point, so a test can build
exactly the on-disk state a ``kill -9`` at that step leaves. Costs one dict lookup
otherwise; never used on a per-read path.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("MODELFS_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
