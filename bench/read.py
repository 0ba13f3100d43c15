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
import hashlib
import json
import mmap
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

MiB = 1 << 20
CHUNK = 8 * MiB  # writing the random file
READ_SIZE = 1 * MiB  # every timed read
ROUNDS = 3
SOURCE = "bench"

MOUNT_TIMEOUT = 30.0  # daemon start until the mount is live
DOWNLOAD_TIMEOUT = 600.0  # the download must finish within 10 minutes
STATUS_TIMEOUT = 10.0  # one read of @status
CLI_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0  # each step of stopping the daemon
SYNC_TIMEOUT = 300.0
RSS_INTERVAL = 0.05
STATUS_INTERVAL = 0.1

TARGET_WARM_RATIO = 0.9
TARGET_RSS_MIB = 100.0

T = TypeVar("T")


class BenchError(Exception):
    """The benchmark itself failed (not a missed target)."""


# --- helpers ----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 512K, 32M, 1G")
    n = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return n


def human(n: int) -> str:
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f and n % f == 0:
            return f"{n // f} {unit}"
    return f"{n} B"


def bounded(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run ``fn`` in a daemon thread; fail if it takes longer than ``timeout``.

    Anything that touches the mount goes through here: a hung daemon must not hang the
    benchmark. A thread left blocked in the mount is released when cleanup kills the
    daemon (the FUSE connection is aborted), and being a daemon thread it never holds
    up the exit.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name=what, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise BenchError(f"{what} did not finish within {timeout:.0f}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def is_mounted(path: Path) -> bool:
    """From /proc/self/mountinfo: never blocks on a hung FUSE daemon (unlike stat)."""
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
            if point == target:
                return True
    return False


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile... of a process, in KiB ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return out


def make_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes in 8 MiB chunks (flat memory); return the sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def timed_read(path: Path, expected: int) -> float:
    """Read the whole file sequentially with 1 MiB reads; return seconds taken."""
    buf = bytearray(READ_SIZE)
    total = 0
    with open(path, "rb", buffering=0) as f:
        t0 = time.perf_counter()
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
        elapsed = time.perf_counter() - t0
    if total != expected:
        raise BenchError(f"read {total} bytes from {path}, expected {expected}")
    return elapsed


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(READ_SIZE)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def prefault(n: int) -> None:
    """Touch then free ``n`` bytes of fresh memory.

    On a VM whose host backs guest memory lazily (and takes freed pages back), a read that
    fills new page-cache pages pays for the host faulting them in: up to 4x slower reads
    that have nothing to do with the filesystem. Freed just before the read, these pages
    are the ones the page cache gets next.
    """
    m = mmap.mmap(-1, n)
    try:
        chunk = b"\1" * CHUNK
        for off in range(0, n, CHUNK):
            m[off : off + min(CHUNK, n - off)] = chunk[: min(CHUNK, n - off)]
    finally:
        m.close()


def drop_caches() -> None:
    subprocess.run(["sync"], check=True, timeout=SYNC_TIMEOUT)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


# --- the origin -------------------------------------------------------------------------


class Origin:
    """One file on http://127.0.0.1:PORT/data, streamed with sendfile (single Range too)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.etag = f'"{self.size:x}-{int(path.stat().st_mtime_ns):x}"'
        self.requests: list[tuple[float, str, str | None]] = []  # (monotonic, method, Range)
        self.lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                origin.handle(self, body=False)

            def do_GET(self) -> None:
                origin.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/data"
        self.thread = threading.Thread(target=self.server.serve_forever, name="origin",
                                       daemon=True)

    def start(self) -> Origin:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        rng = h.headers.get("Range")
        with self.lock:
            self.requests.append((time.monotonic(), h.command, rng))
        if h.path != "/data":
            h.send_error(404)
            return
        start, end, status = 0, self.size - 1, 200
        if_range = h.headers.get("If-Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng or "")
        if m and (if_range is None or if_range == self.etag) and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), self.size - 1) if m.group(2) else self.size - 1
            else:  # suffix range
                start = max(0, self.size - int(m.group(2)))
            if start > end or start >= self.size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{self.size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        length = end - start + 1
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(length))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", self.etag)
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{self.size}")
        h.end_headers()
        if not body:
            return
        try:
            with open(self.path, "rb") as f:
                h.connection.sendfile(f, start, length)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def first_get(self) -> float | None:
        with self.lock:
            return next((t for t, method, _ in self.requests if method == "GET"), None)


# --- the daemon -------------------------------------------------------------------------


class Daemon:
    """``buffyfs mount MNT --foreground`` as a subprocess; ``stop`` always cleans up."""

    def __init__(self, mnt: Path, cache: Path, log: Path) -> None:
        self.mnt = mnt
        self.log = log
        with open(log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "buffyfs", "mount", str(mnt), "--foreground",
                 "--cache", str(cache), "--log-level", "warning"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        self.pid = self.proc.pid

    def wait_mounted(self) -> float:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise BenchError(f"the daemon exited with status {self.proc.returncode} "
                                 f"before mounting\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"the mount did not appear within {MOUNT_TIMEOUT:.0f}s\n"
                                 f"{self.log_tail()}")
            time.sleep(0.02)
        return time.monotonic()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the daemon exited with status {self.proc.returncode}\n"
                             f"{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no daemon log)"
        return "daemon log:\n  " + "\n  ".join(text) if text else "(daemon log empty)"

    def stop(self) -> None:
        """Unmount (-u, then lazily -uz), then SIGTERM, then SIGKILL, by PID."""
        if is_mounted(self.mnt):
            _run_quiet(["fusermount3", "-u", str(self.mnt)])
            _wait(lambda: not is_mounted(self.mnt), STOP_TIMEOUT)
        if is_mounted(self.mnt):
            _run_quiet(["fusermount3", "-uz", str(self.mnt)])
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=STOP_TIMEOUT)
        if is_mounted(self.mnt):  # the daemon died without unmounting
            _run_quiet(["fusermount3", "-uz", str(self.mnt)])


def _run_quiet(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, capture_output=True, timeout=STOP_TIMEOUT)
    except (subprocess.TimeoutExpired, OSError):
        pass


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def cli(cache: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "buffyfs", *args, "--cache", str(cache)],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BenchError(f"buffyfs {' '.join(args)} failed ({done.returncode}): "
                         f"{done.stderr.strip()}")


STATUS_ENOENT: list[float] = []  # times @status was missing (reported: it should not be)


def read_status(mnt: Path) -> dict[str, Any]:
    """The source's @status; a missing one is retried for STATUS_TIMEOUT, then fatal."""
    path = mnt / SOURCE / "@status"
    deadline = time.monotonic() + STATUS_TIMEOUT
    while True:
        try:
            text = bounded(path.read_text, STATUS_TIMEOUT, "reading @status")
            return json.loads(text)
        except FileNotFoundError:
            STATUS_ENOENT.append(time.monotonic())
            if time.monotonic() > deadline:
                raise BenchError(f"{path} missing for {STATUS_TIMEOUT:.0f}s") from None
            time.sleep(0.05)


def read_ahead_kb(mnt: Path) -> str:
    try:
        dev = subprocess.run(["mountpoint", "-d", str(mnt)], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        return Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


# --- the benchmark ----------------------------------------------------------------------


def download(daemon: Daemon, origin: Origin, size: int) -> dict[str, Any]:
    """Wait for the first version, sampling the daemon's memory; return the figures."""
    mounted_at = daemon.wait_mounted()
    deadline = mounted_at + DOWNLOAD_TIMEOUT
    peak_rss = peak_anon = 0
    samples = 0
    next_status = 0.0
    status: dict[str, Any] = {}
    while True:
        now = time.monotonic()
        st = proc_status(daemon.pid)
        if st:
            samples += 1
            peak_rss = max(peak_rss, st.get("VmRSS", 0))
            peak_anon = max(peak_anon, st.get("RssAnon", 0))
        daemon.check_alive()
        if now >= next_status:
            next_status = now + STATUS_INTERVAL
            status = read_status(daemon.mnt)
            if status.get("latest"):
                done_at = time.monotonic()
                break
            if status.get("last_error") and status.get("consecutive_failures"):
                raise BenchError(f"the download failed: {status['last_error']['message']}")
        if now > deadline:
            progress = status.get("progress") or {}
            raise BenchError(f"the download did not finish within {DOWNLOAD_TIMEOUT:.0f}s "
                             f"(state {status.get('state')!r}, {progress.get('bytes', '?')} "
                             f"of {size} bytes)")
        time.sleep(RSS_INTERVAL)
    started = origin.first_get()
    if started is None:
        raise BenchError("@status shows a version but the origin saw no GET")
    seconds = done_at - started
    version = next(v for v in status["versions"] if v["id"] == status["latest"])
    return {
        "seconds": seconds,
        "mount_to_latest_seconds": done_at - mounted_at,
        "mb_s": size / seconds / 1e6,
        "rss_samples": samples,
        "peak_vmrss_kib": peak_rss,
        "peak_rssanon_kib": peak_anon,
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
    origin = Origin(data).start()
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
                if read_status(mnt).get("latest") != dl["version"]["id"]:
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

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

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
            _run_quiet(["fusermount3", "-uz", str(work / "mnt")])
        shutil.rmtree(work, ignore_errors=True)
        if created:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
