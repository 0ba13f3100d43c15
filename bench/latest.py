"""What resolving ``latest`` and ``newest`` costs on the loop, by how many versions a
source keeps (issue 12: a lookup of ``SOURCE/latest`` runs on the event loop).

    python -m bench.latest            # 20 sources x 5, 100 and 1,000 versions
    python -m bench.latest --smoke    # 5 sources x 5 and 50, to prove the script works

Prints microseconds per call (one read transaction each, best of three) for
``Reader.latest`` and ``Reader.newest``, which read newest first and stop at the first
version they want, against the same answers from every version of the source
(``resolve_latest``/``newest_of`` over ``Reader.versions``, what they did before), and
the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/latest.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import populate  # noqa: E402
from buffyfs.store.index import Index, newest_of, resolve_latest  # noqa: E402


def per_call(index: Index, sources: int, fn: Callable[[Any, str], object],
             calls: int) -> float:
    """Microseconds per ``fn(reader, name)`` in its own read transaction, best of 3."""
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        for i in range(calls):
            with index.read() as r:
                fn(r, f"src{i % sources}")
        best = min(best, time.perf_counter() - began)
    return best / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    sources, sizes, calls = (5, (5, 50), 200) if args.smoke else (20, (5, 100, 1000), 2000)
    print(f"{'versions':>9} {'call':<7} {'newest first':>13} {'every version':>14} ratio")
    for per_source in sizes:
        with tempfile.TemporaryDirectory() as d:
            index = Index(Path(d) / "index")
            try:
                populate(index, sources, per_source, size=100, options={},
                         sha256=lambda s, i: hashlib.sha256(f"{s}-{i}".encode()).hexdigest())
                rows = [
                    ("latest", lambda r, n: r.latest(n),
                     lambda r, n: resolve_latest(r.source(n), r.versions(n))),
                    ("newest", lambda r, n: r.newest(n),
                     lambda r, n: newest_of(r.versions(n))),
                ]
                for what, lazy, whole in rows:
                    fast = per_call(index, sources, lazy, calls)
                    slow = per_call(index, sources, whole, calls)
                    print(f"{per_source:>9,} {what:<7} {fast:>10.1f} µs {slow:>11.1f} µs "
                          f"{slow / fast:5.1f}×")
            finally:
                index.close()


if __name__ == "__main__":
    main()
