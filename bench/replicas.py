"""Replicas across hosts (issue 15): a hub, one nginx cache
(contrib/nginx/replica-cache.conf) and N replicas, each in a network namespace of its
own (tests/hosts.py), each replica's daemon mounting its own FUSE filesystem.

    python -m bench.replicas                      # 1 GiB, 8 replicas, 20 tags (root)
    python -m bench.replicas --size 256M --replicas 4
    python -m bench.replicas --smoke              # tiny: checks the script runs
    python -m bench.replicas --link-rate 200mbit  # each replica's link shaped (tc tbf)

Prints the issue's figures:

- fan-out: N replicas (``prefetch = none``) reading a new version's file at once
  through the cache (timed from the open, where the fetch happens, to the last byte): the bytes the hub sent (its interface's counter), and the slowest
  replica's read against one replica alone reading another new version of the same size
  (cold cache both times). With ``--link-rate``, each replica host's link is shaped
  to that rate both ways (``tc tbf``; the hub-to-cache link is not): the network, as
  between real machines, is the bottleneck, not the replicas' hashing sharing this
  machine's cores;
- propagation: a tag at the hub until it shows on every replica (p50, p99 over all
  replicas and tags);
- first read of a version the replica holds, against the same read on a plain mount
  (the warm-read figure: backing file in the page cache, every read through Python):
  the median of HELD_ROUNDS reads each, the mounts taking turns to read first, the
  kernel's pages of the mount's file dropped before each read.

The fourth figure of the issue, a replica's RSS with 10,000 mirrored sources, is
bench/replica_rss.py's. Needs root (namespaces), iproute2, nginx, curl, fuse3; traffic
stays inside the benchmark's namespaces. Everything is removed at the end: mounts,
processes (by PID), namespaces, the work directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    BenchError,
    handle_sigterm,
    human,
    make_random_file,
    parse_size,
    timed_read,
)
from tests.hosts import Host, Network, available
from tests.hubs import ORIGIN_PORT, Hub, NginxCache, Replica, buffyfs

MiB = 1 << 20
READ_TIMEOUT = 900.0
HELD_ROUNDS = 5  # first reads of a held version timed on the replica and a plain mount


def tx_bytes(host: Host) -> int:
    """Bytes ``host`` has sent on its eth0 (its own /proc/net/dev), headers included."""
    dev = host.run(["cat", "/proc/net/dev"], check=True).stdout.decode()
    return int(dev.split("eth0:")[1].split()[8])


def wait(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def read_status(replica: Replica, name: str) -> dict:
    try:
        return replica.status(name)
    except (OSError, ValueError):
        return {}


def new_version(hub: Hub, work: Path, size: int) -> str:
    """A fresh random file of ``size`` at the hub's origin, committed by the hub."""
    tmp = work / "body"
    make_random_file(tmp, size)
    old = hub.status("t")["latest"] if (hub.files / "t").exists() else None
    stamp = max(time.time(), (hub.files / "t").stat().st_mtime + 1.5
                if (hub.files / "t").exists() else 0)
    os.replace(tmp, hub.files / "t")
    os.utime(hub.files / "t", (stamp, stamp))
    if old is None:
        hub.cli("add", "t", f"http://127.0.0.1:{ORIGIN_PORT}/t", "--refresh", "never")
    else:
        hub.cli("refresh", "t")
    return hub.wait_latest("t", lambda v: v is not None and v != old, timeout=READ_TIMEOUT)


def first_read(path: Path, size: int) -> float:
    """Seconds from the open of a version not held yet to its last byte: the open is
    where a replica fetches (or starts streaming) the blob, so it counts."""
    started = time.perf_counter()
    timed_read(path, size)
    return time.perf_counter() - started


