"""Stalls of the event loop: how long a `stat` waits while the daemon does heavy work.

    python -m bench.stall              # 4,000 sources x 5 versions (~1 min)
    python -m bench.stall --full       # the issue's size: 20,000 sources x 5 versions
    python -m bench.stall --smoke      # tiny, seconds: proves the script runs

A prober stats `SRC/latest` every 2 ms, cycling over the sources so that each stat
reaches the daemon (a name stays in the kernel's cache for 1 s) instead of the kernel's
cache, and records how long each took:

- idle: nothing else runs (the floor);
- status: `cat MOUNT/@status` runs in a loop (a separate process);
- gc: `buffyfs gc` asks the mount to collect (keep_versions=1: two versions in five go).

Prints p50, p99 and max of each against the issue's targets (p99 < 5 ms, max < 50 ms),
and how many "event loop blocked" warnings the daemon's loop monitor logged.
``python -m bench --only stall`` runs it inside the suite.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/stall.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CLI_TIMEOUT, Daemon, bounded, populate  # noqa: E402

PERIOD = 0.002  # seconds between probes
P99_TARGET = 5.0  # ms
MAX_TARGET = 50.0  # ms
STATUS_SECONDS = 3.0  # how long @status is read in a loop
IDLE_SECONDS = 1.0
TAIL = 0.3  # seconds probed after the load ended


def build(cache: Path, sources: int, per_source: int) -> None:
    """``sources`` x ``per_source`` versions, each with its own blob (absent: the mount
    runs without the scrub, and a stat never opens a blob),
    refresh=never, keep_versions=1: a collection drops two versions in five."""
    from buffyfs.cache import Cache

    c = Cache(cache)
    try:
        populate(c.index, sources, per_source, size=4096,
                 options={"refresh": "never", "keep_versions": 1},
                 sha256=lambda s, i: hashlib.sha256(f"{s}-{i}".encode()).hexdigest())
    finally:
        c.close()


def probe(mnt: Path, sources: int, busy: Any, tail: float = TAIL) -> list[float]:
    """Stat ``SRC/latest`` every PERIOD while ``busy()`` is true, then ``tail`` seconds
    more; returns each stat's time in ms."""
    import os

    times: list[float] = []
    i = 0
    next_at = time.perf_counter()
    ended: float | None = None
    while True:
        now = time.perf_counter()
        if ended is None and not busy():
            ended = now
        if ended is not None and now - ended > tail:
            return times
        if next_at > now:
            time.sleep(next_at - now)
        path = mnt / f"src{1 + i % (sources - 1)}" / "latest"
        t0 = time.perf_counter()
        os.stat(path)
        times.append((time.perf_counter() - t0) * 1e3)
        i += 1
        next_at = max(next_at + PERIOD, t0)


def summary(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    return {"n": len(s), "p50": s[len(s) // 2], "p99": s[min(len(s) - 1, int(0.99 * len(s)))],
            "max": s[-1]}


def measure(sources: int, per_source: int, workdir: Path | None = None,
            status_seconds: float = STATUS_SECONDS) -> dict[str, Any]:
    """One run: build a cache, mount it, probe while idle, while @status is read in a
    loop, and during a collection. Returns {scenario: summary} plus details."""
    work = Path(tempfile.mkdtemp(prefix="buffyfs-bench-stall-", dir=workdir or "/var/tmp"))
    daemon = None
    reader = None
    try:
        cache = work / "cache"
        t = time.monotonic()
        build(cache, sources, per_source)
        built = time.monotonic() - t
        log = work / "daemon.log"
        # no scrub: the blobs are absent (a stat never opens them)
        daemon = Daemon(work / "mnt", cache, log, ("--scrub-interval", "never"))
        daemon.wait_mounted()
        daemon.settle()
        mnt = daemon.mnt
        bounded(lambda: probe(mnt, sources, lambda: False, tail=0.2), 60, "warm-up")

        out: dict[str, Any] = {"versions": sources * per_source, "built": built}
        until = time.monotonic() + IDLE_SECONDS
        out["idle"] = summary(bounded(
            lambda: probe(mnt, sources, lambda: time.monotonic() < until, 0), 60, "idle"))

        status = mnt / "@status"
        size = len(status.read_bytes())
        reader = subprocess.Popen(
            ["sh", "-c", f'while :; do cat "{status}" > /dev/null || exit 1; done'],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until = time.monotonic() + status_seconds
        out["status"] = summary(bounded(lambda: probe(
            mnt, sources, lambda: time.monotonic() < until and reader.poll() is None, 0),
            status_seconds + 60, "@status"))
        reader.kill()
        reader.wait(timeout=10)
        if reader.returncode not in (0, -9):
            raise RuntimeError(f"cat of @status failed ({reader.returncode})")
        out["status_bytes"] = size

        daemon.settle()
        gc_proc = subprocess.Popen(
            [sys.executable, "-m", "buffyfs", "gc", "--cache", str(cache)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t = time.monotonic()
        out["gc"] = summary(bounded(lambda: probe(mnt, sources, lambda: gc_proc.poll() is None),
                                    CLI_TIMEOUT + 60, "gc"))
        out["gc_seconds"] = time.monotonic() - t
        _, stderr = gc_proc.communicate(timeout=10)
        if gc_proc.returncode != 0:
            raise RuntimeError(f"buffyfs gc failed: {stderr.decode(errors='replace')}")
        daemon.check_alive()
        out["warnings"] = [line for line in log.read_text(errors="replace").splitlines()
                           if "event loop" in line and "test hook" not in line]
        return out
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait(timeout=10)
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


def verdict(s: dict[str, float]) -> str:
    ok = s["p99"] < P99_TARGET and s["max"] < MAX_TARGET
    return "PASS" if ok else "MISS"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", type=int, default=4000)
    p.add_argument("--per-source", type=int, default=5)
    p.add_argument("--full", action="store_true", help="20,000 sources x 5 versions")
    p.add_argument("--smoke", action="store_true", help="200 sources, seconds")
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--show", type=int, default=5, metavar="N",
                   help="print the first N loop-monitor warnings (default 5)")
    args = p.parse_args()
    if args.full:
        args.sources, args.per_source = 20_000, 5
    if args.smoke:
        args.sources, args.per_source = 200, 5
    m = measure(args.sources, args.per_source, Path(args.workdir),
                1.0 if args.smoke else STATUS_SECONDS)
    print(f"{m['versions']:,} versions in {args.sources:,} sources (built in "
          f"{m['built']:.1f} s); stat of SRC/latest every {PERIOD * 1e3:g} ms")
    print(f"{'while':<34} {'stats':>6} {'p50':>9} {'p99':>9} {'max':>9}   target")
    rows = [("idle", "nothing else"),
            ("status", f"cat @status in a loop ({m['status_bytes'] / 1e6:.1f} MB)"),
            ("gc", f"buffyfs gc ({m['gc_seconds']:.1f} s)")]
    for key, what in rows:
        s = m[key]
        print(f"{what:<34} {s['n']:>6} {s['p50']:>7.2f}ms {s['p99']:>7.2f}ms "
              f"{s['max']:>7.1f}ms   p99 < {P99_TARGET:g} ms, max < {MAX_TARGET:g} ms: "
              f"{verdict(s)}")
    print(f"loop monitor warnings in the daemon's log: {len(m['warnings'])}")
    for line in m["warnings"][:args.show]:
        print("  " + line.split(" buffyfs.watchdog: ", 1)[-1][:300])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
