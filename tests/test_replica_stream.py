"""A replica's first read of a version it does not hold streams as the blob arrives
from the hub (issue 15 item 2, SPEC part 2 "Replicas": "fetched on first read, which
streams as above"): early bytes before the whole blob, the end of the file only once
the sha256 matched, one download for concurrent readers, a cut resumed by Range.

Between the replica and the hub (serve_factory on 127.0.0.1) sits a GatedProxy: it
sends the first part of each blob answer, then holds the rest until the test opens
its gate, so "before the whole blob" is a fact, not a race."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time

from tests.conftest import wait_for
from tests.hubproxy import HubProxy
from tests.test_replica import hub_add

PROPAGATION = 5.0
FIRST = 1 << 20  # bytes of a blob answer sent before the gate
BODY = os.urandom(6 << 20)
GATE_MAX = 20.0  # seconds a held answer waits for the gate at most (a test that failed)
READ_MAX = 15.0  # seconds a test waits for a read


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class GatedProxy(HubProxy):
    """Forwards to the hub. A blob answer sends its first FIRST bytes, then waits for
    ``gate`` (set: sends the rest at once). ``cut``: the first blob answer ends at the
    gate instead (a hub cut mid-blob). ``down``: blob requests get their connection
    closed, no answer (a hub gone). ``corrupt``: sha256 -> "cached" (the blob's last
    byte flipped unless the request says Cache-Control: no-cache, as a stale cache) or
    "always". ``blob_requests``: (Range, Cache-Control) of each blob request."""

    def __init__(self, hub_url: str, cut: bool = False,
                 corrupt: dict[str, str] | None = None) -> None:
        self.gate = threading.Event()
        self.down = threading.Event()
        self.cut = cut
        self.corrupt = corrupt or {}
        self.blob_requests: list[tuple[str | None, str | None]] = []
        self.rests_sent = 0  # blob answers sent past FIRST
        self.timed_out = False  # an answer waited GATE_MAX for the gate (a failed test)
        super().__init__(hub_url)

    def get(self, h) -> None:
        blob = h.path.startswith("/@blobs/sha256/")
        if blob:
            self.blob_requests.append((h.headers.get("Range"), h.headers.get("Cache-Control")))
            if self.down.is_set():
                h.close_connection = True
                return
        status, rh, body = self.forward(h)
        mode = self.corrupt.get(h.path.rsplit("/", 1)[-1]) if blob else None
        if body and (mode == "always" or mode == "cached"
                     and h.headers.get("Cache-Control") != "no-cache"):
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        self.send_head(h, status, rh, len(body))
        if not blob or status not in (200, 206) or self.gate.is_set():
            h.wfile.write(body)
            return
        first = len(self.blob_requests) == 1
        h.wfile.write(body[:FIRST])
        h.wfile.flush()
        if not self.gate.wait(GATE_MAX):
            self.timed_out = True
        if self.cut and first:
            h.close_connection = True
            return
        h.wfile.write(body[FIRST:])
        self.rests_sent += 1

    def close(self) -> None:
        self.gate.set()
        super().close()


class Reader:
    """A reader in a thread of its own: ``first(n)`` reads the file's first n bytes,
    ``rest()`` the rest to the end; each waits at most READ_MAX for its answer."""

    def __init__(self, path: os.PathLike) -> None:
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed in close)

    def _run(self, call):
        box: list = []

        def run():
            try:
                box.append(("ok", call()))
            except OSError as e:
                box.append(("error", e))

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(READ_MAX)
        assert box, f"the read did not answer within {READ_MAX}s"
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def first(self, n: int) -> bytes:
        return self._run(lambda: self.file.read(n))

    def rest(self) -> bytes:
        def read_all():
            chunks = []
            while chunk := self.file.read(1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        return self._run(read_all)

    def close(self) -> None:
        self.file.close()


def status(mnt, name):
    try:
        return json.loads((mnt / name / "@status").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def blob_file(cache, body):
    return cache / "blobs" / sha(body)[:2] / sha(body)


def mirrored(replica, name, vid):
    return wait_for(lambda: (s := status(replica, name)) and s["latest"] == vid and s,
                    PROPAGATION, what=f"{name} on the replica")


def test_first_reads_stream_before_the_whole_blob_and_share_one_download(
        server, cli, origin, replica_factory):
    vid = hub_add(server, cli, origin, "a", BODY)
    proxy = GatedProxy(server.url)
    readers = []
    try:
        replica = replica_factory(proxy.url, prefetch="none")
        mirrored(replica, "a", vid)
        started = time.monotonic()
        readers = [Reader(replica / "a" / "latest"), Reader(replica / "a" / "latest"),
                   Reader(replica / "a" / "@versions" / vid)]
        for r in readers:  # early bytes, while the hub's answer holds the rest back
            assert r.first(1000) == BODY[:1000]
        assert time.monotonic() - started < GATE_MAX / 2 and not proxy.timed_out
        assert proxy.rests_sent == 0 and not blob_file(replica.cache, BODY).exists()
        assert status(replica, "a")["versions"][0].get("remote")  # not held yet
        # a read past the bytes that arrived waits for them; the end waits for the seal
        proxy.gate.set()
        for r in readers:
            assert r.rest() == BODY[1000:]
        assert len(proxy.blob_requests) == 1  # one download for every reader
        wait_for(lambda: not status(replica, "a")["versions"][0].get("remote"),
                 what="the version held")
        assert blob_file(replica.cache, BODY).read_bytes() == BODY
        assert (replica / "a" / "latest").read_bytes() == BODY  # from the cache now
        assert len(proxy.blob_requests) == 1
    finally:
        for r in readers:
            r.close()
        proxy.close()


def test_a_streamed_blob_with_a_wrong_sha256_is_never_a_complete_read(
        server, cli, origin, replica_factory):
    bad_once = BODY[::-1]
    bad_always = b"always wrong " * 100_000
    vid = hub_add(server, cli, origin, "a", bad_once)
    vid_b = hub_add(server, cli, origin, "b", bad_always)
    proxy = GatedProxy(server.url, corrupt={sha(bad_once): "cached",
                                            sha(bad_always): "always"})
    reader = None
    try:
        replica = replica_factory(proxy.url, prefetch="none")
        mirrored(replica, "a", vid)
        reader = Reader(replica / "a" / "latest")
        assert reader.first(1000) == bad_once[:1000]  # early bytes (right ones, here)
        assert proxy.rests_sent == 0 and not proxy.timed_out  # before the whole blob
        proxy.gate.set()
        try:  # the last byte came wrong: the end of the file is never reached
            reader.rest()
            raise AssertionError("a read of wrong bytes reached the end of the file")
        except OSError as e:
            assert e.errno == errno.EIO
        # fetched again past the cache (no-cache): a new open reads the right bytes
        assert (replica / "a" / "latest").read_bytes() == bad_once
        assert [cc for _, cc in proxy.blob_requests] == [None, "no-cache"]
        # a hub (or cache) that always sends wrong bytes: EIO, and the version stays remote
        mirrored(replica, "b", vid_b)
        for _ in range(2):
            try:
                (replica / "b" / "latest").read_bytes()
                raise AssertionError("wrong bytes read to the end")
            except OSError as e:
                assert e.errno == errno.EIO
        assert status(replica, "b")["versions"][0].get("remote")
        assert not blob_file(replica.cache, bad_always).exists()
        assert "wrong sha256" in replica.log_text()
    finally:
        if reader is not None:
            reader.close()
        proxy.close()


def test_a_hub_cut_mid_blob_then_back_resumes_by_range(server, cli, origin,
                                                        replica_factory):
    vid = hub_add(server, cli, origin, "a", BODY)
    proxy = GatedProxy(server.url, cut=True)
    reader = None
    try:
        replica = replica_factory(proxy.url, prefetch="none")
        mirrored(replica, "a", vid)
        reader = Reader(replica / "a" / "latest")
        assert reader.first(1000) == BODY[:1000]
        assert proxy.rests_sent == 0 and not proxy.timed_out  # before the whole blob
        proxy.down.set()  # the hub goes: the answer under way is cut, retries fail
        proxy.gate.set()
        wait_for(lambda: len(proxy.blob_requests) >= 2, what="a retry")
        proxy.down.clear()  # back: the next retry resumes where the bytes stopped
        assert reader.rest() == BODY[1000:]
        ranges = [rng for rng, _ in proxy.blob_requests]
        assert ranges[0] is None
        assert f"bytes={FIRST}-" in ranges, ranges
        wait_for(lambda: blob_file(replica.cache, BODY).exists(), what="the blob stored")
    finally:
        if reader is not None:
            reader.close()
        proxy.close()
