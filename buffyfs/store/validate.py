"""Checks run on every new version before it can become ``latest`` (the ``validate``
option): ``min_size``, ``sha256``, ``content_type`` and ``cmd``.

``cmd`` runs without a shell, the blob's path appended as its last argument, with a
timeout; exit 0 passes. It runs as a trio subprocess (``trio.run_process``): the loop
is free meanwhile, and a cancelled refresh (an unmount) kills the command instead of
waiting for it.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import trio

from buffyfs.options import DEFAULT_VALIDATE_TIMEOUT, human_size, parse_duration


async def failure(rules: dict[str, Any], path: Path, size: int, sha256: str,
                  content_type: str | None) -> str | None:
    """Why the version fails its checks, or None when it passes them all."""
    if "min_size" in rules and size < rules["min_size"]:
        return (f"size {human_size(size)} is below validate.min_size "
                f"{human_size(rules['min_size'])}")
    if "sha256" in rules and sha256 != rules["sha256"]:
        return f"sha256 {sha256} differs from validate.sha256 {rules['sha256']}"
    if "content_type" in rules:
        want = _media_type(rules["content_type"])
        got = _media_type(content_type or "")
        if got != want:
            return f"content type {content_type or '(none)'!r} is not {rules['content_type']!r}"
    if "cmd" in rules:
        timeout = parse_duration(rules.get("timeout", DEFAULT_VALIDATE_TIMEOUT))
        return await _run_cmd(rules["cmd"], path, timeout)
    return None


def _media_type(value: str) -> str:
    return value.split(";")[0].strip().lower()


async def _run_cmd(cmd: str, path: Path, seconds: int) -> str | None:
    argv = shlex.split(cmd) + [str(path)]
    done = None
    try:
        with trio.move_on_after(seconds):  # cancelled, run_process kills the command
            done = await trio.run_process(argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, capture_stderr=True,
                                          check=False)
    except FileNotFoundError:
        return f"validation command not found: {argv[0]}"
    except PermissionError:
        return f"validation command not executable: {argv[0]}"
    except OSError as e:  # e.g. a script without a #! line
        return f"validation command {argv[0]} cannot run: {e.strerror}"
    if done is None:
        return f"validation command {argv[0]} timed out after {seconds}s"
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()
        how = f"status {done.returncode}" if done.returncode > 0 else \
            f"signal {-done.returncode}"
        return f"validation command {argv[0]} exited with {how}" + \
            (f": {tail[-1][:200]}" if tail else "")
    return None
