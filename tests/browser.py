"""A real headless browser for the tests: Debian's ``chromium`` driven through its
DevTools protocol over a pipe (``--remote-debugging-pipe``: requests on the child's
fd 3, answers and events on its fd 4, each a JSON text ended by NUL), so no websocket
library is needed. Every wait is bounded; ``close`` ends the browser by its PID."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

TIMEOUT = 30.0  # seconds for one protocol answer or one page load


class BrowserError(AssertionError):
    pass


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        exe = chromium_path()
        if exe is None:
            raise BrowserError("chromium is not installed (scripts/install.sh installs it)")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds() -> None:  # in the child: its fd 3 reads, its fd 4 writes
            high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)  # neither may be
            high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)  # 3 or 4 then
            os.dup2(high_r, 3)  # dup2's copies are inherited by chromium
            os.dup2(high_w, 4)

        self.log = open(profile.with_suffix(".log"), "ab")  # noqa: SIM115 (closed in close)
        self.proc = subprocess.Popen(
            [exe, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-sync", "--mute-audio",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            # close_fds would close fds 3 and 4 after preexec_fn; Python's own fds are
            # not inherited anyway (PEP 446). Its own session: close ends the group.
            preexec_fn=wire_fds, close_fds=False, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target,
                                     flatten=True)["sessionId"]
            self.call("Page.enable", session=True)
            self.resize(width, height)
        except BaseException:
            self.close()
            raise

    # --- the protocol --------------------------------------------------------------------

    def call(self, method: str, session: bool = False, timeout: float = TIMEOUT,
             **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise BrowserError(f"chromium did not answer {what} in time")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium exited (waiting for {what})")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)

    def wait_event(self, method: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(deadline, method))

    # --- what tests do ---------------------------------------------------------------

    def resize(self, width: int, height: int, mobile: bool = False) -> None:
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width,
                  height=height, deviceScaleFactor=1, mobile=mobile)

    def goto(self, url: str) -> None:
        """Load ``url`` (following redirects) and wait for its load event."""
        self.events.clear()
        result = self.call("Page.navigate", session=True, url=url)
        if result.get("errorText"):
            raise BrowserError(f"loading {url}: {result['errorText']}")
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (DevTools evaluation: the
        page's own Content-Security-Policy, which forbids scripts, does not apply)."""
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click_and_wait(self, selector: str) -> None:
        """Click the element (a form's button) and wait for the page it leads to."""
        self.events.clear()
        if not self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                       " if (!e) return false; e.click(); return true; })()"):
            raise BrowserError(f"nothing matches {selector}")
        self.wait_event("Page.loadEventFired")

    def dom(self) -> str:
        return self.js("document.documentElement.outerHTML")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", session=True, format="png",
                         captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            os.write(self._to_child, json.dumps(
                {"id": 0, "method": "Browser.close", "params": {}}).encode() + b"\0")
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:  # the browser's helpers (renderer, zygote) are in its process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()
