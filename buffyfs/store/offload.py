"""Heavy work of the mount in a worker process, not a worker thread.

A worker thread that runs Python (a collection plan over 100,000 versions, the JSON
of 10,000 sources' ``@status``) holds the GIL the event loop's thread needs: every
FUSE request then waits its turn for it. A worker process has its own GIL. The worker
opens the index read-only itself (LMDB is safe across processes, and a read-only
open never waits for the writer lock) and sends back only bytes: the encoded answer,
or the plan in pickled batches. The mount hands each batch back to a worker to
commit (``commit_batch``: the worker then opens the index for writing; LMDB's writer
lock holds across processes) and gets the names of what went: the mount never
decodes the plan's versions nor maps the pages the commit's re-check reads.

The processes are trio-parallel's (spawned, kept for reuse, killed on cancel but for a
collection's commit, logging as the daemon does); a worker that dies is reported and
the work is done in a thread instead. What the
mount holds in memory and the index does not (its queued state writes, writes.py;
its open versions) is passed along. Small answers (one source's ``@status``, a root
``@status`` of a few sources) stay in a thread: the hop costs more than they do.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio_parallel

from buffyfs import crash, priority
from buffyfs import log as log_setup
from buffyfs.store import gc, status
from buffyfs.store.index import Index
from buffyfs.store.metrics import IndexFigures, index_figures

log = logging.getLogger(__name__)

T = TypeVar("T")

SMALL_SOURCES = 200  # a root @status or @metrics of fewer sources is built in a thread
SMALL_VERSIONS = 1000  # a collection of fewer versions is planned in a thread

# --- in the worker process ------------------------------------------------------------

_indexes: dict[Path, Index] = {}  # opened once per worker process, by path
# the mount's own, open already (LMDB: once per process): the work done in a thread
# when a worker process failed reads it, with its live queued state
_own: dict[Path, Index] = {}


def _index(path: Path, queued_state: dict[str, dict[str, Any]] | None = None) -> Index:
    if path in _own:
        return _own[path]
    index = _indexes.get(path)
    if index is None:
        index = _indexes[path] = Index(path, readonly=True)
    index.queued_state = queued_state
    return index


def _writable_index(path: Path) -> Index:
    """The index opened for writing in this worker: a read-only one opened before is
    closed first (LMDB: one environment per file and process). Opening for writing
    waits for LMDB's writer lock, which a commit takes anyway."""
    if path in _own:
        return _own[path]
    index = _indexes.get(path)
    if index is not None and index.readonly:
        index.close()
        del _indexes[path]
        index = None
    if index is None:
        index = _indexes[path] = Index(path)
    index.queued_state = None
    return index


@dataclass
class Plan:
    """A collection plan as the worker sends it back."""

    wake_at: str | None
    batches: list[bytes] = field(default_factory=list)  # pickled lists of gc.Doomed
    inos: list[list[int]] = field(default_factory=list)  # each batch's version inodes
    report: bytes | None = None  # a dry run: the whole report, JSON (gc.report_json)
    pid: int = 0  # the process that planned


def _plan(path: Path, open_inos: set[int], need: int, max_size: int | None,
          dry_run: bool) -> Plan:
    report = gc.plan_snapshot(_index(path), open_inos, need, max_size)
    if dry_run:
        return Plan(report.wake_at, report=json.dumps(gc.report_json(report)).encode(),
                    pid=os.getpid())
    batches, inos = [], []
    for i in range(0, len(report.doomed), gc.COMMIT_BATCH):
        batch = report.doomed[i:i + gc.COMMIT_BATCH]
        batches.append(pickle.dumps(batch))
        inos.append([d.version.ino for d in batch])
    return Plan(report.wake_at, batches, inos, pid=os.getpid())


def _commit(path: Path, batch: bytes, open_inos: set[int],
            progress: dict[str, Any] | None) -> gc.Report:
    """``gc.commit`` of one pickled batch of a plan, here: the re-check reads every
    version of the batch's sources, which the mount then never maps nor decodes. The
    answer names what went (``Report.slim``)."""
    report = gc.commit(_writable_index(path), pickle.loads(batch), open_inos,
                       progress).slim()
    if path not in _own:  # in a worker process: its answer is lost if it dies here
        crash.point("gc-worker-after-commit")
    return report


@dataclass
class Committed:
    """A batch's commit and what was read right after it, in the same process."""

    report: gc.Report
    read: Any  # what ``read_after`` returned


def _commit_and_read(path: Path, batch: bytes, open_inos: set[int],
                     progress: dict[str, Any] | None,
                     read_after: Callable[[Index, list[str]], Any]) -> Committed:
    """``_commit``, then ``read_after(index, names of the sources it touched)``."""
    report = _commit(path, batch, open_inos, progress)
    names = sorted({source for source, _, _ in report.gone})
    return Committed(report, read_after(_writable_index(path), names))


def _root_status(path: Path, queued_state: dict[str, dict[str, Any]] | None,
                 cache_dir: Path) -> bytes:
    index = _index(path, queued_state)
    with index.read() as r:
        size, quota = r.blob_bytes(), r.meta_json("max_cache_size")
    return encode_status(status.root_status(index, cache_dir, size, quota))


def _metrics(path: Path, queued_state: dict[str, dict[str, Any]] | None) -> IndexFigures:
    return index_figures(_index(path, queued_state))


# --- in the mount ----------------------------------------------------------------------

