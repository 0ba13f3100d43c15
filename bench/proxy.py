"""The proxy's figures (issue 16), against nginx serving the same files statically in the
same run.

    python -m bench.proxy                 # 1 GiB version, 1,000 small URLs (~1 min)
    python -m bench.proxy --smoke         # tiny sizes, seconds: proves the script runs
    python -m bench.proxy --size 256M --small 500 --runs 3

One ``buffyfs serve`` with ``[proxy] allow = ["http://127.0.0.1:9/*"]`` answers every
figure. Its cache is built through the index beforehand: each URL is already a source
(named as the proxy names it) with one version, ``refresh = "never"``, so nothing is
downloaded and the figures measure cached answers. Port 9 (discard) is never contacted.
Clients are ``curl -x`` processes, each reusing its connection to the proxy for all its
URLs; everything runs on 127.0.0.1 in a fresh directory under ``--workdir``, removed at
the end, and every process is ended by its PID.

| figure | measured | compared with | target |
|---|---|---|---|
| proxy-1 | one ``curl -x`` of a cached 1 GiB URL | nginx static, same file | >= 0.5x |
| proxy-small | 1,000 cached small URLs, 8 curl clients at once, requests/s | | >= 2000/s |

Two rows more say what the server costs without the proxy, in the same run:
``serve-1`` and ``serve-small`` are the same answers as ``GET /NAME/latest``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/proxy.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BenchError,
    MiB,
    NginxOrigin,
    add_versions,
    end_process,
    free_port,
    human,
    make_random_file,
    parse_size,
    port_up,
    report,
    wait_until,
)

ORIGIN = "http://127.0.0.1:9"  # discard: never contacted, every URL is cached
CLIENTS = 8
SMALL_SIZE = 1024
CURL_TIMEOUT = 600.0


def build_cache(cache: Path, files: dict[str, tuple[Path, str]]) -> None:
    """One source per URL path of ``files`` (path -> (content, sha256)), named as the
    proxy names it, with the content as its one version (through the index API)."""
    urls = {name_of(path): f"{ORIGIN}/{path}" for path in files}
    add_versions(cache, [(name_of(path), content, sha)
                         for path, (content, sha) in files.items()], ORIGIN, urls)


def name_of(path: str) -> str:
    from buffyfs.http.proxy import source_name

    return source_name(f"{ORIGIN}/{path}")


def curl_proxy(proxy: str | None, urls: list[str]) -> subprocess.Popen[bytes]:
    """One curl for ``urls`` (one connection, reused), printing code and size of each."""
    args = [a for u in urls for a in ("-o", "/dev/null", u)]
    via = ["-x", proxy] if proxy else []
    return subprocess.Popen(["curl", "-sS", *via, "-w", "%{http_code} %{size_download}\n",
                             *args], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})


def timed_clients(proxy: str | None, per_client: list[list[str]], expected: int) -> float:
    """Seconds for one curl per list of URLs, all at once; BenchError unless every
    answer was 200 with ``expected`` bytes."""
    began = time.perf_counter()
    procs = [curl_proxy(proxy, urls) for urls in per_client]
    lines: list[str] = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=CURL_TIMEOUT)
            lines += out.decode(errors="replace").splitlines()
    finally:
        for p in procs:
            end_process(p)
    took = time.perf_counter() - began
    wanted = sum(len(u) for u in per_client)
    bad = [line for line in lines if line != f"200 {expected}"]
    if len(lines) != wanted or bad:
        raise BenchError(f"{len(lines)}/{wanted} answers, unexpected: {sorted(set(bad))[:5]}")
    return took


def run(size: int, small: int, runs: int, workdir: Path) -> list[tuple[str, str, str, str, str]]:
    work = Path(tempfile.mkdtemp(prefix="buffyfs-bench-proxy-", dir=workdir))
    server = static = None
    rows = []
    try:
        root = work / "files"
        (root / "s").mkdir(parents=True)
        print(f"writing {human(size)} + {small} x {human(SMALL_SIZE)} of random bytes",
              flush=True)
        files = {"big": (root / "big", make_random_file(root / "big", size))}
        for i in range(small):
            data = os.urandom(SMALL_SIZE)
            (root / "s" / f"f{i}").write_bytes(data)
            files[f"s/f{i}"] = (root / "s" / f"f{i}", hashlib.sha256(data).hexdigest())
        cache = work / "cache"
        build_cache(cache, files)
        port = free_port()
        config = work / "buffyfs.toml"
        config.write_text(f'[serve]\nlisten = "127.0.0.1:{port}"\n\n'
                          f'[proxy]\nallow = ["{ORIGIN}/*"]\n')
        with open(work / "serve.log", "ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "buffyfs", "serve", "--cache", str(cache), "--config",
                 str(config), "--log-level", "warning", "--scrub-interval", "never"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        if not wait_until(lambda: server.poll() is not None or port_up(port), 30) \
                or server.poll() is not None:
            raise BenchError("buffyfs serve did not start: "
                             + (work / "serve.log").read_text(errors="replace")[-2000:])
        proxy = f"http://127.0.0.1:{port}"
        static = NginxOrigin(root, work / "static").start()

        def best(measure) -> float:  # median of ``runs``
            return statistics.median(measure() for _ in range(runs))

        # 1. one client, the big cached URL through the proxy, against nginx static
        timed_clients(None, [[static.url_for("big")]], size)  # warm everything once
        timed_clients(proxy, [[f"{ORIGIN}/big"]], size)
        t_static = best(lambda: timed_clients(None, [[static.url_for("big")]], size))
        t_proxy = best(lambda: timed_clients(proxy, [[f"{ORIGIN}/big"]], size))
        direct = f"{proxy}/{name_of('big')}/latest"
        t_direct = best(lambda: timed_clients(None, [[direct]], size))
        rate = lambda t: f"{size / t / MiB:.0f} MiB/s"  # noqa: E731
        rows.append(("proxy-1", rate(t_proxy), rate(t_static), f"{t_static / t_proxy:.2f}x",
                     ">= 0.5x"))
        rows.append(("serve-1", rate(t_direct), rate(t_static), f"{t_static / t_direct:.2f}x",
                     "info"))
        # 2. every small URL, 8 clients at once, each its own order of all of them
        urls = [f"{ORIGIN}/s/f{i}" for i in range(small)]
        orders = [random.Random(c).sample(urls, len(urls)) for c in range(CLIENTS)]
        timed_clients(proxy, [urls], SMALL_SIZE)  # warm: every lookup once
        took = best(lambda: timed_clients(proxy, orders, SMALL_SIZE))
        per_second = CLIENTS * small / took
        rows.append(("proxy-small", f"{per_second:.0f}/s", "", "", ">= 2000/s"))
        # the same answers as GET /NAME/latest, without the proxy: what the server costs
        names = [[f"{proxy}/{name_of(u.removeprefix(ORIGIN + '/'))}/latest" for u in order]
                 for order in orders]
        took = best(lambda: timed_clients(None, names, SMALL_SIZE))
        rows.append(("serve-small", f"{CLIENTS * small / took:.0f}/s", "", "", "info"))
        return rows
    except BaseException:
        log_path = work / "serve.log"
        if log_path.exists():
            print("the server's log ends:\n"
                  + log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        if static is not None:
            static.stop()
        if server is not None:
            end_process(server)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1G"))
    p.add_argument("--small", type=int, default=1000, help="small cached URLs")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one run")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.small, args.runs = 16 * MiB, 50, 1
    return report("bench.proxy", lambda: run(args.size, args.small, args.runs, args.workdir),
                  lambda figure: figure.endswith("-small"))


if __name__ == "__main__":
    sys.exit(main())
