"""Issue 12, never stall: collection plans and big ``@status``/``@metrics`` answers are
built in a worker process (store/offload.py), off the event loop's GIL."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from buffyfs import priority
from buffyfs.store import gc, offload
from buffyfs.store.index import Index
from tests.conftest import Mount, wait_for
from tests.test_stall import build

SOURCES = 300  # above offload.SMALL_SOURCES: the root's answers go to a worker process


def children(pid: int) -> list[int]:
    return [int(p) for task in os.listdir(f"/proc/{pid}/task")
            for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]


def niceness(pid: int, tid: int | None = None) -> int:
    stat = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    return int(Path(stat).read_text().rsplit(")", 1)[1].split()[16])


def worker_runs(m: Mount) -> dict[str, float]:
    text = (m / "@metrics").read_text()
    return {task: float(n) for task, n in
            re.findall(r'^buffyfs_worker_process_runs_total\{task="(\w+)"\} (\S+)$', text,
                       re.MULTILINE)}


def test_plans_and_big_answers_come_from_a_worker_process(
        cache_dir: Path, mount_factory: Callable[..., Mount]) -> None:
    build(cache_dir, SOURCES, 5)
    m = mount_factory("--scrub-interval", "never")
    shown = json.loads((m / "@status").read_text())
    assert [s["name"] for s in shown["sources"]] == sorted(f"src{i}" for i in range(SOURCES))
    assert shown["cache"] == str(cache_dir)
    done = subprocess.run([sys.executable, "-m", "buffyfs", "gc", "--cache", str(m.cache)],
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("2 version(s)") == SOURCES  # keep_versions=1: 2 in 5 go
    assert len(os.listdir(m / "src1" / "@versions")) == 3
    (m / "@metrics").read_bytes()  # one render counted before the next shows it
    runs = worker_runs(m)
    assert runs.get("gc_plan", 0) >= 1, runs
    # 600 doomed versions: 3 batches, each committed in a worker process as well
    assert runs.get("gc_commit", 0) >= 3, runs
    # the workers log as the daemon does: each collected version is in its log
    logged = m.log.read_text()
    assert logged.count("collected version") == 2 * SOURCES, logged[-2000:]
    index = Index(m.cache / "index", readonly=True)
    try:
        with index.read() as r:  # what `buffyfs gc` watched while it waited
            progress = r.meta_json("gc_progress")
            asked = r.meta_json("gc_request")["id"]
    finally:
        index.close()
    assert progress == {"request": asked, "round": progress["round"], "done": 3, "of": 3}
    assert runs.get("status", 0) >= 1, runs
    assert runs.get("metrics", 0) >= 1, runs
    # the workers yield the CPU to the daemon's loop on a busy machine
    workers = [p for p in children(m.proc.pid)  # not multiprocessing's resource tracker
               if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert workers and {niceness(w) for w in workers} == \
        {min(19, niceness(m.proc.pid) + priority.WORKER_NICE)}
    assert "buffyfs_versions 900.0" in (m / "@metrics").read_text()  # 300 x 3 left
    # one source's @status is small: built in a thread, right as ever
    assert len(json.loads((m / "src1" / "@status").read_text())["versions"]) == 3


async def test_the_worker_sees_the_mounts_queued_state_and_plans_elsewhere(
        tmp_path: Path) -> None:
    build(tmp_path, sources=3)
    index = Index(tmp_path / "index")
    try:
        # a state write the mount queued and has not committed (writes.IndexWrites)
        index.queued_state = {"src1": {"state": "fetching", "progress": {"bytes": 5,
                                                                         "total": 9}}}
        shown = json.loads(await offload.root_status(index, tmp_path))
        by_name = {s["name"]: s for s in shown["sources"]}
        assert by_name["src1"]["state"] == "fetching"
        assert by_name["src1"]["progress"] == {"bytes": 5, "total": 9}
        assert by_name["src0"]["state"] == "idle"
        plan = await offload.plan_collection(index, set())  # 15 versions: in a thread
        assert plan.pid == os.getpid()
    finally:
        offload._own.clear()
        index.close()


async def test_a_big_collection_is_planned_in_another_process(tmp_path: Path) -> None:
    build(tmp_path, sources=250)  # 1,250 versions
    index = Index(tmp_path / "index")
    try:
        plan = await offload.plan_collection(index, set())
        assert plan.pid not in (0, os.getpid())
        doomed = [d for batch in plan.batches for d in pickle.loads(batch)]
        assert sorted((d.source, d.version.id) for d in doomed) == sorted(
            (d.source, d.version.id) for d in gc.plan_snapshot(index, set()).doomed)
        with index.read() as r:  # an open version is never planned
            ino = r.versions("src0")[-1].ino
        plan = await offload.plan_collection(index, {ino})
        assert ino not in {d.version.ino for b in plan.batches for d in pickle.loads(b)}
    finally:
        index.close()


async def test_a_big_collection_is_committed_in_another_process(
        tmp_path: Path, monkeypatch) -> None:
    """The commits re-read every version of the batch's sources: in the worker process,
    so this process (the mount's) decodes no version and gets names back."""
    from buffyfs.store import records

    build(tmp_path, sources=250)  # 1,250 versions, 500 of them garbage
    index = Index(tmp_path / "index")
    decoded: list[type] = []
    real_decode = records.decode

    def counting(cls, raw):  # type: ignore[no-untyped-def]
        decoded.append(cls)
        return real_decode(cls, raw)

    try:
        plan = await offload.plan_collection(index, set())
        opened = next(d.version for b in plan.batches for d in pickle.loads(b)
                      if d.source == "src7")  # garbage, but open now
        monkeypatch.setattr("buffyfs.store.index.decode", counting)
        report = gc.Report()
        for batch in plan.batches:
            gc.merge(report, await offload.commit_batch(index, plan, batch, {opened.ino}))
        assert records.Version not in decoded
        assert report.doomed == []  # names only, no records
        assert len(report.gone) == 499 and len(report.unlink) == 499
        assert ("src7", opened.id, "retention") not in report.gone
        monkeypatch.setattr("buffyfs.store.index.decode", real_decode)
        with index.read() as r:
            assert r.version_count() == 1250 - 499
            assert r.version("src7", opened.id) is not None
    finally:
        index.close()


async def test_a_failed_worker_process_leaves_the_work_to_a_thread(
        tmp_path: Path, monkeypatch, caplog) -> None:
    import trio_parallel

    build(tmp_path, sources=3)
    index = Index(tmp_path / "index")  # open here, as the mount's: LMDB opens it once

    async def broken(*args, **kwargs):
        raise trio_parallel.BrokenWorkerError("killed")

    monkeypatch.setattr(trio_parallel, "run_sync", broken)
    try:
        shown = json.loads(await offload.root_status(index, tmp_path))
        assert [s["name"] for s in shown["sources"]] == ["src0", "src1", "src2"]
        assert "a worker process failed" in caplog.text
    finally:
        offload._own.clear()
        index.close()


async def test_a_cancelled_collection_still_hands_back_a_commit_under_way(
        tmp_path: Path) -> None:
    """A batch's commit is not killed by a cancel (an unmount, a cancelled download's
    eviction): a commit that landed hands back the blobs it freed, for the mount to
    unlink (a killed worker's were left on disk, counted as freed)."""
    build(tmp_path, sources=250)
    index = Index(tmp_path / "index")
    try:
        plan = await offload.plan_collection(index, set())
        assert plan.pid != os.getpid()  # big enough for a worker process
        got: list[gc.Report] = []

        async def commit() -> None:
            got.append(await offload.commit_batch(index, plan, plan.batches[0], set()))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(commit)
                await trio.sleep(0.01)  # under way
                nursery.cancel_scope.cancel()
        assert got and len(got[0].unlink) == len(got[0].gone) > 0
    finally:
        index.close()


async def test_a_collections_kernel_work_reads_and_sends_nothing_on_the_loop(
        tmp_path: Path, monkeypatch) -> None:
    """What the kernel's view of a collected batch's sources hangs on is read by the
    worker that committed it; the loop only compares, decoding no version, and the
    invalidations go from a worker thread, never from the loop's."""
    import threading

    import pyfuse3

    from buffyfs.fs.handlers import BuffyFS
    from buffyfs.mount import Collector
    from buffyfs.store import records
    from buffyfs.store.cache import Cache

    build(tmp_path, sources=250)  # 1,250 versions: planned and committed elsewhere
    cache = Cache(tmp_path)
    sent: list[tuple[str, Any, int]] = []  # (call, what, thread)

    def recorder(call: str) -> Callable[..., None]:
        def record(what: Any, *args: Any, **kwargs: Any) -> None:
            sent.append((call, args[0] if call.startswith("entry") else what,
                         threading.get_ident()))
        return record

    for call in ("invalidate_entry", "invalidate_entry_async", "invalidate_inode"):
        monkeypatch.setattr(pyfuse3, call, recorder(call.removeprefix("invalidate_")))
    decoded: list[type] = []
    real_decode = records.decode

    def counting(cls, raw):  # type: ignore[no-untyped-def]
        if threading.get_ident() == loop_thread:
            decoded.append(cls)
        return real_decode(cls, raw)

    loop_thread = threading.get_ident()
    try:
        fs = BuffyFS(cache, None)
        with cache.index.read() as r:
            names = list(r.source_names())
            some_version = r.versions("src7")[0]
        fs.tree.entered.update(names)  # the kernel looked into every source
        fs.tree.versions_entered.update(names)  # and into its @versions/
        fs.shown_links[some_version.ino] = 99  # and holds a link count that is wrong
        monkeypatch.setattr("buffyfs.store.index.decode", counting)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                collector = Collector(cache, fs, None, nursery)
                report = await collector.collect()
                assert collector.planned_in > 0  # how long the plan took: the rest after it
        assert len(report.collected()) == 500
        assert records.Version not in decoded
        assert sent and all(thread != loop_thread for _, _, thread in sent)
        entries = {name for call, name, _ in sent if call == "entry"}
        assert {vid.encode() for _, vid, _ in report.collected()} <= entries
        assert ("inode", some_version.ino) in {(call, what) for call, what, _ in sent}
    finally:
        cache.close()


def test_worker_threads_run_niced_below_the_loop(origin, mnt, tmp_path: Path) -> None:
    """Downloads' writes and hashes, index commits, invalidations, validation commands:
    everything but the event loop runs WORKER_NICE levels below it, so the loop gets a
    core first."""
    from tests.test_mount import read, write_control

    seen = tmp_path / "nice"
    script = tmp_path / "validator"
    script.write_text(f"#!/bin/sh\nnice > {seen}\n")
    script.chmod(0o755)
    body = os.urandom(1 << 20)
    origin.set("/n", body, etag=True)
    write_control(mnt / "@control", f"add n {origin.url('/n')} validate.cmd={script}")
    assert read(mnt / "n/latest") == body  # worker threads wrote, hashed and committed it
    pid = mnt.proc.pid
    helper = min(19, niceness(pid) + priority.WORKER_NICE)
    assert niceness(pid) == os.getpriority(os.PRIO_PROCESS, 0)  # the loop: not lowered

    def threads() -> dict[str, int]:
        """name (and id) -> nice value of each of the daemon's threads but the loop's;
        a thread that ended meanwhile (trio's idle ones end after 10 s) is left out"""
        out = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            if tid == str(pid):
                continue  # the loop's
            try:
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                out[f"{name} {tid}"] = niceness(pid, int(tid))
            except (FileNotFoundError, ProcessLookupError):
                continue
        return out

    # trio's worker threads, the loop monitor's sampler; one started this instant
    # lowers itself as soon as it runs
    try:
        wait_for(lambda: len(t := threads()) >= 2 and set(t.values()) == {helper}, 10)
    except AssertionError:
        raise AssertionError(f"not every thread but the loop's at nice {helper}: "
                             f"{threads()}") from None
    assert int(seen.read_text()) == helper  # the validation command
