"""Unpacked views: what a version's bytes are (by their magic bytes), and the unpacking
itself, which runs in a child process (``python -m buffyfs.store.unpack``).

Representation (chosen by measurement, bench/unpack.py): a compressed file is
decompressed once into a *derived file*; reads at any offset are then plain ``pread``
calls on it, as fast as a version's blob. A seek-point index over the compressed bytes
(indexed_gzip and the like) saves the disk space but pays a decompression of up to a
window per random read and decompresses again on every sequential read; single-frame
xz and zstd cannot seek at all.

Archives become a member list (``members.json``) over one data file:

    plain tar              members point into the version's blob itself (no copy)
    compressed tar         the decompressed tar is the data file; members point into it
    zip                    the members' bytes, extracted one after the other

Layout under the cache directory (derived data is keyed by the sha256 of the
original, so versions with the same bytes share it)::

    unpacked/ab/SHA256/data            the derived file (absent for a plain tar)
    unpacked/ab/SHA256/members.json    the member list of an archive
    unpacked/partial/SHA256/           an unpack in progress; renamed to its place
                                       only complete (crash-safe like blobs)

The child is the only code that parses untrusted compressed data: it runs niced, dies
with its parent, stops at ``unpack_max_size`` bytes of output, and answers one JSON
line on stdout (``{"kind", "size", "file_size", "members"}`` or ``{"error"}``). A
crash, bomb or hang in it costs the mount nothing.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import json
import lzma
import os
import posixpath
import shutil
import stat
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from buffyfs import priority
from buffyfs.safeio import entry_kind, fsync_dir, make_dir, open_file

COMPRESSED = ("gzip", "bzip2", "xz", "zstd")
ARCHIVES = ("tar", "zip")
CHUNK = 1 << 20
HEAD = 4096  # bytes read (after decompression) to tell a tar from a plain file
# Test hook (with BUFFYFS_TEST_HOOKS=1): write at most this many bytes a second, so that
# a test can open a view while its unpack runs, or kill the mount in the middle.
_TEST_RATE = int(os.environ.get("BUFFYFS_TEST_UNPACK_RATE", "0")) \
    if os.environ.get("BUFFYFS_TEST_HOOKS") == "1" else 0


# --- what the bytes are ---------------------------------------------------------------


def compression_of(head: bytes) -> str | None:
    """The compression format named by the first bytes, or None."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0" and \
            head[4:10] in (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90"):
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return None


def is_tar(head: bytes) -> bool:
    """A POSIX (ustar) or GNU tar header at the start (magic at offset 257)."""
    return len(head) >= 263 and head[257:262] == b"ustar"


def is_zip(head: bytes) -> bool:
    return head[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def detect(path: Path | str) -> str | None:
    """``gzip``, ``bzip2``, ``xz``, ``zstd``, ``tar``, ``tar+gzip`` (etc.), ``zip``, or
    None (nothing to unpack). Reads a few KiB; a corrupt head is a compressed file whose
    unpack will fail (and say why), not an error here."""
    with open(open_file(path, os.O_RDONLY), "rb") as f:
        head = f.read(HEAD)
        if is_zip(head):
            return "zip"
        if is_tar(head):
            return "tar"
        method = compression_of(head)
        if method is None:
            return None
        f.seek(0)
        try:
            inner = _decompressed(f, method).read(HEAD)
        except Exception:  # noqa: BLE001 (any decoder error: corrupt; the unpack says so)
            return method
    return f"tar+{method}" if is_tar(inner) else method


def is_archive(kind: str) -> bool:
    return kind == "zip" or kind.startswith("tar")


class _ZstdReader:
    """zstandard's stream reader across frames, closed with its file."""

    def __init__(self, f: IO[bytes]) -> None:
        import zstandard

        self.reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)

    def read(self, n: int = -1) -> bytes:
        return self.reader.read(n)

    def readinto(self, b: Any) -> int:
        return self.reader.readinto(b)


def _decompressed(f: IO[bytes], method: str) -> Any:
    """A file object reading the decompressed bytes of ``f`` (concatenated members,
    streams and frames included)."""
    if method == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=f, mode="rb")
    if method == "bzip2":
        return bz2.BZ2File(f, "rb")
    if method == "xz":
        return lzma.LZMAFile(f, "rb")
    if method == "zstd":
        return _ZstdReader(f)
    raise ValueError(method)


# --- the derived store ------------------------------------------------------------------


