"""The benchmark suite of issue 7: every figure of the table, each run three times, its
median printed with the physical limit measured in the same run, their ratio, and
PASS/MISS against the target.

    python -m bench                      # default sizes (1 GiB files; a few minutes)
    python -m bench --smoke              # tiny sizes, seconds: proves the suite runs
    python -m bench --only read-warm,ls  # selected figures
    python -m bench --json out.json      # also write the results, for comparison
    python -m bench --compare old.json   # print old and new medians side by side

Exit status: 0 when every figure ran (whatever PASS/MISS says: it is a benchmark),
1 when a figure failed to run, 2 on bad arguments, 130 when interrupted. Nothing is left
behind: mounts, daemons and the origin are stopped by PID, the work directory removed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench import gc as gc_bench
from bench import stall as stall_bench
from bench.common import (
    CLI_TIMEOUT,
    DOWNLOAD_TIMEOUT,
    ROOT,
    SYNC_TIMEOUT,
    BenchError,
    Daemon,
    GiB,
    MiB,
    NginxOrigin,
    Origin,
    add_blob,
    add_versions,
    bounded,
    can_drop_caches,
    cli,
    cpu_seconds,
    drop_caches,
    handle_sigterm,
    human,
    make_random_file,
    parse_size,
    populate,
    proc_status,
    read_ahead_kb,
    run_quiet,
    sample_until,
    sha256_of,
    start_origin,
    timed_cat,
    timed_read,
)

RUNS = 3
PAIRS = 3  # warm reads: interleaved (plain, mount) pairs per run, their median
PARALLEL = 16
BIG = "big"  # the source of the big file


# --- results ----------------------------------------------------------------------------


@dataclass
class Target:
    on: str  # "ratio" (value / limit) or "value"
    op: str  # ">=" or "<"
    bound: float
    text: str

    def holds(self, value: float, ratio: float | None) -> bool | None:
        x = ratio if self.on == "ratio" else value
        if x is None:
            return None
        return x >= self.bound if self.op == ">=" else x < self.bound


def at_least(ratio: float) -> Target:
    return Target("ratio", ">=", ratio, f">= {ratio}x")


def below(bound: float, unit: str) -> Target:
    return Target("value", "<", bound, f"< {bound:g} {unit}")


@dataclass
class Row:
    key: str  # stable id, for --json comparisons
    figure: str  # the --only name it belongs to
    what: str
    unit: str
    values: list[float] = field(default_factory=list)  # one per run
    limit: list[float] | None = None  # the physical limit, measured in the same runs
    limit_what: str = ""
    target: Target | None = None
    note: str = ""
    skipped: str = ""  # why the row was not measured
    error: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def limit_median(self) -> float | None:
        return statistics.median(self.limit) if self.limit else None

    @property
    def ratio(self) -> float | None:
        m, lim = self.median, self.limit_median
        return m / lim if m is not None and lim else None

    @property
    def result(self) -> str:
        if self.error:
            return "ERROR"
        if self.skipped:
            return "SKIP"
        if self.target is None or self.median is None:
            return "info"
        ok = self.target.holds(self.median, self.ratio)
        return "" if ok is None else ("PASS" if ok else "MISS")

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = self.target.text if self.target else None
        d.update(median=self.median, limit_median=self.limit_median, ratio=self.ratio,
                 result=self.result)
        return d


def fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit in ("MB/s", "MiB", "µs"):
        return f"{x:,.0f} {unit}" if x >= 100 else f"{x:.1f} {unit}"
    if unit == "s":
        return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"
    if unit == "ms":
        return f"{x:.3f} ms"
    return f"{x:g} {unit}"


def print_rows(rows: list[Row], out: Any = None) -> None:
    out = out or sys.stdout
    print(f"{'figure':<13} {'what':<46} {'median':>11} {'limit (same run)':>17} "
          f"{'ratio':>7}  {'target':<10} result", file=out)
    print("-" * 118, file=out)
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        print(f"{r.figure:<13} {r.what[:46]:<46} {fmt(r.median, r.unit):>11} "
              f"{fmt(r.limit_median, r.unit) if r.limit else '':>17} {ratio:>7}  "
              f"{r.target.text if r.target else '':<10} {r.result}", file=out)
    print("-" * 118, file=out)


# --- the suite --------------------------------------------------------------------------


@dataclass
class Sizes:
    size: int  # the big file: reads, fetch, the big download
    small: int  # the second download (flatness of memory)
    parallel: int  # each of the 16 parallel files
    sources: int  # sources of the big index (ls, stat, mount start, memory)
    per_source: int  # versions per source there
    gc_sources: int
    gc_per_source: int
    stall_sources: int = 4_000  # x 5 versions (--stall-full: the 20,000)

    @classmethod
    def default(cls, size: int) -> Sizes:
        return cls(size, size // 4, max(MiB, size // PARALLEL), 10_000, 10, 1_000, 100)

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(4 * MiB, MiB, 256 << 10, 200, 10, 100, 20, 200)


class Suite:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.sizes: Sizes = args.sizes
        self.runs: int = args.runs
        self.can_drop = can_drop_caches()
        self.live: list[Daemon] = []
        self.origins: list[Any] = []
        self.mounts = 0
        self._data: tuple[Path, str] | None = None
        self._origin: Any = None
        self._read_cache: tuple[Path, Path] | None = None
        self._many: Path | None = None
        self._empty: Path | None = None
        self._plain_dir: Path | None = None
        self.downloads: dict[int, list[dict[str, Any]]] = {}  # size -> mount downloads
        self.info: dict[str, Any] = {}

    # --- resources, made on first use ---------------------------------------------------

    def data(self) -> tuple[Path, str]:
        """The big random file (the plain copy) and its sha256."""
        if self._data is None:
            d = self.work / "www"
            d.mkdir(exist_ok=True)
            path = d / "big.bin"
            t = time.monotonic()
            sha = make_random_file(path, self.sizes.size)
            say(f"  random file of {human(self.sizes.size)} written in "
                f"{time.monotonic() - t:.1f}s")
            self._data = (path, sha)
        return self._data

    def origin(self) -> Any:
        if self._origin is None:
            path, _ = self.data()
            self._origin = start_origin(path.parent, self.work / "nginx", {path.name: path},
                                        nginx=self.args.origin != "python")
            self.origins.append(self._origin)
            self.info["origin"] = self._origin.kind
            say(f"  origin: {self._origin.kind} at {self._origin.url_for(path.name)}")
        return self._origin

    def read_cache(self) -> tuple[Path, Path]:
        """A cache whose source BIG has the big file as its version: (cache, blob)."""
        if self._read_cache is None:
            path, sha = self.data()
            cache = self.work / "cache-read"
            add_versions(cache, [(BIG, path, sha)], "http://127.0.0.1:9/big.bin")
            self._read_cache = (cache, cache / "blobs" / sha[:2] / sha)
        return self._read_cache

    def many(self) -> Path:
        """A cache with sizes.sources sources x sizes.per_source versions (refresh=never,
        checked), all sharing one small blob that exists: the mount starts no download."""
        if self._many is None:
            from buffyfs.store.cache import Cache

            cache = self.work / "cache-many"
            c = Cache(cache)
            try:
                small = self.work / "small.bin"
                sha = make_random_file(small, 4096)
                add_blob(cache, small, sha)
                t = time.monotonic()
                populate(c.index, self.sizes.sources, self.sizes.per_source,
                         sha256=lambda s, i: sha, size=4096,
                         options={"refresh": "never",
                                  "keep_versions": self.sizes.per_source})
                say(f"  index of {self.sizes.sources:,} sources x {self.sizes.per_source} "
                    f"versions written in {time.monotonic() - t:.1f}s")
            finally:
                c.close()
            self._many = cache
        return self._many

    def empty(self) -> Path:
        if self._empty is None:
            self._empty = self.work / "cache-empty"
            self._empty.mkdir()
        return self._empty

    def plain_dir(self) -> Path:
        """A plain directory with sizes.sources subdirectories (the `ls -l` limit), each
        with a file `latest` (the `stat` limit)."""
        if self._plain_dir is None:
            d = self.work / "plain-ls"
            d.mkdir()
            for i in range(self.sizes.sources):
                (d / f"src{i}").mkdir()
                (d / f"src{i}" / "latest").write_bytes(b"x")
            self._plain_dir = d
        return self._plain_dir

    @contextlib.contextmanager
    def mounted(self, cache: Path, settle: bool = False) -> Iterator[Daemon]:
        self.mounts += 1
        d = Daemon(self.work / f"mnt{self.mounts}", cache, self.work / "daemon.log")
        self.live.append(d)
        try:
            d.wait_mounted()
            if settle:
                d.settle()
            yield d
        finally:
            d.stop()
            self.live.remove(d)

    def close(self) -> None:
        for d in list(self.live):
            d.stop()
        for o in self.origins:
            o.stop()
        for line in open("/proc/self/mountinfo").read().splitlines():  # nothing may stay
            point = line.split()[4]
            if point.startswith(str(self.work)):
                run_quiet(["fusermount3", "-uz", point])

    def drop(self) -> None:
        bounded(drop_caches, SYNC_TIMEOUT, "dropping caches")


def say(text: str) -> None:
    print(text, flush=True)


def sync() -> None:
    subprocess.run(["sync"], check=True, timeout=SYNC_TIMEOUT)


def read_timeout(size: int) -> float:
    return 60.0 + size / 5e6  # at least 5 MB/s


def mb_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


# --- figures ----------------------------------------------------------------------------


def fig_read_warm(s: Suite) -> list[Row]:
    """Sequential read of the big version through the mount, warm, vs the plain copy."""
    size = s.sizes.size
    plain, sha = s.data()
    cache, blob = s.read_cache()
    t = read_timeout(size)
    warm = Row("read-warm", "read-warm", f"cat of a {human(size)} version, warm",
               "MB/s", limit=[], limit_what="cat plain copy, warm", target=at_least(0.9))
    second = Row("read-second", "read-warm", "  cat, 2nd read of the version after caching",
                 "MB/s", limit=[], limit_what="cat plain copy, warm")
    py = Row("read-warm-1m", "read-warm", "  same, 1 MiB reads into an aligned buffer", "MB/s",
             limit=[], limit_what="same on the plain copy")
    first = Row("read-first", "read-warm", "  cat, first read after mount (blob cached)",
                "MB/s", limit=[], limit_what="cat plain copy, warm")
    cpu = []
    for i in range(s.runs):
        with s.mounted(cache) as d:
            latest = d.mnt / BIG / "latest"
            timed_cat([plain, blob], t)  # both in the page cache
            p0 = timed_cat([plain], t)
            c0 = cpu_seconds(d.pid)
            f = timed_cat([latest], t)
            cpu.append(cpu_seconds(d.pid) - c0)
            # The 2nd and 3rd reads of newly cached FUSE pages are slower than later ones
            # (measured 0.53-0.69x, where an ext4 file is at full speed from its 2nd
            # read): the plain copy has been read often, so "warm" compares both
            # settled, from the 4th read on, and the 2nd read is shown apart.
            s2 = (timed_cat([plain], t), timed_cat([latest], t))
            timed_cat([latest], t)
            # warm reads are short and the VM is noisy: 3 interleaved pairs, their medians
            pairs = [(timed_cat([plain], t), timed_cat([latest], t)) for _ in range(PAIRS)]
            p = statistics.median(x for x, _ in pairs)
            w = statistics.median(y for _, y in pairs)
            pp = bounded(partial(timed_read, plain, size), t, "plain read")
            pm = bounded(partial(timed_read, latest, size), t, "warm read")
            if i == 0:  # the bytes, once, untimed
                got = bounded(partial(sha256_of, latest), t, "hashing latest")
                if got != sha:
                    raise BenchError(f"{latest} has sha256 {got}, expected {sha}")
            s.info.setdefault("read_ahead_kb", read_ahead_kb(d.mnt))
        for row, secs, lim in ((warm, w, p), (second, s2[1], s2[0]), (first, f, p0),
                               (py, pm, pp)):
            row.values.append(mb_s(size, secs))
            row.limit.append(mb_s(size, lim))
    first.note = f"daemon CPU during the first read: {statistics.median(cpu):.2f} s"
    return [warm, second, py, first]


def fig_read_dropped(s: Suite) -> list[Row]:
    """The same read with the page cache dropped before each read."""
    size = s.sizes.size
    row = Row("read-dropped", "read-dropped", f"cat of a {human(size)} version, cache dropped",
              "MB/s", limit=[], limit_what="cat plain copy, dropped", target=at_least(0.7))
    if not s.can_drop:
        row.skipped = "needs root (drop_caches)"
        return [row]
    plain, _ = s.data()
    cache, _ = s.read_cache()
    t = read_timeout(size)
    cpu = []
    for _ in range(s.runs):
        with s.mounted(cache) as d:
            latest = d.mnt / BIG / "latest"
            s.drop()
            c0 = cpu_seconds(d.pid)
            m = timed_cat([latest], t)
            cpu.append(cpu_seconds(d.pid) - c0)
            s.drop()
            p = timed_cat([plain], t)
        row.values.append(mb_s(size, m))
        row.limit.append(mb_s(size, p))
    row.note = f"daemon CPU during the cold read: {statistics.median(cpu):.2f} s"
    return [row]


def _served(origin: Any, since: float) -> dict[str, Any] | None:
    """The origin's view of the last GET after ``since`` (nginx only)."""
    if not isinstance(origin, NginxOrigin):
        return None
    done = [r for r in origin.served() if r["start"] >= since - 0.01 and r["status"] < 300]
    return done[-1] if done else None


