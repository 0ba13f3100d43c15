"""The WAN profile of issue 14: an origin that caps each connection, as many public data
servers do, compared in one run with ``curl -o`` (one connection) and ``aria2c -x N -s
N`` (the parallel-download anchor).

    python -m bench.wan                  # 1 GiB, 8 connections, limit_rate 25m (root)
    python -m bench.wan --size 256M --rss-size 1G

The origin is nginx (``limit_rate 25m`` per connection) in a network namespace of its
own; every client (curl, aria2c, buffyfs and its mount daemon) joins that namespace
with ``nsenter --net`` and talks to the namespace's own 127.0.0.1, so no traffic leaves
loopback and no other process on the machine shares the origin's network. (A veth pair
would add nothing here: this kernel has no netem, so it could add no delay either.) The
loopback rows run the same nginx without ``limit_rate``.

Prints the issue's table: first fetch over the WAN profile against aria2c and curl,
first fetch over loopback against curl, time to the first byte of ``latest`` of a new
source, ``unzip -l`` of a zip still downloading, and the daemon's RSS during an
8-connection download. Needs root (the namespace), nginx, curl, unzip; aria2c if
installed (``apt-get install aria2``), else its rows say SKIP. Everything is removed at
the end: the namespace, the mount, every process (by PID), the work directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import (
    NGINX_CONF,
    BenchError,
    end_process,
    free_port,
    human,
    is_mounted,
    make_random_file,
    nginx_path,
    parse_size,
    proc_status,
    wait_until,
)

MiB = 1 << 20
TIMEOUT = 600.0  # seconds any one download may take


@contextmanager
def namespace() -> Iterator[str]:
    name = f"buffy-wan-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns: str, cmd: list[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", *cmd]


@contextmanager
def nginx(ns: str, root: Path, prefix: Path, rate: str | None) -> Iterator[str]:
    exe = nginx_path()
    if exe is None:
        raise BenchError("nginx is not installed")
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "body").mkdir(exist_ok=True)
    port = free_port()
    conf = NGINX_CONF.format(prefix=prefix, root=root, port=port, user="user root;")
    if rate:
        conf = conf.replace("location / { }", f"location / {{ limit_rate {rate}; }}")
    (prefix / "nginx.conf").write_text(conf)
    proc = subprocess.Popen(in_ns(ns, [exe, "-p", str(prefix), "-c", str(prefix / "nginx.conf")]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        up = wait_until(lambda: subprocess.run(
            in_ns(ns, ["curl", "-sf", "-o", "/dev/null", "-r", "0-0",
                       f"http://127.0.0.1:{port}/"]), capture_output=True).returncode in (0, 22),
            10.0, 0.1)
        if not up or proc.poll() is not None:
            raise BenchError("nginx did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        end_process(proc)


def timed(cmd: list[str], timeout: float = TIMEOUT) -> float:
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BenchError(f"{cmd[2] if cmd[0] == 'nsenter' else cmd[0]} failed: "
                         f"{(done.stderr or done.stdout)[-500:]}")
    return time.monotonic() - started


def buffyfs(ns: str, cache: Path, *args: str) -> list[str]:
    return in_ns(ns, [sys.executable, "-m", "buffyfs", *args, "--cache", str(cache)])


def fetch_buffyfs(ns: str, work: Path, url: str, connections: int) -> float:
    cache = work / f"cache-{time.monotonic_ns()}"
    subprocess.run(buffyfs(ns, cache, "add", "f", url, "--connections", str(connections)),
                   check=True, capture_output=True)
    try:
        return timed(buffyfs(ns, cache, "fetch", "f"))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def fetch_curl(ns: str, work: Path, url: str) -> float:
    out = work / "curl.out"
    try:
        return timed(in_ns(ns, ["curl", "-sf", "-o", str(out), url]))
    finally:
        out.unlink(missing_ok=True)


def fetch_aria2(ns: str, work: Path, url: str, connections: int) -> float | None:
    if shutil.which("aria2c") is None:
        return None
    out = work / "aria2"
    try:
        return timed(in_ns(ns, ["aria2c", "-q", "-x", str(connections), "-s", str(connections),
                                "--allow-overwrite=true", "--auto-file-renaming=false",
                                "--file-allocation=none", "-d", str(out), "-o", "a", url]))
    finally:
        shutil.rmtree(out, ignore_errors=True)


@contextmanager
def mounted(ns: str, work: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """A buffyfs mount whose daemon lives in the namespace (its mount is everyone's)."""
    cache, mnt = work / "mcache", work / "mnt"
    mnt.mkdir(exist_ok=True)
    log = open(work / "mount.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(in_ns(ns, [sys.executable, "-m", "buffyfs", "mount", str(mnt),
                                       "--foreground", "--cache", str(cache)]),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        if not wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, 15.0):
            raise BenchError("the mount did not come up")
        yield mnt, cache, proc
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        end_process(proc)
        log.close()
        shutil.rmtree(cache, ignore_errors=True)


def add_source(mnt: Path, name: str, url: str, options: str = "") -> None:
    fd = os.open(mnt / "@control", os.O_WRONLY)
    try:
        os.write(fd, f"add {name} {url} {options}".encode())
    finally:
        os.close(fd)