class DerivedStore:
    """Paths of derived data under the cache directory (layout in the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "unpacked"
        self.partial_dir = self.dir / "partial"

    def ensure(self) -> None:
        make_dir(self.dir, self.root)
        make_dir(self.partial_dir, self.root)

    def path(self, sha256: str) -> Path:
        return Path(self.path_str(sha256))

    def path_str(self, sha256: str) -> str:
        """``path`` as a string, made without pathlib (per freed blob of a collection)."""
        return f"{self.dir}/{sha256[:2]}/{sha256}"

    def partial(self, sha256: str) -> Path:
        return Path(self.partial_str(sha256))

    def partial_str(self, sha256: str) -> str:
        return f"{self.partial_dir}/{sha256}"

    def data_path(self, sha256: str) -> Path:
        return self.path(sha256) / "data"

    def members_path(self, sha256: str) -> Path:
        return self.path(sha256) / "members.json"

    def commit(self, sha256: str) -> bool:
        """Move a complete unpack into place (replacing a stale one). False when its
        partial is gone: a collection took the blob, and its unpack, meanwhile."""
        target = self.path(sha256)
        make_dir(target.parent, self.root)
        _remove_entry(target)
        try:
            os.rename(self.partial(sha256), target)
        except FileNotFoundError:
            return False
        fsync_dir(target.parent)
        return True

    def remove(self, sha256: str) -> None:
        """Delete the derived data of ``sha256``, done or in progress. Paths made as
        strings: a collection removes this for every blob it frees (tens of thousands),
        in a worker thread whose Python time the event loop waits behind."""
        _remove_entry(self.path_str(sha256))
        _remove_entry(self.partial_str(sha256))

    def remove_partial(self, sha256: str) -> None:
        _remove_entry(self.partial(sha256))

    def drop_partials(self) -> None:
        """Unpacks a crash or an unmount interrupted: they start again from scratch."""
        if entry_kind(self.partial_dir) != "directory":
            return
        for entry in os.scandir(self.partial_dir):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)

    def stored(self) -> list[str]:
        """The sha256 of every derived entry in place."""
        out = []
        if entry_kind(self.dir) != "directory":
            return out
        for sub in os.scandir(self.dir):
            if sub.name == "partial" or not sub.is_dir(follow_symlinks=False):
                continue
            out += [e.name for e in os.scandir(sub.path)]
        return out

    def disk_size(self, sha256: str) -> int:
        """Bytes of the derived files of ``sha256`` (0: none)."""
        return _files_size(self.path(sha256))

    def partial_size(self, sha256: str) -> int:
        """Bytes of an unpack in progress."""
        return _files_size(self.partial(sha256))


def _remove_entry(path: Path | str) -> None:
    """Delete a file or a directory tree, never following links; gone already is fine."""
    kind = entry_kind(path)
    if kind == "directory":
        shutil.rmtree(path, ignore_errors=True)
    elif kind is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _files_size(directory: Path) -> int:
    total = 0
    for name in ("data", "members.json"):
        try:
            st = os.lstat(directory / name)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def data_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(open_file(path, os.O_RDONLY), "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


# --- the unpacking (in the child) -------------------------------------------------------


class UnpackError(Exception):
    """The input cannot be unpacked (corrupt, truncated, too big): the message says why."""


class _Output:
    """The data file being written, hashed, and bounded by ``limit`` bytes."""

    def __init__(self, path: Path, limit: int) -> None:
        self.f = open(open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb")
        self.limit = limit
        self.size = 0
        self.hash = hashlib.sha256()

    def write(self, block: bytes | memoryview) -> None:
        if self.size + len(block) > self.limit:
            raise UnpackError(f"expands past unpack_max_size ({self.limit} bytes)")
        _check_parent()
        self.f.write(block)
        self.hash.update(block)
        self.size += len(block)
        if _TEST_RATE:
            import time

            self.f.flush()
            time.sleep(len(block) / _TEST_RATE)

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, failed: object, *rest: object) -> None:
        """Complete: flushed to disk; failed: just closed (the partial goes anyway)."""
        try:
            if failed is None:
                self.f.flush()
                os.fsync(self.f.fileno())
        finally:
            self.f.close()


def _copy_gzip(f: IO[bytes], out: _Output) -> None:
    """gzip members one after the other (zero padding after the last is allowed), with
    zlib itself: twice the speed of gzip.GzipFile's 8 KiB reads (bench/unpack.py). The
    output of one call is bounded (``CHUNK``), so a bomb never sits in memory."""
    d = zlib.decompressobj(31)
    feed, in_member = b"", False
    while True:
        if not feed:
            feed = f.read(CHUNK)
            if not feed:
                break
        if not in_member:
            feed = feed.lstrip(b"\0")  # padding between or after members
            if not feed:
                continue
            in_member = True
        out.write(d.decompress(feed, CHUNK))
        feed = d.unconsumed_tail
        if d.eof:
            feed, in_member = d.unused_data, False
            d = zlib.decompressobj(31)
    if in_member:
        raise EOFError("truncated")


def _copy_decompressed(blob: Path, method: str, out: _Output) -> None:
    with open(open_file(blob, os.O_RDONLY), "rb") as f:
        if method == "gzip":
            return _copy_gzip(f, out)
        reader = _decompressed(f, method)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := reader.readinto(view):
            out.write(view[:n])


def _decoder_error(method: str, e: BaseException) -> str:
    if isinstance(e, EOFError):
        return f"truncated {method} data (it ends before its end marker)"
    return f"corrupt {method} data ({e})"


DECODER_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


def unpack(blob: Path, kind: str, out_dir: Path, limit: int) -> dict[str, Any]:
    """Unpack the blob into ``out_dir`` (which must not exist); returns the summary.
    Raises UnpackError."""
    os.mkdir(out_dir, 0o700)
    method = kind.partition("+")[2] if kind.startswith("tar+") else kind
    summary: dict[str, Any] = {"kind": kind}
    if kind in COMPRESSED or kind.startswith("tar+"):
        with _Output(out_dir / "data", limit) as out:
            try:
                _copy_decompressed(blob, method, out)
            except UnpackError:
                raise
            except DECODER_ERRORS as e:
                raise UnpackError(_decoder_error(method, e)) from None
            except Exception as e:  # zstandard.ZstdError and kin
                raise UnpackError(f"corrupt {method} data ({e})") from None
        summary["file_size"] = out.size
        summary["data_sha256"] = out.hash.hexdigest()
    if kind.startswith("tar"):
        data = out_dir / "data" if kind != "tar" else blob
        members = tar_members(data)
        summary["source"] = "blob" if kind == "tar" else "data"
    elif kind == "zip":
        with _Output(out_dir / "data", limit) as out:
            members = zip_members(blob, out)
        summary["file_size"] = out.size
        summary["data_sha256"] = out.hash.hexdigest()
        summary["source"] = "data"
    else:
        return summary
    tree = confine(members)
    with open(open_file(out_dir / "members.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
              "w") as f:
        json.dump(tree["members"], f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    summary["members"] = len(tree["members"])
    summary["skipped"] = tree["skipped"]
    return summary


# A member: [path, type, size, mode, mtime, offset, link target]; type "f" (file),
# "d" (directory), "l" (symlink). Paths are relative, "/"-separated, normalized. In
# members.json (sorted by path) each has an eighth field: its parent's position (-1:
# the top).
Member = list[Any]


def tar_members(path: Path) -> list[Member]:
    """The members of a tar file, with their data offsets. Hard links become copies of
    the entry they name (an earlier member, so no loop); devices and fifos are skipped."""
    out: list[Member] = []
    by_name: dict[str, Member] = {}
    try:
        with tarfile.open(fileobj=open(open_file(path, os.O_RDONLY), "rb"), mode="r:") as tar:
            for m in _iter_tar(tar):
                name = _clean(m.name)
                if m.isreg() and not m.issparse():
                    entry = [m.name, "f", m.size, m.mode & 0o7777, int(m.mtime),
                             m.offset_data, None]
                elif m.isdir():
                    entry = [m.name, "d", 0, m.mode & 0o7777, int(m.mtime), 0, None]
                elif m.issym():
                    entry = [m.name, "l", len(m.linkname.encode()), 0o777, int(m.mtime), 0,
                             m.linkname]
                elif m.islnk():
                    target = by_name.get(_clean(m.linkname) or "")
                    if target is None or target[1] != "f":
                        continue  # names nothing before it (or a non-file): skipped
                    entry = [m.name, "f", target[2], target[3], target[4], target[5], None]
                else:
                    continue
                out.append(entry)
                if name:
                    by_name[name] = entry
    except tarfile.TarError as e:
        raise UnpackError(f"corrupt tar archive ({e})") from None
    except (OSError, EOFError) as e:
        raise UnpackError(f"truncated tar archive ({e})") from None
    return out


def _iter_tar(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members one by one, none kept in memory (tarfile keeps a list otherwise)."""
    count = 0
    while (m := tar.next()) is not None:
        yield m
        tar.members = []
        count += 1
        if count % 1000 == 0:
            _check_parent()
    size = os.fstat(tar.fileobj.fileno()).st_size  # type: ignore[union-attr]
    if tar.offset > size:
        raise UnpackError("truncated tar archive (a member runs past its end)")


