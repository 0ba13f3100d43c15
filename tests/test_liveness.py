"""The event loop's liveness: the loop monitor's warnings, and the systemd watchdog fed
from the loop (a daemon whose loop is blocked stops its heartbeats)."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import trio

from buffyfs import watchdog
from tests.conftest import Mount, wait_for

# --- the loop monitor, in-process -------------------------------------------------------


def _sleepy_helper(seconds: float) -> None:
    time.sleep(seconds)


async def _blocks_the_loop() -> None:
    await trio.lowlevel.checkpoint()
    _sleepy_helper(0.3)


def test_monitor_names_the_task_and_code_of_a_long_step(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="buffyfs.watchdog")
    with watchdog.LoopMonitor(threshold=0.1) as monitor:
        trio.run(_blocks_the_loop, instruments=[monitor])
    warnings = [r.getMessage() for r in caplog.records if "event loop" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "blocked for" in warnings[0]
    assert "_blocks_the_loop" in warnings[0]  # the task
    assert "_sleepy_helper" in warnings[0]  # the code it was in, sampled while it ran


async def _many_short_steps() -> None:
    async def short() -> None:
        _sleepy_helper(0.03)

    async with trio.open_nursery() as nursery:
        for _ in range(8):  # all runnable in one turn: 8 x 30 ms without an I/O wait
            nursery.start_soon(short)


def test_monitor_reports_a_long_turn_of_short_steps(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="buffyfs.watchdog")
    with watchdog.LoopMonitor(threshold=0.1) as monitor:
        trio.run(_many_short_steps, instruments=[monitor])
    warnings = [r.getMessage() for r in caplog.records if "event loop" in r.getMessage()]
    assert any("turn took" in w and "short" in w for w in warnings), warnings


async def _quick_work() -> None:
    for _ in range(1000):
        await trio.lowlevel.checkpoint()


def test_monitor_is_quiet_when_the_loop_turns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="buffyfs.watchdog")
    with watchdog.LoopMonitor(threshold=0.1) as monitor:
        trio.run(_quick_work, instruments=[monitor])
    assert not [r for r in caplog.records if "event loop" in r.getMessage()]


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_monitor_names_a_long_garbage_collection(caplog: pytest.LogCaptureFixture) -> None:
    """A pause of Python's collector is named as such (its stack would name whatever
    allocated last), and the hook is gone after the monitor."""
    caplog.set_level(logging.WARNING, logger="buffyfs.watchdog")
    keep = [[{"n": i}] for i in range(300_000)]  # objects the collector walks through
    with watchdog.LoopMonitor(threshold=0.0) as monitor:
        _ = _Cycle()
        del _
        gc.collect()
        assert monitor._collection in gc.callbacks
    assert monitor._collection not in gc.callbacks
    lines = [r.getMessage() for r in caplog.records if "garbage collection" in r.getMessage()]
    assert lines and "generation 2 took" in lines[-1] and "freed" in lines[-1], lines
    assert keep


def test_the_daemons_collector_skips_start_up_objects_and_runs_full_collections_rarely(
) -> None:
    """What the mount does before it serves (watchdog.tune_collector), in a process of
    its own: the objects alive then are frozen, and a full collection waits for 100
    middle ones."""
    code = ("import gc, json; from buffyfs import watchdog, mount; "
            "before = (gc.get_freeze_count(), gc.get_threshold()); "
            "watchdog.tune_collector(); "
            "print(json.dumps([before, gc.get_freeze_count(), gc.get_threshold()]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    (frozen_before, threshold_before), frozen, threshold = json.loads(done.stdout)
    assert frozen_before == 0 and threshold_before[2] == 10
    assert frozen > 10_000  # the modules of a mount, at least
    assert threshold == [threshold_before[0], threshold_before[1],
                         watchdog.FULL_COLLECTION_EVERY]


# --- the systemd watchdog ---------------------------------------------------------------


def test_watchdog_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog.watchdog_interval() == 15.0  # half of WatchdogSec=30s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog.watchdog_interval() is None


class FakeSystemd:
    """A NOTIFY_SOCKET (abstract unix datagram socket) that records what arrives, when."""

    def __init__(self) -> None:
        self.name = f"@buffyfs-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setblocking(False)
        self.received: list[tuple[float, bytes]] = []

    def poll(self) -> list[tuple[float, bytes]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.received
            self.received.append((time.monotonic(), data))

    def heartbeats(self, since: float = 0.0) -> list[float]:
        return [t for t, m in self.poll() if m == b"WATCHDOG=1" and t >= since]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    monkeypatch.setenv("NOTIFY_SOCKET", fake.name)
    yield fake
    fake.close()


WATCHDOG_USEC = 200_000  # heartbeats every 0.1 s
BLOCK_SECONDS = 1.5


def test_watchdog_heartbeats_stop_while_the_loop_is_blocked(
        systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch,
        mount_factory: Callable[..., Mount]) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv(watchdog.TEST_HOOKS_ENV, "1")
    monkeypatch.setenv("BUFFYFS_TEST_BLOCK_SECONDS", str(BLOCK_SECONDS))
    m = mount_factory()
    wait_for(lambda: any(msg == b"READY=1" for _, msg in systemd.poll()), what="READY=1")
    wait_for(lambda: len(systemd.heartbeats()) >= 5, timeout=10, what="heartbeats")
    # a live loop beats about every WATCHDOG_USEC/2: never a gap systemd would punish
    beats = systemd.heartbeats()
    assert max(b - a for a, b in zip(beats, beats[1:], strict=False)) < WATCHDOG_USEC / 1e6

    blocked_at = time.monotonic()
    m.proc.send_signal(signal.SIGUSR2)  # test hook: the loop thread sleeps BLOCK_SECONDS
    wait_for(lambda: "test hook: blocking" in m.log_text(), what="the block")
    time.sleep(BLOCK_SECONDS / 2)
    during = systemd.heartbeats(since=blocked_at + 0.2)
    assert during == [], "heartbeats went on while the loop was blocked"
    wait_for(lambda: systemd.heartbeats(since=blocked_at + BLOCK_SECONDS * 0.9),
             timeout=10, what="heartbeats after the block")
    beats = systemd.heartbeats(since=blocked_at - 1)
    gap = max(b - a for a, b in zip(beats, beats[1:], strict=False))
    assert gap > WATCHDOG_USEC / 1e6, f"no heartbeat gap systemd would see ({gap:.2f} s)"

    # the loop monitor named what held the loop
    wait_for(lambda: "event loop blocked for" in m.log_text(), what="the monitor's warning")
    line = next(x for x in m.log_text().splitlines() if "event loop blocked for" in x)
    assert "WARNING" in line and "block_loop_on_signal" in line \
        and "_block_loop_for_test" in line, line
    assert os.path.ismount(m.path)  # the mount lives on


def test_no_heartbeats_without_watchdog_usec(
        systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch,
        mount_factory: Callable[..., Mount]) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    mount_factory()
    wait_for(lambda: any(msg == b"READY=1" for _, msg in systemd.poll()), what="READY=1")
    time.sleep(0.5)
    assert systemd.heartbeats() == []
