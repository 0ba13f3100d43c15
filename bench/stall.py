"""Stalls of the event loop: how long a `stat` waits while the daemon does heavy work
(issue 12's `stall` figure, every row of its table).

    python -m bench.stall              # 4,000 sources x 5 versions (~2 min)
    python -m bench.stall --full       # the issue's size: 20,000 sources x 5 versions
    python -m bench.stall --smoke      # tiny, seconds: proves the script runs

A prober stats `SRC/newest` (PROBED) every 2 ms, cycling over the sources so that each
stat reaches the daemon (that name stays in the kernel's cache for 1 s) instead of the
kernel's cache, and records how long each took, while:

- idle: nothing else runs (the floor);
- status: `cat MOUNT/@status` runs in a loop (a separate process);
- gc: `buffyfs gc` asks the mount to collect (keep_versions=1: two versions in five go);
- burst: 1,000 sources (`burstN`, besides the others) are asked to `refresh` at once
  (1,000 control writes) and download a new 4 KiB version each from a local origin
  (nginx when installed, as the other benchmarks: its own process, light on the two
  cores the daemon shares with it; ``--python-origin`` serves from a thread of this
  process instead, as before 2026-12-01 evening);
- hold: another process holds the index's write lock for 3 s (as a long `buffyfs` CLI
  write does) while the same 1,000 sources refresh again;

then:

- cat: `cat` of the 1,000 sources' `latest` (4 KiB each, one process, all paths),
  the second time (warm), against the same `cat` of the origin's plain files;
- rss: the daemon's RSS after all of the above (a collection and two refresh bursts).

Prints each figure against the issue's target, with the load average of the machine
(1 min) when it was measured, and how many "event loop blocked" warnings the daemon's
loop monitor logged. ``python -m bench --only stall`` runs it inside the suite.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/stall.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    CLI_TIMEOUT,
    BenchError,
    Daemon,
    bounded,
    populate,
    proc_status,
    start_origin,
)

PERIOD = 0.002  # seconds between probes
# What the prober stats in each source. `latest` (naming a version) now stays in the
# kernel's cache for a minute, dropped when it moves (fs/handlers.py LATEST_TIMEOUT),
# so a stat of it seldom reaches the daemon any more; `newest` is still short-lived
# (1 s) and resolved by the same code, an index read per lookup, as `latest` was: the
# probe keeps measuring how long the daemon takes to answer.
PROBED = "newest"
P99_TARGET = 5.0  # ms
MAX_TARGET = 50.0  # ms
CAT_TARGET = 5.0  # x the cat of plain files
RSS_TARGET = 150.0  # MiB
STATUS_SECONDS = 3.0  # how long @status is read in a loop
IDLE_SECONDS = 1.0
TAIL = 0.3  # seconds probed after the load ended
BURST = 1000  # sources refreshed at once
BURST_SIZE = 4096  # bytes of each of their versions
HOLD_SECONDS = 3.0  # the other process holds the index's writer this long
BURST_TIMEOUT = 300.0  # the whole burst must be done by then
CAT_RUNS = 5  # the best of these

# Held by a separate process, as a `buffyfs` command would: ready once it holds the lock.
HOLDER = """
import sys, time
from buffyfs.store.index import Index
idx = Index(__import__("pathlib").Path(sys.argv[1]))
with idx.write():
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
idx.close()
"""


def build(cache: Path, sources: int, per_source: int, burst: int = 0,
          origin: str = "http://127.0.0.1:9") -> None:
    """``sources`` x ``per_source`` versions, each with its own blob (absent: the mount
    runs without the scrub, unpack=off, and a stat never opens a blob),
    refresh=never, keep_versions=1: a collection drops two versions in five. Plus
    ``burst`` sources ``burstN`` of one version each, whose URL is ``origin``/burstN."""
    from buffyfs.store.cache import Cache

    c = Cache(cache)
    try:
        populate(c.index, sources, per_source, size=4096,
                 options={"refresh": "never", "keep_versions": 1, "unpack": "off"},
                 sha256=lambda s, i: hashlib.sha256(f"{s}-{i}".encode()).hexdigest())
        if burst:
            names = populate(c.index, burst, 1, size=BURST_SIZE, prefix="burst",
                             options={"refresh": "never", "keep_versions": 1,
                                      "unpack": "off"},
                             sha256=lambda s, i: hashlib.sha256(f"b{s}".encode()).hexdigest())
            with c.index.write() as w:  # their URLs: the local origin
                for name in names:
                    src = w.source(name)
                    w.put_source(name, dataclasses.replace(src, url=f"{origin}/{name}"))
    finally:
        c.close()


# The prober, in a process of its own: in the benchmark's process, the origin's threads
# serving the burst's downloads and the reads of the index took the GIL from it (a stat
# the kernel answered at once measured up to a second while the daemon's loop was idle).
PROBER = """
import json, os, sys, threading, time
mnt, sources, period, tail, name = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \\
    float(sys.argv[4]), sys.argv[5]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
