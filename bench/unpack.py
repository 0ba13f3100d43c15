"""Benchmark: unpacked views (issue 17's table), and the choice of representation.

Makes a text-like file of ``--size`` bytes (default 1 GiB) and gzips it with the
system's ``gzip -6``, and a tar.gz of ``--members`` small files (default 100,000);
serves both from an HTTP origin in a thread, mounts (``buffyfs mount --foreground``,
a subprocess) and measures:

- ``unpack``: the daemon's unpack of the gzip, from the version appearing in
  ``@status`` to its view ``done`` (polled every 20 ms), against ``gzip -dc FILE > OUT``
  on the same disk;
- ``cat``: ``cat SOURCE/@unpacked/latest`` warm (3rd to 5th read, median) against
  ``zcat SOURCE/latest`` warm (what a reader does without the view);
- ``read-4k``: 4 KiB reads at 1,000 random offsets of the view (median, ms);
- ``list``: walking the tar.gz view of ``--members`` members (os.walk, first walk
  after the mount) against the same walk of the same tree extracted to disk;
- the representation (``repr-*``, info): the same 4 KiB random reads and a sequential
  read through indexed_gzip's seek-point index (when installed), which is what a view
  without the decompressed derived file would cost.

Exit status 0 whatever the figures, 1 if the benchmark failed, 2 on bad arguments.
Everything is removed at the end; the mount is unmounted and every process ended by
its PID.

    python -m bench.unpack [--size 1G | --smoke] [--members N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/unpack.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402 - after the path fix above
    BenchError,
    Daemon,
    Origin,
    cli,
    human,
    parse_size,
    read_status,
    timed_cat,
    wait_until,
)

RUNS = 3
RANDOM_READS = 1000


def make_text(path: Path, size: int) -> None:
    """Text-like bytes (words, spaces, newlines): gzip -6 takes them to ~30 %."""
    rng = random.Random(17)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 12)))
             for _ in range(20000)]
    block = bytearray()
    while len(block) < 8 << 20:
        block += b" ".join(rng.choices(words, k=12)) + b"\n"
    with open(path, "wb") as f:
        left = size
        while left:
            piece = bytes(block[: min(left, len(block))])
            f.write(piece)
            left -= len(piece)
            rng.shuffle(words)  # the next block differs (gzip's window is 32 KiB anyway)


def make_tgz(path: Path, members: int) -> None:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for i in range(members):
            info = tarfile.TarInfo(f"d{i % 100:02d}/f{i:07d}.txt")
            body = b"%d\n" % i
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


def wait_view(mnt: Path, name: str, timeout: float) -> tuple[float, dict]:
    """Wait for the source's version, then for its view; (seconds between, status)."""
    appeared: float | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = read_status(mnt, name)
        if st["versions"] and appeared is None:
            appeared = time.monotonic()
        unpack = st["versions"][0].get("unpack") if st["versions"] else None
        if unpack and unpack["state"] in ("done", "error"):
            if unpack["state"] == "error":
                raise BenchError(f"{name}: unpack failed: {st['versions'][0]['unpack_error']}")
            return time.monotonic() - (appeared or time.monotonic()), st
        time.sleep(0.02)
    raise BenchError(f"{name}: no unpacked view within {timeout:.0f}s")


def random_reads(path: Path, size: int, reads: int = RANDOM_READS) -> float:
    """Median milliseconds of a 4 KiB read at a random offset."""
    rng = random.Random(5)
    times = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(reads):
            off = rng.randrange(max(1, size - 4096))
            t0 = time.perf_counter()
            if len(os.pread(fd, 4096, off)) != min(4096, size - off):
                raise BenchError(f"short read at {off} of {path}")
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return statistics.median(times) * 1000


