"""Replicas (issue 15 items 1-4): a mount with --upstream following a hub started by
serve_factory on 127.0.0.1. The multi-host tests (network namespaces, a cache between
hub and replicas) are elsewhere; these cover the replica's own rules."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import http_request, wait_for

PROPAGATION = 5.0  # SPEC: a change at the hub shows in the replica within 5 s


def hub_add(server, cli, origin, name, body):
    origin.set(f"/{name}", body)
    cli("add", name, origin.url(f"/{name}"), check=True)
    return wait_for(lambda: (st := hub_status(server, name)) and st["latest"],
                    what=f"the hub's first version of {name}")


def hub_status(server, name):
    status, _, body = http_request(server.url, f"/{name}/@status")
    return json.loads(body) if status == 200 else None


def status(mnt, name):
    try:
        return json.loads((mnt / name / "@status").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def origin_hits(origin, name):
    return len(origin.seen(f"/{name}"))


def test_mirrors_sources_versions_and_bytes_without_the_origin(server, cli, origin,
                                                               replica_factory):
    vid = hub_add(server, cli, origin, "a", b"alpha " * 1000)
    hits = origin_hits(origin, "a")
    replica = replica_factory(server.url)
    st = wait_for(lambda: (s := status(replica, "a")) and s["latest"] == vid and s,
                  PROPAGATION, what="the source on the replica")
    assert st["versions"][0]["sha256"] == hashlib.sha256(b"alpha " * 1000).hexdigest()
    assert (replica / "a" / "latest").read_bytes() == b"alpha " * 1000
    assert (replica / "a" / "@versions" / vid).read_bytes() == b"alpha " * 1000
    # a new version at the hub shows within 5 s
    origin.set("/a", b"beta")
    cli("refresh", "a", check=True)
    new = wait_for(lambda: (s := hub_status(server, "a")) and s["latest"] != vid
                   and s["latest"], what="the hub's second version")
    hits = origin_hits(origin, "a")
    wait_for(lambda: (status(replica, "a") or {}).get("latest") == new, PROPAGATION,
             what="the new version on the replica")
    assert (replica / "a" / "latest").read_bytes() == b"beta"
    assert origin_hits(origin, "a") == hits  # the replica never asked the origin
