"""The index records' codec: decode and encode speed of each choice (store/records.py).

    python -m bench.records              # 100,000 version records
    python -m bench.records --smoke      # 2,000, to prove the script works

Decoding every version is what collection planning, ``@status`` and a start-up do,
so the codec was chosen by these figures. Prints records/s (best of three) for decoding
with ``json.loads`` to a dict (the code before typed records), ``json.loads`` plus the
dataclass constructor, and msgspec straight into the dataclass; for encoding with
``json.dumps`` and msgspec of the record's JSON object; then bytes per stored record and
the memory one decoded record holds (a dict, a Version).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/records.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402

from buffyfs.store import records  # noqa: E402
from buffyfs.store.records import Version  # noqa: E402


def version_json(i: int) -> bytes:
    """A version record as the index stores it (the shape bench.common.populate writes)."""
    sha = hashlib.sha256(str(i).encode()).hexdigest()
    return json.dumps({
        "id": f"20260101T{i % 240000:06d}Z-{sha[:8]}", "sha256": sha, "size": 4096 + i,
        "fetched_at": "2026-01-01T00:00:00Z", "url": f"http://127.0.0.1:9/src{i // 5}",
        "etag": f'"{sha[:16]}"', "last_modified": None,
        "content_type": "application/octet-stream", "ino": 16 + i,
        "tags": ["valid"] if i % 10 == 0 else []}, separators=(",", ":")).encode()


def best_rate(count: int, fn: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return count / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--smoke", action="store_true", help="2,000 records")
    args = ap.parse_args(argv)
    count = 2_000 if args.smoke else args.count
    raws = [version_json(i) for i in range(count)]
    fields = set(records._FIELDS[Version])
    decoder = msgspec.json.Decoder(Version)
    typed = [records.decode(Version, raw) for raw in raws]
    objs = [records.to_dict(v) for v in typed]
    encoder = msgspec.json.Encoder()

    def constructed() -> None:
        for raw in raws:
            d = json.loads(raw)
            Version(**{k: v for k, v in d.items() if k in fields})

    rows = [
        ("decode: json.loads to a dict (before)", lambda: [json.loads(r) for r in raws]),
        ("decode: json.loads + dataclass", constructed),
        ("decode: msgspec into the dataclass", lambda: [decoder.decode(r) for r in raws]),
        ("encode: json.dumps of to_dict", lambda: [
            json.dumps(records.to_dict(v), separators=(",", ":")) for v in typed]),
        ("encode: msgspec of to_dict", lambda: [encoder.encode(records.to_dict(v))
                                                for v in typed]),
        ("encode: json.dumps of a dict (before)", lambda: [
            json.dumps(d, separators=(",", ":")) for d in objs]),
    ]
    print(f"{count:,} version records, {sum(map(len, raws)) / count:.0f} bytes per record "
          "as stored")
    for label, fn in rows:
        print(f"  {label:<40} {best_rate(count, fn):>12,.0f} records/s")
    sizes = {"json": len(records.encode(typed[0])), "msgspec": len(encoder.encode(objs[0]))}
    print(f"  bytes per record: json {sizes['json']}, msgspec {sizes['msgspec']} "
          "(the same JSON)")
    for label, decode in (("a dict (before)", json.loads), ("a Version", decoder.decode)):
        tracemalloc.start()
        held = [decode(r) for r in raws]
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del held
        print(f"  memory of a decoded record, {label}: {size / count:,.0f} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
