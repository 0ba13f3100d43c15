"""CPU priority of the mount's helpers: everything but the event loop runs niced.

On a busy machine the event loop's thread must get a core first: every FUSE request
waits for it. The mount's worker threads (downloads' writes and hashes, index commits,
listings, invalidations), its worker processes and its unpacking children run
WORKER_NICE levels below the loop. Measured (bench.stall's refresh burst, 4,000 × 5, on
two cores): with the worker threads at the loop's priority the loop waited for a core
about as long as it ran, and a ``stat`` waited 40-58 ms at p99; with them niced, 11-14.
(Python 3.12 runs profile functions on sys.monitoring: the hook below still runs once
per new thread, and trio keeps its threads for reuse, so that stays rare.)

Linux keeps a nice value per thread, and a thread or process starts with its
creator's: so a thread is lowered once, when it starts (``nice_new_threads``), and a
process the mount starts from a worker thread is already lowered.
"""

from __future__ import annotations

import os
import sys
import threading
from types import FrameType
from typing import Any

WORKER_NICE = 10  # the helpers' niceness above the event loop's
MAX_NICE = 19


def current() -> int:
    """The calling thread's nice value (Linux: per thread)."""
    return os.getpriority(os.PRIO_PROCESS, 0)


def helper_nice(loop_nice: int) -> int:
    """The nice value of a helper of a loop running at ``loop_nice``."""
    return min(MAX_NICE, loop_nice + WORKER_NICE)


def lower_to(nice: int) -> None:
    """Lower the calling thread's priority to ``nice`` unless it is that low already
    (raising it back needs a privilege the mount may not have)."""
    try:
        if current() < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        pass


def nice_new_threads(loop_nice: int) -> None:
    """Every thread started from now on (trio's worker threads, pyfuse3's notification
    thread, trio-parallel's) lowers itself to ``helper_nice(loop_nice)`` as it starts:
    ``threading.setprofile`` runs a function at the start of each new thread, which
    here does its one job and removes itself."""
    nice = helper_nice(loop_nice)

    def at_start(frame: FrameType, event: str, arg: Any) -> None:
        sys.setprofile(None)
        lower_to(nice)

    threading.setprofile(at_start)
