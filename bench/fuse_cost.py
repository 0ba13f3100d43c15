"""The per-file cost of the mount (issue 12's `cat` row), quick enough to iterate on.

    python -m bench.fuse_cost                   # 1,000 sources, ~20 s
    python -m bench.fuse_cost --profile         # also a cProfile of the daemon's cat
    python -m bench.fuse_cost --floor           # also a no-op pyfuse3 file system's
    python -m bench.fuse_cost --sources 200

Builds a cache of SOURCES sources with one 4 KiB version each (blobs written, no
download), mounts it, ``cat``s every ``latest`` once (the kernel learns the names and
keeps the pages), then takes the best of CAT_RUNS (5) ``cat`` of them all against the
best of as many ``cat`` of the same bytes as plain files (bench.stall's ``cat_seconds``).
Prints the time (per file too), the daemon's CPU time per file (steadier than times on
a loaded machine), the FUSE requests it answered per file
(``buffyfs_fuse_requests_total`` by op) and the load average.
With ``--floor``, also the same ``cat`` of a pyfuse3 file system on trio whose
handlers do nothing, without and with buffyfs's loop monitor: what pyfuse3's dispatch
and the monitor cost per file, whatever the handlers do.
(The first ``cat`` after one that read from the daemon also makes a ``getattr`` per
file: a FUSE read marks the atime stale, and ``cat`` ``fstat``s each file: not
measured.) With ``--profile`` the daemon runs under cProfile (its whole run) and the top
functions are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/fuse_cost.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BenchError,
    Daemon,
    bounded,
    cpu_seconds,
    end_process,
    is_mounted,
    populate,
    run_quiet,
    wait_until,
)
from bench.stall import CAT_RUNS, cat_seconds  # noqa: E402

SIZE = 4096


def build(cache: Path, plain: Path, sources: int) -> list[str]:
    """``sources`` sources of one 4 KiB version each, their blobs written; the same
    bytes as plain files under ``plain``."""
    from buffyfs.store.cache import Cache

    plain.mkdir(parents=True)
    body = {s: hashlib.sha256(str(s).encode()).hexdigest().encode() * (SIZE // 64)
            for s in range(sources)}
    shas = {s: hashlib.sha256(b).hexdigest() for s, b in body.items()}
    c = Cache(cache)
    try:
        names = populate(c.index, sources, 1, size=SIZE,
                         options={"refresh": "never", "unpack": "off"},
                         sha256=lambda s, i: shas[s])
        for s, name in enumerate(names):
            path = c.blobs.path(shas[s])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body[s])
            (plain / name).write_bytes(body[s])
    finally:
        c.close()
    return names


# The daemon under cProfile, timed in the CPU time of its loop's thread (wall-clock times
# would count the waits and, on a loaded machine, the other processes' turns).
PROFILED = """
import cProfile, runpy, sys, time
out = sys.argv.pop(1)
sys.argv[0] = "buffyfs"
profile = cProfile.Profile(time.thread_time)
try:
    profile.runcall(runpy.run_module, "buffyfs", run_name="__main__")
except SystemExit:
    pass
finally:
    profile.dump_stats(out)
"""


class ProfiledDaemon(Daemon):
    """``Daemon`` under cProfile, its stats written to FILE (``--profile-to FILE`` in
    extra)."""

    def __init__(self, mnt: Path, cache: Path, log: Path, extra: tuple[str, ...]) -> None:
        out = extra[-1]
        self.mnt = mnt
        self.log = log
        mnt.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        with open(log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", PROFILED, out, "mount",
                 str(mnt), "--foreground", "--cache", str(cache), "--log-level",
                 "warning", *extra[:-2]],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        self.pid = self.proc.pid


# The floor: a pyfuse3 file system on trio whose handlers do nothing (files f0, f1...
# of 4 KiB; open and release answer at once), optionally with buffyfs's loop monitor.
NOOP_FS = """
import errno, stat, sys
import pyfuse3, trio
mnt, monitored = sys.argv[1], sys.argv[2] == "1"
DATA = bytes(4096)

