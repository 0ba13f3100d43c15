"""bench/proxy.py runs end to end at its smoke size."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.benchrun import run_smoke


@pytest.mark.timeout(200)
@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="needs nginx (scripts/install.sh)")
def test_bench_proxy_smoke(tmp_path: Path) -> None:
    run_smoke("bench.proxy", tmp_path / "work",
              ["proxy-1", "serve-1", "proxy-small", "serve-small"])
