"""The status page (SPEC part 2, "The status page"): HTML for people, beside the JSON.

    GET /          every source, the problems first, searchable and paged (no JavaScript)
    GET /NAME/     one source: options, versions, a chart of sizes and checks over time
    POST /NAME/@control   the page's buttons (form-encoded), for control-token holders

Templates are Jinja2 with autoescaping on: source names, URLs, errors and validation
reasons are user data, and an escaping template engine makes forgetting to escape
impossible rather than a review item. Pages carry a strict Content-Security-Policy
(no script at all, styles only by this answer's nonce) and no external assets.

The buttons. Control normally needs ``Authorization: Bearer T``, which a plain HTML
form cannot send; a browser holds its token in the HttpOnly, SameSite=Strict cookie
that ``?token=T`` sets (access.py). A form POST is taken on that cookie only when it
also carries the CSRF token of that cookie (an HMAC of the cookie's token under a
secret of this server process, so it differs per token and is never the token) and
an ``Origin`` (or ``Referer``) of this very server: a page elsewhere can neither read
the form's token nor make the browser send the cookie. Read-only visitors see no
buttons, and a read token's form POST is refused like any read token's control.
"""

from __future__ import annotations

import hmac
import secrets
import shlex
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
import trio

from buffyfs import __version__
from buffyfs.errors import BadInput, BuffyError, NotFound
from buffyfs.http import access
from buffyfs.http.answer import Answer
from buffyfs.options import redact_url
from buffyfs.store import records
from buffyfs.store.index import now_utc, parse_rfc3339, resolve_latest
from buffyfs.store.records import Source, SourceState, Version

if TYPE_CHECKING:
    from buffyfs.http.app import App, Request, Send

PAGE_SIZE = 100  # sources on one page of the overview
REFRESH_SECONDS = 30  # the pages' <meta http-equiv="refresh">
FORM_TYPE = "application/x-www-form-urlencoded"
# the page's buttons: form field "do" -> whether it names a version
ACTIONS = {"refresh": False, "tag-failed": True, "untag": True, "pin": False, "unpin": False}
# a check's outcome (refresh.Outcome.result) -> how the chart and its legend name it
OUTCOMES = {"new_version": "new version", "unchanged": "unchanged",
            "not_modified": "not modified", "failed": "failed"}
HEALTHS = ("all failed", "failing", "stale", "no version", "ok")  # the order of the rows
CHART_W, CHART_H, PAD = 720, 240, 44  # the chart's drawing box (SVG user units)

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True, trim_blocks=True, lstrip_blocks=True)