class NoOp(pyfuse3.Operations):
    def _attr(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = 3600
        a.st_mode = stat.S_IFDIR | 0o555 if ino == 1 else stat.S_IFREG | 0o444
        a.st_size = 0 if ino == 1 else len(DATA)
        return a
    async def getattr(self, ino, ctx=None):
        return self._attr(ino)
    async def lookup(self, parent, name, ctx=None):
        if parent != 1 or not name.startswith(b"f") or not name[1:].isdigit():
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(int(name[1:]) + 2)
    async def open(self, ino, flags, ctx):
        return pyfuse3.FileInfo(fh=ino, keep_cache=True)
    async def read(self, fh, off, size):
        return DATA[off:off + size]
    async def release(self, fh):
        pass

pyfuse3.init(NoOp(), mnt, set(pyfuse3.default_options))
try:
    if monitored:
        from buffyfs.watchdog import LoopMonitor
        with LoopMonitor() as monitor:
            trio.run(pyfuse3.main, instruments=[monitor])
    else:
        trio.run(pyfuse3.main)
finally:
    pyfuse3.close()
"""


def floor(work: Path, files: int, monitored: bool) -> tuple[float, float]:
    """(best cat seconds, CPU seconds per file) of ``files`` files of the no-op file
    system (NOOP_FS), mounted on ``work``/``noop``."""
    mnt = work / ("noop-monitored" if monitored else "noop")
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", NOOP_FS, str(mnt), str(int(monitored))],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # (the monitor's warnings)
    try:
        if not wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, 30) \
                or not is_mounted(mnt):
            raise BenchError("the no-op file system did not mount")
        paths = [mnt / f"f{i}" for i in range(files)]
        bounded(lambda: cat_seconds(paths), 120, "first cats of the no-op file system")
        cpu = cpu_seconds(proc.pid)
        best = bounded(lambda: cat_seconds(paths), 300, "cat of the no-op file system")
        return best, (cpu_seconds(proc.pid) - cpu) / (CAT_RUNS * files)
    finally:
        run_quiet(["fusermount3", "-u", str(mnt)])
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            end_process(proc)
        if is_mounted(mnt):
            run_quiet(["fusermount3", "-uz", str(mnt)])


def requests(mnt: Path) -> dict[str, float]:
    (mnt / "@control").write_text("# drops the snapshot of @metrics\n")
    text = (mnt / "@metrics").read_text()
    return {op: float(n) for op, n in
            re.findall(r'^buffyfs_fuse_requests_total\{op="(\w+)"\} (\S+)$', text, re.M)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=1000)
    ap.add_argument("--profile", action="store_true",
                    help="run the daemon under cProfile; print its top functions")
    ap.add_argument("--floor", action="store_true",
                    help="also the same cat of a pyfuse3 file system whose handlers do "
                         "nothing, with and without buffyfs's loop monitor")
    ap.add_argument("--workdir", default="/var/tmp")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="buffyfs-bench-fuse-cost-", dir=args.workdir))
    daemon = None
    try:
        names = build(work / "cache", work / "plain", args.sources)
        extra = ("--scrub-interval", "never")
        if args.profile:  # the same daemon, under cProfile
            extra += ("--profile-to", str(work / "prof"))
        daemon = (ProfiledDaemon if args.profile else Daemon)(
            work / "mnt", work / "cache", work / "daemon.log", extra)
        daemon.wait_mounted()
        daemon.settle()
        latest = [daemon.mnt / n / "latest" for n in names]
        plain = [work / "plain" / n for n in names]
        bounded(lambda: cat_seconds(latest), 120, "first cats")  # and the fstat after reads
        before = requests(daemon.mnt)
        cpu = cpu_seconds(daemon.pid)
        buffy = bounded(lambda: cat_seconds(latest), 300, "cat of latest")
        cpu = cpu_seconds(daemon.pid) - cpu
        after = requests(daemon.mnt)
        files = bounded(lambda: cat_seconds(plain), 300, "cat of plain files")
        n = len(names)
        made = {op: (after.get(op, 0) - before.get(op, 0)) / (CAT_RUNS * n)
                for op in after if after.get(op, 0) - before.get(op, 0) > 0}
        print(f"cat of {n:,} x 4 KiB latest, 2nd time: {buffy * 1e3:.1f} ms "
              f"({buffy / n * 1e6:.0f} us/file) vs plain {files * 1e3:.1f} ms = "
              f"{buffy / files:.1f}x; load {os.getloadavg()[0]:.2f}")
        print(f"daemon CPU per file: {cpu / (CAT_RUNS * n) * 1e6:.0f} us")
        print("requests per file: " + ", ".join(f"{op} {k:.2f}" for op, k in sorted(made.items())))
        for monitored in (False, True) if args.floor else ():
            best, per_file = floor(work, n, monitored)
            print(f"no-op pyfuse3 file system{' + loop monitor' if monitored else ''}: "
                  f"{best * 1e3:.1f} ms = {best / files:.1f}x plain, CPU per file "
                  f"{per_file * 1e6:.0f} us; load {os.getloadavg()[0]:.2f}")
    finally:
        if daemon is not None:
            daemon.stop()
        if args.profile and (work / "prof").exists():
            import pstats

            stats = pstats.Stats(str(work / "prof"))
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats("buffyfs|pyfuse3", 25)
            if os.environ.get("FUSE_COST_CALLERS"):
                stats.print_callers(os.environ["FUSE_COST_CALLERS"])
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
