"""tests/hosts.py, the multi-host harness: hosts reach each other and only each other,
a link goes down and up, a slow link is slow, a mount made inside a host is the test's,
and nothing outlives the Network."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import unmount, wait_for
from tests.hosts import Network, network, wait_listening  # noqa: F401 (fixture)

PORT = 8000


def serve_dir(host, root: Path):
    proc = host.popen([sys.executable, "-m", "http.server", "--bind", host.address,
                       str(PORT), "--directory", str(root)])
    wait_listening(host, PORT)
    return proc


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_hosts_talk_link_down_and_up(network: Network, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    a, b = network.add("a"), network.add("b")
    assert a.address != b.address
    serve_dir(a, tmp_path)
    status, _, body = b.http(f"http://{a.address}:{PORT}/f")
    assert (status, body) == (200, b"hello")
    # a host has no route but its subnet: nothing it sends can leave the test network
    routes = a.run(["ip", "route"], check=True).stdout.decode()
    assert "default" not in routes and routes.strip().startswith(a.address.rsplit(".", 1)[0])
    b.link_down()
    assert b.http(f"http://{a.address}:{PORT}/f", timeout=2)[0] == 0
    b.link_up()
    wait_for(lambda: b.http(f"http://{a.address}:{PORT}/f", timeout=2)[0] == 200, 10,
             what="the link back up")


def test_slow_link(network: Network, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * (1 << 20))
    a, b = network.add("a"), network.add("b")
    serve_dir(a, tmp_path)
    url = f"http://{a.address}:{PORT}/f"
    started = time.monotonic()
    assert len(b.http(url)[2]) == 1 << 20
    fast = time.monotonic() - started
    a.limit("16mbit")  # 1 MiB ≈ 0.5 s
    started = time.monotonic()
    assert len(b.http(url)[2]) == 1 << 20
    slow = time.monotonic() - started
    assert slow > 0.4 and slow > fast, (fast, slow)


def test_mount_inside_a_host_is_visible(network: Network, tmp_path: Path) -> None:
    host = network.add("r")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = host.popen([sys.executable, "-m", "buffyfs", "mount", str(mnt), "--foreground",
                       "--cache", str(tmp_path / "cache")], log=tmp_path / "mount.log")
    try:
        wait_for(lambda: (mnt / "@status").exists() or proc.poll() is not None, 15,
                 what="the mount")
        assert proc.poll() is None, (tmp_path / "mount.log").read_text()
        assert (mnt / "@status").read_text().startswith("{")
    finally:
        unmount(mnt)
        host.stop(proc)


def test_close_removes_everything(tmp_path: Path) -> None:
    net = Network()
    try:
        a = net.add("a")
        proc = a.popen(["sleep", "60"])
        prefix = net.prefix
        assert prefix in namespaces()
    finally:
        net.close()
    assert proc.poll() is not None
    assert prefix not in namespaces()
