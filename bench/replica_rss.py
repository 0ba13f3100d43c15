"""A replica's memory with many mirrored sources (issue 15: < 100 MiB RSS with 10,000).

    python -m bench.replica_rss                 # 10,000 sources
    python -m bench.replica_rss --sources 500   # smaller, seconds

A hub cache is written through the index (bench.common.populate: one version per
source, no blob files: nothing is read), served by ``buffyfs serve`` on 127.0.0.1; a
replica (``buffyfs mount --upstream``, ``prefetch = "none"``), started once the hub
listens, mirrors it. Printed: the seconds until the replica's mount lists every source,
counted from the replica process's start and from its mount appearing (target: < 5 s
from the start), and the replica daemon's VmRSS once it is idle and its peak (VmHWM,
target: < 100 MiB). Everything runs in a temporary directory, removed at the end;
every process is ended by its PID.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    Daemon,
    cpu_seconds,
    end_process,
    free_port,
    handle_sigterm,
    populate,
    port_up,
    proc_status,
    wait_until,
)

START_TARGET = 5.0  # seconds from the replica's start until it lists the whole hub
RSS_TARGET = 100 << 10  # KiB of peak RSS


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sources", type=int, default=10_000)
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    handle_sigterm()  # a SIGTERM still ends the daemons (the finally below)
    work = Path(tempfile.mkdtemp(prefix="bench-replica-"))
    hub = replica = None
    try:
        from buffyfs.store.index import Index

        index = Index(work / "hub" / "index")
        names = populate(index, args.sources, 1, size=1000, options={"refresh": "never"},
                         sha256=lambda s, i: hashlib.sha256(f"{s}/{i}".encode()).hexdigest())
        index.close()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(work / "hub.log", "ab") as log:
            hub = subprocess.Popen(
                [sys.executable, "-m", "buffyfs", "serve", "--cache", str(work / "hub"),
                 "--listen", f"127.0.0.1:{port}", "--log-level", "warning",
                 "--scrub-interval", "never"],  # its blobs are not there: nothing to scrub
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        if not wait_until(lambda: port_up(port), 60.0):
            print("the hub did not listen within 60 s", file=sys.stderr)
            return 1
        config = work / "replica.toml"
        config.write_text('[daemon]\nprefetch = "none"\n')
        replica = Daemon(work / "mnt", work / "replica", work / "replica.log",
                         ("--upstream", url, "--config", str(config)))
        mounted = replica.wait_mounted()
        # The hub's sources arrive in name order: the last one's name shows the end (a
        # listing of thousands of names each poll would cost the daemon more than it)
        last = replica.mnt / max(names)
        arrived = wait_until(last.exists, args.timeout, interval=0.05)
        done, cpu = time.monotonic(), cpu_seconds(replica.pid)
        mirrored = arrived and wait_until(
            lambda: len(os.listdir(replica.mnt)) >= args.sources + 2, 10.0, interval=0.5)
        replica.check_alive()
        replica.settle(quiet=1.0)
        mem = proc_status(replica.pid)
        took = done - replica.started
        print(f"sources: {args.sources}; mirrored: {'yes' if mirrored else 'NO'} "
              f"{took:.1f}s after the replica's start ({done - mounted:.1f}s after its "
              f"mount appeared; target: < {START_TARGET:g}s from the start)"
              + ("" if took < START_TARGET else "  ABOVE TARGET"))
        print(f"replica CPU until then {cpu:.1f}s; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs")
        peak = mem.get("VmHWM", 0)
        print(f"replica VmRSS {mem.get('VmRSS', 0) / 1024:.1f} MiB idle (RssAnon "
              f"{mem.get('RssAnon', 0) / 1024:.1f}, RssFile {mem.get('RssFile', 0) / 1024:.1f}"
              f"), peak (VmHWM) {peak / 1024:.1f} MiB (target: < {RSS_TARGET >> 10} MiB)"
              + ("" if peak < RSS_TARGET else "  ABOVE TARGET"))
        return 0 if mirrored else 1
    finally:
        if replica is not None:
            replica.stop()
        if hub is not None:
            end_process(hub)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
