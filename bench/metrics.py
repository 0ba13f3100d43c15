"""The cost of one ``@metrics`` render (it runs in a worker thread, but holds the GIL
the loop needs): build an index of many sources, then time ``Metrics.render``.

    python -m bench.metrics            # 10,000 sources x 2 versions
    python -m bench.metrics --smoke    # 200 sources, to prove the script works

Prints the best of five renders in CPU seconds, and what the per-source gauges add
(the same render with prometheus_client's own text for them, for comparison: the
reason metrics.py writes that text itself).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/metrics.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import populate  # noqa: E402
from buffyfs.store import metrics  # noqa: E402
from buffyfs.store.index import Index  # noqa: E402


def best_cpu(render: Callable[[], object], rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        t = time.process_time()
        render()
        times.append(time.process_time() - t)
    return min(times)


def with_library_text(m: metrics.Metrics, index: Index) -> bytes:
    """The render, the per-source gauges' text made by prometheus_client instead."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    samples: dict[str, dict[str, float]] = {name: {} for name in metrics.SOURCE_GAUGES}
    with index.read() as r:
        now = metrics.now_utc().timestamp()
        for name, src in r.sources():
            latest = metrics.resolve_latest(src, r.versions(name))
            metrics._add_source_samples(samples, name, r.state(name), latest, now)

    class Collector:
        def collect(self):  # type: ignore[no-untyped-def]
            for gauge, help_text in metrics.SOURCE_GAUGES.items():
                family = GaugeMetricFamily(gauge, help_text, labels=["source"])
                for source, value in sorted(samples[gauge].items()):
                    family.add_metric([source], value)
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(m.registry) + generate_latest(registry)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.metrics")
    p.add_argument("--sources", type=int, default=10_000)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    sources = 200 if args.smoke else args.sources
    work = Path(tempfile.mkdtemp(prefix="buffyfs-bench-metrics-"))
    try:
        index = Index(work / "index")
        populate(index, sources, 2, size=100, options={"refresh": "never"},
                 sha256=lambda s, i: hashlib.sha256(f"{s}-{i}".encode()).hexdigest())
        m = metrics.Metrics()
        ours = best_cpu(lambda: m.render(index))
        library = best_cpu(lambda: with_library_text(m, index))
        print(f"[metrics] {sources} sources: render {ours:.3f} s CPU "
              f"(with prometheus_client's text for the per-source gauges: {library:.3f} s)")
        index.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
