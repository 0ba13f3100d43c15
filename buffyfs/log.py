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


class _QuietInvalidations(logging.Filter):
    """pyfuse3 logs a failed kernel cache invalidation as an error with a traceback.
    Invalidations are our best-effort hint (the entry's timeout bounds what the kernel
    keeps), and they fail harmlessly while the session closes (EINVAL): one warning
    line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Failed to submit invalidate") and record.exc_info:
            error = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()}: {error}", None
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_settings: tuple[str, Path | None] | None = None  # the last setup's (level, file)


def settings() -> tuple[str, Path | None] | None:
    """What ``setup`` was last called with (None: never), for a worker process to log
    the same way (store/offload.py)."""
    return _settings


def setup(level: str = "info", file: Path | None = None) -> None:
    global _settings
    _settings = (level, file)
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
    quiet = logging.getLogger("pyfuse3")
    if not any(isinstance(f, _QuietInvalidations) for f in quiet.filters):
        quiet.addFilter(_QuietInvalidations())
