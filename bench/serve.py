"""The HTTP server's figures (issue 13), each against nginx serving the same files
statically in the same run.

    python -m bench.serve                 # 1 GiB version, 16 x 64 MiB (~2 min)
    python -m bench.serve --smoke         # tiny sizes, seconds: proves the script runs
    python -m bench.serve --size 256M --each 16M --runs 3

One daemon, ``buffyfs mount --serve``, serves every figure (its server is the one
``buffyfs serve`` runs; the mount is needed for the last figure). The cache is built
through the index (bench.common.add_versions / populate), so nothing is downloaded.
Clients are ``curl`` processes (``-o /dev/null``); everything runs on 127.0.0.1, in a
fresh directory under ``--workdir`` that is removed at the end, and every process is
ended by its PID.

| figure | measured | compared with | target |
|---|---|---|---|
| serve-1 | one curl of a 1 GiB version from buffyfs | nginx static, same file | >= 0.5x |
| front-1 | the same through contrib/nginx (X-Accel-Redirect) | nginx static | >= 0.9x |
| serve-16 | 16 curls at once, 64 MiB versions each, aggregate | nginx static | >= 0.5x |
| revalidate | ``GET /NAME/latest`` answered 304 (If-None-Match), per second | | >= 2000/s |
| stat-p99 | p99 of ``stat`` of a mount's ``SRC/latest`` while 16 clients download | idle | <= 2x |
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/serve.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    NGINX_HEAD,
    BenchError,
    Daemon,
    MiB,
    NginxOrigin,
    add_versions,
    bounded,
    end_process,
    free_port,
    human,
    make_random_file,
    nginx_path,
    parse_size,
    populate,
    port_up,
    report,
    wait_until,
)
from bench.stall import probe, summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 16
STAT_SOURCES = 600  # a stat reaches the daemon: each name is visited once in > 1 s
REVALIDATIONS = 4000
CURL_TIMEOUT = 600.0


def curl_get(url: str, headers: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}\n"]
    for h in headers:
        cmd += ["-H", h]
    return subprocess.Popen([*cmd, url], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)


def timed_downloads(urls: list[str], expected: int) -> float:
    """Seconds for curls of ``urls`` all at once; BenchError unless each got
    ``expected`` bytes with 200."""
    began = time.perf_counter()
    procs = [curl_get(u) for u in urls]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=CURL_TIMEOUT)
            outs.append(out.decode(errors="replace").split())
    finally:
        for p in procs:
            end_process(p)
    took = time.perf_counter() - began
    for url, out in zip(urls, outs, strict=True):
        if out != ["200", str(expected)]:
            raise BenchError(f"{url}: got {out}, expected 200 and {expected} bytes")
    return took


def revalidations(url: str, etag: str, count: int, procs: int = 4) -> float:
    """Requests per second of ``GET url`` with If-None-Match (each must be 304), from
    ``procs`` curl processes, each reusing its connection."""
    per = count // procs
    began = time.perf_counter()
    urls = [arg for _ in range(per) for arg in ("-o", "/dev/null", url)]
    running = [subprocess.Popen(
        ["curl", "-sS", "-H", f"If-None-Match: {etag}", "-w", "%{http_code}\n", *urls],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) for _ in range(procs)]
    codes = []
    try:
        for p in running:
            out, _ = p.communicate(timeout=CURL_TIMEOUT)
            codes += out.decode(errors="replace").split()
    finally:
        for p in running:
            end_process(p)
    took = time.perf_counter() - began
    if codes != ["304"] * (per * procs):
        raise BenchError(f"revalidations: not all 304: {sorted(set(codes))}")
    return per * procs / took


FRONT_MAIN = NGINX_HEAD + """\
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    default_type application/octet-stream;
    include {prefix}/buffyfs.conf;
}}
"""


class Front:
    """contrib/nginx/buffyfs.conf, as shipped, on 127.0.0.1 (one process, by PID)."""

    def __init__(self, prefix: Path, cache: Path, upstream: str) -> None:
        exe = nginx_path()
        if exe is None:
            raise BenchError("nginx is not installed")
        prefix.mkdir(parents=True)
        self.port = free_port()
        site = (ROOT / "contrib" / "nginx" / "buffyfs.conf").read_text()
        site = site.replace("127.0.0.1:8631", upstream).replace("/var/cache/buffyfs",
                                                                str(cache))
        site = site.replace("listen 8080;", f"listen 127.0.0.1:{self.port};")
        (prefix / "buffyfs.conf").write_text(site)
        (prefix / "nginx.conf").write_text(FRONT_MAIN.format(
            prefix=prefix, user="user root;" if os.geteuid() == 0 else ""))
        self.proc = subprocess.Popen(
            [exe, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e",
             str(prefix / "error.log")], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        if not wait_until(lambda: self.proc.poll() is not None or port_up(self.port), 10):
            self.stop()
            raise BenchError("the nginx front did not start")

    def stop(self) -> None:
        end_process(self.proc)


def run(size: int, each: int, runs: int, workdir: Path) -> list[tuple[str, str, str, str, str]]:
    work = Path(tempfile.mkdtemp(prefix="buffyfs-bench-serve-", dir=workdir))
    daemon = static = front = None
    rows = []
    try:
        files = work / "files"
        files.mkdir()
        print(f"writing {human(size)} + {CLIENTS} x {human(each)} of random bytes", flush=True)
        entries = [("big", files / "big", make_random_file(files / "big", size))]
        for i in range(CLIENTS):
            entries.append((f"p{i}", files / f"p{i}", make_random_file(files / f"p{i}", each)))
        cache = work / "cache"
        add_versions(cache, entries, "http://127.0.0.1:9/")
        from buffyfs.store.cache import Cache

        c = Cache(cache)
        try:
            populate(c.index, STAT_SOURCES, 1, size=4096, options={"refresh": "never"},
                     sha256=lambda s, i: f"{s:064x}")
        finally:
            c.close()
        port = free_port()
        daemon = Daemon(work / "mnt", cache, work / "daemon.log",
                        ("--serve", f"127.0.0.1:{port}", "--scrub-interval", "never"))
        daemon.wait_mounted()
        daemon.settle()
        served = f"http://127.0.0.1:{port}"
        wait_until(lambda: port_up(port), 10)
        static = NginxOrigin(files, work / "static").start()
        front = Front(work / "front", cache, f"127.0.0.1:{port}")

        def best(measure) -> float:  # median of ``runs``
            return statistics.median(measure() for _ in range(runs))

        # 1. one client, the big version
        timed_downloads([static.url_for("big")], size)  # warm everything once
        t_static = best(lambda: timed_downloads([static.url_for("big")], size))
        t_serve = best(lambda: timed_downloads([f"{served}/big/latest"], size))
        t_front = best(lambda: timed_downloads([f"{front.base}/big/latest"], size))
        rate = lambda t, n=size: f"{n / t / MiB:.0f} MiB/s"  # noqa: E731
        rows.append(("serve-1", rate(t_serve), rate(t_static), f"{t_static / t_serve:.2f}x",
                     ">= 0.5x"))
        rows.append(("front-1", rate(t_front), rate(t_static), f"{t_static / t_front:.2f}x",
                     ">= 0.9x"))
        # 2. 16 clients at once, 64 MiB each
        total = each * CLIENTS
        s16 = best(lambda: timed_downloads([static.url_for(f"p{i}") for i in range(CLIENTS)],
                                           each))
        b16 = best(lambda: timed_downloads([f"{served}/p{i}/latest" for i in range(CLIENTS)],
                                           each))
        rows.append(("serve-16", rate(b16, total), rate(s16, total), f"{s16 / b16:.2f}x",
                     ">= 0.5x"))
        # 3. 304 revalidations per second
        etag = f'"{entries[2][2]}"'  # p1's
        per_second = best(lambda: revalidations(f"{served}/p1/latest", etag, REVALIDATIONS))
        rows.append(("revalidate", f"{per_second:.0f}/s", "", "", ">= 2000/s"))
        # 4. stat p99 through the mount, idle and while 16 clients download
        mnt = daemon.mnt
        bounded(lambda: probe(mnt, STAT_SOURCES, lambda: False, tail=1.5), 60, "warm-up")
        idle = summary(bounded(lambda: probe(mnt, STAT_SOURCES, lambda: False, tail=3.0),
                               60, "idle probe"))
        loader = threading.Thread(target=lambda: [
            timed_downloads([f"{served}/p{i}/latest" for i in range(CLIENTS)], each)
            for _ in range(max(1, runs))])
        loader.start()
        busy = summary(bounded(lambda: probe(mnt, STAT_SOURCES, loader.is_alive, tail=0.0),
                               CURL_TIMEOUT, "busy probe"))
        loader.join(timeout=CURL_TIMEOUT)
        rows.append(("stat-p99", f"{busy['p99']:.2f} ms", f"{idle['p99']:.2f} ms",
                     f"{busy['p99'] / idle['p99']:.2f}x", "<= 2x"))
        warnings = len(re.findall(r"event loop blocked", daemon.log.read_text(errors="replace")))
        rows.append(("loop-blocked", f"{warnings} warnings", "", "", "info"))
        return rows
    except BaseException:
        if daemon is not None:
            print(f"the daemon's log ends:\n{daemon.log_tail(30)}", file=sys.stderr)
        raise
    finally:
        for proc in (front, static):
            if proc is not None:
                proc.stop()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1G"))
    p.add_argument("--each", type=parse_size, default=parse_size("64M"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one run")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.each, args.runs = 32 * MiB, 2 * MiB, 1
    return report("bench.serve", lambda: run(args.size, args.each, args.runs, args.workdir),
                  lambda figure: figure == "revalidate")


if __name__ == "__main__":
    sys.exit(main())