def _phases(t0: float, served: dict[str, Any] | None, t1: float) -> dict[str, float]:
    if served is None:
        return {"total": t1 - t0}
    return {"before": served["start"] - t0, "transfer": served["seconds"],
            "after": t1 - served["end"], "total": t1 - t0}


class LatestInIndex:
    """Polls the index (read transactions, no daemon involved) for a source's latest."""

    def __init__(self, cache: Path, name: str) -> None:
        self.cache = cache
        self.name = name
        self.index: Any = None

    def __call__(self) -> dict[str, Any] | None:
        from buffyfs.store.index import Index

        if self.index is None:
            self.index = Index(self.cache / "index")
        with self.index.read() as r:
            return r.latest(self.name)

    def close(self) -> None:
        if self.index is not None:
            self.index.close()


def mount_download(s: Suite, size: int, path: Path, url: str) -> dict[str, Any]:
    """A fresh cache, one source, a mount: time from the mount being live to the version
    in the index, sampling the daemon's memory every 20 ms."""
    cache = s.work / f"cache-dl-{s.mounts + 1}"
    cli(cache, "add", BIG, url, "--refresh", "never")
    sync()
    done = LatestInIndex(cache, BIG)
    try:
        with s.mounted(cache) as d:
            t0 = time.monotonic()
            started = d.started
            cpu0 = cpu_seconds(d.pid)
            got = sample_until(d, done, DOWNLOAD_TIMEOUT, "the mount's first download",
                               interval=0.02, poll=0.02)
            cpu = cpu_seconds(d.pid) - cpu0
            hwm = proc_status(d.pid).get("VmHWM", 0)
    finally:
        done.close()
    v = got["value"]
    if v.size != size:
        raise BenchError(f"the mount downloaded {v.size} bytes, expected {size}")
    served = _served(s._origin, started)  # the GET may start before we see the mount
    shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": got["done_at"] - t0, "peak_vmrss_kib": got["peak_vmrss_kib"],
            "peak_rssanon_kib": got["peak_rssanon_kib"], "vmhwm_kib": hwm, "cpu": cpu,
            "phases": _phases(t0, served, got["done_at"]), "sha256": v.sha256}


