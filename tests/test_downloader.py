"""Unit tests of buffyfs.fetch.downloader and buffyfs.fetch.refresh against the test origin (no
mount)."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from buffyfs.fetch import downloader, refresh
from buffyfs.fetch.downloader import AttemptError, Downloaded, NotModified, Request
from buffyfs.options import normalize_options
from buffyfs.store.blobs import BlobStore
from buffyfs.store.index import Index, latest_of
from tests.origin import Origin

SECRET = "sekrit-token-123"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with downloader.new_client() as c:
        yield c


@pytest.fixture
def partial(tmp_path: Path) -> Path:
    return tmp_path / "x.part"


def header(seen_headers: dict[str, str], name: str) -> str | None:
    for k, v in seen_headers.items():
        if k.lower() == name.lower():
            return v
    return None


def contents(path: Path) -> bytes:
    """Small test files: reading them inline in an async test is fine."""
    return path.read_bytes()


def put(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- downloader.download -----------------------------------------------------------------


async def test_200_streams_body_to_partial(origin: Origin, client, partial: Path) -> None:
    body = bytes(range(256)) * 12_345  # ~3 MB: several batches
    origin.set("/f", body, etag=True, last_modified=True, content_type="application/x-gz")
    progress: list[tuple[int, int | None]] = []
    got = await downloader.download(
        client, Request(origin.url("/f")), partial, lambda d, t: progress.append((d, t))
    )
    assert isinstance(got, Downloaded)
    assert got.size == len(body)
    assert got.sha256 == hashlib.sha256(body).hexdigest()
    assert contents(partial) == body
    assert got.etag == '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
    assert got.last_modified and got.last_modified.endswith("GMT")
    assert got.content_type == "application/x-gz"
    assert progress and progress[-1] == (len(body), len(body))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    [seen] = origin.seen("/f")
    assert seen.method == "GET"
    assert header(seen.headers, "Accept-Encoding") == "identity"
    assert header(seen.headers, "If-None-Match") is None
    assert header(seen.headers, "If-Modified-Since") is None


async def test_the_partial_file_is_opened_off_the_loop(origin: Origin, client, partial: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating the partial file waits for the file system's journal (about 1 ms each
    while other downloads sync): it happens in a worker thread, with its truncation."""
    loop_thread = threading.current_thread()
    opened_in: list[threading.Thread] = []
    real_open = downloader.open_file

    def open_file(*args: Any, **kwargs: Any) -> int:
        opened_in.append(threading.current_thread())
        return real_open(*args, **kwargs)

    monkeypatch.setattr(downloader, "open_file", open_file)
    put(partial, b"stale leftovers")
    origin.set("/t", b"fresh")
    got = await downloader.download(client, Request(origin.url("/t")), partial)
    assert isinstance(got, Downloaded) and contents(partial) == b"fresh"
    assert opened_in and loop_thread not in opened_in


async def test_empty_body(origin: Origin, client, partial: Path) -> None:
    origin.set("/e", b"")
    got = await downloader.download(client, Request(origin.url("/e")), partial)
    assert isinstance(got, Downloaded)
    assert got.size == 0 and got.sha256 == hashlib.sha256(b"").hexdigest()
    assert contents(partial) == b""


async def test_partial_file_is_truncated_first(origin: Origin, client, partial: Path) -> None:
    put(partial, b"stale leftovers from an earlier, longer download")
    origin.set("/s", b"new")
    got = await downloader.download(client, Request(origin.url("/s")), partial)
    assert contents(partial) == b"new"
    assert got.size == 3


async def test_post_with_body_and_headers(origin: Origin, client, partial: Path) -> None:
    origin.set("/api", b"answer")
    req = Request(origin.url("/api"), method="POST", body='{"q": 1}',
                  headers={"X-Api-Key": "k1"})
    got = await downloader.download(client, req, partial)
    assert isinstance(got, Downloaded)
    [seen] = origin.seen("/api")
    assert seen.method == "POST"
    assert seen.body == b'{"q": 1}'
    assert header(seen.headers, "X-Api-Key") == "k1"


