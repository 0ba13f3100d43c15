"""Benchmark: download into buffyfs, then read the file through the mount.

Creates a random file, serves it from an HTTP origin in a thread of this process,
registers it with ``buffyfs add``, mounts (``buffyfs mount --foreground``, a
subprocess) and measures:

- the download: throughput (size / time from the origin receiving the request to
  ``@status`` showing a ``latest`` version) and the daemon's peak memory (VmRSS sampled
  every 50 ms while downloading, and VmHWM at the end);
- sequential reads of ``MOUNT/NAME/latest`` with 1 MiB reads: the first read after a
  mount (backing blob in the page cache), a warm re-read, and, as root, a read after
  ``drop_caches``; each against the same bytes read as a plain file (the blob itself).

Each read figure is the median of 3 rounds; every round mounts afresh. Exit status 0
whatever the figures (it is a benchmark), 1 if the benchmark itself failed, 2 on bad
arguments, 130 when interrupted. Nothing is left behind: the mount, the daemon, the
origin and the work directory are always cleaned up.

    python -m bench.read [--size 1G | --smoke] [--json FILE] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/read.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402 - after the path fix above
    DOWNLOAD_TIMEOUT,
    READ_SIZE,
    RSS_INTERVAL,
    STATUS_ENOENT,
    SYNC_TIMEOUT,
    BenchError,
    Daemon,
    MiB,
    Origin,
    bounded,
    can_drop_caches,
    cli,
    drop_caches,
    handle_sigterm,
    human,
    is_mounted,
    make_random_file,
    parse_size,
    prefault,
    proc_status,
    read_ahead_kb,
    read_status,
    run_quiet,
    sample_until,
    sha256_of,
    timed_read,
)

ROUNDS = 3
SOURCE = "bench"
STATUS_INTERVAL = 0.1

TARGET_WARM_RATIO = 0.9
TARGET_RSS_MIB = 100.0


# --- the benchmark ----------------------------------------------------------------------


def download(daemon: Daemon, origin: Origin, size: int) -> dict[str, Any]:
    """Wait for the first version, sampling the daemon's memory; return the figures."""
    mounted_at = daemon.wait_mounted()
    last: dict[str, Any] = {}

    def done() -> dict[str, Any] | None:
        status = last["status"] = read_status(daemon.mnt, SOURCE)
        if status.get("latest"):
            return status
        if status.get("last_error") and status.get("consecutive_failures"):
            raise BenchError(f"the download failed: {status['last_error']['message']}")
        return None

    try:
        got = sample_until(daemon, done, DOWNLOAD_TIMEOUT, "the download",
                           interval=RSS_INTERVAL, poll=STATUS_INTERVAL)
    except BenchError:
        status = last.get("status") or {}
        progress = status.get("progress") or {}
        print(f"  download: state {status.get('state')!r}, {progress.get('bytes', '?')} "
              f"of {size} bytes", file=sys.stderr)
        raise
    status, done_at = got["value"], got["done_at"]
    started = origin.first_get()
    if started is None:
        raise BenchError("@status shows a version but the origin saw no GET")
    seconds = done_at - started
    version = next(v for v in status["versions"] if v["id"] == status["latest"])
    return {
        "seconds": seconds,
        "mount_to_latest_seconds": done_at - mounted_at,
        "mb_s": size / seconds / 1e6,
        "rss_samples": got["rss_samples"],
        "peak_vmrss_kib": got["peak_vmrss_kib"],
        "peak_rssanon_kib": got["peak_rssanon_kib"],
        "version": version,
        "origin_requests": [(round(t - started, 3), m, r) for t, m, r in origin.requests],
    }