def fig_fetch(s: Suite) -> list[Row]:
    """First fetch of the big file from a loopback origin, vs `curl -o` of the same URL."""
    size = s.sizes.size
    path, sha = s.data()
    origin = s.origin()
    url = origin.url_for(path.name)
    curl = shutil.which("curl")
    rows = {
        "cli": Row("fetch-cli", "fetch", f"`buffyfs fetch` {human(size)} (wall, with start-up)",
                   "MB/s", limit=[], limit_what="curl -o", target=at_least(0.8)),
        "mount": Row("fetch-mount", "fetch", f"mount's first download of {human(size)}",
                     "MB/s", limit=[], limit_what="curl -o", target=at_least(0.8)),
        "fsync": Row("fetch-curl-fsync", "fetch", "  (curl -o, then fsync of the file)", "MB/s",
                     limit=[], limit_what="curl -o"),
    }
    phases: dict[str, list[dict[str, float]]] = {"curl": [], "cli": [], "mount": []}
    if curl is None:
        for r in rows.values():
            r.limit = None
        rows["fsync"].skipped = "curl not installed"
    for _ in range(s.runs):
        if curl:
            dest = s.work / "curl.out"
            sync()
            t0 = time.monotonic()
            subprocess.run([curl, "-sS", "-f", "-o", str(dest), url], check=True,
                           timeout=DOWNLOAD_TIMEOUT, stdin=subprocess.DEVNULL)
            t1 = time.monotonic()
            fd = os.open(dest, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            t2 = time.monotonic()
            if dest.stat().st_size != size:
                raise BenchError(f"curl wrote {dest.stat().st_size} bytes, expected {size}")
            dest.unlink()
            phases["curl"].append(_phases(t0, _served(origin, t0), t1))
            c = mb_s(size, t1 - t0)
            for r in rows.values():
                r.limit.append(c)
            rows["fsync"].values.append(mb_s(size, t2 - t0))

        cache = s.work / "cache-fetch"
        cli(cache, "add", BIG, url, "--refresh", "never")
        sync()
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "buffyfs", "fetch", BIG, "--cache",
                               str(cache)], capture_output=True, text=True,
                              timeout=DOWNLOAD_TIMEOUT, stdin=subprocess.DEVNULL)
        t1 = time.monotonic()
        if done.returncode != 0:
            raise BenchError(f"buffyfs fetch failed ({done.returncode}): {done.stderr.strip()}")
        if not (cache / "blobs" / sha[:2] / sha).is_file():
            raise BenchError(f"buffyfs fetch did not store the blob: {done.stdout.strip()}")
        phases["cli"].append(_phases(t0, _served(origin, t0), t1))
        rows["cli"].values.append(mb_s(size, t1 - t0))
        shutil.rmtree(cache, ignore_errors=True)

        m = mount_download(s, size, path, url)
        if m["sha256"] != sha:
            raise BenchError("the mount's download has the wrong sha256")
        s.downloads.setdefault(size, []).append(m)
        phases["mount"].append(m["phases"])
        rows["mount"].values.append(mb_s(size, m["seconds"]))

    def med(who: str, key: str) -> str:
        vals = [p[key] for p in phases[who] if key in p]
        return f"{statistics.median(vals):.2f}" if vals else "?"

    if isinstance(origin, NginxOrigin):
        rows["cli"].note = (f"buffyfs fetch: {med('cli', 'before')} s start-up before the "
                            f"request, {med('cli', 'transfer')} s transfer (origin's view), "
                            f"{med('cli', 'after')} s after the body (fsync, commit, exit); "
                            f"curl: {med('curl', 'before')} s + {med('curl', 'transfer')} s + "
                            f"{med('curl', 'after')} s")
        rows["mount"].note = (f"mount: {med('mount', 'before')} s from live to the request, "
                              f"{med('mount', 'transfer')} s transfer, {med('mount', 'after')}"
                              f" s after the body until the version is in the index; daemon "
                              f"CPU {statistics.median(m['cpu'] for m in s.downloads[size]):.2f}"
                              " s per download")
    s.info["fetch_phases"] = phases
    return list(rows.values())


