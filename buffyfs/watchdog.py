"""Liveness of the event loop: a monitor that logs every loop turn over 100 ms with what
ran, and the systemd watchdog fed from the loop itself.

One trio loop answers every FUSE request, so anything that runs long between two
awaits holds all of them. ``LoopMonitor`` (a trio ``Instrument``) times each task step
and each loop turn (from the end of one I/O wait to the start of the next); a turn
over ``threshold`` is one warning naming the task and, when a step ran long, the code
it was in. The code is found by a sampler thread that looks at the loop thread's stack
while a step is still running (``sys._current_frames``): after the step, the task has
moved on and its coroutine shows only where it waits now. Cost on the loop: two clock
read and a few attribute stores per task step, about 2 us with trio's dispatch
(``python -m bench.loopmon``).

The systemd watchdog (``WatchdogSec=`` in the units): systemd sets ``WATCHDOG_USEC``
(and ``WATCHDOG_PID``) and restarts the service when no ``WATCHDOG=1`` arrives within
that time. ``feed_watchdog`` sends one every half of it from a task on the loop, so a
loop that is wedged stops the heartbeats.

Test hook: with ``BUFFYFS_TEST_HOOKS=1`` in its environment, the daemon blocks its loop
for ``BUFFYFS_TEST_BLOCK_SECONDS`` (default 2) on each SIGUSR2 (``block_loop_on_signal``).
It exists only for the tests of the monitor and the watchdog; without the variable
SIGUSR2 keeps its default action.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType

import trio

log = logging.getLogger(__name__)

SLOW_TURN = 0.1  # seconds: a loop turn longer than this is logged
SAMPLE_EVERY = 0.02  # seconds between looks of the sampler thread
STACK_SHOWN = 4  # innermost frames named in the warning
TEST_HOOKS_ENV = "BUFFYFS_TEST_HOOKS"
FULL_COLLECTION_EVERY = 100  # collections of the middle generation per full one (tune_collector)


# --- the loop monitor ---------------------------------------------------------------


class LoopMonitor(trio.abc.Instrument):
    """Log a warning for every loop turn longer than ``threshold`` seconds.

    Use as ``with LoopMonitor() as monitor: trio.run(..., instruments=[monitor])``:
    the ``with`` runs the sampler thread.
    """

    def __init__(self, threshold: float = SLOW_TURN) -> None:
        self.threshold = threshold
        # Only one hook per step (trio's dispatch costs more than the hook's body): a
        # step is timed from the end of the one before, or from the end of the I/O wait.
        self.mark = time.perf_counter()  # when the step now running (if any) began
        self.running = False  # tasks are running (not waiting for I/O)
        self.steps = 0  # steps finished: the number of the one running, for the sampler
        self.sample: tuple[int, str] | None = None  # (step number, where it was)
        self.turn_started = self.mark
        self.turn_steps = 0
        self.slowest: tuple[float, str] = (0.0, "")  # (seconds, task name) this turn
        self.reported = False  # a step of this turn was logged already
        self.loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._collection_started = 0.0  # perf_counter() when Python's collector began
        self._collection_cpu = 0.0  # and the thread's CPU time then
        # long collections not logged yet: (generation, seconds, CPU seconds, freed)
        self._collections: list[tuple[int, float, float, int]] = []

    def __enter__(self) -> LoopMonitor:
        self.loop_thread = threading.get_ident()
        self._sampler = threading.Thread(target=self._sample_loop, name="loop-monitor",
                                         daemon=True)
        self._sampler.start()
        gc.callbacks.append(self._collection)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._collection in gc.callbacks:
            gc.callbacks.remove(self._collection)
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=1.0)
        self._log_collections()

    # trio's hooks: keep them cheap, they run around every task step

    def after_io_wait(self, timeout: float) -> None:
        self.mark = self.turn_started = time.perf_counter()
        self.running = True
        self.turn_steps = 0
        self.slowest = (0.0, "")
        self.reported = False

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        now = time.perf_counter()
        took = now - self.mark
        self.mark = now
        self.steps += 1
        self.turn_steps += 1
        if took > self.slowest[0]:
            self.slowest = (took, task.name)
            if took > self.threshold:
                sample = self.sample
                where = sample[1] if sample and sample[0] == self.steps - 1 \
                    else _await_point(task)
                log.warning("event loop blocked for %.0f ms by task %s, in %s",
                            took * 1000, task.name, where)
                self.reported = True

    def before_io_wait(self, timeout: float) -> None:
        self.running = False
        took = time.perf_counter() - self.turn_started
        if took > self.threshold and self.turn_steps and not self.reported:
            log.warning("event loop turn took %.0f ms: %d task steps, the longest %.0f ms "
                        "in task %s", took * 1000, self.turn_steps,
                        self.slowest[0] * 1000, self.slowest[1])

    def _collection(self, phase: str, info: dict[str, int]) -> None:
        """Python's cyclic garbage collector holds the GIL, so every thread and the
        loop, for as long as it runs: a long one is logged as what it is (its stack
        would name whatever allocated last)."""
        if phase == "start":
            self._collection_started = time.perf_counter()
            self._collection_cpu = time.thread_time()
            return
        took = time.perf_counter() - self._collection_started
        if took > self.threshold / 2:  # the CPU time: the rest is other processes'
            # logged by the sampler thread: a collection may run inside a log write of
            # this thread, and the stream would be written from within itself
            self._collections.append((info.get("generation", -1), took,
                                      time.thread_time() - self._collection_cpu,
                                      info.get("collected", 0)))

    def _log_collections(self) -> None:
        while self._collections:
            generation, took, cpu, freed = self._collections.pop(0)
            log.warning("garbage collection of generation %d took %.0f ms (%.0f ms of CPU; "
                        "%d objects freed)", generation, took * 1000, cpu * 1000, freed)

    # the sampler thread

    def _sample_loop(self) -> None:
        early = self.threshold / 2  # a step this long may well pass the threshold
        while not self._stop.wait(SAMPLE_EVERY):
            self._log_collections()
            step, began = self.steps, self.mark
            if not self.running or time.perf_counter() - began < early:
                continue
            if self.sample and self.sample[0] == step:
                continue  # this step was sampled already
            frame = sys._current_frames().get(self.loop_thread)
            if frame is not None and self.steps == step and self.running:
                self.sample = (step, _describe(frame))


def _describe(frame: FrameType | None) -> str:
    """A stack, innermost first (``module.func:line < ...``): the innermost frames, then
    the innermost ones of buffyfs itself when those are further out (say, below an
    import or a library call)."""
    frames = []
    while frame is not None and frame.f_globals.get("__name__") != "trio._core._run":
        frames.append(frame)  # up to the loop's own frame: what runs the task step
        frame = frame.f_back
    shown = frames[:STACK_SHOWN // 2]
    ours = [f for f in frames[len(shown):]
            if f.f_globals.get("__name__", "").startswith("buffyfs.")]
    parts = [_where(f) for f in shown]
    if ours:
        parts += (["..."] if ours[0] is not frames[len(shown)] else []) + \
            [_where(f) for f in ours[:STACK_SHOWN - len(shown)]]
    return " < ".join(parts) or "(no Python frame)"


def _where(frame: FrameType) -> str:
    module = frame.f_globals.get("__name__", "?")
    return f"{module}.{frame.f_code.co_qualname}:{frame.f_lineno}"


def _await_point(task: trio.lowlevel.Task) -> str:
    """Where a task waits now (its innermost coroutine frame): what it ran just before."""
    coro = task.coro
    frame = None
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return f"code now waiting at {_describe(frame)}" if frame else "(unknown code)"


def tune_collector() -> None:
    """Python's cyclic garbage collector walks every tracked object of the generations
    it collects, holding the GIL and so the loop; a full collection of the daemon walked
    50,000-150,000 objects, 50-130 ms of CPU (the loop monitor logs the long ones).
    Two changes keep those walks few and short:

    - the objects alive once the mount is set up (modules, the HTTP client, start-up
      state, about 40,000) are collected once and moved to the permanent generation
      (``gc.freeze``): never walked again;
    - a full collection waits for 100 younger ones instead of 10: a burst of 1,000
      refreshes keeps ~100,000 objects alive, and with 10 it ran 9 full collections
      (518 ms of CPU, up to 151 ms at once), with 100 one (24 ms), at the same RSS
      (``python -m bench.stall``, 4,000 x 5). Cyclic garbage that reached the oldest
      generation waits a little longer; refcounted objects are freed as before."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


