"""Run a bench/ script at its smoke size in a child process (no timing is asserted:
figures on a shared machine are noise; the smoke run proves the script works end to end
and cleans up after itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_smoke(module: str, workdir: Path, figures: list[str], *, timeout: float = 180) -> str:
    """``python -m MODULE --smoke --workdir WORKDIR``: exit 0, every figure named in its
    output, nothing left in WORKDIR. Returns the output."""
    workdir.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", module, "--smoke", "--workdir", str(workdir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for figure in figures:
        assert figure in done.stdout, f"figure {figure} missing:\n{done.stdout[-3000:]}"
    assert not list(workdir.iterdir()), f"{module} left files behind"
    return done.stdout
