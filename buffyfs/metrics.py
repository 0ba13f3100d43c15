"""``MOUNT/@metrics``: counters and gauges in the Prometheus text format.

Counters live in the mount process (they restart from zero with it, which Prometheus
handles); gauges are read from the index when ``@metrics`` is opened.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)

from buffyfs.index import Index

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
        return generate_latest(self.registry)
