"""contrib/nginx: nginx in front of `buffyfs serve`, sending version bytes straight
from the blob files (X-Accel-Redirect), with the blob directory opened to the nginx
workers by contrib/nginx/blob-access.sh and nothing else of the cache."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from bench.common import nginx_conf
from tests.conftest import http_request, wait_for
from tests.test_serve import BODY, add_source

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "nginx"
WORKER = ("nobody", "nogroup")

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None and not
                                os.path.exists("/usr/sbin/nginx"),
                                reason="nginx is not installed (scripts/install.sh installs "
                                       "nginx-light)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx on 127.0.0.1 with its own prefix, ended by its PID."""

    def __init__(self, prefix: Path, cache: Path, upstream: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for d in ("tmp", "logs"):
            (prefix / d).mkdir(parents=True, exist_ok=True)
        site = (CONTRIB / "buffyfs.conf").read_text()
        site = site.replace("127.0.0.1:8631", upstream).replace("/var/cache/buffyfs", str(cache))
        site = re.sub(r"listen 8080;", f"listen 127.0.0.1:{self.port};", site)
        (prefix / "buffyfs.conf").write_text(site)
        (prefix / "nginx.conf").write_text(nginx_conf(
            prefix, prefix / "buffyfs.conf", workers=1, user=f"{WORKER[0]} {WORKER[1]}"))
        self.log = prefix / "logs" / "error.log"
        self.proc = subprocess.Popen(
            ["nginx", "-p", f"{prefix}/", "-e", str(self.log), "-c", str(prefix / "nginx.conf")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: self.proc.poll() is not None or _listening(self.port), 15,
                     what="nginx")
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited: {self.proc.stderr.read().decode()}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown; workers end with it
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def as_worker(*cmd: str) -> subprocess.CompletedProcess[bytes]:
    """Run a command with the nginx workers' user and group."""
    return subprocess.run(["setpriv", f"--reuid={WORKER[0]}", f"--regid={WORKER[1]}",
                           "--clear-groups", *cmd], capture_output=True, timeout=30)


@pytest.fixture
def public_tmp():
    """A directory the nginx workers may traverse (pytest's own are private)."""
    base = Path(tempfile.mkdtemp(prefix="buffyfs-nginx-", dir="/var/tmp"))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_nginx_sends_the_bytes_buffyfs_resolves(serve_factory, cli, origin, public_tmp,
                                                tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: nginx workers run as nobody")
    cache = public_tmp / "cache"
    cache.mkdir(mode=0o700)
    server = serve_factory(cache=cache)
    vid = add_source(server, cli_for(cache), origin)
    subprocess.run([str(CONTRIB / "blob-access.sh"), str(cache), WORKER[1]], check=True,
                   timeout=30)
    nginx = Nginx(tmp_path / "nginx", cache, f"127.0.0.1:{server.port}")
    try:
        sha = hashlib.sha256(BODY).hexdigest()
        served_before = _bytes_served(server)
        status, h, body = http_request(nginx.url, "/t/latest")
        assert status == 200 and body == BODY
        assert h["etag"] == f'"{sha}"' and h["x-buffy-version"] == vid
        assert h["x-buffy-stale"] == "0" and h["cache-control"] == "no-cache"
        assert h["content-length"] == str(len(BODY)) and h["accept-ranges"] == "bytes"
        assert "last-modified" in h and "x-accel-redirect" not in h
        assert h["content-type"] == "application/x-test"
        status, h, body = http_request(nginx.url, f"/t/@versions/{vid}",
                                       headers={"Range": "bytes=-100"})
        assert status == 206 and body == BODY[-100:]
        assert h["cache-control"] == "public, max-age=31536000, immutable"
        assert http_request(nginx.url, "/t/latest", headers={"If-None-Match": f'"{sha}"'}
                            )[0] == 304
        assert http_request(nginx.url, "/t/latest", headers={"Range": "bytes=999999999-"}
                            )[0] == 416
        assert http_request(nginx.url, "/t/latest", method="HEAD")[1]["content-length"] == \
            str(len(BODY))
        assert _bytes_served(server) == served_before  # nginx sent them, not buffyfs
        # the rest goes through buffyfs as it is
        assert http_request(nginx.url, "/nope/latest")[0] == 404
        assert http_request(nginx.url, "/t/@status")[0] == 200
        # the blob location is internal, and nothing but blobs is readable to nginx
        for path in (f"/_buffy_blobs/{sha[:2]}/{sha}", "/_buffy_blobs/../index/data.mdb",
                     "/_buffy_blobs/"):
            assert http_request(nginx.url, path)[0] == 404, path
        assert as_worker("cat", str(cache / "blobs" / sha[:2] / sha)).stdout == BODY
        for denied in (["cat", str(cache / "index" / "data.mdb")], ["ls", str(cache)],
                       ["ls", str(cache / "blobs")], ["ls", str(cache / "index")]):
            assert as_worker(*denied).returncode != 0, denied
        # buffyfs keeps working on the opened cache: a new version, through nginx at once
        origin.set("/t", b"new bytes")
        cli_for(cache)("refresh", "t", check=True)
        wait_for(lambda: http_request(nginx.url, "/t/latest")[2] == b"new bytes",
                 what="the new version through nginx")
    finally:
        nginx.close()
    assert "[crit]" not in nginx.log.read_text() and "[alert]" not in nginx.log.read_text()


def cli_for(cache: Path):
    from tests.conftest import run_cli

    def run(*args: str, check: bool = False):
        return run_cli(*args, cache=cache, check=check)
    return run


def _bytes_served(server) -> float:
    text = http_request(server.url, "/@metrics")[2].decode()
    return float(re.search(r"^buffyfs_bytes_served_total (\S+)", text, re.M).group(1))