def read_round(mnt: Path, blob: Path, size: int, drop: bool, pre: bool) -> dict[str, float]:
    """One round on a fresh mount: seconds per figure."""
    latest = mnt / SOURCE / "latest"

    def fresh_pages() -> None:  # before each read that fills new page-cache pages
        if pre:
            prefault(size)

    timeout = 60.0 + size / 5e6  # at least 5 MB/s
    out: dict[str, float] = {}
    timed_read(blob, size)  # the blob in the page cache, for the "first read" figure
    out["plain_warm"] = timed_read(blob, size)
    fresh_pages()
    out["mount_first"] = bounded(lambda: timed_read(latest, size), timeout, "first read")
    out["mount_warm"] = bounded(lambda: timed_read(latest, size), timeout, "warm read")
    if drop:
        bounded(drop_caches, SYNC_TIMEOUT, "dropping caches")
        fresh_pages()
        out["mount_dropped"] = bounded(lambda: timed_read(latest, size), timeout,
                                       "read after drop_caches")
        bounded(drop_caches, SYNC_TIMEOUT, "dropping caches")
        fresh_pages()
        out["plain_dropped"] = timed_read(blob, size)
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = args.size
    data, cache, mnt = work / "data.bin", work / "cache", work / "mnt"
    cache.mkdir()
    mnt.mkdir()
    free = shutil.disk_usage(work).free
    if free < 2 * size + 256 * MiB:
        raise BenchError(f"{work}: {free // MiB} MiB free, need about {(2 * size) // MiB + 256}"
                         " MiB (the file and its cached copy)")
    drop = can_drop_caches()
    print(f"buffyfs read benchmark: {human(size)}, {os.cpu_count()} CPUs, "
          f"kernel {platform.release()}, Python {platform.python_version()}, "
          f"work dir {work}", flush=True)

    t0 = time.monotonic()
    sha = make_random_file(data, size)
    print(f"  random file written in {time.monotonic() - t0:.1f}s", flush=True)

    results: dict[str, Any] = {"size": size, "read_size": READ_SIZE, "rounds": ROUNDS,
                               "drop_caches": drop, "prefault": args.prefault}
    origin = Origin({"data": data}).start()
    daemons: list[Daemon] = []
    try:
        cli(cache, "add", SOURCE, origin.url, "--refresh", "never")
        daemon = Daemon(mnt, cache, work / "daemon.log")
        daemons.append(daemon)
        dl = download(daemon, origin, size)
        results["download"] = dl
        if dl["version"]["sha256"] != sha or dl["version"]["size"] != size:
            raise BenchError(f"the cached version does not match the origin's file: "
                             f"{dl['version']}")
        print(f"  downloaded in {dl['seconds']:.2f}s; origin saw "
              f"{len(dl['origin_requests'])} request(s)", flush=True)
        blob = cache / "blobs" / sha[:2] / sha
        if not blob.is_file():
            raise BenchError(f"no blob at {blob}")
        results["read_ahead_kb"] = read_ahead_kb(mnt)

        rounds: list[dict[str, float]] = []
        for i in range(ROUNDS):
            if i:  # a fresh mount for every round: "first read after mount"
                daemon.stop()
                daemon = Daemon(mnt, cache, work / "daemon.log")
                daemons.append(daemon)
                daemon.wait_mounted()
                if read_status(mnt, SOURCE).get("latest") != dl["version"]["id"]:
                    raise BenchError("after remounting, latest is not the downloaded version")
            rounds.append(read_round(mnt, blob, size, drop, args.prefault))
            daemon.check_alive()
            if i == 0:  # bytes check, once, untimed (from the page cache)
                got = bounded(lambda: sha256_of(mnt / SOURCE / "latest"),
                              60.0 + size / 5e6, "hashing latest")
                if got != sha:
                    raise BenchError(f"{mnt}/{SOURCE}/latest has sha256 {got}, expected {sha}")
                end = proc_status(daemons[0].pid)
                results["vmhwm_kib"] = end.get("VmHWM", 0)
                results["vmrss_end_kib"] = end.get("VmRSS", 0)
            print(f"  round {i + 1}/{ROUNDS}: " + ", ".join(
                f"{k} {size / v / 1e6:.0f} MB/s" for k, v in rounds[-1].items()), flush=True)
        results["runs_seconds"] = rounds
        results["status_enoent"] = len(STATUS_ENOENT)
        results["mb_s"] = {k: size / statistics.median(r[k] for r in rounds) / 1e6
                           for k in rounds[0]}
    finally:
        for d in daemons:
            d.stop()
        origin.stop()
    return results


