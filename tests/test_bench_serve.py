"""bench/serve.py runs end to end at its smoke size."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.benchrun import run_smoke


@pytest.mark.timeout(200)
@pytest.mark.skipif(shutil.which("fusermount3") is None or shutil.which("nginx") is None
                    and not Path("/usr/sbin/nginx").exists(),
                    reason="needs fuse3 and nginx (scripts/install.sh)")
def test_bench_serve_smoke(tmp_path: Path) -> None:
    run_smoke("bench.serve", tmp_path / "work",
              ["serve-1", "front-1", "serve-16", "revalidate", "stat-p99"])
