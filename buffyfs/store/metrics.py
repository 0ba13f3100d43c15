"""``MOUNT/@metrics``: counters and gauges in the Prometheus text format.

Counters live in the mount process (they restart from zero with it, which Prometheus
handles); gauges are read from the index when ``@metrics`` is opened.

Per-source gauges (``buffyfs_source_*``) carry one label, ``source``, and nothing
else (no version ids, no URLs: the series stay as many as the sources). They are
built afresh at each render, so a removed source's series go with it and two renders
at once (worker threads) never see each other's half. Their text is written here, not
by prometheus_client: for 10,000 sources (60,000 samples) a whole render took 0.82 s
of CPU with the library's text, 0.47 s with ours, 0.36-0.41 s before there were
per-source gauges (``python -m bench.metrics``); a render holds the GIL the loop
needs. Source names need no escaping in a label value (options.NAME_RE).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)

from buffyfs.store.index import Index, now_utc, resolve_latest
from buffyfs.store.records import SourceState, Version

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
        self.fuse_requests = Counter("buffyfs_fuse_requests", "Requests of the kernel "
                                     "answered by the mount, by op (lookup, getattr, "
                                     "open, read, release...)", ["op"], registry=r)
        self.fuse_requests_by_op: dict[str, Any] = {}  # fuse_request's children
        self.worker_runs = Counter("buffyfs_worker_process_runs", "Collection plans "
                                   "and large @status/@metrics answers built in a worker "
                                   "process, by task", ["task"], registry=r)
        self.damaged = Gauge("buffyfs_damaged_versions", "Versions whose blob is damaged "
                             "(not served; their sources download again)", registry=r)

    def fuse_request(self, op: str) -> Any:
        """The child of ``fuse_requests`` counting ``op``: made once (``labels()``, a
        lock and a tuple of label values, cost a few microseconds on every request)."""
        child = self.fuse_requests_by_op.get(op)
        if child is None:
            child = self.fuse_requests_by_op[op] = self.fuse_requests.labels(op=op)
        return child

    def render(self, index: Index) -> bytes:
        """The exposition text. One pass over the index: each source's record, state
        and versions are read once (a big cache's render is seconds of JSON)."""
        return self.render_with(index_figures(index))

    def render_with(self, figures: IndexFigures) -> bytes:
        """The exposition text from what ``index_figures`` read (in a worker process,
        offload.py, for a big cache): the counters of this process, its gauges."""
        gauges, source_text = figures
        for name, value in gauges.items():
            getattr(self, name).set(value)
        return generate_latest(self.registry) + source_text


# (gauge attribute of Metrics -> value, the per-source gauges' text): what a render
# reads from the index
IndexFigures = tuple[dict[str, float], bytes]


def index_figures(index: Index) -> IndexFigures:
    """The gauges read from the index and the per-source text, in one pass."""
    per_source: dict[str, dict[str, float]] = {name: {} for name in SOURCE_GAUGES}
    versions = damaged = stale = fetching = 0
    now = now_utc().timestamp()
    with index.read() as r:
        sources = r.sources()
        for name, src in sources:
            state = r.state(name)
            kept = r.versions(name)
            latest = resolve_latest(src, kept)
            versions += len(kept)
            damaged += sum(1 for v in kept if v.damaged)
            stale += _add_source_samples(per_source, name, state, latest, now)
            fetching += state.state == "fetching"
        cache_size = r.blob_bytes()
        max_cache_size = r.meta_json("max_cache_size") or 0
    gauges = {"cache_size": cache_size, "max_cache_size": max_cache_size,
              "versions": versions, "damaged": damaged, "stale": stale,
              "sources": len(sources), "fetching": fetching}
    return gauges, _source_text(per_source)


def _add_source_samples(out: dict[str, dict[str, float]], name: str, state: SourceState,
                        latest: Version | None, now: float) -> bool:
    """Add the source's per-source samples to ``out`` (gauge name -> {source: value});
    a source without a latest has no age or size. Returns whether it is stale."""
    failures = state.consecutive_failures
    for key, gauge in (("last_success", "last_success_timestamp_seconds"),
                       ("last_check", "last_check_timestamp_seconds")):
        stamp = getattr(state, key)
        if stamp:
            out[f"buffyfs_source_{gauge}"][name] = _epoch(stamp)
    stale = bool(latest) and failures > 0
    out["buffyfs_source_stale"][name] = float(stale)
    out["buffyfs_source_consecutive_failures"][name] = float(failures)
    if latest:
        age = now - _epoch(latest.fetched_at)
        out["buffyfs_source_latest_age_seconds"][name] = max(0.0, age)
        out["buffyfs_source_latest_size_bytes"][name] = float(latest.size)
    return stale


def _epoch(stamp: str) -> float:
    """An RFC 3339 UTC time as Unix seconds (fromisoformat: strptime is 10x slower)."""
    return datetime.fromisoformat(stamp).timestamp()


def _source_text(samples: dict[str, dict[str, float]]) -> bytes:
    """The per-source gauges in the Prometheus text format (version 0.0.4)."""
    lines = []
    for name, help_text in SOURCE_GAUGES.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{source="{source}"}} {float(value)!r}'
                  for source, value in sorted(samples[name].items())]
    return ("\n".join(lines) + "\n").encode()