def fig_parallel(s: Suite) -> list[Row]:
    """16 readers (cat processes) of 16 different versions at once, vs plain copies."""
    n, each = PARALLEL, s.sizes.parallel
    total = n * each
    d = s.work / "parallel"
    d.mkdir(exist_ok=True)
    cache = s.work / "cache-parallel"
    files = []
    for i in range(n):
        p = d / f"p{i}.bin"
        files.append((f"p{i}", p, make_random_file(p, each)))
    add_versions(cache, files, "http://127.0.0.1:9/p")
    plain = [p for _, p, _ in files]
    blobs = [cache / "blobs" / sha[:2] / sha for _, _, sha in files]
    what = f"{n} x cat of {human(each)}"
    warm = Row("parallel-warm", "parallel", f"{what}, warm (2nd read), aggregate", "MB/s",
               limit=[], limit_what="plain copies, warm", target=at_least(0.7))
    cold = Row("parallel-dropped", "parallel", f"{what}, cache dropped, aggregate", "MB/s",
               limit=[], limit_what="plain copies, dropped", target=at_least(0.7))
    first = Row("parallel-first", "parallel", f"  {what}, first read (blobs cached)", "MB/s",
                limit=[], limit_what="plain copies, warm")
    timeout = read_timeout(total)
    cpu_first = []
    cpu_cold = []
    for _ in range(s.runs):
        with s.mounted(cache) as dm:
            latest = [dm.mnt / name / "latest" for name, _, _ in files]
            timed_cat(plain + blobs, timeout)
            p0 = timed_cat(plain, timeout)
            c0 = cpu_seconds(dm.pid)
            f = timed_cat(latest, timeout)
            cpu_first.append(cpu_seconds(dm.pid) - c0)
            pairs = [(timed_cat(plain, timeout), timed_cat(latest, timeout))
                     for _ in range(PAIRS)]
            p = statistics.median(x for x, _ in pairs)
            w = statistics.median(y for _, y in pairs)
            for row, secs, lim in ((warm, w, p), (first, f, p0)):
                row.values.append(mb_s(total, secs))
                row.limit.append(mb_s(total, lim))
            if s.can_drop:
                s.drop()
                c0 = cpu_seconds(dm.pid)
                mc = timed_cat(latest, timeout)
                cpu_cold.append(cpu_seconds(dm.pid) - c0)
                s.drop()
                pc = timed_cat(plain, timeout)
                cold.values.append(mb_s(total, mc))
                cold.limit.append(mb_s(total, pc))
    first.note = (f"daemon CPU during the {n} first reads: "
                  f"{statistics.median(cpu_first):.2f} s for {human(total)}")
    if cpu_cold:
        cold.note = f"daemon CPU during the cold reads: {statistics.median(cpu_cold):.2f} s"
    else:
        cold.skipped = "needs root (drop_caches)"
    return [warm, cold, first]


