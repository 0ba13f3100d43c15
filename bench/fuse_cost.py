"""The per-file cost of the mount (issue 12's `cat` row), quick enough to iterate on.

    python -m bench.fuse_cost                   # 1,000 sources, ~20 s
    python -m bench.fuse_cost --profile         # also a cProfile of the daemon's cat
    python -m bench.fuse_cost --sources 200

Builds a cache of SOURCES sources with one 4 KiB version each (blobs written, no
download), mounts it, ``cat``s every ``latest`` once (the kernel learns the names and
keeps the pages), then takes the best of CAT_RUNS (5) ``cat`` of them all against the
best of as many ``cat`` of the same bytes as plain files (bench.stall's ``cat_seconds``). Prints the time (per file too), the
daemon's CPU time per file (steadier than times on a loaded machine), the FUSE requests
it answered per file (``buffyfs_fuse_requests_total`` by op) and the load average.
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

from bench.common import Daemon, bounded, cpu_seconds, populate  # noqa: E402
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
