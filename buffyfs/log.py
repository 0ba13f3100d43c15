"""Logging: one line per event, UTC timestamps, to stderr or a file."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from buffyfs import safeio

LEVELS = ("debug", "info", "warning", "error")


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)sZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        # One event, one line: fold any newline a message (or traceback) carries.
        return super().format(record).replace("\n", "\n    ")


def setup(level: str = "info", file: Path | None = None) -> None:
    handler: logging.Handler = logging.StreamHandler(
        # the log of a detached mount lives in the cache: never written through a link
        open(file, "a", encoding="utf-8", opener=safeio.opener) if file else None
    )
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request at INFO with the full URL (credentials included): keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