async def test_conditional_etag_304(origin: Origin, client, partial: Path) -> None:
    res = origin.set("/c", b"body", etag=True, last_modified=True)
    req = Request(origin.url("/c"), etag=res.etag, last_modified=res.last_modified)
    got = await downloader.download(client, req, partial)
    assert isinstance(got, NotModified)
    [seen] = origin.seen("/c")
    assert header(seen.headers, "If-None-Match") == res.etag
    assert header(seen.headers, "If-Modified-Since") == res.last_modified


async def test_conditional_last_modified_only_304(origin: Origin, client, partial) -> None:
    res = origin.set("/lm", b"body", last_modified=True)
    got = await downloader.download(
        client, Request(origin.url("/lm"), last_modified=res.last_modified), partial
    )
    assert isinstance(got, NotModified)
    [seen] = origin.seen("/lm")
    assert header(seen.headers, "If-Modified-Since") == res.last_modified
    assert header(seen.headers, "If-None-Match") is None


async def test_stale_validator_gets_the_new_body(origin: Origin, client, partial) -> None:
    origin.set("/n", b"new body", etag=True)
    got = await downloader.download(client, Request(origin.url("/n"), etag='"old"'), partial)
    assert isinstance(got, Downloaded)
    assert contents(partial) == b"new body"


async def test_short_body_is_retryable_error(origin: Origin, client, partial: Path) -> None:
    origin.set("/short", b"x" * 10_000)
    origin.fail("/short", "short")
    with pytest.raises(AttemptError) as e:
        await downloader.download(client, Request(origin.url("/short")), partial)
    assert e.value.retryable is True
    assert str(e.value)


async def test_reset_is_retryable_error(origin: Origin, client, partial: Path) -> None:
    origin.set("/reset", b"y" * 100_000)
    origin.fail("/reset", "reset")
    with pytest.raises(AttemptError) as e:
        await downloader.download(client, Request(origin.url("/reset")), partial)
    assert e.value.retryable is True


async def test_stall_times_out_as_retryable(origin: Origin, client, partial: Path) -> None:
    origin.set("/stall", b"z" * 10_000)
    origin.fail("/stall", ("stall", 3))
    with trio.fail_after(10):
        with pytest.raises(AttemptError) as e:
            await downloader.download(
                client, Request(origin.url("/stall"), attempt_timeout=0.3), partial
            )
    assert e.value.retryable is True
    assert "stall" in str(e.value)


async def test_404_is_not_retryable(origin: Origin, client, partial: Path) -> None:
    with pytest.raises(AttemptError) as e:
        await downloader.download(client, Request(origin.url("/missing")), partial)
    assert e.value.retryable is False
    assert "404" in str(e.value)


@pytest.mark.parametrize("status, retryable", [(500, True), (503, True), (408, True),
                                               (429, True), (403, False), (410, False)])
async def test_status_retryability(origin: Origin, client, partial: Path,
                                   status: int, retryable: bool) -> None:
    origin.set("/s", b"ok")
    origin.fail("/s", status)
    with pytest.raises(AttemptError) as e:
        await downloader.download(client, Request(origin.url("/s")), partial)
    assert e.value.retryable is retryable
    assert str(status) in str(e.value)


async def test_connection_refused_is_retryable(client, partial: Path) -> None:
    with pytest.raises(AttemptError) as e:
        await downloader.download(
            client, Request(f"http://127.0.0.1:{free_port()}/x", attempt_timeout=2), partial
        )
    assert e.value.retryable is True
    assert "connect" in str(e.value)


async def test_error_messages_hide_header_values_and_url_credentials(
    origin: Origin, client, partial: Path
) -> None:
    url = origin.url("/nope").replace("http://", f"http://alice:{SECRET}-pw@")
    req = Request(url, headers={"X-Api-Key": f"key-{SECRET}"})
    with pytest.raises(AttemptError) as e:
        await downloader.download(client, req, partial)
    assert SECRET not in str(e.value)
    # the credentials were used all the same
    [seen] = origin.seen("/nope")
    assert header(seen.headers, "X-Api-Key") == f"key-{SECRET}"
    assert (header(seen.headers, "Authorization") or "").startswith("Basic ")