def report(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Print the table; return the rows (for --json)."""
    mb = res["mb_s"]
    dl = res["download"]
    rows: list[dict[str, Any]] = []

    def row(figure: str, value: float, unit: str, plain: float | None = None,
            target: str = "", ok: bool | None = None) -> None:
        rows.append({"figure": figure, "value": round(value, 1), "unit": unit,
                     "ratio_to_plain": None if plain is None else round(value / plain, 3),
                     "target": target or None,
                     "result": None if ok is None else ("PASS" if ok else "MISS")})

    row("download (origin -> cache)", dl["mb_s"], "MB/s")
    row("first read after mount", mb["mount_first"], "MB/s", mb["plain_warm"])
    warm_ratio = mb["mount_warm"] / mb["plain_warm"]
    row("warm read (read again)", mb["mount_warm"], "MB/s", mb["plain_warm"],
        f">= {TARGET_WARM_RATIO}x plain", warm_ratio >= TARGET_WARM_RATIO)
    row("plain file, warm", mb["plain_warm"], "MB/s", mb["plain_warm"])
    if "mount_dropped" in mb:
        row("page cache dropped: mount", mb["mount_dropped"], "MB/s", mb["plain_dropped"])
        row("page cache dropped: plain", mb["plain_dropped"], "MB/s", mb["plain_dropped"])
    peak_kib = max(dl["peak_vmrss_kib"], res.get("vmhwm_kib", 0))
    row("peak daemon RSS (VmHWM)", peak_kib / 1024, "MiB", None,
        f"< {TARGET_RSS_MIB:.0f} MiB", peak_kib / 1024 < TARGET_RSS_MIB)

    print()
    print(f"{'figure':<30} {'value':>10} {'unit':<5} {'vs plain':>9}  {'target':<15} result")
    print("-" * 79)
    for r in rows:
        ratio = "" if r["ratio_to_plain"] is None else f"{r['ratio_to_plain']:.2f}x"
        print(f"{r['figure']:<30} {r['value']:>10.1f} {r['unit']:<5} {ratio:>9}  "
              f"{r['target'] or '':<15} {r['result'] or ''}")
    print("-" * 79)
    print(f"MB = 10^6 bytes; reads of {READ_SIZE // MiB} MiB; read figures are the median of "
          f"{res['rounds']} rounds, each on a fresh mount; \"first read\" has the blob in the "
          "page cache; ratios are to the plain read in the same cache state.")
    print(f"download: {human(res['size'])} in {dl['seconds']:.2f}s from the origin's first "
          f"request to @status showing latest ({dl['mount_to_latest_seconds']:.2f}s from the "
          f"mount appearing); origin requests: {len(dl['origin_requests'])}.")
    print(f"daemon memory: VmRSS sampled every {RSS_INTERVAL * 1000:.0f} ms while downloading "
          f"({dl['rss_samples']} samples): peak {dl['peak_vmrss_kib'] / 1024:.1f} MiB "
          f"(RssAnon peak {dl['peak_rssanon_kib'] / 1024:.1f} MiB); VmHWM after the first "
          f"round of reads {res.get('vmhwm_kib', 0) / 1024:.1f} MiB.")
    if res.get("status_enoent"):
        print(f"warning: reading {SOURCE}/@status failed with ENOENT {res['status_enoent']} "
              "time(s) (retried)")
    if res["prefault"]:
        print("--prefault: memory touched and freed before the first and drop_caches reads")
    print(f"mount read_ahead_kb: {res.get('read_ahead_kb', '?')}"
          + ("" if res["drop_caches"] else "; drop_caches figures skipped (not root)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.read", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1G"),
                   help="file size, K/M/G suffixes (1024-based); default 1G")
    p.add_argument("--smoke", action="store_true", help="a quick run with --size 32M")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--workdir", metavar="DIR",
                   help="work files go in a fresh directory under DIR (default /var/tmp), "
                        "removed at the end (DIR too, if this run created it)")
    p.add_argument("--prefault", action="store_true",
                   help="touch and free SIZE bytes of memory before each read that fills new "
                        "page-cache pages (steadier figures on VMs that back memory lazily)")
    args = p.parse_args(argv)
    if args.smoke:
        args.size = parse_size("32M")

    handle_sigterm()

    base = Path(args.workdir or "/var/tmp").resolve()
    created = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="buffyfs-bench-", dir=base))
    try:
        res = run(args, work)
        rows = report(res)
        if args.json:
            res["table"] = rows
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        return 0
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if is_mounted(work / "mnt"):  # should not happen: run() stops every daemon
            run_quiet(["fusermount3", "-uz", str(work / "mnt")])
        shutil.rmtree(work, ignore_errors=True)
        if created:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
