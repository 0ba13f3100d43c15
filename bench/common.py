"""Helpers shared by the benchmarks: sizes, bounded waits, the mount daemon, origins,
reads, memory sampling and building caches straight through the index.

Everything that touches a mount goes through ``bounded`` (a hung daemon must not hang
a benchmark); every subprocess is started by us and stopped by its PID.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(ROOT))

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 8 * MiB  # writing random files
READ_SIZE = 1 * MiB  # every timed read

MOUNT_TIMEOUT = 30.0  # daemon start until the mount is live
DOWNLOAD_TIMEOUT = 600.0  # a download must finish within 10 minutes
STATUS_TIMEOUT = 10.0  # one read of @status
CLI_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0  # each step of stopping the daemon
SYNC_TIMEOUT = 300.0
RSS_INTERVAL = 0.05

T = TypeVar("T")


class BenchError(Exception):
    """The benchmark itself failed (not a missed target)."""


# --- small helpers ----------------------------------------------------------------------


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


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def aligned_buffer(size: int = READ_SIZE) -> memoryview:
    """A page-aligned buffer, as ``cat`` reads into (coreutils allocates its buffer
    page-aligned). The destination's alignment matters more than one would think: on
    our 2-core VM a warm page-cache read into a bytearray (malloc'ed, 16 bytes off a
    page) ran at ~7 GB/s for a plain file and a FUSE file alike, into an aligned buffer
    at ~17 GB/s plain and ~12 GB/s through FUSE."""
    return memoryview(mmap.mmap(-1, size))


def timed_read(path: Path, expected: int) -> float:
    """Read the whole file sequentially with 1 MiB reads into a page-aligned buffer;
    return seconds taken."""
    buf = aligned_buffer()
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


def timed_cat(paths: list[Path], timeout: float) -> float:
    """``cat FILE > /dev/null`` for every path at once (one process each); seconds from
    starting the first to the end of the last."""
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.perf_counter()
    try:
        for p in paths:
            procs.append(subprocess.Popen(["cat", str(p)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(max(0.0, deadline - time.monotonic()))
        elapsed = time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        raise BenchError(f"cat of {len(paths)} file(s) did not finish within "
                         f"{timeout:.0f}s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
    errors = []
    for proc, p in zip(procs, paths, strict=True):
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        if proc.returncode != 0:
            errors.append(f"cat {p} failed ({proc.returncode}): {err}")
    if errors:
        raise BenchError("; ".join(errors))
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


def end_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` (by its PID), then kill it if it does not go; bounded waits."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


def run_quiet(cmd: list[str], timeout: float = STOP_TIMEOUT) -> None:
    try:
        subprocess.run(cmd, capture_output=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- origins ----------------------------------------------------------------------------


class Origin:
    """Files on http://127.0.0.1:PORT/NAME from a thread of this process, streamed with
    sendfile (single Range requests too). ``files`` maps NAME to a path."""

    kind = "python ThreadingHTTPServer + sendfile"

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = dict(files)
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
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="origin",
                                       daemon=True)

    @property
    def url(self) -> str:
        """The URL of the first file (bench/read.py serves one)."""
        return self.url_for(next(iter(self.files)))

    def url_for(self, name: str) -> str:
        return f"{self.base}/{name}"

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
        path = self.files.get(h.path.lstrip("/"))
        if path is None:
            h.send_error(404)
            return
        st = path.stat()
        size = st.st_size
        etag = f'"{size:x}-{int(st.st_mtime_ns):x}"'
        start, end, status = 0, size - 1, 200
        if_range = h.headers.get("If-Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng or "")
        if m and (if_range is None or if_range == etag) and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # suffix range
                start = max(0, size - int(m.group(2)))
            if start > end or start >= size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        length = end - start + 1
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(length))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", etag)
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if not body:
            return
        try:
            with open(path, "rb") as f:
                h.connection.sendfile(f, start, length)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def first_get(self) -> float | None:
        """time.monotonic() of the first GET seen."""
        with self.lock:
            return next((t for t, method, _ in self.requests if method == "GET"), None)


# the head of every nginx.conf a benchmark writes: one process, in the foreground
def nginx_conf(prefix: Path, include: Path, *, workers: int, user: str,
               access_log: str = "off") -> str:
    """The main nginx.conf of a test or bench nginx under ``prefix`` (its pid, logs and
    temp files there), in the foreground with a master, serving the site in ``include``."""
    temps = "\n".join(f"  {kind}_temp_path {prefix}/tmp/{kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"daemon off;\nmaster_process on;\nworker_processes {workers};\nuser {user};\n"
            f"pid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log warn;\n"
            "events { worker_connections 512; }\n"
            f"http {{\n  access_log {access_log};\n{temps}\n"
            f"  default_type application/octet-stream;\n  include {include};\n}}\n")


NGINX_HEAD = """\
daemon off;
master_process off;
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
"""
NGINX_CONF = NGINX_HEAD + """\
http {{
    log_format bench '$msec $request_time $status $bytes_sent "$request_method" "$http_range"';
    access_log {prefix}/access.log bench;
    client_body_temp_path {prefix}/body;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def nginx_path() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


class NginxOrigin:
    """nginx serving the files of ``root`` (sendfile, ranges, ETags) on 127.0.0.1, as a
    single foreground process (``master_process off``) that ``stop`` ends by its PID."""

    kind = "nginx (sendfile, one process)"

    def __init__(self, root: Path, prefix: Path) -> None:
        exe = nginx_path()
        if exe is None:
            raise BenchError("nginx is not installed")
        self.root = root
        self.prefix = prefix
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "body").mkdir(exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            prefix=prefix, root=root, port=self.port,
            user="user root;" if os.geteuid() == 0 else ""))
        self.log = open(prefix / "stderr.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [exe, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True)
        self.offset = time.time() - time.monotonic()

    def url_for(self, name: str) -> str:
        return f"{self.base}/{name}"

    def start(self) -> NginxOrigin:
        def up() -> bool:
            if self.proc.poll() is not None:
                return True
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        if not wait_until(up, 10.0, 0.02) or self.proc.poll() is not None:
            self.stop()
            raise BenchError(f"nginx did not start: {self.errors()}")
        return self

    def errors(self) -> str:
        out = []
        for name in ("stderr.log", "error.log"):
            try:
                out.append((self.prefix / name).read_text(errors="replace").strip())
            except OSError:
                pass
        return " / ".join(o for o in out if o)[-2000:] or "(no log)"

    def stop(self) -> None:
        end_process(self.proc)
        self.log.close()

    def served(self) -> list[dict[str, Any]]:
        """The access log: one dict per request, times in time.monotonic()."""
        out = []
        try:
            lines = (self.prefix / "access.log").read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            parts = line.split(" ", 4)
            if len(parts) < 5:
                continue
            end = float(parts[0]) - self.offset
            took = float(parts[1])
            out.append({"start": end - took, "end": end, "seconds": took,
                        "status": int(parts[2]), "bytes": int(parts[3]), "rest": parts[4]})
        return out


def start_origin(root: Path, prefix: Path, files: dict[str, Path],
                 nginx: bool = True) -> Origin | NginxOrigin:
    """nginx when installed (it keeps up with curl), else the Python sendfile origin.
    Files must be in ``root`` for nginx; ``files`` maps URL names to paths."""
    if nginx and nginx_path() is not None:
        try:
            return NginxOrigin(root, prefix).start()
        except BenchError as e:
            print(f"  warning: {e}; falling back to the Python origin", flush=True)
    return Origin(files).start()


# --- the daemon -------------------------------------------------------------------------


class Daemon:
    """``buffyfs mount MNT --foreground`` as a subprocess; ``stop`` always cleans up."""

    def __init__(self, mnt: Path, cache: Path, log: Path, extra: tuple[str, ...] = ()) -> None:
        self.mnt = mnt
        self.log = log
        mnt.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()  # just before the process starts
        with open(log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "buffyfs", "mount", str(mnt), "--foreground",
                 "--cache", str(cache), "--log-level", "warning", *extra],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        self.pid = self.proc.pid

    def wait_mounted(self, timeout: float = MOUNT_TIMEOUT, interval: float = 0.02) -> float:
        """Wait for the mount to be in the mount table; returns time.monotonic() then."""
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise BenchError(f"the daemon exited with status {self.proc.returncode} "
                                 f"before mounting\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"the mount did not appear within {timeout:.0f}s\n"
                                 f"{self.log_tail()}")
            time.sleep(interval)
        return time.monotonic()

    def settle(self, quiet: float = 0.3, timeout: float = 60.0) -> float:
        """Wait until the daemon has used no CPU for ``quiet`` seconds (start-up work
        done); returns the seconds waited."""
        t0 = time.monotonic()
        last = cpu_seconds(self.pid)
        still_since = time.monotonic()
        while time.monotonic() - t0 < timeout:
            time.sleep(0.05)
            now = cpu_seconds(self.pid)
            if now > last + 0.005:
                last, still_since = now, time.monotonic()
            elif time.monotonic() - still_since >= quiet:
                break
        return time.monotonic() - t0

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
            run_quiet(["fusermount3", "-u", str(self.mnt)])
            wait_until(lambda: not is_mounted(self.mnt), STOP_TIMEOUT)
        if is_mounted(self.mnt):
            run_quiet(["fusermount3", "-uz", str(self.mnt)])
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)  # unmounted: it exits by itself
            except subprocess.TimeoutExpired:
                end_process(self.proc)
        if is_mounted(self.mnt):  # the daemon died without unmounting
            run_quiet(["fusermount3", "-uz", str(self.mnt)])