async def test_invalid_header_value_error_hides_it(origin: Origin, client, partial) -> None:
    origin.set("/h", b"x")
    # h11 refuses trailing whitespace and its message shows the value as escaped bytes
    # (b'Bearer sekrit-token-123\\t'), which scrub() does not recognise.
    req = Request(origin.url("/h"), headers={"Authorization": f"Bearer {SECRET}\t"})
    with pytest.raises(AttemptError) as e:
        await downloader.download(client, req, partial)
    assert SECRET not in str(e.value)


# --- refresh.Refresher -------------------------------------------------------------------


class Cache:
    def __init__(self, root: Path, client: httpx.AsyncClient) -> None:
        self.root = root
        self.blobs = BlobStore(root)
        self.index = Index(root / "index")
        self.states: list[tuple[str, str]] = []
        self.refresher = refresh.Refresher(
            self.index, self.blobs, client, on_state=lambda n, s: self.states.append((n, s))
        )

    def add(self, name: str, url: str, **options: object) -> None:
        self.index.add_source(name, url, normalize_options(options))

    def versions(self, name: str) -> list[dict]:
        with self.index.read() as r:
            return r.versions(name)

    def state(self, name: str) -> dict:
        with self.index.read() as r:
            return r.state(name)


@pytest.fixture
async def cache(tmp_path: Path, client) -> AsyncIterator[Cache]:
    c = Cache(tmp_path / "cache", client)
    yield c
    c.index.close()


