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


@pytest.mark.timeout(200)
@pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fuse3 (fusermount3)")
def test_stall_smoke_prints_every_row(tmp_path: Path) -> None:
    """bench.stall at its smoke size prints every row of issue 12's table, each with
    its target and a verdict (figures themselves are noise here)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.stall", "--smoke", "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    lines = done.stdout.splitlines()
    for row in ("(a) buffyfs gc", "(b) 50 sources refresh", "(c) cat @status",
                "(d) writer held", "(e) cat of 50", "(f) daemon RSS"):
        line = next((x for x in lines if x.startswith(row)), None)
        assert line is not None and ("PASS" in line or "MISS" in line), done.stdout
    assert not list(tmp_path.iterdir()), "bench.stall left work files behind"


def test_latest_bench_smoke_prints_both_reads() -> None:
    """bench.latest at its smoke size: a row per size and call, each with a ratio."""
    done = subprocess.run([sys.executable, "-m", "bench.latest", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("5", "latest"), ("5", "newest"),
                                            ("50", "latest"), ("50", "newest")]
    assert all(r[-1].endswith("×") and float(r[-1][:-1]) > 0 for r in rows)
