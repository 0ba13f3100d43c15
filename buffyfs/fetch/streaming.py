"""Reading ``latest`` of a source whose first download is under way (SPEC part 2,
"Reading while a download runs"); fs.py's open and read call this for such a handle,
and for a replica's version whose blob arrives from the hub (replica.py: its
LiveDownload names the file, and is sealed once the blob matched its sha256).

The open returns once the origin has answered with a body of known length. A read
waits until its bytes are in the partial file (segments.LiveDownload wakes it; no
polling) and reads them from there. The end of the file is the seal: the read that
answers the end of the file (0 bytes, at or past the end) returns only once the version
is committed, validation included. A read of the last bytes themselves is answered as
they arrive, even one that asks past them (a short answer is no end of file: ``cat``,
``sha256sum``, ``zcat``, ``tar`` and Python's ``read()`` read on until a read answers
nothing), so a program that reads a file's end by its known length — ``unzip -l``, a
database — is not held until the whole body is in. If the
download fails for good, the version fails validation, or the download starts over
with other bytes after this handle was given some, every waiting and later read of the
handle fails with EIO. Retries and resumes only make reads wait longer. A read far ahead of the
bytes that arrived asks for its segment with a ranged request of its own (ranges.py).

Such a handle is opened ``direct_io`` (fs.py): the kernel caches nothing of a file
still arriving, so no reader ever sees a short or holey page-cache view of it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass

import pyfuse3
import trio

from buffyfs.errors import FetchError
from buffyfs.fetch import ranges
from buffyfs.fetch.scheduler import Scheduler
from buffyfs.fetch.segments import LiveDownload, StreamFailed
from buffyfs.safeio import open_file
from buffyfs.store.blobs import BlobStore
from buffyfs.store.index import Index

log = logging.getLogger(__name__)


@dataclass
class StreamHandle:
    live: LiveDownload
    blobs: BlobStore
    generation: int
    fd: int | None = None  # the partial file (or, once sealed, the blob), opened lazily
    served: bool = False  # bytes were given to the reader

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


async def wait_stream(scheduler: Scheduler, index: Index, name: str) -> LiveDownload | None:
    """For a source with no version yet: wait until its download receives a body of
    known length (returned), or its round ends without one (None: the caller waits for
    the version as before). A source that has versions is never streamed (None)."""
    with index.read() as r:
        if r.versions(name):
            return None
    found: list[LiveDownload] = []
    async with trio.open_nursery() as nursery:

        async def until_version() -> None:
            with contextlib.suppress(FetchError):  # the caller's wait says why
                await scheduler.wait_first_version(name)
            nursery.cancel_scope.cancel()

        async def until_body() -> None:
            found.append(await scheduler.refresher.wait_body(name))
            nursery.cancel_scope.cancel()

        nursery.start_soon(until_version)
        nursery.start_soon(until_body)
    return found[0] if found else None


def open_stream(live: LiveDownload, blobs: BlobStore) -> StreamHandle:
    return StreamHandle(live, blobs, live.generation)


async def read(handle: StreamHandle, off: int, size: int) -> bytes:
    """Bytes [off, off + size) of the file still arriving, waiting for them (and for the
    seal when they reach the end); FUSEError(EIO) when the download cannot give them."""
    try:
        return await read_bytes(handle, off, size)
    except StreamFailed as e:
        log.info("%s: read of latest while it downloads fails: %s", handle.live.name, e)
        raise pyfuse3.FUSEError(errno.EIO) from None


async def read_bytes(handle: StreamHandle, off: int, size: int,
                     arrived: bool = False) -> bytes:
    """``read``, raising StreamFailed. ``arrived``: at least one byte, and past it only
    those that arrived already (the server sends bytes as they come, not in reads)."""
    live = handle.live
    assert live.total is not None
    while True:
        end = min(live.total, off + size)
        if not _follow(handle):
            live.check_failed()
            await live.changed.waiter().wait()  # the new bytes are not compared yet
            continue
        if off < end:
            _want_ahead(live, off, end)
            await live.wait_range(off, off + 1 if arrived else end, handle.generation)
            if live.generation != handle.generation:
                continue
            if arrived and live.sha256 is None:
                end = min(end, max(off + 1, live.written.reach(off)))
        if off >= live.total:  # the seal: no clean end on unverified bytes
            if await live.wait_sealed(handle.generation) is None:
                continue  # dropped meanwhile (a replica's blob with a wrong sha256)
        if off >= end:
            return b""
        data = await _pread(handle, off, end - off)
        if live.generation == handle.generation:
            break
        # started over while we read: those bytes may be the new ones (loop) or
        # none at all; a reader given bytes of before cannot go on (EIO)
    if len(data) < end - off:
        log.error("%s: partial file shorter than the bytes it holds", live.name)
        raise StreamFailed("the partial file is shorter than the bytes it holds")
    handle.served = True
    return data


def _want_ahead(live: LiveDownload, off: int, end: int) -> None:
    """Bytes far past those that arrived: ask for them at once (ranges.py) rather than
    wait for the bytes before them."""
    if live.guard is None or live.written.covers(off, end):
        return
    for at in (off, end - 1):
        if at - live.written.reach(at) > ranges.AHEAD:
            live.want(at)


def _follow(handle: StreamHandle) -> bool:
    """Follow a download that started over: a handle that was given nothing yet, or
    whose bytes the new ones match, reads on (True); False while that is not known
    yet; StreamFailed if they differ."""
    live = handle.live
    if handle.generation == live.generation:
        return True
    standing = live.standing(handle.generation) if handle.served else "current"
    if standing == "other":
        raise StreamFailed("the download started over with other bytes")
    if standing == "pending":
        return False
    handle.close()  # the file may be another one now
    handle.generation = live.generation
    return True


async def _pread(handle: StreamHandle, off: int, size: int) -> bytes:
    if handle.fd is None:
        handle.fd = await _open(handle)
    buf = bytearray(size)
    try:  # bytes that just arrived are in the page cache: no worker thread for them
        if os.preadv(handle.fd, [buf], off, os.RWF_NOWAIT) == size:
            return bytes(buf)
    except OSError:  # not there (EAGAIN), or no RWF_NOWAIT here: read it in a thread
        pass
    return await trio.to_thread.run_sync(os.pread, handle.fd, size, off)


async def _open(handle: StreamHandle) -> int:
    """The partial file, or the blob once the download is committed (the partial file
    is renamed into the store: between the rename and the seal, wait for the seal)."""
    live = handle.live
    while True:
        if live.sha256 is not None:
            return handle.blobs.open_blob(live.sha256)
        try:
            return open_file(live.path or handle.blobs.partial_path(live.name), os.O_RDONLY)
        except FileNotFoundError:
            await live.wait_sealed()
