"""Several hosts on one machine, for tests (and bench/replicas.py) of what crosses a
network: each host is a network namespace with one interface ``eth0`` and its own
address in a private subnet; every ``eth0`` is one end of a veth pair whose other end is
a port of a bridge living in a namespace of its own, so no host and no link touches the
machine's own network and parallel runs (other worktrees, other pytest workers) never
see each other's hosts or addresses.

Processes run in a host with ``nsenter --net=/run/netns/NAME`` only: they keep the
machine's mount namespace, so a FUSE mount a daemon makes inside a host is visible to
the test (``ip netns exec`` would unshare the mounts). This kernel has no netem: a slow
link is ``tc tbf`` (rate, no delay); a cut link is the bridge port set down.

``Network.close`` removes every process (by its PID), namespace and link, also after a
failure; the ``network`` fixture calls it. Needs root and iproute2.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

SUBNET = "10.231.7"  # /24; private to each Network's bridge namespace
PREFIX = "bfs-"      # namespace names: bfs-<pid>-<n>-<host>
CMD_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_serial = itertools.count()


def available() -> str | None:
    """Why hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install.sh installs iproute2)"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


def end_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, by the process's PID; bounded waits."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


def remove_stale_namespaces() -> None:
    """Namespaces left by a run that was killed (its PID gone): ours by name only."""
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if not name.startswith(PREFIX) or len(parts) < 3 or not parts[1].isdigit():
            continue
        if not Path(f"/proc/{parts[1]}").exists():
            _run("ip", "netns", "del", name, check=False)


class Host:
    """One namespace of a Network: ``address`` on ``eth0``, loopback up."""

    def __init__(self, network: Network, name: str, number: int) -> None:
        self.network = network
        self.name = name
        self.ns = f"{network.prefix}-{name}"
        self.address = f"{SUBNET}.{number}"
        self.port_name = f"p{number}"  # the bridge's end of this host's veth pair
        self.procs: list[subprocess.Popen] = []

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` run in this host's network (and the machine's mounts)."""
        return ["nsenter", f"--net=/run/netns/{self.ns}", *argv]

    def run(self, argv: list[str], timeout: float = CMD_TIMEOUT, check: bool = False,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(self.cmd(argv), capture_output=True, timeout=timeout,
                              input=input, stdin=None if input is not None
                              else subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(argv)} exited {done.returncode}: "
                                 f"{done.stderr.decode(errors='replace')[-2000:]}")
        return done

    def popen(self, argv: list[str], log: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``argv`` in this host; it is ended by its PID at ``stop`` or teardown."""
        out: IO[bytes] | int = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(self.cmd(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=out, env=env, start_new_session=True)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        end_process(proc)
        if proc in self.procs:
            self.procs.remove(proc)

    def http(self, url: str, *curl_args: str, timeout: float = 30.0
             ) -> tuple[int, dict[str, str], bytes]:
        """One request with curl from this host: (status, headers lowercased, body);
        status 0 when no answer came."""
        done = self.run(["curl", "-s", "-D", "/dev/stderr", "-o", "-", "--max-time",
                         str(timeout), *curl_args, url], timeout=timeout + 5)
        status, headers = 0, {}
        for line in done.stderr.decode("latin-1").splitlines():
            if line.startswith("HTTP/"):
                status, headers = int(line.split()[1]), {}
            elif ":" in line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        return status, headers, done.stdout

    def link_down(self) -> None:
        """Cut this host off (its bridge port down): its packets go nowhere."""
        _run("ip", "-n", self.network.bridge_ns, "link", "set", self.port_name, "down")

    def link_up(self) -> None:
        _run("ip", "-n", self.network.bridge_ns, "link", "set", self.port_name, "up")

    def limit(self, rate: str, burst: str = "64kb", latency: str = "200ms") -> None:
        """A slow link: what this host sends is shaped to ``rate`` (e.g. ``100mbit``)."""
        _run(*self.cmd(["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate",
                        rate, "burst", burst, "latency", latency]))

    def unlimit(self) -> None:
        _run(*self.cmd(["tc", "qdisc", "del", "dev", "eth0", "root"]), check=False)

    def limit_link(self, rate: str, burst: str = "256kb", latency: str = "50ms") -> None:
        """This host's link shaped to ``rate`` both ways: what it sends (``limit``) and
        what it receives (the bridge port's side). The burst holds a 64 KiB GSO packet."""
        self.limit(rate, burst, latency)
        _run("ip", "netns", "exec", self.network.bridge_ns, "tc", "qdisc", "replace", "dev",
             self.port_name, "root", "tbf", "rate", rate, "burst", burst, "latency", latency)

    def close(self) -> None:
        for proc in reversed(self.procs):
            end_process(proc)
        self.procs.clear()


class Network:
    """A bridge in its own namespace and hosts attached to it: ``add("hub")``."""

    def __init__(self) -> None:
        remove_stale_namespaces()
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_serial)}"
        self.bridge_ns = f"{self.prefix}-br"
        self.hosts: dict[str, Host] = {}
        self.finalizers: list[Callable[[], object]] = []  # run first by close (unmounts)
        _run("ip", "netns", "add", self.bridge_ns)
        try:
            _run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def add(self, name: str) -> Host:
        host = Host(self, name, len(self.hosts) + 1)
        self.hosts[name] = host
        _run("ip", "netns", "add", host.ns)
        # Both ends made right in their namespaces: no name ever exists in the
        # machine's own namespace, where parallel runs could collide.
        _run("ip", "link", "add", host.port_name, "netns", self.bridge_ns, "type", "veth",
             "peer", "name", "eth0", "netns", host.ns)
        _run("ip", "-n", self.bridge_ns, "link", "set", host.port_name, "master", "br0")
        _run("ip", "-n", self.bridge_ns, "link", "set", host.port_name, "up")
        _run("ip", "-n", host.ns, "link", "set", "lo", "up")
        _run("ip", "-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _run("ip", "-n", host.ns, "link", "set", "eth0", "up")
        return host

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        """End every process, then remove every namespace (their links go with them)."""
        while self.finalizers:
            try:
                self.finalizers.pop()()
            except Exception:  # noqa: BLE001 - the rest must still be removed
                pass
        for host in self.hosts.values():
            host.close()
        for host in self.hosts.values():
            _run("ip", "netns", "del", host.ns, check=False)
        _run("ip", "netns", "del", self.bridge_ns, check=False)
        self.hosts.clear()


def wait_listening(host: Host, port: int, timeout: float = 15.0) -> None:
    """Until something in ``host`` accepts TCP on ``port`` (bounded)."""
    probe = ("import socket,sys\ns=socket.socket();s.settimeout(1)\n"
             f"sys.exit(s.connect_ex(('{host.address}',{port})))")
    deadline = time.monotonic() + timeout
    while host.run(["python3", "-c", probe]).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on {host.address}:{port} after {timeout}s")
        time.sleep(0.1)


@pytest.fixture
def network() -> Iterator[Network]:
    """A fresh Network; everything in it is removed after the test, pass or fail."""
    reason = available()
    if reason:
        pytest.skip(reason)
    net = Network()
    try:
        yield net
    finally:
        net.close()