def zip_members(path: Path, out: _Output) -> list[Member]:
    """Extract every file member into ``out``, one after the other; their offsets."""
    members: list[Member] = []
    try:
        with zipfile.ZipFile(open(open_file(path, os.O_RDONLY), "rb")) as z:
            for info in z.infolist():
                mode = (info.external_attr >> 16) & 0o7777
                mtime = _zip_time(info.date_time)
                if info.is_dir():
                    members.append([info.filename, "d", 0, mode or 0o755, mtime, 0, None])
                    continue
                if stat.S_ISLNK(info.external_attr >> 16) and info.file_size <= 4096:
                    target = z.read(info).decode(errors="replace")  # at most the declared size
                    members.append([info.filename, "l", len(target.encode()), 0o777, mtime,
                                    0, target])
                    continue
                start = out.size
                with z.open(info) as src:
                    while block := src.read(CHUNK):
                        out.write(block)
                members.append([info.filename, "f", out.size - start, mode or 0o644,
                                mtime, start, None])
    except UnpackError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as e:
        raise UnpackError(f"corrupt zip archive ({e})") from None
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise UnpackError(f"corrupt or truncated zip archive ({e})") from None
    return members


def _zip_time(date_time: tuple[int, ...]) -> int:
    import calendar

    try:
        return calendar.timegm((*date_time, 0, 0, 0))
    except (ValueError, OverflowError):
        return 0