class StatusPage:
    def __init__(self, app: App) -> None:
        self.app = app
        self.secret = secrets.token_bytes(32)  # CSRF tokens of this server process
        self._memo: tuple[int, Any] | None = None  # (index commit, the overview's rows)
        # each source's row and the undecoded index records it was made from
        self._rows: dict[bytes, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    # --- pages -------------------------------------------------------------------------

    async def root(self, req: Request, send: Send) -> None:
        query = req.query.get("q", "").strip()[:200]
        try:
            page = max(1, int(req.query.get("page", "1")))
        except ValueError:
            page = 1
        data = await trio.to_thread.run_sync(self._overview, query, page)
        await self._render(send, "root.html", **data, query=query)

    async def source(self, req: Request, send: Send, name: str) -> None:
        daemon = self.app.daemon
        status = await trio.to_thread.run_sync(
            self.app.cache.source_status, name, daemon.live_progress(), set(daemon.open_inos))
        with self.app.index.read() as r:
            checks = r.checks(name)
        csrf = self._csrf(req)
        await self._render(send, "source.html", s=status, base=f"/{quote(name)}/",
                           csrf=csrf, chart=chart(status["versions"], checks),
                           outcomes=OUTCOMES, now=now_utc(), age=age, size=human_size)

    def _overview(self, query: str, page: int) -> dict[str, Any]:
        """One page of the overview (in a worker thread: 10,000 sources)."""
        rows, counts, used, quota = self._all_rows()
        if query:
            needle = query.lower()
            rows = [s for s in rows if needle in s["name"].lower() or needle in s["url"].lower()]
        pages = max(1, -(-len(rows) // PAGE_SIZE))
        page = min(page, pages)
        now = now_utc()
        shown = [{**s, "age": age(s["latest_fetched_at"], now)}  # only the rows shown:
                 for s in rows[(page - 1) * PAGE_SIZE:page * PAGE_SIZE]]  # strptime is slow
        return {"rows": shown, "matched": len(rows), "total": sum(counts.values()),
                "page": page, "pages": pages, "counts": counts, "used": human_size(used),
                "quota": human_size(quota) if quota else None, "used_bytes": used,
                "quota_bytes": quota, "percent": round(100 * used / quota) if quota else None}

    def _all_rows(self) -> tuple[list[dict[str, Any]], dict[str, int], int, int | None]:
        """Every source's row, the problems first, with the counts by health and the
        cache's usage and quota. Kept until the index changes (``last_commit``): paging,
        searching and the page's own refresh of an idle cache cost no index reads. After
        a change, one scan of the undecoded records, and only the sources whose records
        differ are decoded again (decoding 10,000 sources' JSON takes most of a second).
        Runs in worker threads: two at once only both rebuild."""
        index = self.app.index
        commit = index.last_commit()  # before the read: a commit meanwhile means one
        if self._memo is not None and self._memo[0] == commit:  # rebuild too many
            return self._memo[1]
        with index.read() as r:
            sources = r.raw_items("sources")
            states = dict(r.raw_items("state"))
            versions: dict[bytes, list[bytes]] = {}
            for key, value in r.raw_items("versions"):
                versions.setdefault(key.partition(b"\0")[0], []).append(value)
            used, quota = r.blob_bytes(), r.meta_json("max_cache_size")
        known = self._rows
        self._rows = {}
        rows = []
        for key, src in sources:
            raw = (src, states.get(key), versions.get(key, []))
            old = known.get(key)
            row = old[1] if old is not None and old[0] == raw else _row(key, *raw)
            self._rows[key] = (raw, row)
            rows.append(row)
        rows.sort(key=lambda s: (s["rank"], s["name"]))
        counts = {h: 0 for h in HEALTHS}
        for row in rows:
            counts[row["health"]] += 1
        result = (rows, counts, used, quota)
        self._memo = (commit, result)
        return result

    async def _render(self, send: Send, template: str, **context: Any) -> None:
        nonce = secrets.token_urlsafe(16)
        context.setdefault("version", __version__)
        body = _templates.get_template(template).render(
            **context, nonce=nonce, refresh_seconds=REFRESH_SECONDS)
        csp = (f"default-src 'none'; style-src 'nonce-{nonce}'; img-src data:; "
               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        await self.app._bytes(send, 200, body.encode(), "text/html; charset=utf-8",
                              [("Content-Security-Policy", csp),
                               ("Referrer-Policy", "same-origin")])

    # --- the buttons -------------------------------------------------------------------

    def _csrf(self, req: Request) -> str | None:
        """The form token for this browser, if its cookie holds a control token (else
        None: no buttons)."""
        token = req.cookie(access.COOKIE)
        if self.app.tokens.scope_of(token) != "control":
            return None
        return hmac.new(self.secret, token.encode(), "sha256").hexdigest()

    @staticmethod
    def is_form(req: Request) -> bool:
        """A browser's form post: form-encoded and without a bearer token (a script's
        ``curl -d LINE`` with its token is form-encoded too, and stays control lines)."""
        return ("authorization" not in req.headers and req.headers.get(
            "content-type", "").split(";")[0].strip().lower() == FORM_TYPE)

    async def control_form(self, req: Request, send: Send, name: str | None) -> None:
        """A button of the page: checks (cookie, CSRF token, same origin), one control
        line through the daemon's run_control, then back to the source's page."""
        from buffyfs.http.app import MAX_BODY, _is_name

        if name is None or not _is_name(name):
            raise Answer(404, "the page's buttons post to /NAME/@control")
        token = req.cookie(access.COOKIE)
        scope = self.app.tokens.scope_of(token)
        if scope is None:
            raise Answer(401, "a control token is needed: open /?token=TOKEN once",
                         [("WWW-Authenticate", 'Bearer realm="buffyfs"')])
        if scope != "control":
            raise Answer(403, "this token may read, not control")
        if not self._same_origin(req):
            raise Answer(403, "the form did not come from this server's page")
        try:
            form = {k: v[-1] for k, v in parse_qs((await req.body(MAX_BODY)).decode(
                "utf-8"), max_num_fields=10, strict_parsing=True).items()}
        except (UnicodeDecodeError, ValueError):
            raise Answer(400, "malformed form") from None
        expected = self._csrf(req) or ""
        if not hmac.compare_digest(form.get("csrf", "").encode(), expected.encode()):
            raise Answer(403, "the form's CSRF token is missing or stale: reload the page")
        self.app._source(name)
        line = form_line(form)
        try:
            await self.app.daemon.run_control(line.encode(), name)
        except (BadInput, NotFound) as e:
            raise Answer(400, str(e)) from None
        except BuffyError as e:
            raise Answer(503, f"control write failed: {e}") from None
        await self.app._text(send, 303, "done\n", [("Location", f"/{quote(name)}/")])

    @staticmethod
    def _same_origin(req: Request) -> bool:
        """Whether the form's Origin (or, without one, Referer) is this server."""
        host = req.headers.get("host", "")
        origin = req.headers.get("origin") or req.headers.get("referer")
        if not origin or not host or origin == "null":
            return False
        return urlsplit(origin).netloc.lower() == host.lower()


def form_line(form: dict[str, str]) -> str:
    """The control line of a button's form (control.py's grammar checks it again)."""
    action = form.get("do", "")
    if action not in ACTIONS:
        raise Answer(400, f"unknown action {action[:40]!r}")
    version = form.get("version", "")
    if ACTIONS[action] and not version:
        raise Answer(400, f"{action} needs a version")
    if action == "tag-failed":
        return f"tag {shlex.quote(version)} failed"
    if action == "untag":
        return f"untag {shlex.quote(version)} {shlex.quote(form.get('tag', ''))}"
    if action == "pin" and version:
        return f"pin {shlex.quote(version)}"
    return action


def _row(key: bytes, src_raw: bytes, state_raw: bytes | None,
         versions_raw: list[bytes]) -> dict[str, Any]:
    """A source's row of the overview, from its index records (index.py)."""
    src = records.decode(Source, src_raw)
    state = records.decode(SourceState, state_raw) if state_raw else SourceState()
    versions = [records.decode(Version, v) for v in reversed(versions_raw)]  # newest first
    latest = resolve_latest(src, versions)
    failures = state.consecutive_failures
    run_state = state.state
    row = {"name": key.decode(), "url": redact_url(src.url),
           "latest": latest.id if latest else None,
           "latest_fetched_at": latest.fetched_at if latest else None,
           "state": run_state, "consecutive_failures": failures,
           "stale": bool(latest) and failures > 0,
           "last_error": (state.last_error or {}).get("message"),
           # versions, yet none usable: every one is tagged failed (or damaged)
           "all_failed": latest is None and bool(versions),
           "progress": state.progress if run_state == "fetching" else None}
    row["rank"], row["health"] = _health(row)
    return row


def _health(s: dict[str, Any]) -> tuple[int, str]:
    """Rank (problems first) and a word for the source's health."""
    if s["all_failed"]:
        health = "all failed"
    elif s["latest"] is None and s["consecutive_failures"]:
        health = "failing"
    elif s["stale"]:
        health = "stale"
    elif s["latest"] is None:
        health = "no version"
    else:
        health = "ok"
    return HEALTHS.index(health), health


def age(stamp: str | None, now: datetime) -> str:
    """``5 s``, ``3 min``, ``2 h``, ``4 d``: how long ago an RFC 3339 time was."""
    if not stamp:
        return "-"
    seconds = max(0, int((now - parse_rfc3339(stamp)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def chart(versions: list[dict[str, Any]], checks: list[list[Any]]) -> dict[str, Any]:
    """The marks of the chart, in SVG user units: one circle per version (x its fetch
    time, y its size) and one tick per recorded check (x its time, colour its outcome)."""
    now = now_utc().timestamp()
    times = [parse_rfc3339(v["fetched_at"]).timestamp() for v in versions]
    times += [c[0] for c in checks]
    start = min(times, default=now - 3600)
    end = max(now, start + 60)
    biggest = max((v["size"] for v in versions), default=0) or 1
    left, right, top, bottom = PAD + 16, CHART_W - 12, 12, CHART_H - PAD

    def x(t: float) -> float:
        return round(left + (right - left) * (t - start) / (end - start), 1)

    marks = [{"x": x(parse_rfc3339(v["fetched_at"]).timestamp()),
              "y": round(bottom - 8 - (bottom - 8 - top) * v["size"] / biggest, 1),
              "id": v["id"], "size": human_size(v["size"]),
              "failed": "failed" in v.get("tags", ())} for v in versions]
    ticks = [{"x": x(at), "outcome": result if result in OUTCOMES else "failed",
              "when": datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M:%S")}
             for at, result in checks]
    return {"w": CHART_W, "h": CHART_H, "left": left, "right": right, "top": top,
            "bottom": bottom, "lane": bottom + 12, "marks": marks, "ticks": ticks,
            "biggest": human_size(biggest if versions else 0),
            "start": datetime.fromtimestamp(start).astimezone().strftime("%Y-%m-%d %H:%M"),
            "end": datetime.fromtimestamp(end).astimezone().strftime("%Y-%m-%d %H:%M")}