# --- systemd ------------------------------------------------------------------------


def notify_systemd(message: bytes) -> None:
    """sd_notify: tell systemd (Type=notify) that the mount is live, stopping or alive.

    Never blocks: the socket is non-blocking, and a message that does not fit is
    dropped with a warning (the loop must not wait for systemd)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX,
                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                           ) as sock:
            sock.sendto(message, address)
    except OSError as e:
        log.warning("cannot notify systemd: %s", e)


def watchdog_interval() -> float | None:
    """Seconds between heartbeats (half of ``WATCHDOG_USEC``), or None when systemd
    asked for none (no ``WATCHDOG_USEC``, or ``WATCHDOG_PID`` names another process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number: no watchdog heartbeats", usec)
        return None
    return value / 2e6 if value > 0 else None


async def feed_watchdog(interval: float) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds, from the event loop: a loop that
    stops turning stops the heartbeats, and systemd restarts the daemon."""
    log.info("systemd watchdog: a heartbeat every %.3g s", interval)
    while True:
        notify_systemd(b"WATCHDOG=1")
        await trio.sleep(interval)


# --- test hook ----------------------------------------------------------------------


def hooks_enabled() -> bool:
    return os.environ.get(TEST_HOOKS_ENV) == "1"


async def block_loop_on_signal() -> None:
    """Test hook (only with ``BUFFYFS_TEST_HOOKS=1``): each SIGUSR2 blocks the event loop
    for ``BUFFYFS_TEST_BLOCK_SECONDS``, the way a wedged handler would."""
    seconds = float(os.environ.get("BUFFYFS_TEST_BLOCK_SECONDS", "2"))
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        async for _ in signals:
            log.warning("test hook: blocking the event loop for %g s", seconds)
            _block_loop_for_test(seconds)


def _block_loop_for_test(seconds: float) -> None:
    time.sleep(seconds)  # on purpose: the loop thread itself sleeps
