"""Issue 12, review leftovers: `buffyfs gc --dry-run` of a big cache. Its report (every
version, collected or kept and why) is built as JSON in the worker process that planned
it; the mount passes those bytes on to the command line without decoding them (it
unpickled 100,000 versions' records to encode them again)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from buffyfs.store import gc, offload
from buffyfs.store.index import Index
from tests.conftest import Mount
from tests.test_stall import build

SOURCES = 250  # 1,250 versions: planned in a worker process


async def test_a_dry_run_plan_comes_back_as_the_answer_json(tmp_path: Path) -> None:
    build(tmp_path, SOURCES)
    index = Index(tmp_path / "index")
    try:
        plan = await offload.plan_collection(index, set(), dry_run=True)
        assert plan.pid != os.getpid() and plan.batches == []
        answer = json.loads(plan.report)  # JSON, not a pickle of records
        assert answer == gc.report_json(gc.plan_snapshot(index, set()))
        assert len(answer["versions"]) == 2 * SOURCES
        assert len(answer["kept"]) == 3 * SOURCES
    finally:
        index.close()


def test_the_answer_reaches_the_command_line_whole(tmp_path: Path) -> None:
    index = Index(tmp_path / "index")
    try:
        report = {"versions": [{"source": "a", "id": "v\u00e9", "reason": "retention"}],
                  "freed": {"a": 1}, "total": 1, "orphans": [], "kept": []}
        with index.write() as w:
            w.put_meta_json_with("gc_result", {"id": 3, "dry_run": True, "error": None},
                                 report=json.dumps(report).encode())
            w.put_meta_json_with("empty", {}, a=b"1", b=b"[]")
        with index.read() as r:
            assert r.meta_json("gc_result") == {"id": 3, "dry_run": True, "error": None,
                                                "report": report}
            assert r.meta_json("empty") == {"a": 1, "b": []}
    finally:
        index.close()


def test_gc_dry_run_of_a_big_mount(cache_dir: Path,
                                   mount_factory: Callable[..., Mount]) -> None:
    build(cache_dir, SOURCES, 5)
    m = mount_factory("--scrub-interval", "never")
    done = subprocess.run([sys.executable, "-m", "buffyfs", "gc", "--dry-run", "--cache",
                           str(m.cache)], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": would collect ") == 2 * SOURCES
    assert done.stdout.count(": keeps ") == 3 * SOURCES
    assert done.stdout.count("2 version(s), would free 200 B") == SOURCES
    assert len(os.listdir(m / "src1" / "@versions")) == 5  # nothing collected
