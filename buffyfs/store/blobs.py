"""The content-addressed blob store.

Layout under the cache directory::

    blobs/ab/abcdef...        one read-only file per distinct content, named by sha256
    partial/NAME.part         the body of a download in progress for source NAME
    partial/NAME.lock         flock held by whoever downloads NAME (one at a time)

A blob appears under ``blobs/`` only complete: the partial file is fsynced and then
renamed into place, and the directory fsynced. Identical content is stored once.

Every file here is opened without following symlinks and must be a regular file, and
every directory must be private to the user running buffyfs (safeio.py): what buffyfs
finds planted in the store is refused, replaced, or swept (``stray_entries``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
from pathlib import Path

from buffyfs.safeio import (
    NotRegularFile,
    entry_kind,
    fsync_dir,
    is_regular,
    make_dir,
    open_file,
    open_regular,
)


class BlobStore:
    def __init__(self, root: Path) -> None:
        """CacheError if the cache, ``blobs/``, ``partial/`` or a ``blobs/xx/`` is a
        symlink, not owned by this user, or writable by others."""
        self.root = root
        self.blob_dir = root / "blobs"
        self.blob_dir_str = str(self.blob_dir)
        self.partial_dir = root / "partial"
        make_dir(root)
        make_dir(self.blob_dir, root)
        make_dir(self.partial_dir, root)
        for entry in os.scandir(self.blob_dir):
            if entry.is_dir(follow_symlinks=False) or entry.is_symlink():
                make_dir(Path(entry.path), root)

    def path(self, sha256: str) -> Path:
        return Path(self.path_str(sha256))

    def path_str(self, sha256: str) -> str:
        """The blob's path as a string: made without pathlib, for every FUSE open."""
        return f"{self.blob_dir_str}/{sha256[:2]}/{sha256}"

    def exists(self, sha256: str) -> bool:
        """The blob is in the store (a regular file; anything else is no blob)."""
        return is_regular(self.path(sha256))

    def stray_entries(self) -> list[tuple[Path, str]]:
        """(path, kind) of the entries of ``partial/`` and ``blobs/`` that are neither
        regular files nor (in ``blobs/``) directories: buffyfs never makes them."""
        strays = []
        for directory in (self.partial_dir, self.blob_dir):
            for entry in os.scandir(directory):
                if entry.is_dir(follow_symlinks=False) and directory == self.blob_dir:
                    strays += [(Path(e.path), kind) for e in os.scandir(entry.path)
                               if (kind := entry_kind(e.path)) not in ("regular file", None)]
                elif (kind := entry_kind(entry.path)) not in ("regular file", None):
                    strays.append((Path(entry.path), kind))
        return strays

    def partial_path(self, source: str) -> Path:
        return self.partial_dir / f"{source}.part"

    def lock_path(self, source: str) -> Path:
        return self.partial_dir / f"{source}.lock"

    def commit_partial(self, partial: Path, sha256: str, replace: bool = False) -> Path:
        """Move a complete, fsynced partial file into the store under its hash.

        If the content is already stored, the partial file is dropped instead, unless
        ``replace``: the stored file is damaged and the fresh bytes take its place. Only
        a regular file is ever renamed into the store (else NotRegularFile), and it
        replaces whatever else sits at the blob's name. Blocking: call from a worker
        thread.
        """
        target = self.path(sha256)
        fd = open_file(partial, os.O_RDONLY)
        try:
            if is_regular(target) and not replace:
                partial.unlink(missing_ok=True)
                return target
            make_dir(target.parent, self.root)
            os.fchmod(fd, 0o444)
            st = os.fstat(fd)
            now = os.lstat(partial)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):  # swapped meanwhile
                raise NotRegularFile(partial, entry_kind(partial) or "vanished file")
            os.rename(partial, target)
        finally:
            os.close(fd)
        fsync_dir(target.parent)
        return target

    def open_blob(self, sha256: str) -> int:
        """An O_RDONLY file descriptor of the blob (the caller closes it); never
        through a symlink (NotRegularFile, an OSError)."""
        return self.open_blob_sized(sha256)[0]

    def open_blob_sized(self, sha256: str) -> tuple[int, int]:
        """``open_blob`` and the blob file's size, from the one fstat the open makes
        (per FUSE open of a version)."""
        fd, st = open_regular(self.path_str(sha256))
        return fd, st.st_size

    def is_current(self, sha256: str, fd: int) -> bool:
        """Whether ``fd`` is still the file stored under ``sha256`` (a repair renames
        fresh bytes over a damaged blob: damage seen through an older fd is old news)."""
        try:
            now = os.lstat(self.path(sha256))
        except FileNotFoundError:
            return True  # gone: the damage (a missing blob) is current
        held = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def partial_size(self, source: str) -> int:
        """Bytes of the source's partial file (0: none, or not a regular file)."""
        try:
            st = os.lstat(self.partial_path(source))
        except FileNotFoundError:
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0



class FileLock:
    """An flock on a file (created if needed); held until ``release``. Works across
    processes: the mount and the command line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, exclusive: bool = True, blocking: bool = True) -> bool:
        """Take the lock; False if ``blocking`` is off and someone else holds it."""
        fd = open_file(self.path, os.O_RDWR | os.O_CREAT, 0o600, replace=True)
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
    """sha256 of a regular file (NotRegularFile if it is a symlink or the like)."""
    h = hashlib.sha256()
    with open(open_file(path, os.O_RDONLY), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