def cli(cache: Path, *args: str, timeout: float = CLI_TIMEOUT) -> str:
    done = subprocess.run([sys.executable, "-m", "buffyfs", *args, "--cache", str(cache)],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BenchError(f"buffyfs {' '.join(args)} failed ({done.returncode}): "
                         f"{done.stderr.strip()}")
    return done.stdout


STATUS_ENOENT: list[float] = []  # times @status was missing (reported: it should not be)


def read_status(mnt: Path, source: str) -> dict[str, Any]:
    """A source's @status; a missing one is retried for STATUS_TIMEOUT, then fatal."""
    path = mnt / source / "@status"
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


def sample_until(daemon: Daemon, done: Callable[[], Any], timeout: float, what: str,
                 interval: float = RSS_INTERVAL, poll: float = 0.1) -> dict[str, Any]:
    """Sample the daemon's memory every ``interval`` s until ``done()`` (called every
    ``poll`` s) returns something true. Returns that value, when it came, and the peaks."""
    deadline = time.monotonic() + timeout
    peak_rss = peak_anon = samples = 0
    next_poll = 0.0
    while True:
        now = time.monotonic()
        st = proc_status(daemon.pid)
        if st:
            samples += 1
            peak_rss = max(peak_rss, st.get("VmRSS", 0))
            peak_anon = max(peak_anon, st.get("RssAnon", 0))
        daemon.check_alive()
        if now >= next_poll:
            next_poll = now + poll
            value = done()
            if value:
                return {"value": value, "done_at": time.monotonic(), "rss_samples": samples,
                        "peak_vmrss_kib": peak_rss, "peak_rssanon_kib": peak_anon}
        if now > deadline:
            raise BenchError(f"{what} did not finish within {timeout:.0f}s")
        time.sleep(interval)


# --- caches built straight through the index ---------------------------------------------


def add_blob(cache: Path, content: Path, sha256: str) -> Path:
    """Copy ``content`` into the cache's blob store under its hash (read-only, like a
    committed download)."""
    target = cache / "blobs" / sha256[:2] / sha256
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache / "partial" / f"bench-{sha256}.part"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(content, tmp)
        os.chmod(tmp, 0o444)
        os.rename(tmp, target)
    return target


def add_versions(cache: Path, entries: list[tuple[str, Path, str]], url: str,
                 urls: dict[str, str] | None = None) -> None:
    """One source per entry ``(name, content, sha256)``, refresh=never, whose one version
    is ``content``: copied into the blob store and committed through the index API, so a
    mount serves it without contacting any origin. Its URL is ``urls[name]`` if given,
    else ``url``."""
    from buffyfs.store.cache import Cache

    c = Cache(cache)
    try:
        when = datetime.now(UTC).replace(microsecond=0)
        for name, content, sha in entries:
            source_url = (urls or {}).get(name, url)
            add_blob(cache, content, sha)
            c.add_source(name, source_url, {"refresh": "never"})
            c.index.commit_version(name, {
                "sha256": sha, "size": content.stat().st_size, "url": source_url,
                "etag": None, "last_modified": None,
                "content_type": "application/octet-stream", "tags": []}, when)
    finally:
        c.close()


def populate(index: Any, sources: int, per_source: int, *, sha256: Callable[[int, int], str],
             size: int, options: dict[str, Any], prefix: str = "src",
             checked: bool = True) -> list[str]:
    """Write ``sources`` sources with ``per_source`` versions each into the index in ONE
    write transaction (no fsync per source), the way Index.add_source and
    Index.commit_version would. ``sha256(s, i)`` names the blob of version ``i`` of
    source ``s`` (blobs are not created here). With ``checked``, each source's state
    records a successful check, so refresh=never sources start no download."""
    from buffyfs.options import normalize_options
    from buffyfs.store.index import INODES_PER_SOURCE, SourceInode, rfc3339, version_id
    from buffyfs.store.records import InodeRef, Source, Version

    opts = normalize_options(options)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    names = [f"{prefix}{s}" for s in range(sources)]
    with index.write() as w:
        for s, name in enumerate(names):
            base = w.alloc_inodes(INODES_PER_SOURCE)
            w.put_source(name, Source(url=f"http://127.0.0.1:9/{name}", options=opts,
                                      ino=base, added_at=rfc3339(t0)))
            for kind in SourceInode:
                w.put_inode(base + kind, InodeRef(kind=kind.name, source=name))
            last = t0
            for i in range(per_source):
                sha = sha256(s, i)
                last = t0 + timedelta(minutes=i)
                vid = version_id(last, sha)
                ino = w.alloc_inodes(1)
                w.put_version(name, Version(
                    id=vid, sha256=sha, size=size, fetched_at=rfc3339(last),
                    url=f"http://127.0.0.1:9/{name}", ino=ino,
                    tags=["valid"] if i % 10 == 0 else []))
                w.put_inode(ino, InodeRef(kind="version", source=name, id=vid))
                w.ref_blob(sha, size)
            if checked:
                w.put_state(name, last_check=rfc3339(last), last_success=rfc3339(last))
        w.changed("")
    return names


def on_term(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def handle_sigterm() -> None:
    """SIGTERM cleans up like Ctrl-C (unmount, stop the daemons and origins)."""
    signal.signal(signal.SIGTERM, on_term)


Row = tuple[str, str, str, str, str]  # figure, measured, limit, ratio, target


def verdict(ratio: str, target: str) -> str:
    if not ratio or target == "info":
        return ""
    value = float(ratio.rstrip("x/s"))
    bound = float(re.sub(r"[^\d.]", "", target))
    return "PASS" if (value >= bound if target.startswith(">=") else value <= bound) else "MISS"


def report(prog: str, run: Callable[[], list[Row]],
           judged_by_measure: Callable[[str], bool]) -> int:
    """The ``main`` of a benchmark with a table of figures: run it (SIGTERM and Ctrl-C
    clean up; a BenchError is one line and exit 1), print the table with each
    figure's verdict, judged by its ratio or, where ``judged_by_measure``, by the
    figure itself (a rate)."""
    handle_sigterm()
    try:
        rows = run()
    except BenchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"\n{'figure':<13}{'measured':>16}{'limit':>16}{'ratio':>9}  {'target':<10}")
    for figure, measured, limit, ratio, target in rows:
        plain = judged_by_measure(figure)
        print(f"{figure:<13}{measured:>16}{limit:>16}{'' if plain else ratio:>9}  "
              f"{target:<10}{verdict(measured if plain else ratio, target)}")
    return 0


def port_up(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
