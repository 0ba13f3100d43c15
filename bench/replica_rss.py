"""A replica's memory with many mirrored sources (issue 15: < 100 MiB RSS with 10,000).

    python -m bench.replica_rss                 # 10,000 sources
    python -m bench.replica_rss --sources 500   # smaller, seconds

A hub cache is written through the index (bench.common.populate: one version per
source, no blob files: nothing is read), served by ``buffyfs serve`` on 127.0.0.1; a
replica (``buffyfs mount --upstream``, ``prefetch = "none"``) mirrors it. Printed: the
seconds until the replica's mount lists every source, and the replica daemon's VmRSS
and VmHWM once it is idle. Everything runs in a temporary directory, removed at the
end; every process is ended by its PID.
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
    end_process,
    free_port,
    handle_sigterm,
    populate,
    proc_status,
    wait_until,
)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sources", type=int, default=10_000)
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    handle_sigterm()  # a SIGTERM still ends the daemons (the finally below)
    work = Path(tempfile.mkdtemp(prefix="bench-replica-"))
    hub = replica = None
    try:
        from buffyfs.index import Index

        index = Index(work / "hub" / "index")
        populate(index, args.sources, 1, size=1000, options={"refresh": "never"},
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
        config = work / "replica.toml"
        config.write_text('[daemon]\nprefetch = "none"\n')
        replica = Daemon(work / "mnt", work / "replica", work / "replica.log",
                         ("--upstream", url, "--config", str(config)))
        started = replica.wait_mounted()
        mirrored = wait_until(lambda: len(os.listdir(replica.mnt)) >= args.sources + 2,
                              args.timeout, interval=0.5)  # + @status, @control
        took = time.monotonic() - started
        replica.check_alive()
        replica.settle(quiet=1.0)
        mem = proc_status(replica.pid)
        print(f"sources: {args.sources}; mirrored: {'yes' if mirrored else 'NO'} "
              f"after {took:.1f}s")
        print(f"replica VmRSS {mem.get('VmRSS', 0) / 1024:.1f} MiB, "
              f"VmHWM {mem.get('VmHWM', 0) / 1024:.1f} MiB (target: < 100 MiB)")
        return 0 if mirrored else 1
    finally:
        if replica is not None:
            replica.stop()
        if hub is not None:
            end_process(hub)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
