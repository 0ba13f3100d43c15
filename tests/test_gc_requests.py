"""Issue 12, review leftovers: two `buffyfs gc` at once. The index holds one request, so
the second replaces the first when the mount has not read it yet; the first was then
never answered and waited for the mount's progress to stop, a minute, before failing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from buffyfs.store.index import Index
from tests.conftest import Mount, wait_for, writer_held
from tests.test_stall import build

SOURCES = 50  # keep_versions=1: 2 of each source's 5 versions are garbage


def blocked_on_a_lock(proc: subprocess.Popen) -> bool:
    """The process waits in the kernel for a futex (LMDB's writer lock is one)."""
    try:
        return "futex" in Path(f"/proc/{proc.pid}/wchan").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("second", [["gc"], ["gc", "--dry-run"]])
def test_two_gc_requests_at_once_are_both_answered(
        cache_dir: Path, mount_factory: Callable[..., Mount], second: list[str]) -> None:
    build(cache_dir, SOURCES, 5)
    m = mount_factory("--scrub-interval", "never")
    index = Index(m.cache / "index")  # as another process: LMDB's writer lock is the file's
    runs: list[subprocess.Popen] = []
    with index.read() as r:
        before = (r.meta_json("gc_request") or {"id": 0})["id"]
    stopped = False
    try:
        with writer_held(index) as let_go:
            for args in (["gc"], second):  # both wait for the writer to write their requests
                runs.append(subprocess.Popen(
                    [sys.executable, "-m", "buffyfs", *args, "--cache", str(m.cache)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    stdin=subprocess.DEVNULL))
            wait_for(lambda: all(blocked_on_a_lock(p) for p in runs), 30,
                     what="both `buffyfs gc` to wait for the writer lock")
            # the mount is stopped while they write their requests: it reads only the
            # second (the command line never touches the mountpoint)
            os.kill(m.proc.pid, signal.SIGSTOP)
            stopped = True
            let_go()

            def asked() -> int:
                with index.read() as r:
                    return (r.meta_json("gc_request") or {"id": 0})["id"]

            wait_for(lambda: asked() == before + 2, 30, what="both requests to be written")
            os.kill(m.proc.pid, signal.SIGCONT)
            stopped = False
            outs = [p.communicate(timeout=150) for p in runs]
    finally:
        if stopped:
            os.kill(m.proc.pid, signal.SIGCONT)
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        index.close()
    for p, (_, err) in zip(runs, outs, strict=True):
        assert p.returncode == 0, err
    collected = outs[0][0]
    assert collected.count(": 2 version(s), freed") == SOURCES, collected[-2000:]
    assert outs[1][0].rstrip().splitlines()[-1].startswith(
        "total: would free" if "--dry-run" in second else "total: freed")