times, i, next_at, ended = [], 0, time.perf_counter(), None
while True:
    now = time.perf_counter()
    if ended is None and stop.is_set():
        ended = now
    if ended is not None and now - ended > tail:
        break
    if next_at > now:
        time.sleep(next_at - now)
    path = f"{mnt}/src{1 + i % (sources - 1)}/{name}"
    t0 = time.perf_counter()
    os.stat(path)
    times.append((time.perf_counter() - t0) * 1e3)
    i += 1
    next_at = max(next_at + period, t0)
json.dump(times, sys.stdout)
"""


def probe(mnt: Path, sources: int, busy: Any, tail: float = TAIL) -> list[float]:
    """Stat ``SRC/PROBED`` every PERIOD (in a process of its own) while ``busy()`` is
    true, then ``tail`` seconds more; returns each stat's time in ms."""
    prober = subprocess.Popen(
        [sys.executable, "-c", PROBER, str(mnt), str(sources), str(PERIOD), str(tail), PROBED],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert prober.stdout is not None and prober.stdin is not None
        if prober.stdout.readline().strip() != b"ready":
            raise BenchError(f"the prober failed: {prober.communicate(timeout=10)}")
        while busy():
            time.sleep(0.01)
        out, err = prober.communicate(timeout=60)
        if prober.returncode != 0:
            raise BenchError(f"the prober failed: {err.decode(errors='replace')}")
        return json.loads(out)
    finally:
        if prober.poll() is None:
            prober.kill()
            prober.wait(timeout=10)


def summary(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    return {"n": len(s), "p50": s[len(s) // 2], "p99": s[min(len(s) - 1, int(0.99 * len(s)))],
            "max": s[-1], "load": os.getloadavg()[0]}


def write_origin_files(root: Path, burst: int, round_: int) -> dict[str, Path]:
    """The origin's files for the burst sources: new bytes each round."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(burst):
        path = root / f"burst{i}"
        body = hashlib.sha256(f"{round_}-{i}".encode()).digest() * (BURST_SIZE // 32)
        path.write_bytes(body)
        files[path.name] = path
    return files


def refreshed_since(index: Any, names: list[str], since: float) -> int:
    """How many of ``names`` ended a refresh started after ``since`` (wall clock) with
    a new version (read from the index: no load on the mount)."""
    with index.read() as r:
        done = 0
        for name in names:
            last = r.state(name).last_refresh or {}
            if last.get("started", 0) >= since and last.get("result") == "new_version":
                done += 1
        return done


def ask_refresh(mnt: Path, names: list[str]) -> None:
    """``refresh`` written to each source's @control, 32 writers at once."""
    def one(name: str) -> None:
        with open(mnt / name / "@control", "w") as f:
            f.write("refresh\n")

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(one, names))


def burst_round(daemon: Daemon, cache: Path, index: Any, sources: int, names: list[str],
                hold: bool) -> dict[str, float]:
    """Ask every burst source to refresh and probe until all have their new version;
    with ``hold``, another process holds the index's writer for HOLD_SECONDS meanwhile."""
    mnt = daemon.mnt
    asked = time.time()
    holder = None
    if hold:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(cache / "index"), str(HOLD_SECONDS)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != b"held":
            raise BenchError(f"the writer-holding process failed: {holder.communicate()}")
    try:
        pool = concurrent.futures.ThreadPoolExecutor(1)
        asking = pool.submit(ask_refresh, mnt, names)
        done = [0]
        deadline = time.monotonic() + BURST_TIMEOUT
        looked = [0.0]

        def busy() -> bool:
            if holder is not None and holder.poll() is None:
                return True
            if time.monotonic() > deadline:
                raise BenchError(f"the burst did not end within {BURST_TIMEOUT:.0f}s: "
                                 f"{done[0]} of {len(names)} sources refreshed")
            if not asking.done():
                return True
            if time.monotonic() - looked[0] >= 0.2:  # not at every probe: it takes CPU
                looked[0] = time.monotonic()
                done[0] = refreshed_since(index, names, asked)
            return done[0] < len(names)

        times = bounded(lambda: probe(mnt, sources, busy), BURST_TIMEOUT + 60, "burst")
        asking.result(timeout=10)
        pool.shutdown()
    finally:
        if holder is not None:
            holder.communicate(timeout=HOLD_SECONDS + 30)
    out = summary(times)
    out["seconds"] = time.time() - asked
    return out


def cat_seconds(paths: list[Path]) -> float:
    """The best of CAT_RUNS ``cat PATHS... > /dev/null`` (one process)."""
    best = float("inf")
    for _ in range(CAT_RUNS):
        t = time.perf_counter()
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True,
                       timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t)
    return best


def measure(sources: int, per_source: int, workdir: Path | None = None,
            status_seconds: float = STATUS_SECONDS, burst: int = BURST,
            nginx: bool = True) -> dict[str, Any]:
    """One run: build a cache, mount it, probe while idle, while @status is read in a
    loop, during a collection, a refresh burst, a burst with the writer held by another
    process; then the cat and RSS figures. Returns {scenario: summary} plus details."""
    work = Path(tempfile.mkdtemp(prefix="buffyfs-bench-stall-", dir=workdir or "/var/tmp"))
    daemon = None
    reader = None
    origin = None
    try:
        cache = work / "cache"
        files = write_origin_files(work / "origin", burst, 1)
        origin = start_origin(work / "origin", work / "nginx", files, nginx)
        t = time.monotonic()
        build(cache, sources, per_source, burst, origin.base)
        built = time.monotonic() - t
        log = work / "daemon.log"
        # no scrub: the blobs are absent (a stat never opens them)
        daemon = Daemon(work / "mnt", cache, log, ("--scrub-interval", "never"))
        daemon.wait_mounted()
        daemon.settle()
        mnt = daemon.mnt
        bounded(lambda: probe(mnt, sources, lambda: False, tail=0.2), 60, "warm-up")

        out: dict[str, Any] = {"versions": sources * per_source, "built": built,
                               "sources": sources, "burst_sources": burst,
                               "origin": origin.kind}
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

        names = [f"burst{i}" for i in range(burst)]
        daemon.settle()
        from buffyfs.store.index import Index

        index = Index(cache / "index")  # opened now: opening takes the writer a moment
        out["burst"] = burst_round(daemon, cache, index, sources, names, hold=False)
        daemon.settle()
        write_origin_files(work / "origin", burst, 2)  # new bytes: new versions again
        out["hold"] = burst_round(daemon, cache, index, sources, names, hold=True)
        index.close()
        daemon.settle()

        latest = [mnt / name / "latest" for name in names]
        plain = [work / "origin" / name for name in names]
        bounded(lambda: cat_seconds(latest), 120, "cat of latest")  # the first time
        buffy = bounded(lambda: cat_seconds(latest), 120, "cat of latest")
        files_s = bounded(lambda: cat_seconds(plain), 120, "cat of plain files")
        out["cat"] = {"buffyfs": buffy, "plain": files_s, "ratio": buffy / files_s,
                      "load": os.getloadavg()[0]}

        daemon.settle()
        st = proc_status(daemon.pid)
        out["rss"] = {"mib": st.get("VmRSS", 0) / 1024, "peak_mib": st.get("VmHWM", 0) / 1024,
                      "anon_mib": st.get("RssAnon", 0) / 1024,
                      "file_mib": st.get("RssFile", 0) / 1024, "load": os.getloadavg()[0]}
        daemon.check_alive()
        out["warnings"] = [line for line in log.read_text(errors="replace").splitlines()
                           if ("event loop" in line or "garbage collection" in line)
                           and "test hook" not in line]
        return out
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait(timeout=10)
        if daemon is not None:
            daemon.stop()
        if origin is not None:
            origin.stop()
        shutil.rmtree(work, ignore_errors=True)


def verdict(s: dict[str, float], p99: bool = True) -> str:
    ok = (not p99 or s["p99"] < P99_TARGET) and s["max"] < MAX_TARGET
    return "PASS" if ok else "MISS"


def table(m: dict[str, Any]) -> list[str]:
    """The figures as printed lines, each with its target and the load average."""
    lines = [f"{m['versions']:,} versions in {m['sources']:,} sources + {m['burst_sources']:,} "
             f"burst sources (built in {m['built']:.1f} s); stat of SRC/{PROBED} every "
             f"{PERIOD * 1e3:g} ms; the burst's origin: {m['origin']}",
             f"{'stat while':<44} {'stats':>6} {'p50':>8} {'p99':>8} {'max':>8}  load  target"]
    rows = [("idle", "nothing else", None),
            ("gc", f"(a) buffyfs gc ({m['gc_seconds']:.1f} s)", True),
            ("burst", f"(b) {m['burst_sources']:,} sources refresh "
                      f"({m['burst']['seconds']:.1f} s)", True),
            ("status", f"(c) cat @status in a loop ({m['status_bytes'] / 1e6:.1f} MB)", True),
            ("hold", f"(d) writer held {HOLD_SECONDS:g} s + refresh burst", False)]
    for key, what, p99 in rows:
        s = m[key]
        target = "info" if p99 is None else (
            f"p99 < {P99_TARGET:g} ms, max < {MAX_TARGET:g} ms" if p99
            else f"max < {MAX_TARGET:g} ms") + f": {verdict(s, p99)}"
        lines.append(f"{what:<44} {s['n']:>6} {s['p50']:>6.2f}ms {s['p99']:>6.2f}ms "
                     f"{s['max']:>6.1f}ms {s['load']:>5.2f}  {target}")
    c = m["cat"]
    lines.append(f"(e) cat of {m['burst_sources']:,} x 4 KiB latest, 2nd time: "
                 f"{c['buffyfs'] * 1e3:.1f} ms vs plain files {c['plain'] * 1e3:.1f} ms = "
                 f"{c['ratio']:.1f}x  (load {c['load']:.2f})  target <= {CAT_TARGET:g}x: "
                 f"{'PASS' if c['ratio'] <= CAT_TARGET else 'MISS'}")
    r = m["rss"]
    lines.append(f"(f) daemon RSS after the collection and the bursts: {r['mib']:.0f} MiB "
                 f"(anonymous {r['anon_mib']:.0f}, files {r['file_mib']:.0f} (the index's map "
                 f"among them); peak {r['peak_mib']:.0f} MiB)  (load {r['load']:.2f})  target < "
                 f"{RSS_TARGET:g} MiB: {'PASS' if r['mib'] < RSS_TARGET else 'MISS'}")
    lines.append(f"loop monitor warnings in the daemon's log: {len(m['warnings'])}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", type=int, default=4000)
    p.add_argument("--per-source", type=int, default=5)
    p.add_argument("--burst", type=int, default=BURST, help="sources refreshed at once")
    p.add_argument("--full", action="store_true", help="20,000 sources x 5 versions")
    p.add_argument("--smoke", action="store_true", help="200 sources, seconds")
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--python-origin", action="store_true",
                   help="serve the burst from a thread of this process, not nginx")
    p.add_argument("--show", type=int, default=5, metavar="N",
                   help="print the first N loop-monitor warnings (default 5)")
    args = p.parse_args()
    if args.full:
        args.sources, args.per_source = 20_000, 5
    if args.smoke:
        args.sources, args.per_source, args.burst = 200, 5, 50
    m = measure(args.sources, args.per_source, Path(args.workdir),
                1.0 if args.smoke else STATUS_SECONDS, args.burst, not args.python_origin)
    for line in table(m):
        print(line)
    for line in m["warnings"][:args.show]:
        print("  " + line.split(" buffyfs.watchdog: ", 1)[-1][:300])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