def walk_count(root: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    count = sum(len(files) for _d, _s, files in os.walk(root))
    return time.perf_counter() - t0, count


def timed(cmd: str, timeout: float = 3600) -> float:
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", cmd], check=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def indexed_gzip_figures(gz: Path, size: int) -> dict[str, float] | None:
    """The seek-point alternative: build time, 4 KiB random read median (ms), MB/s of a
    sequential read. None when indexed_gzip is not installed."""
    try:
        import indexed_gzip
    except ImportError:
        return None
    out = {}
    t0 = time.perf_counter()
    f = indexed_gzip.IndexedGzipFile(str(gz), spacing=1 << 20)
    f.build_full_index()
    out["build_s"] = time.perf_counter() - t0
    rng = random.Random(5)
    times = []
    for _ in range(200):
        off = rng.randrange(max(1, size - 4096))
        t0 = time.perf_counter()
        f.seek(off)
        f.read(4096)
        times.append(time.perf_counter() - t0)
    out["read4k_ms"] = statistics.median(times) * 1000
    f.seek(0)
    t0 = time.perf_counter()
    while f.read(1 << 20):
        pass
    out["seq_mbs"] = size / (time.perf_counter() - t0) / 1e6
    f.close()
    return out


def row(name: str, value: str, limit: str, ratio: str, target: str, verdict: str) -> None:
    print(f"| {name} | {value} | {limit} | {ratio} | {target} | {verdict} |", flush=True)


def run(size: int, members: int, workdir: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-unpack-", dir=workdir))
    daemon = None
    origin = None
    try:
        print(f"making a {human(size)} text file, its gzip and a tar.gz of {members} "
              "members...", flush=True)
        text, gz, tgz = work / "big.txt", work / "big.txt.gz", work / "many.tar.gz"
        make_text(text, size)
        subprocess.run(["sh", "-c", f"gzip -6 -c {text} > {gz}"], check=True)
        make_tgz(tgz, members)
        extracted = work / "extracted"
        extracted.mkdir()
        subprocess.run(["tar", "xzf", str(tgz), "-C", str(extracted)], check=True)
        origin = Origin({"big": gz, "many": tgz}).start()
        cache, mnt = work / "cache", work / "mnt"
        cli(cache, "add", "big", origin.url_for("big"), "--refresh", "never")
        cli(cache, "add", "many", origin.url_for("many"), "--refresh", "never")
        daemon = Daemon(mnt, cache, work / "daemon.log")
        daemon.wait_mounted()
        unpack_s, _ = wait_view(mnt, "big", 3600)
        list_unpack_s, _ = wait_view(mnt, "many", 3600)
        gzip_s = min(timed(f"gzip -dc {gz} > {work / 'gzip-out'}") for _ in range(RUNS))
        (work / "gzip-out").unlink()
        view, version = mnt / "big/@unpacked/latest", mnt / "big/latest"
        walk_first, count = walk_count(mnt / "many/@unpacked/latest")
        if count != members:
            raise BenchError(f"the view lists {count} members, not {members}")
        walk_again, _ = walk_count(mnt / "many/@unpacked/latest")
        walk_plain = min(walk_count(extracted)[0] for _ in range(RUNS))
        cats = [timed_cat([view], 3600) for _ in range(RUNS + 2)][2:]
        zcats = [timed(f"zcat {version} > /dev/null") for _ in range(RUNS)]
        read4k = random_reads(view, size)
        ig = indexed_gzip_figures(gz, size)
        daemon.check_alive()
        cat_s, zcat_s = statistics.median(cats), statistics.median(zcats)
        print()
        print(f"gzip {human(gz.stat().st_size)} -> {human(size)}; tar.gz of {members} "
              f"members unpacked in {list_unpack_s:.1f}s")
        print("| figure | measured | limit | ratio | target | |")
        print("|---|---|---|---|---|---|")
        row("cat @unpacked/latest, warm", f"{cat_s:.2f} s ({size / cat_s / 1e6:.0f} MB/s)",
            f"zcat latest {zcat_s:.2f} s", f"{zcat_s / cat_s:.1f}x", ">= 3x zcat",
            "PASS" if zcat_s / cat_s >= 3 else "MISS")
        row("4 KiB read at a random offset", f"{read4k:.3f} ms (median of {RANDOM_READS})",
            "", "", "< 10 ms", "PASS" if read4k < 10 else "MISS")
        row(f"listing a tar.gz of {members} members", f"{walk_first:.2f} s (again "
            f"{walk_again:.2f} s)", f"extracted on disk {walk_plain:.2f} s", "", "< 1 s",
            "PASS" if walk_first < 1 else "MISS")
        row("unpack throughput of gzip", f"{unpack_s:.1f} s ({size / unpack_s / 1e6:.0f} "
            "MB/s)", f"gzip -dc > file {gzip_s:.1f} s", f"{gzip_s / unpack_s:.2f}x",
            ">= 0.8x gzip -dc", "PASS" if gzip_s / unpack_s >= 0.8 else "MISS")
        if ig:
            row("repr: indexed_gzip 4 KiB random read", f"{ig['read4k_ms']:.2f} ms", "", "",
                "info", "")
            row("repr: indexed_gzip sequential read", f"{ig['seq_mbs']:.0f} MB/s "
                f"(index built in {ig['build_s']:.1f} s)",
                f"derived file {size / cat_s / 1e6:.0f} MB/s", "", "info", "")
        else:
            print("(indexed_gzip not installed: no repr-* rows)")
    finally:
        if daemon is not None:
            daemon.stop()
        if origin is not None:
            origin.stop()
        wait_until(lambda: True, 0)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unpack", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--size", type=parse_size, default=1 << 30,
                   help="decompressed size of the gzip (default 1G)")
    p.add_argument("--members", type=int, default=100_000, help="members of the tar.gz")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: proves it runs")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.members = 8 << 20, 2000
    try:
        run(args.size, args.members, args.workdir)
    except BenchError as e:
        print(f"bench.unpack: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
