"""``SOURCE/@unpacked/``: the FUSE side of unpacked views (fs.py hands these inodes here).

    SOURCE/@unpacked/            there when the source's ``unpack`` is ``auto``; listed
                                 in SOURCE/ once a version has something to unpack
    SOURCE/@unpacked/latest      the view of the version ``latest`` resolves to now
    SOURCE/@unpacked/ID          a compressed version: its decompressed bytes (a file);
                                 an archive: a directory of its members

Inode numbers, all derived from stable ones (never stored, never reused):

    FIRST_INO + source base                       a source's @unpacked/
    VIEW_BASE + (version inode << MEMBER_BITS)    a version's view
      + 1 + i                                     member i of its (sorted) member list

A view is immutable once its unpack is done (cached like a version); before, its size
is unknown, so it is not cached and an open or listing waits for the unpack.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from buffyfs.safeio import open_file
from buffyfs.store.index import rfc3339_ns
from buffyfs.store.records import Source, Version
from buffyfs.store.unpack import COMPRESSED, DerivedStore

if TYPE_CHECKING:
    from buffyfs.fs.handlers import BuffyFS
    from buffyfs.store.unpacker import Unpacker

log = logging.getLogger(__name__)

FIRST_INO = 1 << 60
VIEW_BASE = 1 << 61
MEMBER_BITS = 24
MEMBER_MASK = (1 << MEMBER_BITS) - 1
IMMUTABLE_TIMEOUT = 3600.0
SHORT_TIMEOUT = 1.0
MEMBER_LISTS_KEPT = 8  # member lists of archives kept in memory


def owns(ino: int) -> bool:
    return ino >= FIRST_INO


def dir_ino(source_base: int) -> int:
    return FIRST_INO + source_base


def view_ino(version_ino: int, member: int = -1) -> int:
    return VIEW_BASE + (version_ino << MEMBER_BITS) + member + 1


@dataclass
class UnpackedHandle:
    fd: int
    start: int  # where the file's bytes begin in fd
    size: int
    version_ino: int


@dataclass
class View:
    source: str
    version: Version
    record: dict[str, Any] | None  # blobs[SHA].unpacked
    member: int  # -1: the view itself


class Members:
    """An archive's member list (unpack.confine's), with its directory structure."""

    def __init__(self, entries: list[list[Any]]) -> None:
        self.entries = entries[:MEMBER_MASK - 1]
        self.by_path = {e[0]: i for i, e in enumerate(self.entries)}
        self.children: dict[int, list[int]] = collections.defaultdict(list)
        for i, e in enumerate(self.entries):
            self.children[e[7]].append(i)  # the parent's position (unpack.confine)


class UnpackedTree:
    def __init__(self, fs: BuffyFS) -> None:
        self.fs = fs
        self.index = fs.index
        self.derived = DerivedStore(fs.cache.root)
        self.unpacker: Unpacker | None = None  # the mount's (waits for unpacks)
        self.member_lists: collections.OrderedDict[str, Members] = collections.OrderedDict()

    # --- resolving --------------------------------------------------------------------

    def _source_of_dir(self, ino: int) -> tuple[str, int]:
        base = ino - FIRST_INO
        with self.index.read() as r:
            ref = r.inode(base)
            src = r.source(ref.source) if ref and ref.kind == "dir" else None
        if src is None or src.ino != base or not shown(src):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return ref.source, base

    def _view(self, ino: int) -> View:
        rel = ino - VIEW_BASE
        with self.index.read() as r:
            found = r.version_by_inode(rel >> MEMBER_BITS)
            if found is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            record = r.unpacked(found[1].sha256)
        return View(found[0], found[1], record, (rel & MEMBER_MASK) - 1)

    def _members(self, view: View) -> Members:
        sha = view.version.sha256
        if sha in self.member_lists:
            self.member_lists.move_to_end(sha)
            return self.member_lists[sha]
        try:
            with open(open_file(self.derived.members_path(sha), os.O_RDONLY), "rb") as f:
                members = Members(json.load(f))
        except (OSError, ValueError):
            raise pyfuse3.FUSEError(errno.EIO) from None
        self.member_lists[sha] = members
        while len(self.member_lists) > MEMBER_LISTS_KEPT:
            self.member_lists.popitem(last=False)
        return members

    async def _finished(self, view: View) -> dict[str, Any]:
        """The view's record once its unpack has ended; EIO if it failed."""
        record = view.record
        if (record is None or record["state"] not in ("done", "error", "none")) \
                and self.unpacker is not None:
            record = await self.unpacker.wait_done(view.version.sha256)
        if record is None or record["state"] == "none":
            raise pyfuse3.FUSEError(errno.ENOENT)
        if record["state"] != "done" or view.version.damaged:
            raise pyfuse3.FUSEError(errno.EIO)
        view.record = record
        return record

    async def _member_view(self, view: View) -> tuple[Members, list[Any] | None]:
        record = await self._finished(view)
        if record["kind"] in COMPRESSED:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        members = await self._members_soon(view)
        return members, members.entries[view.member] if view.member >= 0 else None

    async def _members_soon(self, view: View) -> Members:
        """The member list: from memory, else loaded in a worker thread."""
        members = self.member_lists.get(view.version.sha256)
        return members or await trio.to_thread.run_sync(self._members, view)

    # --- attributes -------------------------------------------------------------------

    def attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_uid, a.st_gid = self.fs.uid, self.fs.gid
        a.st_blksize = 1 << 17
        a.entry_timeout = a.attr_timeout = SHORT_TIMEOUT
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = self.fs.started_ns
        if ino < VIEW_BASE:
            self._source_of_dir(ino)
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o555, 2
            return a
        view = self._view(ino)
        stamp = rfc3339_ns(view.version.fetched_at)
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = stamp
        record = view.record
        if record is None or record.get("kind") is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        done = record["state"] == "done"
        if view.member < 0:
            if record["kind"] in COMPRESSED:
                a.st_mode, a.st_nlink = stat.S_IFREG | 0o444, 1
                a.st_size = record.get("file_size", 0) if done else 0
            else:
                a.st_mode, a.st_nlink = stat.S_IFDIR | 0o555, 2
            if done:
                a.entry_timeout = a.attr_timeout = IMMUTABLE_TIMEOUT
            else:
                a.attr_timeout = 0
            a.st_blocks = (a.st_size + 511) // 512
            return a
        if not done:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._member_attr(ino, self._members(view).entries[view.member])

    def _member_attr(self, ino: int, entry: list[Any]) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_uid, a.st_gid = self.fs.uid, self.fs.gid
        a.st_blksize = 1 << 17
        _path, kind, size, mode, mtime = entry[:5]
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = int(mtime) * 10**9
        if kind == "d":
            a.st_mode, a.st_nlink = stat.S_IFDIR | (mode & 0o555) | 0o500, 2
        elif kind == "l":
            a.st_mode, a.st_nlink = stat.S_IFLNK | 0o777, 1
            a.st_size = size
        else:
            a.st_mode, a.st_nlink = stat.S_IFREG | (mode & 0o555) | 0o400, 1
            a.st_size = size
        a.st_blocks = (a.st_size + 511) // 512
        a.entry_timeout = a.attr_timeout = IMMUTABLE_TIMEOUT
        return a

    # --- lookup and listing -----------------------------------------------------------

    async def lookup(self, parent: int, name: str) -> int:
        if parent < VIEW_BASE:
            source, base = self._source_of_dir(parent)
            if name == "..":
                return base
            if name == ".":
                return parent
            with self.index.read() as r:
                v = r.latest(source) if name == "latest" else \
                    r.version(source, name) if "\0" not in name else None
            if v is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if self.unpacker is not None:
                kind = await trio.to_thread.run_sync(self.unpacker.detect_now, v.sha256)
            else:
                with self.index.read() as r:
                    kind = (r.unpacked(v.sha256) or {}).get("kind")
            if kind is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return view_ino(v.ino)
        view = self._view(parent)
        members, entry = await self._member_view(view)
        if name == ".":
            return parent
        if name == "..":
            if entry is None:
                return dir_ino(self._source_base(view.source))
            up = posixpath.dirname(entry[0])
            return view_ino(view.version.ino, members.by_path[up]) if up else \
                view_ino(view.version.ino)
        path = f"{entry[0]}/{name}" if entry is not None else name
        i = members.by_path.get(path)
        if i is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return view_ino(view.version.ino, i)

    def _source_base(self, source: str) -> int:
        with self.index.read() as r:
            src = r.source(source)
        if src is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return src.ino

    async def _version_entries(self, ino: int) -> list[tuple[str, int]]:
        """(name, inode) of a source's @unpacked/: ``latest`` and every version whose
        bytes are compressed or an archive (as far as looked at)."""
        source, _ = self._source_of_dir(ino)
        with self.index.read() as r:
            latest = r.latest(source)
            out = []
            for v in r.versions(source):
                record = r.unpacked(v.sha256)
                if record is not None and record.get("kind"):
                    out.append((v.id, view_ino(v.ino)))
                    if latest is not None and v.id == latest.id:
                        out.insert(0, ("latest", view_ino(v.ino)))
        return out

    async def listing(self, ino: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """A directory's entries with their attributes (an archive's built in a worker
        thread from its member list: 100,000 members take a fraction of a second)."""
        if ino < VIEW_BASE:
            out = [(n.encode(), self.attr(i)) for n, i in await self._version_entries(ino)]
            for name, attr in out:
                if name == b"latest":
                    attr.entry_timeout = SHORT_TIMEOUT  # moves with the source's latest
            return out
        view = self._view(ino)
        members, entry = await self._member_view(view)

        def build() -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
            children = members.children.get(view.member if entry is not None else -1, [])
            base = view_ino(view.version.ino)
            return [(posixpath.basename(members.entries[i][0]).encode(),
                     self._member_attr(base + 1 + i, members.entries[i])) for i in children]

        if len(members.children.get(view.member if entry is not None else -1, [])) < 1000:
            return build()
        return await trio.to_thread.run_sync(build)

    def is_dir(self, ino: int) -> bool:
        return self.attr(ino).st_mode & stat.S_IFDIR == stat.S_IFDIR

    # --- reading ----------------------------------------------------------------------

    async def open(self, ino: int) -> tuple[UnpackedHandle, bool]:
        """A handle on the view's bytes, and whether the open waited for the unpack."""
        if ino < VIEW_BASE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        view = self._view(ino)
        waited = view.record is None or view.record["state"] != "done"
        record = await self._finished(view)
        sha = view.version.sha256
        if view.member < 0:
            if record["kind"] not in COMPRESSED:
                raise pyfuse3.FUSEError(errno.EISDIR)
            path, start, size = self.derived.data_path(sha), 0, record["file_size"]
        else:
            entry = (await self._members_soon(view)).entries[view.member]
            if entry[1] == "d":
                raise pyfuse3.FUSEError(errno.EISDIR)
            if entry[1] != "f":
                raise pyfuse3.FUSEError(errno.ELOOP)
            path = self.fs.cache.blobs.path(sha) if record.get("source") == "blob" \
                else self.derived.data_path(sha)
            start, size = entry[5], entry[2]
        try:
            fd = open_file(path, os.O_RDONLY)
        except OSError as e:
            log.error("unpacked data of version %s unreadable (%s): run buffyfs check",
                      view.version.id, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        return UnpackedHandle(fd, start, size, view.version.ino), waited

    async def read(self, handle: UnpackedHandle, off: int, size: int) -> bytes | memoryview:
        size = max(0, min(size, handle.size - off))
        if size == 0:
            return b""
        data = self.fs._read_cached(handle.fd, handle.start + off, size)
        if data is None:
            data = await trio.to_thread.run_sync(os.pread, handle.fd, size, handle.start + off)
            if len(data) < size:
                raise pyfuse3.FUSEError(errno.EIO)  # the derived file shrank: damaged
        return data

    def readlink(self, ino: int) -> bytes:
        if ino < VIEW_BASE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        view = self._view(ino)
        if view.member < 0 or view.record is None or view.record["state"] != "done":
            raise pyfuse3.FUSEError(errno.EINVAL)
        entry = self._members(view).entries[view.member]
        if entry[1] != "l":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return entry[6].encode()

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        """The version's attributes, plus ``user.buffy.unpacked_from``."""
        if ino < VIEW_BASE:
            return {}
        view = self._view(ino)
        out = self.fs._xattrs(view.version.ino)
        out[b"user.buffy.unpacked_from"] = view.version.id.encode()
        return out


def listed_in(source: Source, kinds: list[str | None]) -> bool:
    """Whether ``@unpacked`` appears in the listing of a source's directory: when it is
    shown and some version has something to unpack (``kinds``: what each version's
    bytes are, as far as looked at). A plain source's directory stays as it was."""
    return shown(source) and any(kinds)


def shown(source: Source) -> bool:
    """Whether a source has ``@unpacked/`` (its ``unpack`` option is not ``off``)."""
    return source.options.get("unpack", "auto") != "off"