def remove_source(mnt: Path, name: str) -> None:
    """End a row's download, so that the next row has the host's connections."""
    fd = os.open(mnt / "@control", os.O_WRONLY)
    try:
        os.write(fd, f"remove {name}".encode())
    finally:
        os.close(fd)


def first_byte(mnt: Path, url: str) -> float:
    started = time.monotonic()
    add_source(mnt, "ttfb", url)
    with open(mnt / "ttfb/latest", "rb", buffering=0) as f:
        if not f.read(1):
            raise BenchError("latest read nothing")
    took = time.monotonic() - started
    remove_source(mnt, "ttfb")
    return took


def unzip_listing(mnt: Path, url: str, size: int) -> float:
    add_source(mnt, "zip", url)
    if not wait_until(lambda: os.stat(mnt / "zip/latest").st_size == size, 30.0):
        raise BenchError("the zip's length never showed")
    took = timed(["unzip", "-l", str(mnt / "zip/latest")], timeout=120)
    remove_source(mnt, "zip")
    return took


def rss_during(mnt: Path, proc: subprocess.Popen[bytes], url: str) -> tuple[int, int]:
    """Peak and last VmRSS (bytes) of the daemon while it downloads ``url``."""
    add_source(mnt, "rss", url, "connections=8")
    peak = last = 0
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        last = proc_status(daemon_pid(proc)).get("VmRSS", 0) * 1024  # KiB
        peak = max(peak, last)
        if any((mnt / "rss/@versions").iterdir()):
            return peak, last
        time.sleep(0.05)
    raise BenchError("the 8-connection download did not end in time")


def daemon_pid(proc: subprocess.Popen[bytes]) -> int:
    """nsenter execs the daemon: same PID."""
    return proc.pid


def make_zip(path: Path, size: int) -> int:
    member = min(size // 4, 256 * MiB)
    block = os.urandom(MiB)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(max(1, size // member)):
            with z.open(f"member{i}.bin", "w", force_zip64=True) as f:
                for _ in range(member // MiB):
                    f.write(block)
    return path.stat().st_size


def row(name: str, value: str, against: str, target: str, ok: bool | None) -> None:
    verdict = "SKIP" if ok is None else ("PASS" if ok else "MISS")
    print(f"{name:<44} {value:>12}  {against:<34} {target:<24} {verdict}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wan", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G", help="the file fetched (default 1G)")
    p.add_argument("--rss-size", default="4G", help="the file of the RSS row (default 4G)")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--rate", default="25m", help="nginx limit_rate per connection")
    p.add_argument("--workdir", default="/var/tmp")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.wan needs root (a network namespace)", file=sys.stderr)
        return 2
    size, rss_size, n = parse_size(args.size), parse_size(args.rss_size), args.connections
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    work = Path(tempfile.mkdtemp(prefix="buffy-wan-", dir=args.workdir))
    try:
        root = work / "root"
        root.mkdir()
        make_random_file(root / "big", size)
        make_random_file(root / "huge", rss_size)
        zsize = make_zip(root / "big.zip", size)
        print(f"WAN profile: nginx limit_rate {args.rate} per connection, own network "
              f"namespace; {human(size)} file, {n} connections", flush=True)
        print(f"{'figure':<44} {'value':>12}  {'against':<34} {'target':<24}", flush=True)
        with namespace() as ns:
            with nginx(ns, root, work / "nginx-wan", args.rate) as base:
                url = f"{base}/big"
                curl = fetch_curl(ns, work, url)
                aria = fetch_aria2(ns, work, url, n)
                ours = fetch_buffyfs(ns, work, url, n)
                row("first fetch, WAN: buffyfs fetch", f"{ours:.1f} s",
                    f"curl {curl:.1f} s ({curl / ours:.2f}x)", ">= 3x curl", curl / ours >= 3)
                row("first fetch, WAN: against aria2c", f"{ours:.1f} s",
                    "aria2c missing" if aria is None else
                    f"aria2c -x{n} {aria:.1f} s ({aria / ours:.2f}x)", ">= 0.9x aria2c",
                    None if aria is None else aria / ours >= 0.9)
                with mounted(ns, work) as (mnt, _cache, proc):
                    ttfb = first_byte(mnt, url)
                    row("first byte of latest, new source, WAN", f"{ttfb:.2f} s", "",
                        "< 0.5 s", ttfb < 0.5)
                    listing = unzip_listing(mnt, f"{base}/big.zip", zsize)
                    row("unzip -l of a zip still downloading, WAN", f"{listing:.2f} s", "",
                        "< 2 s", listing < 2)
                    peak, last = rss_during(mnt, proc, f"{base}/huge")
                    row(f"RSS, 8 connections, {human(rss_size)}", f"{peak / MiB:.0f} MiB",
                        f"at the end {last / MiB:.0f} MiB", "< 100 MiB, flat",
                        peak < 100 * MiB)
            with nginx(ns, root, work / "nginx-lo", None) as base:
                url = f"{base}/big"
                curl = fetch_curl(ns, work, url)
                ours = fetch_buffyfs(ns, work, url, n)
                row("first fetch, loopback nginx", f"{ours:.1f} s",
                    f"curl {curl:.1f} s ({curl / ours:.2f}x)", ">= 0.8x curl", curl / ours >= 0.8)
        return 0
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        print(f"bench.wan: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
