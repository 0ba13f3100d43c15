"""bench/proxy.py runs end to end at its smoke size (no timing is asserted: figures on
a shared machine are noise)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(200)
@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="needs nginx (scripts/install.sh)")
def test_bench_proxy_smoke(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", "bench.proxy", "--smoke", "--workdir",
                           str(work)], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for figure in ("proxy-1", "serve-1", "proxy-small", "serve-small"):
        assert figure in done.stdout
    assert not list(work.iterdir()), "the benchmark left files behind"
