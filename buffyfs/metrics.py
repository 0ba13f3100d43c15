"""``MOUNT/@metrics``: counters and gauges in the Prometheus text format.

Counters live in the mount process (they restart from zero with it, which Prometheus
handles); gauges are read from the index when ``@metrics`` is opened.

Per-source gauges (``buffyfs_source_*``) carry one label, ``source``, and nothing
else (no version ids, no URLs: the series stay as many as the sources). They are
built afresh at each render in a registry of their own, so a removed source's series
go with it and two renders at once (worker threads) never see each other's half.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from buffyfs.index import Index, Reader, now_utc, parse_rfc3339, resolve_latest

# name -> help of the per-source gauges; each has the one label ``source``
SOURCE_GAUGES = {
    "buffyfs_source_last_success_timestamp_seconds":
        "When the origin last answered a refresh (Unix time)",
    "buffyfs_source_last_check_timestamp_seconds":
        "When the origin was last checked, whatever the outcome (Unix time)",
    "buffyfs_source_stale": "1 while the source is served but its refreshes fail",
    "buffyfs_source_consecutive_failures": "Failed refreshes in a row",
    "buffyfs_source_latest_age_seconds": "Age of the version latest names (since its fetch)",
    "buffyfs_source_latest_size_bytes": "Size of the version latest names",
}

disable_created_metrics()  # no *_created series beside every counter


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.bytes_served = Counter("buffyfs_bytes_served", "Bytes read by programs from "
                                    "version files (page-cache hits are not seen)",
                                    registry=r)
        self.opens = Counter("buffyfs_opens", "Opens of version files", registry=r)
        self.downloads = Counter("buffyfs_downloads", "Finished refreshes by result",
                                 ["result"], registry=r)
        self.bytes_downloaded = Counter("buffyfs_bytes_downloaded", "Body bytes received",
                                        registry=r)
        self.retries = Counter("buffyfs_retries", "Attempts made after a failed attempt",
                               registry=r)
        self.cache_size = Gauge("buffyfs_cache_size_bytes", "Bytes of cached versions",
                                registry=r)
        self.max_cache_size = Gauge("buffyfs_max_cache_size_bytes",
                                    "The quota (0: unlimited)", registry=r)
        self.sources = Gauge("buffyfs_sources", "Registered sources", registry=r)
        self.versions = Gauge("buffyfs_versions", "Kept versions", registry=r)
        self.stale = Gauge("buffyfs_stale_sources", "Sources served while their origin "
                           "is failing", registry=r)
        self.fetching = Gauge("buffyfs_fetching_sources", "Sources downloading now",
                              registry=r)
        self.damage_found = Counter("buffyfs_damaged_blobs_found", "Blob files found "
                                    "missing, truncated or corrupt, by the check that "
                                    "found them (open, read, scrub)", ["check"], registry=r)
        for check in ("open", "read", "scrub"):
            self.damage_found.labels(check=check)  # shown as 0 before the first
        self.scrubbed_bytes = Counter("buffyfs_scrubbed_bytes", "Bytes re-hashed by the "
                                      "background scrub", registry=r)
        self.damaged = Gauge("buffyfs_damaged_versions", "Versions whose blob is damaged "
                             "(not served; their sources download again)", registry=r)

    def render(self, index: Index) -> bytes:
        with index.read() as r:
            per_source = _SourceGauges(source_samples(r))
            names = r.source_names()
            states = [r.state(n) for n in names]
            self.cache_size.set(r.blob_bytes())
            self.max_cache_size.set(r.meta_json("max_cache_size") or 0)
            versions = [v for n in names for v in r.versions(n)]
            self.versions.set(len(versions))
            self.damaged.set(sum(1 for v in versions if v.get("damaged")))
            self.stale.set(sum(1 for n, st in zip(names, states, strict=True)
                               if st.get("consecutive_failures") and r.latest(n)))
        self.sources.set(len(names))
        self.fetching.set(sum(1 for st in states if st.get("state") == "fetching"))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(per_source)
        return generate_latest(self.registry) + generate_latest(registry)


def source_samples(r: Reader) -> dict[str, dict[str, float]]:
    """Gauge name -> {source: value}; a source without a latest has no age or size."""
    out: dict[str, dict[str, float]] = {name: {} for name in SOURCE_GAUGES}
    now = now_utc().timestamp()
    for name, src in r.sources():
        state = r.state(name)
        latest = resolve_latest(src, r.versions(name))
        failures = state.get("consecutive_failures", 0)
        for key, gauge in (("last_success", "last_success_timestamp_seconds"),
                           ("last_check", "last_check_timestamp_seconds")):
            if state.get(key):
                out[f"buffyfs_source_{gauge}"][name] = parse_rfc3339(state[key]).timestamp()
        out["buffyfs_source_stale"][name] = float(bool(latest) and failures > 0)
        out["buffyfs_source_consecutive_failures"][name] = float(failures)
        if latest:
            age = now - parse_rfc3339(latest["fetched_at"]).timestamp()
            out["buffyfs_source_latest_age_seconds"][name] = max(0.0, age)
            out["buffyfs_source_latest_size_bytes"][name] = float(latest["size"])
    return out


class _SourceGauges:
    """A collector of one render's per-source samples."""

    def __init__(self, samples: dict[str, dict[str, float]]) -> None:
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        for name, help_text in SOURCE_GAUGES.items():
            family = GaugeMetricFamily(name, help_text, labels=["source"])
            for source, value in sorted(self.samples[name].items()):
                family.add_metric([source], value)
            yield family

    def describe(self) -> list[Any]:
        return []
