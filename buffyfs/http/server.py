"""Running the HTTP server inside the daemon's trio loop, on hypercorn.

hypercorn is a maintained ASGI server with a native trio worker, so the server is
one more task of the daemon's nursery (``buffyfs serve`` and ``mount --serve`` alike):
it shares the daemon's index, scheduler and collector, with no thread or process
between them. HTTP/1.1 only (no HTTP/2 over ALPN, no websockets): one protocol to get
right. Its access log is off (it would print query strings: ``?token=T``); our app
logs each request at debug level without query or headers.

The listening socket is bound before the loop starts (``bind``): an address in use is
one clear error at start, never after "ready", and a restart of the server task
reuses the same socket.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from dataclasses import dataclass, field

from buffyfs.config import ProxyConfig
from buffyfs.errors import BadInput, CacheError
from buffyfs.http.access import Tokens, is_loopback

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8631"


@dataclass
class ServeSettings:
    host: str
    port: int
    public: bool = False
    tokens: Tokens = field(default_factory=Tokens)
    tls_cert: str | None = None
    tls_key: str | None = None
    sock: socket.socket | None = None  # bound by ``bind``
    proxy: ProxyConfig = field(default_factory=ProxyConfig)  # [proxy]: http/proxy.py

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = self.sock.getsockname()[1] if self.sock is not None else self.port
        return f"{'https' if self.tls_cert else 'http'}://{host}:{port}"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8631`` for IPv6); BadInput if it is not one."""
    host, sep, port = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535 \
            or any(c.isspace() or c in "/[]" for c in host):
        raise BadInput(f"invalid listen address {value[:100]!r}: use HOST:PORT, e.g. "
                       f"{DEFAULT_LISTEN} or [::1]:8631")
    return host, int(port)


def prepare(listen: str, public: bool, tokens: Tokens, tls_cert: str | None,
            tls_key: str | None) -> ServeSettings:
    """Check what the server is asked to do (BadInput: exit 2, before binding):
    open reads beyond loopback need ``public``; TLS needs a certificate and its key
    that load."""
    host, port = parse_listen(listen)
    if tokens.open_reads and not public and not is_loopback(host):
        raise BadInput(f"listening on {host} (beyond loopback) with no read token would "
                       "let anyone on the network read the cache: give --public "
                       "([serve] public = true) to mean it, or configure read_tokens")
    if (tls_cert is None) != (tls_key is None):
        raise BadInput("TLS needs both --tls-cert and --tls-key")
    if tls_cert is not None and tls_key is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(tls_cert, tls_key)
        except OSError as e:
            raise BadInput(f"cannot read the TLS certificate or key: "
                           f"{e.strerror or e}: {e.filename or tls_cert}") from None
        except ssl.SSLError as e:
            raise BadInput(f"cannot use the TLS certificate {tls_cert} with key {tls_key}: "
                           f"{e.reason or e}") from None
    return ServeSettings(host, port, public, tokens, tls_cert, tls_key)


def bind(settings: ServeSettings) -> None:
    """Bind and listen (CacheError, exit 1, if the address cannot be had)."""
    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise CacheError(f"cannot listen on {settings.host}:{settings.port}: "
                         f"{e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise CacheError(f"cannot listen on {settings.host}:{settings.port}: "
                         f"{e.strerror or e}") from None
    sock.set_inheritable(False)
    settings.sock = sock


async def run(settings: ServeSettings, app: object) -> None:
    """Serve ``app`` on the bound socket until cancelled."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    assert settings.sock is not None
    config = Config()
    config.bind = [f"fd://{os.dup(settings.sock.fileno())}"]  # hypercorn owns its copy
    config.certfile, config.keyfile = settings.tls_cert, settings.tls_key
    config.alpn_protocols = ["http/1.1"]
    config.accesslog = None
    config.errorlog = logging.getLogger("buffyfs.http.hypercorn")
    config.loglevel = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    config.include_server_header = False
    config.backlog = 1024
    config.graceful_timeout = 1.0
    await serve(app, config, mode="asgi")  # type: ignore[arg-type]


def close(settings: ServeSettings) -> None:
    if settings.sock is not None:
        settings.sock.close()
        settings.sock = None