def timed_reads(paths: list[Path], size: int) -> list[float]:
    """Every path read at once (one thread each), open included: seconds each took."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(lambda p: first_read(p, size), paths))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(size: int, replicas: int, tags: int, work: Path, link_rate: str | None = None
        ) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    net = Network()

    def replica_host(name: str) -> Host:
        host = net.add(name)
        if link_rate:
            host.limit_link(link_rate)
        return host

    try:
        hub = Hub(net.add("hub"), work / "hub", 'control_tokens = ["bench-token"]\n')
        cache = NginxCache(net.add("cache"), work / "nginx", hub.url)
        alone_v = new_version(hub, work, size)
        config = '[daemon]\nprefetch = "none"\n'
        alone = Replica(replica_host("alone"), work / "alone", cache.url, config=config)
        wait(lambda: read_status(alone, "t").get("latest") == alone_v, 30, "the alone replica")
        t_alone = first_read(alone / "t" / "@versions" / alone_v, size)
        alone.stop()
        many = [Replica(replica_host(f"r{i}"), work / f"r{i}", cache.url, config=config)
                for i in range(replicas)]
        sent_before = tx_bytes(hub.host)
        vid = new_version(hub, work, size)
        for r in many:
            wait(lambda r=r: read_status(r, "t").get("latest") == vid, 30, "the new version")
        times = timed_reads([r / "t" / "@versions" / vid for r in many], size)
        sent = tx_bytes(hub.host) - sent_before
        rows.append((f"hub-sent-{replicas}", human(sent), f"{sent / size:.2f}x", "<= 1.1x"))
        rows.append((f"slowest-of-{replicas}", f"{max(times):.2f}s",
                     f"{max(times) / t_alone:.2f}x", f"<= 2x alone ({t_alone:.2f}s)"))
        # propagation of a tag to every replica
        delays: list[float] = []
        for i in range(tags):
            tag = f"bench{i}"
            started = time.monotonic()
            done = hub.host.http(f"{hub.url}/t/@control", "--data-binary", f"tag {vid} {tag}",
                                 "-H", "Authorization: Bearer bench-token")
            if done[0] != 200:
                raise BenchError(f"the hub refused the tag: {done[0]} {done[2][:200]!r}")
            pending = set(range(replicas))
            while pending:
                for n in list(pending):
                    if (many[n] / "t" / f"@{tag}").exists():
                        delays.append(time.monotonic() - started)
                        pending.discard(n)
                if time.monotonic() - started > 30:
                    raise BenchError(f"tag {tag} not on every replica after 30 s")
                time.sleep(0.005)
        rows.append((f"tag-p50-{replicas}", f"{percentile(delays, 0.5):.3f}s", "", ""))
        rows.append((f"tag-p99-{replicas}", f"{percentile(delays, 0.99):.3f}s", "",
                     "<= 2 s"))
        # first read of a held version: replica against a plain mount of the same bytes
        for r in many[1:]:
            r.stop()
        held = Replica(net.add("held"), work / "held", cache.url)  # prefetch = latest
        wait(lambda: any(v["id"] == vid and not v.get("remote")
                         for v in read_status(held, "t").get("versions", [])),
             READ_TIMEOUT, "the replica holding the version")
        plain_host = net.add("plain")
        plain_mnt = work / "plain" / "mnt"  # a plain mount of the version's hub URL
        plain_mnt.mkdir(parents=True)
        plain_cache = work / "plain" / "cache"
        plain_host.run(buffyfs("add", "t", f"{hub.url}/t/@versions/{vid}", "--cache",
                               str(plain_cache)), check=True)
        plain_host.run(buffyfs("fetch", "t", "--cache", str(plain_cache)),
                       timeout=READ_TIMEOUT, check=True)
        proc = plain_host.popen(buffyfs("mount", str(plain_mnt), "--foreground", "--cache",
                                        str(plain_cache)), log=work / "plain" / "mount.log")
        net.finalizers.append(lambda: _unmount(plain_mnt))
        wait(lambda: (plain_mnt / "@status").exists() or proc.poll() is not None, 30,
             "the plain mount")
        prime(held.cache)
        prime(plain_cache)
        # Rounds, each mount reading first in turn (the machine is shared: one read
        # each says little); before each read the kernel's pages of the mount's file
        # are dropped, so that every read is a first read through the daemon.
        times: dict[str, list[float]] = {"held": [], "plain": []}
        files = [("held", held / "t" / "@versions" / vid), ("plain", plain_mnt / "t" / "latest")]
        for i in range(HELD_ROUNDS):
            for who, path in files if i % 2 == 0 else files[::-1]:
                forget_pages(path)
                times[who].append(timed_read(path, size))
        t_held, t_plain = (sorted(times[w])[len(times[w]) // 2] for w in ("held", "plain"))
        rows.append(("held-read", f"{size / t_held / 1e9:.2f}GB/s",
                     f"{t_held / t_plain:.2f}x", f"~1x plain ({size / t_plain / 1e9:.2f}GB/s)"))
    except AssertionError as e:  # the harness's bounded waits
        raise BenchError(str(e)) from None
    finally:
        net.close()
    return rows


def forget_pages(path: Path) -> None:
    """Drop the kernel's cached pages of ``path`` (a file of a mount): its next read
    goes through the daemon again, as a first read does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def prime(cache: Path) -> None:
    """Every blob of ``cache`` into the page cache (the warm-read setting)."""
    for blob in (cache / "blobs").rglob("*"):
        if blob.is_file():
            with open(blob, "rb") as f:
                while f.read(8 * MiB):
                    pass


def _unmount(path: Path) -> None:
    from tests.conftest import unmount
    unmount(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replicas",
                                description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1G"))
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--tags", type=int, default=20, help="tags timed for propagation")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: 8 MiB, 3 replicas")
    p.add_argument("--link-rate", metavar="RATE",
                   help="shape each replica's link to RATE both ways (tc tbf, e.g. 200mbit)")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.replicas, args.tags = 8 * MiB, 3, 3
    reason = available()
    if reason:
        print(f"bench.replicas: error: {reason}", file=sys.stderr)
        return 1
    handle_sigterm()
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-", dir=args.workdir))
    try:
        print(f"{args.replicas} replicas, {human(args.size)}, {args.tags} tags, replica links "
              f"{args.link_rate or 'not shaped'}", flush=True)
        rows = run(args.size, args.replicas, args.tags, work, args.link_rate)
    except BenchError as e:
        print(f"bench.replicas: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'figure':<16}{'measured':>14}{'ratio':>9}  target")
    for figure, measured, ratio, target in rows:
        print(f"{figure:<16}{measured:>14}{ratio:>9}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