class FakeRandom:
    """Stands in for the ``random`` module of refresh: tiny jitter, calls recorded."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return self.factor


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> FakeRandom:
    fake = FakeRandom(0.02)
    monkeypatch.setattr(refresh, "random", fake)
    return fake


async def test_refresh_first_version_then_unchanged_then_changed(
    origin: Origin, cache: Cache
) -> None:
    origin.set("/d", b"version one")
    cache.add("d", origin.url("/d"), max_attempts=1)

    first = await cache.refresher.refresh("d")
    assert first.error is None and first.checked
    v1 = first.version
    assert v1 is not None
    assert v1.sha256 == hashlib.sha256(b"version one").hexdigest()
    assert v1.size == len(b"version one")
    blob = cache.blobs.path(v1.sha256)
    assert blob.is_file()
    assert blob.parent.parent == cache.root / "blobs"
    assert contents(blob) == b"version one"
    assert not cache.blobs.partial_path("d").exists()
    assert [v.id for v in cache.versions("d")] == [v1.id]
    st = cache.state("d")
    assert st.last_success is not None and st.consecutive_failures == 0
    assert st.state == "idle"
    assert ("d", "fetching") in cache.states and cache.states[-1] == ("d", "idle")

    second = await cache.refresher.refresh("d")  # no validators: same bytes
    assert second.version is None and second.checked and second.error is None
    assert [v.id for v in cache.versions("d")] == [v1.id]
    assert len(origin.seen("/d")) == 2

    origin.set("/d", b"version two")
    third = await cache.refresher.refresh("d")
    assert third.version is not None
    assert third.version.id != v1.id
    assert contents(cache.blobs.path(third.version.sha256)) == b"version two"
    assert [v.id for v in cache.versions("d")] == [third.version.id, v1.id]
    assert latest_of(cache.versions("d")).id == third.version.id
    assert contents(blob) == b"version one"  # the old blob is untouched


async def test_refresh_uses_conditional_request(origin: Origin, cache: Cache) -> None:
    res = origin.set("/c", b"cached body", etag=True)
    cache.add("c", origin.url("/c"), max_attempts=1)
    first = await cache.refresher.refresh("c")
    assert first.version.etag == res.etag
    second = await cache.refresher.refresh("c")
    assert second.checked and second.version is None and second.error is None
    seen = origin.seen("/c")
    assert len(seen) == 2
    assert header(seen[1].headers, "If-None-Match") == res.etag
    assert len(cache.versions("c")) == 1
    assert cache.state("c").consecutive_failures == 0


async def test_refresh_same_content_as_other_source_shares_blob(
    origin: Origin, cache: Cache
) -> None:
    origin.set("/a", b"shared")
    origin.set("/b", b"shared")
    cache.add("a", origin.url("/a"))
    cache.add("b", origin.url("/b"))
    va = (await cache.refresher.refresh("a")).version
    vb = (await cache.refresher.refresh("b")).version
    assert va and vb and va.sha256 == vb.sha256
    assert contents(cache.blobs.path(va.sha256)) == b"shared"
    assert not cache.blobs.partial_path("b").exists()


async def test_refresh_retries_5xx_then_succeeds(
    origin: Origin, cache: Cache, fast_backoff: FakeRandom
) -> None:
    origin.set("/r", b"finally")
    origin.fail("/r", 500, 500)
    cache.add("r", origin.url("/r"), max_attempts=3)
    with trio.fail_after(20):
        out = await cache.refresher.refresh("r")
    assert out.error is None
    assert out.version is not None
    assert contents(cache.blobs.path(out.version.sha256)) == b"finally"
    assert len(origin.seen("/r")) == 3
    assert fast_backoff.calls == [(0.5, 1.0), (0.5, 1.0)]  # jitter between attempts
    assert ("r", "waiting") in cache.states
    assert cache.state("r").consecutive_failures == 0


async def test_refresh_real_backoff_is_bounded(origin: Origin, cache: Cache) -> None:
    origin.set("/rb", b"ok")
    origin.fail("/rb", 503)
    cache.add("rb", origin.url("/rb"), max_attempts=2)
    start = trio.current_time()
    with trio.fail_after(10):
        out = await cache.refresher.refresh("rb")
    elapsed = trio.current_time() - start
    assert out.version is not None
    assert 0.5 <= elapsed < 5  # one backoff of 1 s * jitter in [0.5, 1]


async def test_refresh_gives_up_after_max_attempts(
    origin: Origin, cache: Cache, fast_backoff: FakeRandom
) -> None:
    origin.set("/g", b"never served")
    origin.fail("/g", 500, 502, 500, 502)
    cache.add("g", origin.url("/g"), max_attempts=2)
    out = await cache.refresher.refresh("g")
    assert out.version is None and not out.checked
    assert out.error and "502" in out.error
    assert len(origin.seen("/g")) == 2
    st = cache.state("g")
    assert st.consecutive_failures == 1
    assert st.last_error["message"] == out.error
    assert st.state == "idle"
    assert cache.versions("g") == []
    assert not cache.blobs.partial_path("g").exists()

    out = await cache.refresher.refresh("g")
    assert out.error
    assert cache.state("g").consecutive_failures == 2

    out = await cache.refresher.refresh("g")  # the failures queue is empty now
    assert out.version is not None
    st = cache.state("g")
    assert st.consecutive_failures == 0 and st.last_error is None


async def test_refresh_404_fails_at_once(
    origin: Origin, cache: Cache, fast_backoff: FakeRandom
) -> None:
    cache.add("m", origin.url("/missing"), max_attempts=5)
    out = await cache.refresher.refresh("m")
    assert out.error and "404" in out.error
    assert len(origin.seen("/missing")) == 1
    assert fast_backoff.calls == []
    assert cache.state("m").consecutive_failures == 1


async def test_refresh_short_body_retried(
    origin: Origin, cache: Cache, fast_backoff: FakeRandom
) -> None:
    origin.set("/sb", b"q" * 50_000)
    origin.fail("/sb", "short")
    cache.add("sb", origin.url("/sb"), max_attempts=2)
    out = await cache.refresher.refresh("sb")
    assert out.version is not None and out.version.size == 50_000
    assert contents(cache.blobs.path(out.version.sha256)) == b"q" * 50_000


async def test_refresh_failure_keeps_the_cached_version(
    origin: Origin, cache: Cache, fast_backoff: FakeRandom
) -> None:
    origin.set("/k", b"good")
    cache.add("k", origin.url("/k"), max_attempts=1)
    v = (await cache.refresher.refresh("k")).version
    origin.set("/k", b"better")
    origin.fail("/k", 500)
    out = await cache.refresher.refresh("k")
    assert out.error
    assert [x.id for x in cache.versions("k")] == [v.id]
    assert contents(cache.blobs.path(v.sha256)) == b"good"


async def test_refresh_removed_source(cache: Cache) -> None:
    out = await cache.refresher.refresh("ghost")
    assert out.error == "source removed"
    assert out.version is None


async def test_refresh_post_with_body(origin: Origin, cache: Cache) -> None:
    origin.set("/api", b"result")
    cache.add("api", origin.url("/api"), method="POST", body='{"q": 1}')
    out = await cache.refresher.refresh("api")
    assert out.version is not None
    [seen] = origin.seen("/api")
    assert seen.method == "POST" and seen.body == b'{"q": 1}'


def buffyfs_log(caplog: pytest.LogCaptureFixture) -> str:
    """What buffyfs itself logged (log.setup keeps httpx's own request lines quiet)."""
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("buffyfs")]
    assert lines  # the refresh did log something
    return "\n".join(lines)


