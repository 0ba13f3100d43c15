"""The status page of a big cache: how long ``GET /`` takes with 10,000 sources.

    python -m bench.status_page [--sources 10000] [--runs 5] [--workdir /var/tmp]

Builds a cache of N sources straight in the index (no origin: each has one version
of the same small blob and refresh ``never``; one in fifty fails, one in a hundred
has every version tagged failed), starts ``buffyfs serve`` on 127.0.0.1 and times,
from a client on the same machine, the first page of ``/``, a search, the last page,
and one source's page: the median of ``--runs`` requests each (a page is built
for every request, from rows the server keeps until the index changes: the
``(first)`` row is the first request after the start, which decodes every source; the
``(cold)`` row writes one source's state before each request, so its page scans the
index again and decodes that source). Everything runs in a fresh
directory, removed at the end; the server is ended by its PID. tests/test_status_page.py
uses ``fill_cache`` and checks the first figure against the issue's 1 s.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from buffyfs.options import normalize_options
from buffyfs.store.cache import Cache
from buffyfs.store.index import Index, now_utc, rfc3339, version_id
from buffyfs.store.records import InodeRef, Version

BLOB = b"status page bench\n" * 64
SERVE_TIMEOUT = 30.0


def fill_cache(root: Path, count: int, url: str = "http://127.0.0.1:9/data") -> None:
    """``count`` sources named ``s00000``..., with one version each of one real blob."""
    cache = Cache(root)
    try:
        sha = hashlib.sha256(BLOB).hexdigest()
        partial = cache.blobs.partial_path("bench")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(BLOB)
        cache.blobs.commit_partial(partial, sha)
        options = normalize_options({"refresh": "never"})
        now = now_utc()
        with cache.index.write() as w:
            for i in range(count):
                name = f"s{i:05d}"
                w.add_source(name, f"{url}/{name}?i={i}", options)
                fetched = now - timedelta(minutes=i % 5000)
                stamp = rfc3339(fetched)
                vid = version_id(fetched, sha)
                ino = w.alloc_inodes(1)
                tags = ["failed"] if i % 100 == 7 else []
                w.put_version(name, Version(id=vid, sha256=sha, size=len(BLOB),
                                            fetched_at=stamp, url=f"{url}/{name}",
                                            content_type="text/plain", ino=ino, tags=tags))
                w.put_inode(ino, InodeRef(kind="version", source=name, id=vid))
                w.ref_blob(sha, len(BLOB))
                failing = i % 50 == 3
                w.put_state(name, last_check=stamp, last_success=stamp,
                            consecutive_failures=2 if failing else 0,
                            last_error={"at": stamp, "message": "HTTP 503 Service Unavailable"}
                            if failing else None)
    finally:
        cache.close()


def timed_get(url: str, path: str) -> float:
    host, port = re.match(r"https?://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        started = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        took = time.perf_counter() - started
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status}")
        return took
    finally:
        conn.close()


def serve(cache: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "buffyfs", "serve", "--cache", str(cache),
                                 "--listen", "127.0.0.1:0"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out)
    deadline = time.monotonic() + SERVE_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"serving HTTP on (https?://\S+)", log.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"the server did not start: {log.read_text(errors='replace')[-500:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="buffy-page-", dir=args.workdir) as tmp:
        cache = Path(tmp) / "cache"
        fill_cache(cache, args.sources)
        proc, url = serve(cache, Path(tmp) / "serve.log")
        try:
            first = timed_get(url, "/")  # every source decoded
            print(f"{'/ (first)':<16} {args.sources} sources: {first * 1000:7.1f} ms")
            index = Index(cache / "index")
            cold = []
            for i in range(args.runs):  # a change in the index first: the page reads it all
                index.set_state("s00000", next_check=f"2099-01-01T00:00:{i:02d}Z")
                cold.append(timed_get(url, "/"))
            index.close()
            print(f"{'/ (cold)':<16} {args.sources} sources: median "
                  f"{statistics.median(cold) * 1000:7.1f} ms  (min {min(cold) * 1000:.1f}, "
                  f"max {max(cold) * 1000:.1f})")
            last = -(-args.sources // 100)
            for label, path in (("/", "/"), ("/?q=s0999", "/?q=s0999"),
                                (f"/?page={last}", f"/?page={last}"), ("/s00042/", "/s00042/")):
                times = [timed_get(url, path) for _ in range(args.runs)]
                median = statistics.median(times) * 1000
                print(f"{label:<16} {args.sources} sources: median {median:7.1f} ms"
                      f"  (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f})")
        finally:
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
