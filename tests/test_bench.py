"""The benchmark suite runs end to end at its smoke size (CI proves it works; it asserts
no timing: figures on a shared CI machine are noise)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ["read-warm", "read-dropped", "fetch", "parallel", "ls", "stat", "mount-start",
           "rss", "gc", "stall"]


@pytest.mark.timeout(330)
@pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fuse3 (fusermount3)")
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    for name in FIGURES:
        assert f"[{name}]" in done.stdout, f"figure {name} missing:\n{done.stdout[-4000:]}"
    rows = json.loads(out.read_text())["rows"]
    assert {r["figure"] for r in rows} == set(FIGURES)
    assert not [r for r in rows if r["result"] == "ERROR"]
    assert not list((tmp_path / "work").iterdir()), "the suite left work files behind"
