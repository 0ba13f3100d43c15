"""Issue 12, the refresh-burst and writer-held rows: the event loop is not made to wait
for the GIL while worker threads run Python (index commits of a burst's queued writes,
tree updates), and what a released index writer hands back to the loop is bounded."""

from __future__ import annotations

import json
import subprocess
import sys

from buffyfs import watchdog


def test_the_daemon_takes_the_gil_back_from_worker_threads_within_half_a_millisecond(
) -> None:
    """What the mount does before it serves (watchdog.prefer_the_loop), in a process of
    its own: a worker thread running Python gives the GIL up after 0.5 ms, not Python's
    5 ms, so each blocking call of the loop costs a FUSE request at most that."""
    code = ("import json, sys; from buffyfs import watchdog, mount; "
            "before = sys.getswitchinterval(); watchdog.prefer_the_loop(); "
            "print(json.dumps([before, sys.getswitchinterval()]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    before, after = json.loads(done.stdout)
    assert before == 0.005
    assert after == watchdog.SWITCH_INTERVAL <= 0.001
