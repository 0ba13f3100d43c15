"""Chosen crash points, for the crash-safety tests.

With ``BUFFYFS_CRASH_AT=NAME`` in the environment, the process kills itself with
SIGKILL when it reaches point NAME, so a test can stop the daemon at an exact,
repeatable moment (mid-body, between blob and index, mid-collection...). Without the
variable a point costs one comparison.
"""

from __future__ import annotations

import os
import signal

_AT = os.environ.get("BUFFYFS_CRASH_AT")


def point(name: str) -> None:
    if _AT == name:
        os.kill(os.getpid(), signal.SIGKILL)
