"""The HTTP server (``buffyfs serve``, ``mount --serve``): SPEC part 2.

What the rest of buffyfs uses: ``prepare`` (check the settings: BadInput before
binding), ``bind``, ``serve`` (the task the daemon's nursery runs) and ``close``.

    server.py    settings, binding, hypercorn inside the daemon's trio loop
    app.py       the ASGI application: URL space, byte serving, listings, control
    ranges.py    validators, conditional requests, byte ranges (pure)
    access.py    tokens and scopes, loopback (pure)
    changes.py   the long-poll change feed
    proxy.py     the server as an HTTP proxy: proxied URLs become sources
"""

from __future__ import annotations

from typing import Any

from buffyfs.http.access import Tokens, load_tokens
from buffyfs.http.server import DEFAULT_LISTEN, ServeSettings, bind, close, prepare

__all__ = ["DEFAULT_LISTEN", "ServeSettings", "Tokens", "bind", "close", "load_tokens",
           "preload", "prepare", "serve"]


def preload() -> None:
    """Import the server's modules (hypercorn: ~0.1 s) before the loop runs."""
    import hypercorn.trio  # noqa: F401

    import buffyfs.http.app  # noqa: F401


async def serve(settings: ServeSettings, daemon: Any) -> None:
    """Serve the daemon's cache until cancelled (the daemon's nursery runs this)."""
    import trio

    from buffyfs.http.app import App
    from buffyfs.http.server import run

    app = App(daemon, settings.tokens, secure=settings.tls_cert is not None,
              proxy=settings.proxy)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.feed.run)
        await run(settings, app)
        nursery.cancel_scope.cancel()
