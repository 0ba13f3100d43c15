"""The ``buffyfs`` command. Parsing and printing only; the work is in the modules below."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from buffyfs import __version__
from buffyfs.daemon import check_mountpoint, fstab_args, start_detached, unmount
from buffyfs.errors import BadInput, BuffyError, CacheError, FetchError

# SPEC options settable on the command line: key -> help
SOURCE_OPTIONS = {
    "refresh": "never, on-open, cron:'M H DOM MON DOW' (UTC) or a duration such as 30m, "
               "6h, 1d (default 1d)",
    "attempt_timeout": "connect/stall timeout of one attempt (default 30s)",
    "max_attempts": "attempts per refresh (default 5)",
    "min_speed": "an attempt whose body moves fewer bytes a second than this (K, M: "
                 "1024-based; 0: no limit) for --min-speed-time fails and is retried "
                 "(default 1K)",
    "min_speed_time": "how long a body may stay below --min-speed (default 60s)",
    "attempt_max_time": "the longest one attempt may take in all (default 6h)",
    "keep_versions": "versions kept besides latest, newest valid and keep (default 5)",
    "keep_for": "keep a version at least this long after it stops being latest "
                "(default 0s: off)",
    "open_wait": "with --refresh on-open: how long an open waits for the check (default 5s)",
    "retry_backoff": "first wait before retrying a failed refresh, doubled per failure in a "
                     "row up to the refresh interval; halved for a source with no version "
                     "yet (default 1m)",
    "proxy": "HTTP proxy URL for this source (default: the HTTP(S)_PROXY environment)",
    "unpack": "auto: show compressed files decompressed and archives as directories in "
              "SOURCE/@unpacked/; off: not (default auto)",
    "method": "GET or POST (default GET)",
    "body": "request body (for POST)",
    "connections": "ranged connections at once for a body of 64 MiB or more from an origin "
                   "that accepts ranges (default 4)",
}
OPTION_METAVARS = {"refresh": "POLICY", "attempt_timeout": "DURATION", "open_wait": "DURATION",
                   "keep_for": "DURATION", "retry_backoff": "DURATION",
                   "min_speed": "SIZE", "min_speed_time": "DURATION",
                   "attempt_max_time": "DURATION",
                   "max_attempts": "N", "keep_versions": "N", "proxy": "URL",
                   "method": "METHOD", "body": "TEXT", "connections": "N",
                   "unpack": "auto|off"}


class _Parser(argparse.ArgumentParser):
    commands: dict[str, argparse.ArgumentParser] = {}  # the top level's: by command

    def error(self, message: str) -> None:  # usage line, then one error line, exit 2
        self.print_usage(sys.stderr)
        print(f"buffyfs: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="buffyfs", description="Registered URLs as plain files, from a local "
                "versioned cache.")
    p.add_argument("--version", action="version", version=f"buffyfs {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--cache", metavar="DIR", help="cache directory")
    common.add_argument("--config", metavar="FILE",
                        help="TOML config: daemon settings (its cache directory) and sources")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    # the daemon's flags, shared by mount and serve
    m = daemon_flags = _Parser(add_help=False)
    m.add_argument("--prune", action="store_true",
                   help="remove sources the config file does not declare")
    m.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="default: the config's log_level, else info")
    m.add_argument("--max-cache-size", metavar="SIZE",
                   help="hard quota on cached versions, e.g. 50G (K, M, G, T: 1024-based)")
    m.add_argument("--scrub-interval", metavar="DURATION",
                   help="re-hash every cached blob this often, e.g. 7d, or 'never' "
                        "(default: the config's scrub_interval, else 7d)")
    m.add_argument("--scrub-rate", metavar="SIZE",
                   help="bytes per second the scrub reads at most, e.g. 20M "
                        "(default: the config's scrub_rate, else 20M)")
    m.add_argument("--upstream", metavar="URL[,URL...]",
                   help="be a replica of these buffyfs serve hubs, tried in order "
                        "(default: the config's upstream, else none)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--public", action="store_true",
                   help="allow open reads on an address beyond loopback")
    m.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    m.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")

    m = sub.add_parser("mount", parents=[common, daemon_flags], help="mount the cache")
    m.add_argument("mountpoint")
    m.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    m.add_argument("--allow-other", action="store_true", help="let other users read")
    m.add_argument("--allow-non-empty", action="store_true",
                   help="mount even on a directory that is not empty (hiding what it holds)")
    m.add_argument("--serve", metavar="HOST:PORT",
                   help="also serve the cache over HTTP (default: the config's [serve] "
                        "listen, else no server)")
    sv = sub.add_parser("serve", parents=[common, daemon_flags],
                        help="serve the cache over HTTP (the daemon, without a mount)")
    sv.add_argument("--listen", metavar="HOST:PORT",
                    help="address to listen on (default: the config's [serve] listen, "
                         "else 127.0.0.1:8631)")

    u = sub.add_parser("umount", help="unmount")
    u.add_argument("mountpoint")
    u.add_argument("--lazy", action="store_true",
                   help="detach now even if busy; the mount goes when its last file closes")

    a = sub.add_parser("add", parents=[common], help="register a source")
    a.add_argument("name")
    a.add_argument("url")
    for key, help_text in SOURCE_OPTIONS.items():
        a.add_argument("--" + key.replace("_", "-"), dest="opt_" + key, help=help_text,
                       metavar=OPTION_METAVARS.get(key, "VALUE"))
    a.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra request header (repeatable); its value is never shown")
    a.add_argument("--validate", action="append", default=[], metavar="CHECK=VALUE",
                   help="check new versions: min_size=N, sha256=HEX, content_type=T, "
                   "cmd='COMMAND', timeout=60s (repeatable)")
    a.add_argument("--pinned", action="store_true",
                   help="hold latest at the first version; do not contact the origin after")

    for word, help_text in (("tag", "tag a version"), ("untag", "remove a tag")):
        t = sub.add_parser(word, parents=[common], help=help_text)
        t.add_argument("name")
        t.add_argument("version", help="a version id, 'latest' or 'newest'")
        t.add_argument("tag")
    pn = sub.add_parser("pin", parents=[common], help="hold latest at a version")
    pn.add_argument("name")
    pn.add_argument("version", nargs="?", help="a version id, 'latest' (default) or 'newest'")
    up = sub.add_parser("unpin", parents=[common], help="follow the refresh policy again")
    up.add_argument("name")
    hd = sub.add_parser("hold", parents=[common],
                        help="keep a version from collection for a while; prints its id")
    hd.add_argument("name")
    hd.add_argument("version", help="a version id, 'latest' or 'newest' (resolved now)")
    hd.add_argument("duration", help="how long, e.g. 30m, 12h, 1d")
    rl = sub.add_parser("release", parents=[common], help="end a hold early")
    rl.add_argument("name")
    rl.add_argument("version", help="a version id, 'latest' or 'newest'")

    rv = sub.add_parser("revalidate", parents=[common],
                        help="run the source's current validate checks on a version again "
                        "and tag it valid or failed; exit 1 if it fails them")
    rv.add_argument("name")
    rv.add_argument("version", help="a version id, 'latest' or 'newest'")

    st = sub.add_parser("set", parents=[common], help="change options of a source")
    st.add_argument("name")
    st.add_argument("pairs", nargs="+", metavar="KEY=VALUE",
                    help="option keys as in the config file (url= too); a table entry as "
                    "headers.NAME=VALUE or validate.CHECK=VALUE, empty to remove it")

    r = sub.add_parser("remove", parents=[common], help="unregister a source")
    r.add_argument("name")
    sub.add_parser("list", parents=[common], help="list sources")
    s = sub.add_parser("status", parents=[common], help="show status")
    s.add_argument("name", nargs="?")
    s.add_argument("--json", action="store_true")
    v = sub.add_parser("versions", parents=[common], help="list versions of a source")
    v.add_argument("name")
    f = sub.add_parser("fetch", parents=[common], help="download now, with a progress bar")
    f.add_argument("name")
    rf = sub.add_parser("refresh", parents=[common], help="check the origin now")
    rf.add_argument("name")
    rf.add_argument("--wait", action="store_true",
                    help="with a mount running: return when the check has finished, print "
                    "its outcome, exit 1 if it failed (without a mount refresh always waits)")
    rf.add_argument("--force", action="store_true",
                    help="an unconditional GET: no If-None-Match/If-Modified-Since, no "
                    "resume (for origins whose validators lie)")
    comp = sub.add_parser("completion", help="print a shell completion script")
    comp.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    g = sub.add_parser("gc", parents=[common], help="collect garbage now")
    g.add_argument("--dry-run", action="store_true", help="only print what would be freed")
    c = sub.add_parser("check", parents=[common], help="verify the index against the blobs")
    c.add_argument("--repair", action="store_true",
                   help="drop broken versions and remove orphans")
    p.commands = sub.choices  # for parse_args: each command's own parser
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Like ``parser.parse_args``, but an unknown option is reported by its command's
    parser (its usage line, not the top level's), with the closest known option."""
    from buffyfs.config import _hint

    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser.commands[args.command]
        known = [s for a in command._actions for s in a.option_strings]
        flags = [w for w in unknown if w.startswith("-")]
        hint = _hint(flags[0].split("=", 1)[0], known) if flags else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] not in COMMANDS and not argv[0].startswith("-") and \
            (argv[0] == "none" or os.path.isfile(argv[0])) and os.path.isdir(argv[1]):
        argv = fstab_args(argv)
    args = parse_args(build_parser(), argv)
    if args.command not in ("mount", "serve"):  # commands report their own errors
        logging.getLogger().addHandler(logging.NullHandler())
        logging.getLogger().setLevel(logging.CRITICAL)
    try:
        return COMMANDS[args.command](args) or 0
    except BrokenPipeError:  # `buffyfs list | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BuffyError as e:
        print(f"buffyfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("buffyfs: interrupted", file=sys.stderr)
        return 130


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


READ_ONLY = ("list", "status", "versions", "gc", "check")


def _cache(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from buffyfs.config import load_config
    from buffyfs.store.cache import Cache, resolve_cache_dir

    configured = load_config(Path(args.config)).daemon.cache if args.config else None
    root = resolve_cache_dir(args.cache, configured)
    if args.command in READ_ONLY and not root.is_dir():
        # a mistyped --cache would otherwise show an empty cache, and create it; a
        # command that only reads never creates a cache directory
        given = "" if (args.cache or configured or os.environ.get("BUFFYFS_CACHE")) else \
            " (nothing was added yet; or give --cache DIR)"
        raise CacheError(f"no buffyfs cache in {root}: the directory does not exist{given}")
    return Cache(root)


# --- mount ------------------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    from buffyfs import log
    from buffyfs.config import (
        DaemonConfig,
        check_scrub_interval,
        check_scrub_rate,
        load_config,
    )
    from buffyfs.options import parse_duration, parse_size
    from buffyfs.store.cache import resolve_cache_dir

    config_path = Path(args.config).absolute() if args.config else None
    config = load_config(config_path) if config_path else None
    daemon = config.daemon if config else DaemonConfig()
    cache_dir = resolve_cache_dir(args.cache, daemon.cache)
    serve = _serve_settings(args, config)
    if args.mountpoint is not None:
        check_mountpoint(args.mountpoint, args.allow_non_empty)
    max_size = parse_size(args.max_cache_size, "--max-cache-size") \
        if args.max_cache_size else daemon.max_cache_size
    args.log_level = args.log_level or daemon.log_level
    scrub_interval = check_scrub_interval(args.scrub_interval or daemon.scrub_interval)
    scrub_rate = check_scrub_rate(args.scrub_rate) if args.scrub_rate else daemon.scrub_rate
    replica = _replica_settings(args, daemon)  # bad input fails before the daemon starts
    if args.foreground:
        from buffyfs import mount

        log.setup(args.log_level, None if args.ready_fd is None else cache_dir / "buffyfs.log")
        mount.run(mount.Settings(
            args.mountpoint, cache_dir, allow_other=args.allow_other, ready_fd=args.ready_fd,
            max_downloads=daemon.max_downloads,
            max_downloads_per_host=daemon.max_downloads_per_host,
            max_connections_per_host=daemon.max_connections_per_host,
            max_cache_size=max_size, config_path=config_path, prune=args.prune,
            scrub_interval=None if scrub_interval == "never" else
            float(parse_duration(scrub_interval, "scrub_interval")),
            scrub_rate=scrub_rate, serve=serve, unpack_max_size=daemon.unpack_max_size,
            replica=replica))
        return 0
    return _mount_detached(args, cache_dir)


def _replica_settings(args: argparse.Namespace, daemon: Any) -> Any:
    """``--upstream`` over ``[daemon] upstream``: None when this is no replica."""
    from buffyfs.config import check_upstream
    from buffyfs.fetch.replica import ReplicaSettings

    urls = check_upstream(args.upstream) if getattr(args, "upstream", None) else daemon.upstream
    if not urls:
        return None
    return ReplicaSettings(urls, daemon.upstream_token, daemon.upstream_sources,
                           daemon.prefetch)


def cmd_serve(args: argparse.Namespace) -> int:
    """The daemon without FUSE, in the foreground: ``cmd_mount`` with no mount point."""
    args.mountpoint, args.foreground, args.allow_other, args.serve = None, True, False, None
    return cmd_mount(args)


def _serve_settings(args: argparse.Namespace, config: Any) -> Any:
    """The HTTP server's settings from the flags over the config's ``[serve]`` (None:
    no server); BadInput (exit 2) for anything wrong, before anything is bound."""
    from buffyfs import http
    from buffyfs.config import ServeConfig

    table = config.serve if config else ServeConfig()
    listen = args.listen if args.command == "serve" else args.serve
    listen = listen or table.listen or (http.DEFAULT_LISTEN if args.command == "serve" else None)
    if listen is None:
        if args.public or args.tls_cert or args.tls_key:
            raise BadInput("--public, --tls-cert and --tls-key go with --serve HOST:PORT")
        return None
    tokens = http.Tokens(
        read=http.load_tokens(table.read_tokens, table.read_token_files, "read token"),
        control=http.load_tokens(table.control_tokens, table.control_token_files,
                                 "control token"))
    settings = http.prepare(listen, args.public or table.public, tokens,
                            args.tls_cert or table.tls_cert, args.tls_key or table.tls_key)
    if config is not None:
        settings.proxy = config.proxy
    return settings


def _mount_detached(args: argparse.Namespace, cache_dir: Path) -> int:
    """Start the daemon in its own session (daemon.py) and return once the mount is live."""
    flags = ["--log-level", args.log_level]
    if args.allow_other:
        flags.append("--allow-other")
    if args.allow_non_empty:
        flags.append("--allow-non-empty")
    if args.max_cache_size:
        flags += ["--max-cache-size", args.max_cache_size]
    for flag, value in (("--scrub-interval", args.scrub_interval),
                        ("--scrub-rate", args.scrub_rate), ("--upstream", args.upstream)):
        if value:
            flags += [flag, value]
    if args.config:
        flags += ["--config", str(Path(args.config).absolute())]
    if args.prune:
        flags.append("--prune")
    for flag, value in (("--serve", args.serve), ("--tls-cert", args.tls_cert),
                        ("--tls-key", args.tls_key)):
        if value:
            flags += [flag, str(Path(value).absolute()) if flag != "--serve" else value]
    if args.public:
        flags.append("--public")
    pid = start_detached(args.mountpoint, cache_dir, flags)
    print(f"buffyfs mounted on {args.mountpoint} (pid {pid}, log {cache_dir}/buffyfs.log)")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    unmount(args.mountpoint, lazy=args.lazy)
    return 0


# --- sources ----------------------------------------------------------------------------


def _options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, Any] = {k: getattr(args, "opt_" + k) for k in SOURCE_OPTIONS
                           if getattr(args, "opt_" + k) is not None}
    if args.header:
        headers = {}
        for h in args.header:
            key, sep, value = h.partition(":")
            if not sep or not key.strip():
                raise BadInput("invalid --header: use 'Name: value'")
            headers[key.strip()] = value.strip()
        raw["headers"] = headers
    if args.validate:
        checks = {}
        for item in args.validate:
            key, sep, value = item.partition("=")
            if not sep:
                raise BadInput("invalid --validate: use CHECK=VALUE, e.g. min_size=1000")
            checks[key.strip()] = value
        raw["validate"] = checks
    if args.pinned:
        raw["pinned"] = True
    return raw


def cmd_add(args: argparse.Namespace) -> int:
    from buffyfs.options import check_name, check_url, normalize_options

    check_name(args.name)
    check_url(args.url)
    raw = _options_from_args(args)
    normalize_options(raw)  # bad input is reported before the cache is touched
    _apply(_cache(args), "add", [args.name, args.url], raw)
    from buffyfs.options import redact_url

    print(f"added source {args.name} ({redact_url(args.url)})")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from buffyfs.options import check_name

    check_name(args.name)
    _apply(_cache(args), "remove", [args.name])
    print(f"removed source {args.name} (its versions go at the next collection)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from buffyfs.options import redact_url

    cache = _cache(args)
    with cache.index.read() as r:
        for name, src in r.sources():
            print(f"{name}\t{redact_url(src.url)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cache = _cache(args)
    if args.name:
        from buffyfs.options import check_name

        check_name(args.name)
        obj = cache.source_status(args.name)
    else:
        obj = cache.root_status()
    if args.json:
        print(json.dumps(obj, indent=2))
        return 0
    _print_status(obj, cache)
    return 0


def _print_status(obj: dict[str, Any], cache: Any) -> None:
    from rich.table import Table

    console = _console()
    if "sources" in obj:
        mount = cache.running_mount()
        where = (f"mounted on {mount['mountpoint']}" if mount and mount["mountpoint"]
                 else f"served at {mount.get('serving')}" if mount else "not mounted")
        console.print(f"buffyfs {obj['version']}  cache {obj['cache']} ({where}), "
                      f"{_human(obj['cache_size'])} used")
        table = Table("source", "url", "latest", "age", "state", "stale", "failures", box=None)
        for s in obj["sources"]:
            table.add_row(s["name"], s["url"], s["latest"] or "-",
                          _age(s.get("latest_fetched_at")),
                          _state_text(s["state"], s.get("progress")),
                          "yes" if s.get("stale") else "no", str(s["consecutive_failures"]))
        console.print(table)
        if obj.get("last_reload_error"):
            error = obj["last_reload_error"]
            console.print(f"last reload refused at {error['at']}: {error['message']}",
                          highlight=False, markup=False)
        return
    latest = next((v for v in obj["versions"] if v["id"] == obj["latest"]), None)
    shown = {**obj, "state": _state_text(obj["state"], obj.get("progress")),
             "age": _age(latest["fetched_at"]) if latest else None}
    for key in ("name", "url", "refresh", "pinned", "stale", "state", "latest", "age",
                "last_check", "last_success", "next_check", "consecutive_failures"):
        value = shown.get(key)
        if isinstance(value, bool):
            value = "yes" if value else "no"
        console.print(f"{key:>21}: {value if value is not None else '-'}", highlight=False)
    if obj["last_error"]:
        console.print(f"{'last_error':>21}: {obj['last_error']['at']} "
                      f"{obj['last_error']['message']}", highlight=False)
    console.print(f"{'versions':>21}: {len(obj['versions'])}")


def _age(fetched_at: str | None) -> str:
    """How long ago ``fetched_at`` (RFC 3339) was, in its two largest units: 3h12m."""
    if not fetched_at:
        return "-"
    from buffyfs.store.index import now_utc, parse_rfc3339

    seconds = max(0, int((now_utc() - parse_rfc3339(fetched_at)).total_seconds()))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for (unit, size), (next_unit, next_size) in zip(units, units[1:], strict=False):
        if seconds >= size:
            return f"{seconds // size}{unit}{seconds % size // next_size}{next_unit}"
    return f"{seconds}s"


def _state_text(state: str, progress: dict[str, Any] | None) -> str:
    """``fetching 1.5 MiB/4.0 MiB (37%)`` for a download under way; else the state."""
    if state != "fetching" or not progress:
        return state
    done, total = progress["bytes"], progress.get("total")
    if not total:
        return f"fetching {_human(done)}"
    return f"fetching {_human(done)}/{_human(total)} ({100 * done // total}%)"


def _console():  # type: ignore[no-untyped-def]
    """A rich console that does not cut lines when the output is not a terminal."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=1000, soft_wrap=True)


def _human(n: int) -> str:
    from buffyfs.options import human_size

    return human_size(n)


def cmd_versions(args: argparse.Namespace) -> int:
    from rich.table import Table

    from buffyfs.options import check_name

    check_name(args.name)
    cache = _cache(args)
    cache.index.get_source(args.name)
    with cache.index.read() as r:
        versions = r.versions(args.name)
        latest = r.latest(args.name)
    table = Table("version", "size", "fetched", "tags", "note", box=None)
    for v in versions:
        note = "latest" if latest and v.id == latest.id else \
            ("damaged: " + v.damaged["reason"]) if v.damaged else ""
        table.add_row(v.id, _human(v.size), v.fetched_at, ",".join(v.tags),
                      note)
    _console().print(table)
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from buffyfs.control import check_version_ref
    from buffyfs.options import check_name, check_tag

    check_name(args.name)
    check_tag(args.tag)
    check_version_ref(args.version)
    v = _apply(_cache(args), args.command, [args.version, args.tag], source=args.name)
    print(f"{args.name}: {v.id} tags: {','.join(v.tags) or '-'}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    from buffyfs.control import check_version_ref
    from buffyfs.options import check_name

    check_name(args.name)
    if args.version is not None:
        check_version_ref(args.version)  # a malformed id is bad input, like for tag
    vid = _apply(_cache(args), "pin", [args.version] if args.version else [],
                 source=args.name)
    print(f"{args.name}: pinned at {vid}" if vid else
          f"{args.name}: pinned; the first version to arrive will hold")
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    """Print only the id held, so that ``V=$(buffyfs hold NAME latest 12h)`` works."""
    from buffyfs.control import check_version_ref
    from buffyfs.options import check_name, parse_duration

    check_name(args.name)
    check_version_ref(args.version)
    parse_duration(args.duration, "hold duration")
    cache = _cache(args)
    v = _unknown_version_is_bad_input(cache, args.name, "hold", [args.version, args.duration])
    print(v.id)
    return 0


def _unknown_version_is_bad_input(cache: Any, name: str, word: str, words: list[str]) -> Any:
    """hold/release: an unknown source fails (exit 1), but a version the source does
    not have is a bad argument (exit 2, as issue 20 asks)."""
    from buffyfs.errors import NotFound

    cache.index.get_source(name)  # NotFound: exit 1
    try:
        return _apply(cache, word, words, source=name)
    except NotFound as e:
        raise BadInput(str(e)) from None


def cmd_release(args: argparse.Namespace) -> int:
    from buffyfs.control import check_version_ref
    from buffyfs.options import check_name

    check_name(args.name)
    check_version_ref(args.version)
    _unknown_version_is_bad_input(_cache(args), args.name, "release", [args.version])
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    from buffyfs.options import check_name

    check_name(args.name)
    _apply(_cache(args), "unpin", [], source=args.name)
    print(f"{args.name}: unpinned; latest follows the refresh policy again")
    return 0


def cmd_revalidate(args: argparse.Namespace) -> int:
    from buffyfs.control import check_version_ref
    from buffyfs.options import check_name

    check_name(args.name)
    check_version_ref(args.version)
    v = _apply(_cache(args), "revalidate", [args.version], source=args.name)
    if "failed" in v.tags:
        print(f"{args.name}: {v.id} failed: {v.validation or 'failed'}")
        return 1
    print(f"{args.name}: {v.id} valid")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    from buffyfs.options import check_name

    check_name(args.name)
    options: dict[str, str] = {}
    for pair in args.pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInput(f"invalid {pair[:40]!r}: use KEY=VALUE, e.g. refresh=6h")
        options[key] = value
    _apply(_cache(args), "set", [], options, source=args.name)
    # the keys only: a header's value is a secret
    print(f"{args.name}: set {', '.join(options)}")
    return 0


def _apply(cache: Any, word: str, words: list[str], options: dict[str, Any] | None = None,
           source: str | None = None) -> Any:
    """Run one command through the running mount (so it has taken effect there when
    this returns), else on the index; returns its result (see commands.py)."""
    from buffyfs import mountctl
    from buffyfs.control import Command

    return mountctl.apply(cache, Command(word, words, options or {}), source)


# --- downloads --------------------------------------------------------------------------


def cmd_fetch(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from buffyfs.options import check_name

    check_name(args.name)
    cache = _cache(args)
    with cache.index.read() as r:
        src = r.source(args.name)
        pinned_with_version = src.pin if src is not None else None
    cache.index.get_source(args.name)
    from buffyfs.mountctl import refuse_mirrored

    refuse_mirrored(cache, args.name)  # its bytes come from the hub, by its mount
    if pinned_with_version:
        raise BadInput(f"source {args.name!r} is pinned: unpin it first")
    from rich.console import Console

    # the bar goes to stderr, and only to a terminal: stdout stays one line per result
    with Progress(TextColumn(args.name), BarColumn(), DownloadColumn(binary_units=True),
                  TransferSpeedColumn(), transient=True, console=Console(stderr=True),
                  disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("fetch", total=None)

        def on_progress(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        def on_note(text: str) -> None:
            # Retries, resumes, a restart from byte 0: above the bar, for the person
            # watching it (so it never jumps back silently); a script gets one error line.
            if not bar.disable:
                bar.console.print(f"{args.name}: {text}", markup=False, highlight=False,
                                  soft_wrap=True)

        outcome = _run_refresh(cache, args.name, on_progress, on_note)
    if outcome.error:
        raise FetchError(f"{args.name}: {outcome.error}")
    if outcome.version:
        v = outcome.version
        print(f"{args.name}: new version {v.id} ({_human(v.size)})")
    else:
        print(f"{args.name}: up to date")
    return 0


REFRESH_WORDS = {"new_version": "new version", "unchanged": "unchanged",
                 "not_modified": "not modified"}


def cmd_refresh(args: argparse.Namespace) -> int:
    from buffyfs import mountctl
    from buffyfs.control import Command
    from buffyfs.options import check_name

    check_name(args.name)
    cache = _cache(args)
    cmd = Command("refresh", ["--force"] if args.force else [])
    if args.wait or not cache.running_mount():
        mountctl.refuse_mirrored(cache, args.name)  # the hub refreshes it, not this cache
    if cache.running_mount():
        asked = time.time()
        if not mountctl.through_mount(cache, cmd, args.name):
            from buffyfs.store import commands

            commands.run(cache.index, [cmd], args.name, refresh="request")
        if not args.wait:
            print(f"{args.name}: refresh requested from the running mount")
            return 0
        outcome = mountctl.wait_refresh(cache, args.name, asked)
    else:
        cache.request_refresh(args.name, "check")
        outcome = _run_refresh(cache, args.name, None, force=args.force).record(0)
    if outcome["result"] == "failed":
        raise FetchError(f"{args.name}: {outcome['error']}")
    print(f"{args.name}: {REFRESH_WORDS[outcome['result']]}"
          + (f" {outcome['version']}" if outcome["version"] else ""))
    return 0


def _run_refresh(cache: Any, name: str, on_progress: Any, on_note: Any = None,
                 force: bool = False) -> Any:
    import trio

    from buffyfs.fetch import downloader
    from buffyfs.fetch.refresh import Refresher

    async def go() -> Any:
        async with downloader.new_client() as client:
            refresher = Refresher(cache.index, cache.blobs, client,
                                  make_room=_room_maker(cache))
            return await refresher.refresh(name, on_progress, on_note, force)

    return trio.run(go)


# --- collection and checks -------------------------------------------------------------

GC_WAIT = 60.0  # seconds `buffyfs gc` waits for a mount that shows no progress


def cmd_gc(args: argparse.Namespace) -> int:
    cache = _cache(args)
    if cache.running_mount():  # the mount knows which versions are open: it collects
        from buffyfs import mountctl

        rid = cache.request_gc(args.dry_run)
        result = mountctl.wait_gc(cache, rid, GC_WAIT, args.dry_run)
        if result["error"]:
            raise CacheError(result["error"])
        report = result["report"]
    else:
        from buffyfs.store import gc

        found = gc.collect_now(cache.index, cache.blobs, set(), 0, cache.max_cache_size(),
                               args.dry_run)
        if not args.dry_run:
            from buffyfs.fetch.refresh import partial_key

            swept = gc.sweep_orphans(cache.index, cache.blobs, partial_key)
            if swept is None:  # a download is committing: its partials are its own
                swept = gc.sweep_partials(cache.index, cache.blobs, partial_key)
            found.orphans = swept
        report = gc.report_json(found)
    verb = "would free" if args.dry_run else "freed"
    per_source: dict[str, int] = {}
    for v in report["versions"]:
        per_source[v["source"]] = per_source.get(v["source"], 0) + 1
        print(f"{v['source']}: {'would collect' if args.dry_run else 'collected'} {v['id']} "
              f"({v['reason']})")
    for source, count in sorted(per_source.items()):
        print(f"{source}: {count} version(s), {verb} {_human(report['freed'].get(source, 0))}")
    for path in report["orphans"]:
        print(f"removed orphan {path}")
    for k in report.get("kept", []):  # dry runs: why every other version stays
        print(f"{k['source']}: keeps {k['id']} ({', '.join(k['reasons'])})")
    print(f"total: {verb} {_human(report['total'])}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from buffyfs.store import check

    cache = _cache(args)
    with Progress(TextColumn("checking"), BarColumn(), DownloadColumn(), transient=True,
                  disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("check", total=None)
        found = check.check(cache.index, cache.blobs,
                            lambda done, total: bar.update(task, completed=done, total=total))
    for source, vid in found.missing:
        print(f"missing blob: {source} {vid}")
    for source, vid in found.corrupt:
        print(f"corrupt blob: {source} {vid}")
    for source, vid, kind in found.not_regular:
        print(f"blob is a {kind}, not a regular file: {source} {vid}")
    for path in found.orphans:
        print(f"orphan: {path}")
    for sha in found.bad_refs:
        print(f"wrong reference count: {sha}")
    for path, why in found.strays:
        print(f"stray: {path}: {why}")
    for path in found.unknown:  # the user's own, maybe: reported, never removed
        print(f"unknown entry (not made by buffyfs; left alone): {path}")
    for sha, why in found.bad_unpacked:
        print(f"unpacked view damaged: {sha}: {why}")
    if found.healthy:
        print(f"healthy: {found.checked} blob(s) verified")
        return 0
    if args.repair:
        check.repair(cache.index, cache.blobs, found)
        print("repaired: broken versions dropped, orphans and strays removed, counts rebuilt"
              + (", damaged unpacked views forgotten (the mount unpacks them again)"
                 if found.bad_unpacked else ""))
        return 0  # everything found is repaired (repair raises when it cannot)
    print("run buffyfs check --repair to repair", file=sys.stderr)
    return 1


def _room_maker(cache: Any) -> Any:
    """The quota rule for downloads made by the command line."""
    from buffyfs.store import gc

    max_size = cache.max_cache_size()
    if max_size is None:
        return None
    mounted = cache.running_mount() is not None

    def make_room(need: int) -> None:
        if mounted:  # only the mount knows what is open: do not evict, only check
            with cache.index.read() as r:
                if r.blob_bytes() + need > max_size:
                    raise gc.CacheFull(f"cache full: {_human(need)} more do not fit in "
                                       f"max_cache_size {_human(max_size)}")
            return
        gc.collect_now(cache.index, cache.blobs, set(), need, max_size)

    return make_room


COMMANDS = {
    "mount": cmd_mount, "umount": cmd_umount, "add": cmd_add, "remove": cmd_remove,
    "list": cmd_list, "status": cmd_status, "versions": cmd_versions, "fetch": cmd_fetch,
    "refresh": cmd_refresh, "tag": cmd_tag, "untag": cmd_tag, "pin": cmd_pin,
    "unpin": cmd_unpin, "hold": cmd_hold, "release": cmd_release, "gc": cmd_gc,
    "check": cmd_check, "completion": cmd_completion, "set": cmd_set,
    "revalidate": cmd_revalidate, "serve": cmd_serve,
}