WORKER_IDLE = 60.0  # seconds an idle worker process lives on (one that planned a
# collection of 100,000 versions holds ~190 MiB until it ends; trio-parallel's default
# is 10 minutes)
WORKER_GRACE = 5.0  # seconds the daemon's exit waits for its workers before killing them


def configure_workers() -> None:
    """Set up the worker threads and processes; once, in the event loop's thread, before
    any is used. Both run niced below the loop (priority.py). The processes log as the
    daemon does (a collection's commit logs what it collected)."""
    loop_nice = priority.current()
    priority.nice_new_threads(loop_nice)
    trio_parallel.configure_default_context(
        idle_timeout=WORKER_IDLE, grace_period=WORKER_GRACE,
        init=functools.partial(_start_worker, log_setup.settings(),
                               priority.helper_nice(loop_nice)))


def _start_worker(logged: tuple[str, Path | None] | None, nice: int) -> bool:
    """In a new worker process: run at ``nice``, so that on a busy machine the daemon's
    event loop runs first (a collection of 100,000 versions keeps a worker busy for a
    minute; on two cores it took the loop's turn); log as the daemon."""
    priority.lower_to(nice)
    if logged is not None:
        log_setup.setup(*logged)
    return True



def encode_status(obj: dict[str, Any]) -> bytes:
    """The bytes of an ``@status`` file."""
    return (json.dumps(obj, indent=2) + "\n").encode()


async def _run(fn: Callable[..., T], index: Index, *args: Any, kill: bool = True,
               broken: Callable[[], None] | None = None) -> T:
    """``fn(index.path, *args)`` in a worker process (with ``kill``, killed if the
    caller is cancelled); in a thread, on ``index`` itself, if the worker died (a bug or
    out of memory there: the mount goes on), after calling ``broken``."""
    try:
        return await trio_parallel.run_sync(fn, index.path, *args, kill_on_cancel=kill)
    except trio_parallel.BrokenWorkerError as e:
        log.warning("a worker process failed (%s): doing the work in a thread", e)
        if broken is not None:
            broken()
        _own[index.path] = index
        return await trio.to_thread.run_sync(fn, index.path, *args)


async def plan_collection(index: Index, open_inos: set[int], need: int = 0,
                          max_size: int | None = None, dry_run: bool = False) -> Plan:
    """``gc.plan_snapshot`` in a worker process (CacheFull as there); of a small
    cache in a thread (no process is started for it)."""
    with index.read() as r:
        small = r.version_count() < SMALL_VERSIONS
    if small:
        _own[index.path] = index
        return await trio.to_thread.run_sync(_plan, index.path, open_inos, need, max_size,
                                             dry_run)
    return await _run(_plan, index, open_inos, need, max_size, dry_run)


async def commit_batch(index: Index, plan: Plan, batch: bytes, open_inos: set[int],
                       progress: dict[str, Any] | None = None,
                       lost: Callable[[], None] | None = None) -> gc.Report:
    """``gc.commit`` of one batch of ``plan`` in a worker process (a thread if the plan
    was small, or if the worker died). Never cut short by a cancel: a commit that
    landed must hand back the blobs it freed, for the mount to unlink them (a killed
    worker's would stay on disk, counted as freed, until the next start's sweep).
    ``lost`` is called when the worker died: its commit may have landed, and which
    blobs it freed is not known (the thread's second try finds them gone)."""
    return await _commit_where_planned(plan, _commit, index, batch, open_inos, progress,
                                       lost=lost)


async def commit_and_read(index: Index, plan: Plan, batch: bytes, open_inos: set[int],
                          progress: dict[str, Any] | None,
                          read_after: Callable[[Index, list[str]], Any],
                          lost: Callable[[], None] | None = None) -> Committed:
    """``commit_batch``, and ``read_after(index, names)`` of the sources whose versions
    went, read by the same worker right after the commit: what the mount needs to know
    of them then (fs/tree.py's ``read_sources``) is neither read nor decoded on its
    loop. ``read_after`` must be a module-level function (it is pickled by name).
    ``lost``: as for ``commit_batch``."""
    return await _commit_where_planned(plan, _commit_and_read, index, batch, open_inos,
                                       progress, read_after, lost=lost)


async def _commit_where_planned(plan: Plan, fn: Callable[..., T], index: Index,
                                *args: Any, lost: Callable[[], None] | None) -> T:
    """``fn(index.path, *args)`` where ``plan`` was made: in a worker process, or a
    thread for a small plan (see ``commit_batch``); never cut short by a cancel."""
    with trio.CancelScope(shield=True):
        if plan.pid == os.getpid():
            _own[index.path] = index
            return await trio.to_thread.run_sync(fn, index.path, *args)
        return await _run(fn, index, *args, kill=False, broken=lost)


def is_small(index: Index) -> bool:
    with index.read() as r:
        return r.source_count() < SMALL_SOURCES


async def root_status(index: Index, cache_dir: Path) -> bytes:
    """The root ``@status`` file's bytes, built in a worker process."""
    return await _run(_root_status, index, _queued(index), cache_dir)


async def metrics_figures(index: Index) -> IndexFigures:
    """What ``@metrics`` reads from the index, in a worker process."""
    return await _run(_metrics, index, _queued(index))


def _queued(index: Index) -> dict[str, dict[str, Any]] | None:
    """The state writes the mount queued and has not committed (writes.py): the
    worker's reads see them too (a copy: the mount changes its own meanwhile)."""
    return dict(index.queued_state) if index.queued_state else None
