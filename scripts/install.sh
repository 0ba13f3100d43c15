#!/usr/bin/env bash
# Install what buffyfs needs on a Debian machine: the FUSE packages, then a virtual
# environment in .venv with buffyfs and its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 libfuse3-dev pkg-config systemd strace rsync  # systemd-analyze, strace, rsync: tests
          curl openssl nginx-light  # the server's tests: a client, a TLS certificate, the nginx front
          chromium  # the status page's tests: a real headless browser
          wget  # the proxy's tests: one more real proxy client
          iproute2  # replicas across hosts: network namespaces, veth, a bridge, tc (tests/hosts.py)
          squid)  # contrib/squid: Squid as the cache between hub and replicas (tests/test_replica_squid.py)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q -e '.[test]'
echo "installed: $(.venv/bin/buffyfs --version)"
