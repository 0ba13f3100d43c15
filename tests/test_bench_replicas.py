"""bench/replicas.py runs end to end at its smoke size (no timing is asserted: figures
on a shared machine are noise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.hosts import available
from tests.hubs import nginx_exe

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
@pytest.mark.skipif(available() is not None or nginx_exe() is None,
                    reason="needs root, iproute2 and nginx (scripts/install.sh)")
def test_bench_replicas_smoke(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.replicas", "--smoke", "--workdir",
                           str(tmp_path), "--link-rate", "1gbit"], cwd=ROOT, capture_output=True, text=True,
                          timeout=280, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "replica links 1gbit" in done.stdout  # each shaped with tc tbf
    for figure in ("hub-sent-3", "slowest-of-3", "tag-p99-3", "held-read"):
        assert figure in done.stdout
    assert not list(tmp_path.iterdir()), "the benchmark left files behind"