def _ls(path: Path, timeout: float = 120.0) -> tuple[float, int]:
    t0 = time.perf_counter()
    done = subprocess.run(["ls", "-l", str(path)], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    t = time.perf_counter() - t0
    if done.returncode != 0:
        raise BenchError(f"ls -l {path} failed: {done.stderr.decode(errors='replace')}")
    return t, done.stdout.count(b"\n")


def fig_ls(s: Suite) -> list[Row]:
    """`ls -l` of the root of a mount with many sources."""
    n = s.sizes.sources
    cache, plain = s.many(), s.plain_dir()
    row = Row("ls", "ls", f"ls -l of a mount with {n:,} sources (fresh mount)", "s",
              limit=[], limit_what=f"ls -l, {n:,} plain dirs", target=below(1.0, "s"))
    again = Row("ls-again", "ls", "  ls -l again (kernel caches warm)", "s", limit=[],
                limit_what=f"ls -l, {n:,} plain dirs")
    settle = []
    for _ in range(s.runs):
        with s.mounted(cache) as d:
            settle.append(d.settle())
            t, lines = _ls(d.mnt)
            if lines < n + 1:
                raise BenchError(f"ls -l of the mount printed {lines} lines, expected > {n}")
            t2, _ = _ls(d.mnt)
        _ls(plain)
        p, _ = _ls(plain)
        row.values.append(t)
        again.values.append(t2)
        row.limit.append(p)
        again.limit.append(p)
    row.note = (f"after the daemon went idle (its start-up took "
                f"{statistics.median(settle):.2f} s of waiting)")
    return [row, again]


def _stat_times(paths: list[Path]) -> list[float]:
    out = []
    for p in paths:
        t0 = time.perf_counter()
        os.stat(p)
        out.append(time.perf_counter() - t0)
    return out


def fig_stat(s: Suite) -> list[Row]:
    """`stat` of SOURCE/latest, warm: median over 1000 calls."""
    calls = 1000
    cache, plain = s.many(), s.plain_dir()
    row = Row("stat", "stat", f"stat SOURCE/latest, warm, median of {calls}", "ms", limit=[],
              limit_what="stat of a plain file", target=below(0.2, "ms"))
    cold = Row("stat-first", "stat", f"  stat SRC/latest of {min(calls, s.sizes.sources)} "
               "sources, first time", "ms", limit=[], limit_what="stat of a plain file")
    p99s = []
    for _ in range(s.runs):
        with s.mounted(cache, settle=True) as d:
            others = [d.mnt / f"src{i}" / "latest" for i in range(1, min(calls, s.sizes.sources))]
            c = bounded(partial(_stat_times, others), 120.0, "first stats")
            latest = d.mnt / "src0" / "latest"
            bounded(partial(os.stat, latest), 30.0, "stat")
            w = bounded(partial(_stat_times, [latest] * calls), 120.0, "warm stats")
        pl = plain / "src0" / "latest"
        os.stat(pl)
        p = _stat_times([pl] * calls)
        row.values.append(statistics.median(w) * 1e3)
        row.limit.append(statistics.median(p) * 1e3)
        cold.values.append(statistics.median(c) * 1e3)
        cold.limit.append(statistics.median(p) * 1e3)
        p99s.append(sorted(w)[int(0.99 * len(w))] * 1e3)
    row.note = f"warm p99 {statistics.median(p99s):.3f} ms"
    return [row, cold]


def fig_mount_start(s: Suite) -> list[Row]:
    """Mount start with a big index: from starting `buffyfs mount --foreground` to live."""
    versions = s.sizes.sources * s.sizes.per_source
    cache, empty = s.many(), s.empty()
    row = Row("mount-start", "mount-start", f"mount start to live, {versions:,} versions",
              "s", limit=[], limit_what="same, empty cache", target=below(1.0, "s"))
    answer = Row("mount-ready", "mount-start", "  start until a first stat is answered", "s",
                 limit=[], limit_what="same, empty cache", target=below(1.0, "s"))
    imp = Row("import", "mount-start", "  python -c 'import buffyfs.cli'", "s")

    def start(c: Path) -> tuple[float, float]:
        s.mounts += 1
        d = Daemon(s.work / f"mnt{s.mounts}", c, s.work / "daemon.log")
        s.live.append(d)
        try:
            t_live = d.wait_mounted(interval=0.002) - d.started
            bounded(partial(os.stat, d.mnt / "@status"), 30.0, "first stat")
            t_answer = time.monotonic() - d.started
        finally:
            d.stop()
            s.live.remove(d)
        return t_live, t_answer

    for _ in range(s.runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import buffyfs.cli"], check=True,
                       timeout=CLI_TIMEOUT)
        imp.values.append(time.perf_counter() - t0)
        e_live, e_answer = start(empty)
        m_live, m_answer = start(cache)
        row.values.append(m_live)
        row.limit.append(e_live)
        answer.values.append(m_answer)
        answer.limit.append(e_answer)
    return [row, answer, imp]


def _walk(mnt: Path) -> int:
    """List everything once: every directory, with a stat of every entry."""
    count = 0
    stack = [mnt]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                e.stat(follow_symlinks=False)
                count += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
    return count


def fig_rss(s: Suite) -> list[Row]:
    """Daemon memory: with a big index after listing everything, and during downloads."""
    n, per = s.sizes.sources, s.sizes.per_source
    cache, empty = s.many(), s.empty()
    idx = Row("rss-index", "rss", f"RSS, {n:,} sources x {per} versions, all listed",
              "MiB", limit=[], limit_what="idle mount, empty cache", target=below(100, "MiB"))
    big, small = s.sizes.size, s.sizes.small
    at_start = Row("rss-start", "rss", "  RSS of that mount right after start (idle)", "MiB",
                   limit=[], limit_what="idle mount, empty cache")
    anon = Row("rss-index-anon", "rss", "  RssAnon of it after listing (no LMDB map)", "MiB")
    dl = Row("rss-download", "rss", f"peak RSS during a {human(big)} download", "MiB",
             limit=[], limit_what="idle mount, empty cache", target=below(100, "MiB"))
    dl_small = Row("rss-download-small", "rss", f"  peak RSS during a {human(small)} download",
                   "MiB", limit=[], limit_what="idle mount, empty cache")
    flat = Row("rss-growth", "rss", f"  peak RSS growth {human(small)} -> {human(big)}",
               "MiB", target=below(10, "MiB"))
    walk_t = []
    for _ in range(s.runs):
        with s.mounted(empty, settle=True) as d:
            base = proc_status(d.pid).get("VmRSS", 0) / 1024
        with s.mounted(cache, settle=True) as d:
            st0 = proc_status(d.pid)
            t0 = time.monotonic()
            entries = bounded(partial(_walk, d.mnt), 1800.0, "listing everything")
            walk_t.append(time.monotonic() - t0)
            st = proc_status(d.pid)
        at_start.values.append(st0.get("VmRSS", 0) / 1024)
        at_start.limit.append(base)
        anon.values.append(st.get("RssAnon", 0) / 1024)
        want = n * (per + 8)  # per source: 4 entries + @valid/, @versions/ and tag dir files
        if entries < n * per:
            raise BenchError(f"listing found {entries} entries, expected about {want}")
        idx.values.append(st.get("VmRSS", 0) / 1024)
        idx.limit.append(base)
        for row in (dl, dl_small):
            row.limit.append(base)
    idx.note = (f"listing {entries:,} entries took {statistics.median(walk_t):.1f} s; "
                f"VmHWM {st.get('VmHWM', 0) / 1024:.0f} MiB, RssFile (LMDB map, libraries) "
                f"{st.get('RssFile', 0) / 1024:.0f} MiB; index data.mdb "
                f"{(cache / 'index' / 'data.mdb').stat().st_size / MiB:.0f} MiB")
    path, _ = s.data()
    origin = s.origin()
    small_file = path.parent / "small-dl.bin"
    if not small_file.exists():
        make_random_file(small_file, small)
    if isinstance(origin, Origin):
        origin.files[small_file.name] = small_file
    for size, f, row in ((big, path, dl), (small, small_file, dl_small)):
        runs = s.downloads.setdefault(size, [])
        while len(runs) < s.runs:
            runs.append(mount_download(s, size, f, origin.url_for(f.name)))
        row.values = [max(m["peak_vmrss_kib"], m["vmhwm_kib"]) / 1024 for m in runs[:s.runs]]
    flat.values = [a - b for a, b in zip(dl.values, dl_small.values, strict=True)]
    dl.note = ("VmRSS sampled every 20 ms and VmHWM; RssAnon peak "
               f"{statistics.median(m['peak_rssanon_kib'] for m in s.downloads[big]) / 1024:.0f}"
               " MiB")
    return [idx, at_start, anon, dl, dl_small, flat]


def fig_gc(s: Suite) -> list[Row]:
    """Collection of many versions in one go (bench/gc.py)."""
    versions = s.sizes.gc_sources * s.sizes.gc_per_source
    row = Row("gc", "gc", f"collection of {versions:,} versions", "s",
              target=below(10.0, "s"))
    plan = Row("gc-plan", "gc", "  plan only (dry run)", "s")
    for _ in range(s.runs):
        m = gc_bench.measure(s.sizes.gc_sources, s.sizes.gc_per_source, s.work)
        row.values.append(m["collected"])
        plan.values.append(m["planned"])
    row.note = f"{m['doomed']:,} versions collected, {m['left']:,} left"
    return [row, plan]


def fig_stall(s: Suite) -> list[Row]:
    """`stat` of SRC/latest every 2 ms while the daemon works hard, then cat of the burst
    sources against plain files and the daemon's RSS (bench/stall.py)."""
    n = s.sizes.stall_sources
    burst = stall_bench.BURST if n >= 1000 else 50
    rows: dict[str, Row] = {}
    loads = (("idle", "nothing else"), ("gc", f"buffyfs gc of {n * 5:,} versions"),
             ("burst", f"{burst:,} sources refresh at once"),
             ("status", "cat @status in a loop"),
             ("hold", "another process holds the index writer"))
    for key, what in loads:
        for stat, target in (("p99", below(stall_bench.P99_TARGET, "ms")),
                             ("max", below(stall_bench.MAX_TARGET, "ms"))):
            rows[f"{key}-{stat}"] = Row(f"stall-{key}-{stat}", "stall",
                                        f"{'  ' if stat == 'max' else ''}stat {stat}, "
                                        f"while {what}", "ms",
                                        target=target if key != "idle" and
                                        (key, stat) != ("hold", "p99") else None)
    rows["cat"] = Row("stall-cat", "stall", f"cat of {burst:,} x 4 KiB latest, 2nd time",
                      "s", limit=[], limit_what="plain files",
                      target=Target("ratio", "<", stall_bench.CAT_TARGET + 1e-9,
                                    f"<= {stall_bench.CAT_TARGET:g}x"))
    rows["rss"] = Row("stall-rss", "stall", "daemon RSS after gc and bursts", "MiB",
                      target=below(stall_bench.RSS_TARGET, "MiB"))
    warnings, load = [], []
    for _ in range(s.runs):
        m = stall_bench.measure(n, 5, s.work, 1.0 if n < 1000 else stall_bench.STATUS_SECONDS,
                                burst)
        for key, _what in loads:
            rows[f"{key}-p99"].values.append(m[key]["p99"])
            rows[f"{key}-max"].values.append(m[key]["max"])
            load.append(m[key]["load"])
        rows["cat"].values.append(m["cat"]["buffyfs"])
        assert rows["cat"].limit is not None
        rows["cat"].limit.append(m["cat"]["plain"])
        rows["rss"].values.append(m["rss"]["mib"])
        warnings.append(len(m["warnings"]))
    rows["idle-p99"].note = f"{n:,} sources x 5 versions; @status {m['status_bytes'] / 1e6:.1f} MB"
    rows["hold-max"].note = f"loop monitor warnings per run: {warnings}; load average " \
        f"{min(load):.1f}-{max(load):.1f}"
    return list(rows.values())


FIGURES: dict[str, Callable[[Suite], list[Row]]] = {
    "read-warm": fig_read_warm,
    "read-dropped": fig_read_dropped,
    "fetch": fig_fetch,
    "parallel": fig_parallel,
    "ls": fig_ls,
    "stat": fig_stat,
    "mount-start": fig_mount_start,
    "rss": fig_rss,
    "gc": fig_gc,
    "stall": fig_stall,
}


# --- the command ------------------------------------------------------------------------


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"nproc": os.cpu_count(), "kernel": platform.release(), "loadavg": loadavg(),
            "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "buffyfs"))}


def compare(rows: list[Row], old_path: str) -> None:
    old = {r["key"]: r for r in json.loads(Path(old_path).read_text())["rows"]}
    print(f"\ncompared with {old_path}:")
    print(f"{'key':<20} {'old':>12} {'new':>12} {'change':>8}")
    for r in rows:
        o = old.get(r.key)
        if o is None or o.get("median") is None or r.median is None:
            continue
        change = (r.median - o["median"]) / o["median"] * 100 if o["median"] else 0.0
        print(f"{r.key:<20} {fmt(o['median'], r.unit):>12} {fmt(r.median, r.unit):>12} "
              f"{change:>+7.1f}%")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="figures: " + ", ".join(FIGURES))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for CI")
    p.add_argument("--only", metavar="NAME[,NAME]", help="run only these figures")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--compare", metavar="FILE", help="print medians next to an earlier --json")
    p.add_argument("--size", type=parse_size, default=GiB,
                   help="the big file (reads, fetch, download); default 1G")
    p.add_argument("--runs", type=int, default=RUNS, help="runs per figure (default 3)")
    p.add_argument("--sources", type=int, metavar="N",
                   help="sources of the big index (ls, stat, mount-start, rss); default 10000")
    p.add_argument("--stall-full", action="store_true",
                   help="the stall figure at the issue's size: 20,000 sources x 5 versions "
                        "(default 4,000 x 5)")
    p.add_argument("--origin", choices=("auto", "python"), default="auto",
                   help="auto: nginx when installed, else a Python sendfile server")
    p.add_argument("--workdir", metavar="DIR", default="/var/tmp",
                   help="work files go in a fresh directory under DIR, removed at the end")
    args = p.parse_args(argv)
    args.sizes = Sizes.smoke() if args.smoke else Sizes.default(args.size)
    if args.sources is not None:
        if args.sources < 2:
            p.error("--sources must be at least 2")
        args.sizes.sources = args.sources
    if args.stall_full:
        args.sizes.stall_sources = 20_000
    args.figures = list(FIGURES)
    if args.only:
        args.figures = [f.strip() for f in args.only.split(",") if f.strip()]
        unknown = [f for f in args.figures if f not in FIGURES]
        if unknown:
            p.error(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handle_sigterm()
    base = Path(args.workdir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="buffyfs-bench-", dir=base))
    m = machine()
    sz = args.sizes
    say(f"buffyfs benchmarks{' (smoke)' if args.smoke else ''}: {m['nproc']} CPUs, kernel "
        f"{m['kernel']}, Python {m['python']}, {m['date']}, commit {m['commit']}"
        f"{' (buffyfs/ modified)' if m['dirty'] else ''}; {args.runs} runs per figure; "
        f"load average {m['loadavg']}; work dir {work}")
    need = 6 * sz.size + 2 * PARALLEL * sz.parallel + 512 * MiB
    free = shutil.disk_usage(work).free
    rows: list[Row] = []
    suite = Suite(args, work)
    failed = False
    try:
        if free < need:
            raise BenchError(f"{work}: {free // MiB} MiB free, need about {need // MiB} MiB")
        for name in args.figures:
            say(f"\n[{name}] {FIGURES[name].__doc__.splitlines()[0]}")
            t0 = time.monotonic()
            try:
                got = FIGURES[name](suite)
            except BenchError as e:
                failed = True
                got = [Row(name, name, "(failed)", "", error=str(e))]
                print(f"  error: {e}", file=sys.stderr, flush=True)
            except Exception as e:  # a broken figure must not stop the others
                failed = True
                got = [Row(name, name, "(failed)", "", error=repr(e))]
                traceback.print_exc()
            rows += got
            print_rows(got)
            for r in got:
                if r.note:
                    say(f"  {r.key}: {r.note}")
                if r.skipped:
                    say(f"  {r.key}: skipped: {r.skipped}")
            say(f"  ({time.monotonic() - t0:.0f} s)")
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    finally:
        suite.close()
        shutil.rmtree(work, ignore_errors=True)

    say(f"\nSummary ({m['nproc']} CPUs, kernel {m['kernel']}, {m['date']}, commit "
        f"{m['commit']}; median of {args.runs} runs; ratio = median / limit measured in the "
        f"same runs; MB = 10^6 bytes; origin: {suite.info.get('origin', '-')}; mount "
        f"read_ahead_kb: {suite.info.get('read_ahead_kb', '-')}; load average at the start "
        f"{m['loadavg']}, at the end {loadavg()})")
    print_rows(rows)
    counts = {k: sum(r.result == k for r in rows) for k in ("PASS", "MISS", "SKIP", "ERROR")}
    say(", ".join(f"{v} {k}" for k, v in counts.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": m, "smoke": args.smoke, "runs": args.runs, "sizes": asdict(sz),
             "info": suite.info, "rows": [r.as_json() for r in rows]}, indent=2) + "\n")
    if args.compare:
        compare(rows, args.compare)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