def _index_records_outside_sources(index: Index) -> list[bytes]:
    """Every key and value of the index except the sources' own records (which must
    hold the header values and URL to be able to make the request)."""
    out = []
    with index.env.begin() as txn:
        for name, db in index.dbs.items():
            if name == "sources":
                continue
            with txn.cursor(db=db) as cur:
                for k, v in cur:
                    out += [bytes(k), bytes(v)]
    return out


async def test_header_values_never_shown(
    origin: Origin, cache: Cache, fast_backoff: FakeRandom, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cache.add("s", origin.url("/secret"), max_attempts=2,
              headers={"Authorization": f"Bearer {SECRET}"})
    origin.fail("/secret", 500, 404)
    out = await cache.refresher.refresh("s")
    assert out.error and "404" in out.error
    assert SECRET not in out.error
    seen = origin.seen("/secret")
    assert len(seen) == 2
    assert all(header(s.headers, "Authorization") == f"Bearer {SECRET}" for s in seen)
    st = cache.state("s")
    assert st.last_error and SECRET not in repr(st)
    assert SECRET not in buffyfs_log(caplog)
    records = _index_records_outside_sources(cache.index)
    assert records  # the scan did read the index
    assert not [r for r in records if SECRET.encode() in r]
    # the source record is the one place that holds it (the data file, only there)
    data = contents(cache.root / "index" / "data.mdb")
    assert SECRET.encode() in data
    assert SECRET not in repr(cache.versions("s"))


async def test_url_credentials_never_shown(
    origin: Origin, cache: Cache, fast_backoff: FakeRandom, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    origin.set("/u", b"private")
    url = origin.url("/u").replace("http://", f"http://alice:{SECRET}@")
    cache.add("u", url)
    out = await cache.refresher.refresh("u")
    assert out.version is not None
    assert SECRET not in out.version.url
    assert out.version.url == origin.url("/u")
    [seen] = origin.seen("/u")
    assert (header(seen.headers, "Authorization") or "").startswith("Basic ")
    # now a failure: the message and the log hide the password too
    cache.add("u2", url.replace("/u", "/gone"), max_attempts=1)
    out = await cache.refresher.refresh("u2")
    assert out.error and SECRET not in out.error
    assert SECRET not in buffyfs_log(caplog)
    records = _index_records_outside_sources(cache.index)
    assert not [r for r in records if SECRET.encode() in r]


def test_batches_are_written_in_order_and_hashed(tmp_path):
    """A batch is a list of received chunks (no joining copy): written with writev,
    hashed chunk by chunk, its writeback started."""
    import os

    path = tmp_path / "partial"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    hasher = hashlib.sha256()
    batches = [[b"abc", b"", b"d" * 100_000], [b"e" * 3, b"f" * (1 << 20)]]
    offset = 0
    try:
        for batch in batches:
            downloader._write_and_hash(fd, hasher, batch, offset)
            offset += sum(map(len, batch))
    finally:
        os.close(fd)
    expected = b"".join(b"".join(b) for b in batches)
    assert path.read_bytes() == expected
    assert hasher.hexdigest() == hashlib.sha256(expected).hexdigest()


# --- issue 11: resume points, the quota, slow bodies -------------------------------------


async def test_a_connection_error_keeps_the_resume_point(
    origin: Origin, cache: Cache, fast_backoff: FakeRandom
) -> None:
    body = b"r" * (3 << 20)
    res = origin.set("/cr", body, etag=True)
    origin.fail("/cr", "reset", 503, 500)  # cut mid-body, then two attempts without a body
    cache.add("cr", origin.url("/cr"), max_attempts=4)
    out = await cache.refresher.refresh("cr")
    assert out.version is not None and out.version.sha256 == hashlib.sha256(body).hexdigest()
    seen = origin.seen("/cr")
    offset = seen[1].headers["Range"]
    assert [header(s.headers, "Range") for s in seen[1:]] == [offset] * 3
    assert header(seen[-1].headers, "If-Range") == res.etag


async def test_a_refused_resume_starts_over_and_says_so(
    origin: Origin, cache: Cache, fast_backoff: FakeRandom
) -> None:
    body = b"s" * (3 << 20)
    origin.set("/so", body, etag=True)
    origin.fail("/so", "reset")
    cache.add("so", origin.url("/so"), max_attempts=2)
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if text.startswith("attempt 1/2"):  # between the attempts, the body changes:
            origin.resources["/so"].etag = '"changed"'  # If-Range fails, a 200 comes

    out = await cache.refresher.refresh("so", None, note)
    assert out.version is not None
    assert header(origin.seen("/so")[1].headers, "Range")
    assert any("starting over from byte 0" in n for n in notes), notes
    assert any(n.startswith("attempt 1/2: ") for n in notes), notes


async def test_partial_files_count_against_the_quota(
    origin: Origin, cache: Cache, fast_backoff: FakeRandom
) -> None:
    from buffyfs.store import gc

    quota = 3 << 20
    cache.refresher.make_room = lambda need: gc.collect_now(
        cache.index, cache.blobs, set(), need, quota)
    put(cache.blobs.partial_path("other"), b"x" * (2 << 20))  # kept for a later resume
    origin.set("/q", b"q" * (2 << 20))
    cache.add("q", origin.url("/q"), max_attempts=3)
    out = await cache.refresher.refresh("q")
    assert out.error and "cache full" in out.error and "partial files" in out.error
    assert len(origin.seen("/q")) == 1  # not retried
    assert not cache.blobs.partial_path("q").exists()


async def test_a_slow_body_fails_as_retryable_keeping_its_resume_point(
    origin: Origin, client, partial: Path
) -> None:
    res = origin.set("/sl", b"z" * 400_000, etag=True)
    res.chunk_delay = 0.5  # 40 KB/s
    req = Request(origin.url("/sl"), min_speed=100_000, min_speed_time=1.0)
    with trio.fail_after(10), pytest.raises(AttemptError) as e:
        await downloader.download(client, req, partial)
    assert e.value.retryable and not e.value.restart
    assert "too slow" in str(e.value)
    assert e.value.resume is not None and e.value.resume.offset == len(contents(partial)) > 0


async def test_a_source_waiting_for_its_host_holds_no_slot_of_another_host(
    cache: Cache, client
) -> None:
    """Slots are taken host first: two downloads from host a (one slot per host) leave
    the second global slot to host b. No traffic: only the slots are taken."""
    refresher = refresh.Refresher(cache.index, cache.blobs, client, max_downloads=2,
                                  max_downloads_per_host=1)
    for name in ("a1", "a2", "b1"):
        cache.add(name, f"http://{name[0]}.invalid/x")
    got: list[str] = []
    release = trio.Event()

    async def take(name: str) -> None:
        async with refresher._slot(name, f"http://{name[0]}.invalid/x", lambda *a: None):
            got.append(name)
            await release.wait()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for name in ("a1", "a2", "b1"):
                nursery.start_soon(take, name)
                await trio.testing.wait_all_tasks_blocked()
            assert got == ["a1", "b1"]
            assert "max_downloads_per_host for a.invalid" in cache.state("a2").queued
            release.set()
    assert got == ["a1", "b1", "a2"]
