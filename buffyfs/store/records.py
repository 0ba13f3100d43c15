"""The index's records as typed values, and their one codec.

Every JSON value stored in the index's ``sources``, ``versions``, ``garbage``,
``state``, ``inodes`` and ``blobs`` tables (index.py) is one of the dataclasses here;
the fields and their comments are the schema of those values. They are frozen: a change
is ``dataclasses.replace(record, field=...)`` written back through ``index.Writer``.

The codec (``encode`` / ``decode``) writes the JSON the code before these types wrote:
the same keys, with the optional ones (``OMIT``) left out while they hold their default,
so an index written by either reads the same with both. Keys are written in field
order. Unknown keys (written by a newer buffyfs) are dropped on decode: a record
rewritten here loses them.

Decoding uses msgspec, which builds the dataclass straight from the JSON bytes (no
intermediate dict): version records decode about twice as fast as with ``json.loads``
and a constructor call, and faster than ``json.loads`` to a dict did before
(bench/records.py). A value of the wrong type (a damaged record) is a ValueError.

Nested values (a damage mark, the last error, progress, a resume point, the last
refresh) stay plain JSON objects; their keys are in the field comments.

"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

import msgspec

OMIT = {"omit": True}  # field metadata: left out of the JSON while at its default


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """``sources`` NAME -> a registered source."""

    url: str
    options: dict[str, Any]  # normalized (options.normalize_options)
    ino: int  # the first of INODES_PER_SOURCE inode numbers it owns (index.SourceInode)
    added_at: str | None = None  # RFC 3339 UTC
    # the pinned version id (None: not pinned, or pinned with no version yet: the first
    # version commits as the pin)
    pin: str | None = None
    # a replica's copy of a hub's source (replica.py), never refreshed here
    mirror: bool = dataclasses.field(default=False, metadata=OMIT)


@dataclasses.dataclass(frozen=True, slots=True)
class Version:
    """``versions`` NAME \\0 ID -> a version of a source; in ``garbage`` (8-byte inode ->)
    also with ``source``: a version of a removed source, kept until no reader holds it."""

    id: str  # fetch time and sha256 prefix (index.version_id): ids sort by fetch time
    sha256: str
    size: int
    fetched_at: str  # RFC 3339 UTC
    url: str | None = None  # the source's URL when fetched, credentials redacted
    etag: str | None = None
    last_modified: str | None = None
    content_type: str | None = None
    ino: int = 0
    tags: list[str] = dataclasses.field(default_factory=list)
    # {"at", "reason"}: the blob failed a check (see ``BlobEntry.damaged``); ``latest``
    # skips the version
    damaged: dict[str, Any] | None = dataclasses.field(default=None, metadata=OMIT)
    # RFC 3339 UTC, set by ``hold``: collection and the quota leave the version alone
    # until then (gc.py); ``release`` drops it; a time in the past is no hold
    held_until: str | None = dataclasses.field(default=None, metadata=OMIT)
    # why the version was tagged ``failed`` (validate.py, the ``validate`` command)
    validation: str | None = dataclasses.field(default=None, metadata=OMIT)
    # a replica's version whose bytes are not here yet: no blob reference until they
    # are (replica.py)
    remote: bool = dataclasses.field(default=False, metadata=OMIT)
    # garbage only: the removed source it belonged to
    source: str | None = dataclasses.field(default=None, metadata=OMIT)


@dataclasses.dataclass(frozen=True, slots=True)
class SourceState:
    """``state`` NAME -> how a source's refreshes go (refresh.py, scheduler.py); a
    source with no entry has the defaults. Times are RFC 3339 UTC."""

    last_check: str | None = None
    last_success: str | None = None
    next_check: str | None = None
    consecutive_failures: int = 0
    last_error: dict[str, Any] | None = None  # {"at", "message"}
    # why the last control write to the source failed (commands.py)
    last_control_error: str | None = None
    progress: dict[str, Any] | None = None  # {"bytes", "total"} of the body under way
    # idle, fetching, or waiting for a retry
    state: str = dataclasses.field(default="idle", metadata=OMIT)
    # while a refresh runs: its attempt number, and why it waits for a download slot
    attempt: int | None = dataclasses.field(default=None, metadata=OMIT)
    queued: str | None = dataclasses.field(default=None, metadata=OMIT)
    # the resume point of partial/NAME.part: {"key", "etag", "last_modified"}
    # (refresh.py) and its map of arrived segments: "segment_size", "total",
    # "segments", "prefix" (segments.py)
    partial: dict[str, Any] | None = dataclasses.field(default=None, metadata=OMIT)
    # the next refresh is unconditional (``refresh --force``; the refresh clears it to
    # null, written as such before these types)
    force: bool | None = dataclasses.field(default=None, metadata=OMIT)
    # how the last refresh ended: {"started" (epoch seconds), "result", "version",
    # "error"} (refresh.Outcome)
    last_refresh: dict[str, Any] | None = dataclasses.field(default=None, metadata=OMIT)


@dataclasses.dataclass(frozen=True, slots=True)
class InodeRef:
    """``inodes`` 8-byte inode -> what the inode names."""

    kind: str  # a name of index.SourceInode, or "version"
    source: str
    id: str | None = dataclasses.field(default=None, metadata=OMIT)  # versions only


@dataclasses.dataclass(frozen=True, slots=True)
class BlobEntry:
    """``blobs`` SHA256 -> a blob file and its users. A blob file whose entry is gone is
    an orphan (gc.py removes it)."""

    size: int
    refs: int = 0  # how many versions (in ``versions`` and ``garbage``) use it
    # {"at", "reason"}: the file is missing, has the wrong size or the wrong hash
    # (fs/ open, scrub.py); the same mark is on every version using the blob, and both
    # go when fresh bytes replace the file (index.clear_damage)
    damaged: dict[str, Any] | None = dataclasses.field(default=None, metadata=OMIT)
    # what the blob unpacks to (unpacker.py): {"state", "kind"[, "size", "file_size",
    # "data_sha256", "source", "members", "skipped", "bytes", "error", "retry", "at"]};
    # state none (not compressed, no archive), pending, running (``bytes`` so far), done
    # or error (``retry``: try again at the next start). Its ``size`` (the derived
    # files' bytes) counts in ``blob_bytes``
    unpacked: dict[str, Any] | None = dataclasses.field(default=None, metadata=OMIT)


Record = Source | Version | SourceState | InodeRef | BlobEntry
R = TypeVar("R", Source, Version, SourceState, InodeRef, BlobEntry)

# per type: field name -> (omitted at its default, the default)
_FIELDS: dict[type, dict[str, tuple[bool, Any]]] = {}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING  # required


for _cls in (Source, Version, SourceState, InodeRef, BlobEntry):
    _FIELDS[_cls] = {f.name: (bool(f.metadata.get("omit")), _default(f))
                     for f in dataclasses.fields(_cls)}

_decoders = {cls: msgspec.json.Decoder(cls) for cls in _FIELDS}


def to_dict(record: Record) -> dict[str, Any]:
    """The record as the JSON object stored for it (optional keys at their default
    left out)."""
    out = {}
    for name, (omit, default) in _FIELDS[type(record)].items():
        value = getattr(record, name)
        if omit and value == default:
            continue
        out[name] = value
    return out


def encode(record: Record) -> bytes:
    """The stored JSON of a record: compact ``json.dumps``, as written before typed
    records (non-ASCII escaped; msgspec would write it raw)."""
    return json.dumps(to_dict(record), separators=(",", ":")).encode()


def decode(cls: type[R], raw: bytes) -> R:
    """A record from its stored JSON. Keys missing (written before they existed) take
    their defaults; unknown keys are dropped."""
    try:
        return _decoders[cls].decode(raw)
    except msgspec.ValidationError as e:
        raise ValueError(f"bad {cls.__name__} record: {e}") from None


def from_dict(cls: type[R], obj: dict[str, Any] | R) -> R:
    """A record from its JSON object (a record is returned as it is)."""
    if isinstance(obj, cls):
        return obj
    fields = _FIELDS[cls]
    return cls(**{k: v for k, v in obj.items() if k in fields})
