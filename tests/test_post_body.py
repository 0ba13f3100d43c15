"""A POST body is a secret like a header value: shown only as its size and a hash
prefix, in status, logs, errors, xattrs and metrics (issue 11, item 3)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from buffyfs.options import describe_body, normalize_options, public_options
from tests.conftest import wait_for
from tests.test_mount import read, status, write_control

KEY = "api-key-d41d8cd98f00b204"
BODY = json.dumps({"query": "genes", "key": KEY})


def test_describe_body_is_size_and_hash_prefix() -> None:
    digest = hashlib.sha256(BODY.encode()).hexdigest()
    assert describe_body(BODY) == f"<{len(BODY.encode())} bytes, sha256 {digest[:8]}…>"
    accent = hashlib.sha256("é".encode()).hexdigest()[:8]
    assert describe_body("é") == f"<2 bytes, sha256 {accent}…>"  # bytes as sent: UTF-8
    shown = public_options(normalize_options({"method": "POST", "body": BODY}))
    assert KEY not in repr(shown) and shown["body"] == describe_body(BODY)
    assert public_options(normalize_options({}))["body"] is None  # no body: null, as before


def test_post_body_never_shown(origin, cli, mount_factory):
    origin.set("/api", b'{"result": 42}', content_type="application/json")
    origin.set("/api2", b'{"result": 43}', content_type="application/json")
    cli("add", "api", origin.url("/api"), "--method", "POST", "--body", BODY,
        "--max-attempts", "1", check=True)
    mnt = mount_factory()
    write_control(mnt / "@control",
                  f"add api2 {origin.url('/api2')} method=POST body='{BODY}' max_attempts=1")
    assert read(mnt / "api/latest") == b'{"result": 42}'
    assert read(mnt / "api2/latest") == b'{"result": 43}'
    assert origin.seen("/api")[0].body == BODY.encode()  # sent as it is
    assert origin.seen("/api2")[0].body == BODY.encode()
    origin.fail("/api", 500)  # a failed refresh: errors in status and the log
    write_control(mnt / "api/@control", "refresh")
    wait_for(lambda: status(mnt / "api/@status")["consecutive_failures"] == 1, 10,
             what="the failure")
    with pytest.raises(OSError):  # a refused control write that carries the body
        write_control(mnt / "api/@control", f"set body='{BODY}' max_attempts=zero")
    with pytest.raises(OSError):
        write_control(mnt / "api/@control", f"set body='{BODY}")  # unbalanced quote
    shown = status(mnt / "api/@status")["options"]["body"]
    assert shown == describe_body(BODY)
    assert json.loads(cli("status", "api2", "--json", check=True).stdout)["options"]["body"] \
        == describe_body(BODY)
    outputs = [
        (mnt / "api/@status").read_text(), (mnt / "api2/@status").read_text(),
        (mnt / "@status").read_text(), (mnt / "@metrics").read_text(),
        json.dumps({n: os.getxattr(mnt / "api/latest", n).decode()
                    for n in os.listxattr(mnt / "api/latest")}),
        cli("status", "--json", check=True).stdout, cli("status", "api", "--json").stdout,
        cli("status", "api").stdout, cli("status").stdout, cli("list").stdout,
        cli("versions", "api").stdout, cli("fetch", "api").stderr,
    ]
    mnt.close()
    outputs.append(mnt.log_text())
    for text in outputs:
        assert KEY not in text