def _clean(name: str) -> str | None:
    """A member name as a confined relative path, or None when it must be skipped (an
    absolute name, or one that climbs out with ``..``)."""
    if not name or name.startswith("/") or "\0" in name:
        return None
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            return None  # even a/../b: a name that climbs is refused, not resolved
        parts.append(part)
    return "/".join(parts) or None


def _inside(link_dir: str, target: str) -> bool:
    """Whether a symlink in ``link_dir`` pointing at ``target`` stays in the tree."""
    if target.startswith("/") or not target:
        return False
    depth = len(link_dir.split("/")) if link_dir else 0
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in ("", "."):
            depth += 1
    return True


def confine(members: list[Member]) -> dict[str, Any]:
    """The member list as served: names cleaned; absolute names, names with ``..`` and
    symlinks pointing outside skipped; a duplicate name keeps its last entry (as
    extracting would); parent directories that the archive does not list are added; a
    name used both as a file and as a directory stays a directory. Sorted by path."""
    entries: dict[str, Member] = {}
    skipped = 0
    for m in members:
        name = _clean(m[0])
        if name is None:
            skipped += 1
            continue
        if m[1] == "l" and not _inside(posixpath.dirname(name), m[6]):
            skipped += 1
            continue
        entries[name] = [name, *m[1:]]
    for name in list(entries):
        parent = posixpath.dirname(name)
        while parent:
            have = entries.get(parent)
            if have is not None and have[1] == "d":
                break
            if have is not None:
                skipped += 1  # a file (or link) where a directory must be
            entries[parent] = [parent, "d", 0, 0o755, entries[name][4], 0, None]
            parent = posixpath.dirname(parent)
    out = [entries[k] for k in sorted(entries)]
    position = {m[0]: i for i, m in enumerate(out)}
    for m in out:  # the parent's position, so that readers need no path arithmetic
        m.append(position[posixpath.dirname(m[0])] if "/" in m[0] else -1)
    return {"members": out, "skipped": skipped}


# --- the child process ------------------------------------------------------------------


_PARENT: int | None = None  # the mount's pid, in the child


def _check_parent() -> None:
    """End the child when the mount that started it has died (it is then reparented).
    Called for every block written and every thousand tar members. (PR_SET_PDEATHSIG
    would fire when the *thread* that started the child ends: trio starts processes
    from worker threads, which end after 10 s idle.)"""
    if _PARENT is not None and os.getppid() != _PARENT:
        os._exit(1)


def main(argv: list[str]) -> int:
    """``python -m buffyfs.store.unpack BLOB KIND OUT_DIR LIMIT PARENT_PID MEMORY``."""
    import resource

    global _PARENT
    blob, kind, out_dir, limit, parent, memory = argv
    _PARENT = int(parent)
    _check_parent()
    try:  # niced below the mount's event loop (its thread's id is the mount's pid)
        loop_nice = os.getpriority(os.PRIO_PROCESS, _PARENT)
    except OSError:
        loop_nice = priority.current()
    priority.lower_to(priority.helper_nice(loop_nice))
    # hostile input must not take the machine's memory: a decoder asking more fails
    resource.setrlimit(resource.RLIMIT_AS, (int(memory), int(memory)))
    try:
        summary = unpack(Path(blob), kind, Path(out_dir), int(limit))
    except UnpackError as e:
        summary = {"error": str(e)}
    except MemoryError:
        summary = {"error": "unpacking needs more memory than it may use"}
    except RecursionError:
        summary = {"error": "archive nested too deeply"}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
