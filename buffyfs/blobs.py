"""The content-addressed blob store.

Layout under the cache directory::

    blobs/ab/abcdef...        one read-only file per distinct content, named by sha256
    partial/NAME.part         the body of a download in progress for source NAME
    partial/NAME.lock         flock held by whoever downloads NAME (one at a time)

A blob appears under ``blobs/`` only complete: the partial file is fsynced and then
renamed into place, and the directory fsynced. Identical content is stored once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from buffyfs.errors import CacheError


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.partial_dir = root / "partial"
        try:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            self.partial_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot use cache directory {root}: {e.strerror}") from None

    def path(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def partial_path(self, source: str) -> Path:
        return self.partial_dir / f"{source}.part"

    def lock_path(self, source: str) -> Path:
        return self.partial_dir / f"{source}.lock"

    def commit_partial(self, partial: Path, sha256: str, replace: bool = False) -> Path:
        """Move a complete, fsynced partial file into the store under its hash.

        If the content is already stored, the partial file is dropped instead, unless
        ``replace``: the stored file is damaged and the fresh bytes take its place.
        Blocking: call from a worker thread.
        """
        target = self.path(sha256)
        if target.exists() and not replace:
            partial.unlink(missing_ok=True)
            return target
        target.parent.mkdir(exist_ok=True)
        os.chmod(partial, 0o444)
        os.rename(partial, target)
        _fsync_dir(target.parent)
        return target

    def open_blob(self, sha256: str) -> int:
        """An O_RDONLY file descriptor of the blob (the caller closes it)."""
        return os.open(self.path(sha256), os.O_RDONLY | os.O_CLOEXEC)



class FileLock:
    """An flock on a file (created if needed); held until ``release``. Works across
    processes: the mount and the command line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, exclusive: bool = True, blocking: bool = True) -> bool:
        """Take the lock; False if ``blocking`` is off and someone else holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | \
            (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class SourceLock(FileLock):
    """An exclusive flock on ``partial/NAME.lock``: one download per source."""

    def try_acquire(self) -> bool:
        return self.acquire(exclusive=True, blocking=False)


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
