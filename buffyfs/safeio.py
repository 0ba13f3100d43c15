"""Opening the cache's own files and directories without following what was planted
in them.

The index holds secrets (header values) and the daemon often runs as root, so a
symlink, fifo or device found where buffyfs expects one of its own files must never
be followed: a file is opened with ``O_NOFOLLOW`` and must turn out to be a regular
file; a directory must be a real directory, owned by the user running buffyfs and
writable by no one else, so that no one else can plant anything in it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path
from typing import NoReturn

from buffyfs.errors import CacheError

log = logging.getLogger(__name__)


class NotRegularFile(CacheError, OSError):
    """A cache entry that must be a regular file is something else (a symlink...).

    An OSError too, so that code handling I/O errors of a cache file handles it."""

    def __init__(self, path: Path | str, what: str) -> None:
        OSError.__init__(self, errno.EINVAL, f"not a regular file but a {what}", str(path))
        self.what = what

    def __str__(self) -> str:
        return f"{self.filename} is a {self.what}, not a regular file"


def describe(mode: int) -> str:
    """What kind of entry a mode says (``symlink``, ``fifo``...)."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def entry_kind(path: Path | str) -> str | None:
    """What is at ``path`` itself (a symlink is not followed); None if nothing."""
    try:
        return describe(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


def is_regular(path: Path | str) -> bool:
    return entry_kind(path) == "regular file"


def open_file(path: Path | str, flags: int, mode: int = 0o600, replace: bool = False) -> int:
    """``os.open`` of a regular file only, never through a symlink (else NotRegularFile).

    With ``replace`` (for files buffyfs creates, flags with ``O_CREAT``), an entry that
    is not a regular file is removed, with a warning, and a new file created instead.
    """
    opened = _open_regular(path, flags, mode)
    if isinstance(opened, str):  # what is there instead
        return _replace(path, opened, flags, mode) if replace else _refuse(path, opened)
    return opened[0]


def open_regular(path: Path | str) -> tuple[int, os.stat_result]:
    """``open_file(path, O_RDONLY)`` and the file's stat, from the one ``fstat`` the
    check makes (an open of a version, per FUSE open: its size is checked too)."""
    opened = _open_regular(path, os.O_RDONLY, 0)
    return _refuse(path, opened) if isinstance(opened, str) else opened


def _open_regular(path: Path | str, flags: int,
                  mode: int) -> tuple[int, os.stat_result] | str:
    """(fd, its stat) of the regular file at ``path``, or what is there instead."""
    # O_NONBLOCK: opening a fifo must not wait for a writer; dropped again below.
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        what = entry_kind(path) if e.errno != errno.ENOENT else None
        if what is None or what == "regular file":
            raise
        return what
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return describe(st.st_mode)
    # F_SETFL sets only the status flags (O_APPEND, O_NONBLOCK...): those of ``flags``
    # are the fd's, so no F_GETFL is needed first
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return fd, st


def _refuse(path: Path | str, what: str) -> NoReturn:
    raise NotRegularFile(path, what)


def _replace(path: Path | str, what: str, flags: int, mode: int) -> int:
    if what == "directory" or not flags & os.O_CREAT:
        raise NotRegularFile(path, what)
    os.unlink(path)  # removes the entry itself, never what a symlink points to
    log.warning("removed %s: a %s where buffyfs keeps a regular file", path, what)
    return open_file(path, flags | os.O_EXCL, mode)


def opener(path: str, flags: int) -> int:
    """For ``open(..., opener=opener)``: a file buffyfs owns, replaced if not regular."""
    return open_file(path, flags, 0o600, replace=True)


def read_text(path: Path | str) -> str:
    """The text of a regular file (NotRegularFile if it is something else)."""
    with open(open_file(path, os.O_RDONLY), encoding="utf-8", errors="replace") as f:
        return f.read()


def check_dir(path: Path, root: Path | None = None) -> None:
    """CacheError unless ``path`` is a real directory (not a symlink) that the user
    running buffyfs owns and that no one else may write to."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise CacheError(f"cannot use cache directory {path}: {e.strerror}") from None
    what = describe(st.st_mode)
    if what == "symlink":
        raise CacheError(f"cache directory {path} is a symlink: buffyfs does not follow "
                         "links in its cache (name the directory it points to instead)")
    if what != "directory":
        raise CacheError(f"cache directory {path} is a {what}, not a directory")
    if st.st_uid != os.geteuid():
        raise CacheError(f"cache directory {path} belongs to uid {st.st_uid}, not to the "
                         f"user running buffyfs (uid {os.geteuid()}): refusing to use it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheError(f"cache directory {path} is writable by others "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing to use it; "
                         f"run chmod -R go-w {root or path}")


def make_dir(path: Path, root: Path | None = None) -> None:
    """Create a private directory if missing; then ``check_dir`` it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CacheError(f"cannot create cache directory {path}: {e.strerror}") from None
    check_dir(path, root)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
