"""The admin web UI: server-rendered pages over the undo manager (they work without JavaScript), a login
session bound to the admin token, CSRF tokens on every form, a strict Content-Security-Policy, and live
replay progress over Server-Sent Events. Everything recorded from clients is hostile: Jinja2 escapes it,
and recorded bodies are served only as images (allow-listed types) or as downloads."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable
from urllib.parse import urlencode

from aiohttp import web
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import select

from storage.models import VerbRow
from storage.timeline import VerbFilter, verb_json
from undo_proxy import metrics
from undo_proxy.admin import AdminApi, Handler, token_ok
from undo_proxy.manager import OperationError

log = logging.getLogger("undo_proxy.ui")

SESSION_COOKIE = "undo_session"
LOGIN_COOKIE = "undo_login"
IDLE_SECONDS = 3600            # a session unused this long expires
MAX_SECONDS = 12 * 3600        # and every session after this long
MAX_SESSIONS = 1000
PAGE_SIZE = 50
BODY_LIMIT = 16 << 20          # recorded bodies larger than this are not served
PREVIEW_LIMIT = 64 << 10       # text bodies up to this size are shown on the verb page
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/avif", "image/bmp"})
TEXT_TYPES = frozenset({"application/json", "application/xml", "application/javascript", "message/rfc822",
                        "application/x-www-form-urlencoded"})
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
BODY_CSP = "default-src 'none'; sandbox"
ERROR_STATUSES = ("failed", "aborted", "unknown")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def public(path: str) -> bool:
    """Everything but the login form and the shipped CSS/JS needs a session (or, under /api and
    /metrics, the token)."""
    return path == "/login" or path.startswith("/static/")


@dataclass
class Session:
    csrf: str
    created: float
    seen: float
    flash: list[tuple[str, str]] = field(default_factory=list)


class Sessions:
    """Login sessions in memory: a daemon restart logs everyone out."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def new(self) -> tuple[str, Session]:
        self._expire()
        if len(self._by_id) >= MAX_SESSIONS:  # drop the least recently used
            del self._by_id[min(self._by_id, key=lambda k: self._by_id[k].seen)]
        sid, now = secrets.token_urlsafe(32), time.monotonic()
        self._by_id[sid] = session = Session(csrf=secrets.token_urlsafe(32), created=now, seen=now)
        return sid, session

    def get(self, sid: str | None, touch: bool = True) -> Session | None:
        session = self._by_id.get(sid) if sid else None
        now = time.monotonic()
        if session is None or now - session.seen > IDLE_SECONDS or now - session.created > MAX_SECONDS:
            if sid:
                self._by_id.pop(sid, None)
            return None
        if touch:
            session.seen = now
        return session

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def _expire(self) -> None:
        for sid in list(self._by_id):
            self.get(sid, touch=False)


# --- presentation helpers ----------------------------------------------------------------------------
def parse_iso(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def short_time(text: str | None) -> str:
    when = parse_iso(text)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if when else "—"


def human_size(n: int | None) -> str:
    size = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def header_value(headers: Any, name: str) -> str | None:
    for pair in headers or []:
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and str(pair[0]).lower() == name:
            return str(pair[1])
    return None


def media_type(part: dict[str, Any] | None) -> str:
    value = header_value((part or {}).get("headers"), "content-type") or ""
    return value.split(";", 1)[0].strip().lower()


def is_text(mtype: str) -> bool:
    return mtype.startswith("text/") or mtype in TEXT_TYPES or mtype.endswith(("+json", "+xml"))


def body_of(part: dict[str, Any] | None) -> dict[str, Any] | None:
    body = (part or {}).get("body")
    return body if isinstance(body, dict) and isinstance(body.get("digest"), str) else None


def _int(value: str | None) -> int | None:
    """A non-negative whole number from a query or form field, else None (the filter is then ignored)."""
    try:
        n = int(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except ValueError:
        return None
    return n if n is not None and 0 <= n < 1 << 63 else None


def _time(value: str) -> datetime | None:
    """An ISO-8601 time from a filter field (UTC unless it says otherwise), else None."""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None
    return when.replace(tzinfo=timezone.utc) if when and not when.tzinfo else when


def timeline_picture(verbs: list[dict[str, Any]], snapshots: list[dict[str, Any]],
                     cycles: list[dict[str, Any]], width: int = 960) -> dict[str, Any] | None:
    """Coordinates for the SVG on the timeline page: the shown verbs over time, one lane per protocol,
    with the snapshots and cycle spans that fall in the same stretch of time."""
    if not verbs:
        return None
    times = [datetime.fromisoformat(v["time"]) for v in verbs]
    t0, t1 = min(times), max(times)
    span = max((t1 - t0).total_seconds(), 1.0)
    left, right, lane_h, top = 90, 20, 34, 24
    protocols = sorted({v["protocol"] for v in verbs})
    lanes = {p: top + i * lane_h + lane_h // 2 for i, p in enumerate(protocols)}
    height = top + lane_h * len(protocols) + 22

    def x(when: datetime) -> float:
        secs = (when - t0).total_seconds()
        return round(left + (width - left - right) * min(max(secs / span, 0.0), 1.0), 1)

    now = datetime.now(timezone.utc)
    spans = []
    for c in cycles:
        opened, closed = datetime.fromisoformat(c["opened"]), parse_iso(c["closed"]) or now
        if opened <= t1 and closed >= t0:
            x0, x1 = x(opened), x(closed)
            spans.append({"x": x0, "w": max(x1 - x0, 3.0), "label": f"cycle {c['id']} ({c['state']})",
                          "id": c["id"]})
    return {
        "width": width, "height": height, "left": left, "right": width - right, "axis_y": height - 18,
        "lanes": [{"name": p, "y": y} for p, y in lanes.items()],
        "dots": [{"x": x(t), "y": lanes[v["protocol"]], "seq": v["seq"], "status": v["status"],
                  "mutates": v["mutates"], "title": f"#{v['seq']} {v['summary']} ({v['status']})"}
                 for v, t in zip(verbs, times)],
        "snapshots": [{"x": x(t), "label": s["label"] or s["id"]}
                      for s in snapshots if t0 <= (t := datetime.fromisoformat(s["time"])) <= t1],
        "spans": spans, "start": short_time(t0.isoformat()), "end": short_time(t1.isoformat()),
    }


def sparkline(counts: list[int], width: int = 150, height: int = 24) -> list[dict[str, float]]:
    top = max(counts) or 1
    bar = width / len(counts)
    return [{"x": round(i * bar, 1), "w": round(bar - 1, 1), "h": round(height * n / top, 1),
             "y": round(height - height * n / top, 1), "n": n} for i, n in enumerate(counts)]


# --- the UI ------------------------------------------------------------------------------------------
class WebUi:
    def __init__(self, api: AdminApi) -> None:
        self.api = api
        self.m = api.manager
        self.sessions = Sessions()
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        api.session_ok = self.api_session_ok
        self.env = Environment(loader=PackageLoader("undo_proxy", "templates"),
                               autoescape=select_autoescape(default=True, default_for_string=True))
        self.env.filters.update(when=short_time, size=human_size,
                                dump=lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str))

    # --- sessions and security ----------------------------------------------------------------
    def session(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def api_session_ok(self, request: web.Request) -> bool:
        """A UI session authorizes /api calls too; changing ones must also carry X-CSRF-Token."""
        session = self.session(request)
        if session is None:
            return False
        return request.method in SAFE_METHODS or token_ok(request.headers.get("X-CSRF-Token"), session.csrf)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/api") or path == "/metrics" or public(path):
            return await handler(request)  # the API middleware checks the token; login checks itself
        session = self.session(request)
        if session is None:
            raise web.HTTPSeeOther("/login")
        request["session"] = session
        if request.method not in SAFE_METHODS:
            form = await request.post()
            if not token_ok(str(form.get("csrf", "")), session.csrf):
                return web.Response(status=403, text="The form's CSRF token is missing or wrong: reload the "
                                                     "page and try again.\n")
        return await handler(request)

    @staticmethod
    async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
        h = response.headers
        h.setdefault("Content-Security-Policy", CSP)
        h["X-Frame-Options"] = "DENY"
        h["X-Content-Type-Options"] = "nosniff"
        h["Referrer-Policy"] = "no-referrer"
        h.setdefault("Cache-Control", "no-cache" if request.path.startswith("/static/") else "no-store")

    async def _on_shutdown(self, app: web.Application) -> None:
        self.stopping.set()

    def setup(self, app: web.Application) -> None:
        app.on_response_prepare.append(self.security_headers)
        app.on_shutdown.append(self._on_shutdown)
        app.router.add_static("/static/", Path(__file__).with_name("static"), name="static")
        app.add_routes([
            web.get("/login", self.login_form), web.post("/login", self.login), web.post("/logout", self.logout),
            web.get("/", self.dashboard), web.get("/timeline", self.timeline),
            web.get("/timeline/{seq:\\d+}", self.verb),
            web.get("/timeline/{seq:\\d+}/body/{part:request|output}", self.body),
            web.get("/snapshots", self.snapshots), web.post("/snapshots", self.take_snapshot),
            web.post("/snapshots/{id}/delete", self.delete_snapshot),
            web.get("/cycle", self.cycle), web.get("/cycle/confirm", self.confirm),
            web.post("/cycle/rewind", self.rewind), web.post("/cycle/repair", self.repair),
            web.post("/cycle/replay", self.replay), web.post("/cycle/commit", self.commit),
            web.post("/cycle/cancel", self.cancel),
            web.get("/inconsistencies", self.inconsistencies),
            web.post("/inconsistencies/compensate", self.compensate),
            web.post("/inconsistencies/{id:\\d+}/acknowledge", self.acknowledge),
            web.get("/events", self.events),
        ])

        async def not_found(request: web.Request) -> web.Response:
            return await self.page(request, "message.html", title="Not found", status=404,
                                   message=f"There is no page {request.path}.")
        app.router.add_route("GET", "/{tail:.*}", not_found)

    # --- rendering ------------------------------------------------------------------------------
    def flash(self, request: web.Request, kind: str, message: str) -> None:
        request["session"].flash.append((kind, message))

    async def page(self, request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
        session: Session = request["session"]
        flash, session.flash = session.flash, []
        try:
            state = await self.m.status()
        except OperationError as exc:
            state, flash = {"mode": "unknown", "cycle": None}, flash + [("error", exc.message)]
        html = self.env.get_template(template).render(csrf=session.csrf, state=state, flash=flash,
                                                      path=request.path, **ctx)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    async def operate(self, request: web.Request, op: Awaitable[Any], done: str, back: str) -> web.Response:
        try:
            await op
            self.flash(request, "ok", done)
        except OperationError as exc:
            self.flash(request, "error", exc.message)
        raise web.HTTPSeeOther(back)

    # --- login ----------------------------------------------------------------------------------
    async def login_form(self, request: web.Request, error: str | None = None) -> web.Response:
        if error is None and self.session(request):
            raise web.HTTPSeeOther("/")
        # Double-submit: the form's hidden field must match this cookie. An existing nonce is kept, so two
        # tabs (or a stray request that lands here) do not invalidate each other's form.
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{43}", nonce):
            nonce = secrets.token_urlsafe(32)
        html = self.env.get_template("login.html").render(csrf=nonce, error=error)
        resp = web.Response(text=html, status=401 if error else 200, content_type="text/html", charset="utf-8")
        resp.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="Strict", secure=request.secure,
                        path="/login", max_age=900)
        return resp

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not token_ok(str(form.get("csrf", "")), nonce):
            return await self.login_form(request, "The login form expired: try again.")
        if not token_ok(str(form.get("token", "")), self.api.token):
            await asyncio.sleep(0.5)  # slows down guessing
            return await self.login_form(request, "That is not the admin token.")
        sid, _ = self.sessions.new()
        resp = web.HTTPSeeOther("/")
        resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="Strict", secure=request.secure, path="/",
                        max_age=MAX_SECONDS)
        resp.del_cookie(LOGIN_COOKIE, path="/login")
        raise resp

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.drop(request.cookies.get(SESSION_COOKIE))
        resp = web.HTTPSeeOther("/login")
        resp.del_cookie(SESSION_COOKIE, path="/")
        raise resp

    # --- dashboard ------------------------------------------------------------------------------
    def _rates(self, minutes: int = 15, cap: int = 200_000) -> dict[str, list[int]]:
        """Verbs per minute by protocol over the last `minutes`, newest minute last. Walks the newest
        verbs backwards by seq (the primary key), so the cost is the recent traffic, not the history."""
        def q(s: Any) -> dict[str, list[int]]:
            now = datetime.now(timezone.utc)
            counts: dict[str, list[int]] = defaultdict(lambda: [0] * minutes)
            stmt = (select(VerbRow.protocol, VerbRow.time).order_by(VerbRow.seq.desc()).limit(cap)
                    .execution_options(yield_per=2000))
            for protocol, when in s.execute(stmt):
                when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
                age = int((now - when).total_seconds() // 60)
                if age >= minutes:
                    break
                counts[protocol][minutes - 1 - max(age, 0)] += 1
            return dict(counts)
        return self.m.timeline.run(q)

    async def dashboard(self, request: web.Request) -> web.Response:
        tl = self.m.timeline
        rates = await self.m.db(self._rates)
        errors: list[dict[str, Any]] = []
        for status in ERROR_STATUSES:
            errors += await self.m.db(tl.verbs, VerbFilter(status=status, limit=10, newest_first=True))
        errors = sorted(errors, key=lambda v: v["seq"], reverse=True)[:10]
        protocols = [{"name": p, "last": c[-1], "avg": round(sum(c) / len(c), 1), "bars": sparkline(c)}
                     for p, c in sorted(rates.items())]
        return await self.page(request, "dashboard.html", title="Dashboard", protocols=protocols, errors=errors,
                               cycle=await self.m.db(tl.open_cycle), keep=self.m.cfg.snapshots.keep,
                               snapshots=(await self.m.db(tl.snapshots))[-3:])

    # --- timeline -------------------------------------------------------------------------------
    async def timeline(self, request: web.Request) -> web.Response:
        q = request.query
        filters = {k: q.get(k, "").strip() for k in ("protocol", "verb", "target", "status", "cycle", "since",
                                                      "until")}
        limit = min(max(_int(q.get("limit")) or PAGE_SIZE, 1), 500)
        after, before = _int(q.get("after")), _int(q.get("before"))
        f = VerbFilter(limit=limit, protocol=filters["protocol"] or None, verb=filters["verb"] or None,
                       target=filters["target"] or None, status=filters["status"] or None,
                       cycle=_int(filters["cycle"]), since=_time(filters["since"]), until=_time(filters["until"]))
        if after is not None:  # "newer": the page right after `after`, shown newest first
            f.after = after
            verbs = list(reversed(await self.m.db(self.m.timeline.verbs, f)))
        else:
            f.before, f.newest_first = before, True
            verbs = await self.m.db(self.m.timeline.verbs, f)
        keep = {k: v for k, v in filters.items() if v}
        if limit != PAGE_SIZE:
            keep["limit"] = str(limit)
        links = {"newest": "/timeline?" + urlencode(keep)}
        if verbs:
            links["newer"] = "/timeline?" + urlencode({**keep, "after": verbs[0]["seq"]})
            links["older"] = "/timeline?" + urlencode({**keep, "before": verbs[-1]["seq"]})
        picture = timeline_picture(verbs, await self.m.db(self.m.timeline.snapshots),
                                   await self.m.db(self.m.timeline.cycles))
        return await self.page(request, "timeline.html", title="Timeline", verbs=verbs, filters=filters,
                               links=links, picture=picture, statuses=("pending", "committed") + ERROR_STATUSES)

    async def _verb(self, request: web.Request) -> dict[str, Any]:
        seq = int(request.match_info["seq"])
        doc = await self.m.db(self.m.timeline.verb, seq)
        if doc is None:
            raise web.HTTPNotFound(text=f"no verb {seq}")
        return doc

    async def _part_view(self, doc: dict[str, Any], part: str) -> dict[str, Any] | None:
        data = doc.get(part)
        if not isinstance(data, dict):
            return None
        body, mtype = body_of(data), media_type(data)
        view: dict[str, Any] = {
            "name": part, "headers": data.get("headers") if isinstance(data.get("headers"), list) else [],
            "fields": {k: v for k, v in data.items() if k not in ("headers", "body")},
            "body": body, "type": mtype or "unknown", "url": f"/timeline/{doc['seq']}/body/{part}",
            "kind": None, "text": None}
        if body and body.get("stored") and body.get("size"):
            if mtype in IMAGE_TYPES and body["size"] <= BODY_LIMIT:
                view["kind"] = "image"
            elif is_text(mtype) and body["size"] <= PREVIEW_LIMIT:
                raw = await asyncio.to_thread(self.m.blobs.read, body["digest"])
                view["kind"], view["text"] = "text", raw.decode("utf-8", errors="replace")
            else:
                view["kind"] = "download"
        return view

    async def verb(self, request: web.Request) -> web.Response:
        doc = await self._verb(request)
        parts = [await self._part_view(doc, p) for p in ("request", "output")]
        replays = await self.m.db(self.m.timeline.verbs, VerbFilter(limit=20, after=doc["seq"], verb=doc["verb"]))
        replays = [v for v in replays if v["original_seq"] == doc["seq"]]
        return await self.page(request, "verb.html", title=f"Verb {doc['seq']}", verb=doc,
                               parts=[p for p in parts if p], replays=replays, body_limit=BODY_LIMIT)

    async def body(self, request: web.Request) -> web.Response:
        doc = await self._verb(request)
        part = request.match_info["part"]
        data = doc.get(part) if isinstance(doc.get(part), dict) else None
        body = body_of(data)
        if body is None or not body.get("stored"):
            raise web.HTTPNotFound(text="this body was not recorded")
        if (body.get("size") or 0) > BODY_LIMIT:
            raise web.HTTPRequestEntityTooLarge(max_size=BODY_LIMIT, actual_size=body["size"])
        try:
            raw = await asyncio.to_thread(self.m.blobs.read, body["digest"])
        except (OSError, ValueError):
            raise web.HTTPNotFound(text="the body is missing from the blob store") from None
        mtype = media_type(data)
        name = f"verb-{doc['seq']}-{part}"
        if mtype in IMAGE_TYPES and "download" not in request.query:
            ctype, disposition = mtype, f'inline; filename="{name}.{mtype.split("/")[1]}"'
        else:
            ctype, disposition = "application/octet-stream", f'attachment; filename="{name}.bin"'
        return web.Response(body=raw, headers={"Content-Type": ctype, "Content-Disposition": disposition,
                                               "Content-Security-Policy": BODY_CSP})

    # --- snapshots ------------------------------------------------------------------------------
    async def snapshots(self, request: web.Request) -> web.Response:
        tl = self.m.timeline
        cycle = await self.m.db(tl.open_cycle)
        protected = {cycle["snapshot"], cycle["pre_rewind_snapshot"]} if cycle else set()
        snaps = list(reversed(await self.m.db(tl.snapshots)))
        return await self.page(request, "snapshots.html", title="Snapshots", snapshots=snaps, cycle=cycle,
                               protected=protected, keep=self.m.cfg.snapshots.keep,
                               backend=self.m.backend.name if self.m.backend else None)

    async def take_snapshot(self, request: web.Request) -> web.Response:
        label = str((await request.post()).get("label", "")).strip() or None
        return await self.operate(request, self.m.take_snapshot(label), "Snapshot taken.", "/snapshots")

    async def delete_snapshot(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        return await self.operate(request, self.m.delete_snapshot(sid), f"Snapshot {sid} deleted.", "/snapshots")

    # --- the undo cycle -------------------------------------------------------------------------
    async def _side_by_side(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for item in items:
            original = await self.m.db(self.m.timeline.verb, item["seq"])
            replayed = await self.m.db(self.m.timeline.verb, item["replay_seq"]) if item["replay_seq"] else None
            out.append({"item": item, "original": original, "replayed": replayed,
                        "before": await self._part_view(original, "output") if original else None,
                        "after": await self._part_view(replayed, "output") if replayed else None})
        return out

    async def cycle(self, request: web.Request) -> web.Response:
        tl = self.m.timeline
        cycle = await self.m.db(tl.open_cycle)
        ctx: dict[str, Any] = {"cycle": cycle}
        if cycle is None:
            ctx["snapshots"] = [s for s in reversed(await self.m.db(tl.snapshots)) if s["valid"]]
            ctx["past"] = list(reversed(await self.m.db(tl.cycles)))[:10]
        elif cycle["state"] == "rewound":
            rows = await self.m.db(tl.effective_verbs, cycle["rewind_to_seq"], cycle["end_seq"])
            ctx["candidates"] = [verb_json(r) for r in rows[:1000]]
            ctx["more"] = max(len(rows) - 1000, 0)
        elif cycle["state"] == "review":
            items = await self.m.db(lambda: tl.inconsistencies(cycle=cycle["id"]))
            ctx["review"] = await self._side_by_side(items)
        return await self.page(request, "cycle.html", title="Undo cycle", **ctx)

    async def confirm(self, request: web.Request) -> web.Response:
        action = request.query.get("action", "")
        typed = [v.strip() for v in request.query.getall("to", []) if v.strip()]
        to = typed[-1] if typed else ""  # a typed @SEQ or time (last in the form) wins over a ticked snapshot
        if action not in ("rewind", "commit", "cancel"):
            raise web.HTTPSeeOther("/cycle")
        if action == "rewind" and not to:
            self.flash(request, "error", "Pick a snapshot or give @SEQ or a time to rewind to.")
            raise web.HTTPSeeOther("/cycle")
        return await self.page(request, "confirm.html", title=f"Confirm {action}", action=action, to=to,
                               cycle=await self.m.db(self.m.timeline.open_cycle))

    async def _confirmed(self, request: web.Request, action: str) -> Any:
        form = await request.post()
        if form.get("confirm") != "yes":
            raise web.HTTPSeeOther("/cycle/confirm?" + urlencode({"action": action, "to": form.get("to", "")}))
        return form

    async def rewind(self, request: web.Request) -> web.Response:
        to = str((await self._confirmed(request, "rewind")).get("to", "")).strip()
        return await self.operate(request, self.m.rewind(to), f"Rewound to {to}: live traffic is held until "
                                  "commit or cancel.", "/cycle")

    async def repair(self, request: web.Request) -> web.Response:
        note = str((await request.post()).get("note", ""))
        return await self.operate(request, self.m.repair(note), "Repair note recorded.", "/cycle")

    async def replay(self, request: web.Request) -> web.Response:
        form = await request.post()
        skip: list[int] = []
        for value in form.getall("skip", []) + str(form.get("skip_more", "")).replace(",", " ").split():
            seq = _int(str(value).strip().lstrip("#"))
            if seq is None:
                self.flash(request, "error", f"{value!r} is not a verb number.")
                raise web.HTTPSeeOther("/cycle")
            skip.append(seq)
        task = asyncio.create_task(self.m.replay(skip))
        self._tasks.add(task)
        session: Session = request["session"]

        def finished(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            exc = None if t.cancelled() else t.exception()
            if isinstance(exc, OperationError):
                session.flash.append(("error", exc.message))
            elif exc is not None:
                log.error("replay from the web UI failed: %s", exc)
                session.flash.append(("error", f"replay failed: {exc}"))
            else:
                session.flash.append(("ok", "Replay finished: review the result, then commit or cancel."))
        task.add_done_callback(finished)
        await asyncio.wait({task}, timeout=1.0)  # a quick refusal shows at once; a long replay runs on
        raise web.HTTPSeeOther("/cycle")

    async def commit(self, request: web.Request) -> web.Response:
        await self._confirmed(request, "commit")
        return await self.operate(request, self.m.commit(), "Committed: the replayed timeline is the service's "
                                  "history now; live traffic resumes.", "/cycle")

    async def cancel(self, request: web.Request) -> web.Response:
        await self._confirmed(request, "cancel")
        return await self.operate(request, self.m.cancel(), "Cancelled: the pre-rewind state is back; live "
                                  "traffic resumes.", "/cycle")

    # --- inconsistencies ------------------------------------------------------------------------
    async def inconsistencies(self, request: web.Request) -> web.Response:
        cid = _int(request.query.get("cycle"))
        items = await self.m.db(lambda: self.m.timeline.inconsistencies(cycle=cid))
        return await self.page(request, "inconsistencies.html", title="Inconsistencies",
                               items=list(reversed(items)), cycle_filter=cid)

    async def compensate(self, request: web.Request) -> web.Response:
        form = await request.post()
        ids = [i for i in (_int(str(v)) for v in form.getall("id", [])) if i is not None]
        op = self.m.compensate(ids or None, all_pending=not ids)
        return await self.operate(request, op, "Compensation run.", "/inconsistencies")

    async def acknowledge(self, request: web.Request) -> web.Response:
        iid = int(request.match_info["id"])

        async def ack() -> None:
            if not await self.m.db(lambda: self.m.timeline.inconsistencies(ids=[iid])):
                raise OperationError(404, f"no inconsistency {iid}")
            await self.m.db(self.m.timeline.set_compensation, iid, "acknowledged",
                            "acknowledged by the operator in the web UI")
            metrics.COMPENSATIONS.labels("acknowledged").inc()
        return await self.operate(request, ack(), f"Inconsistency {iid} acknowledged.", "/inconsistencies")

    # --- live updates ---------------------------------------------------------------------------
    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: `progress` from the manager's replay listeners, `mode` when the mode changes."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=256)

        def listener(event: dict[str, Any]) -> None:
            if not queue.full():
                queue.put_nowait(event)

        async def send(kind: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

        sid, mode, quiet = request.cookies.get(SESSION_COOKIE), None, 0
        self.m.listeners.append(listener)
        try:
            while not self.stopping.is_set() and self.sessions.get(sid, touch=False):
                if self.m.gate.mode != mode:
                    mode = self.m.gate.mode
                    await send("mode", {"mode": mode})
                try:
                    await send("progress", await asyncio.wait_for(queue.get(), 1.0))
                except asyncio.TimeoutError:
                    quiet += 1
                    if quiet % 15 == 0:
                        await resp.write(b": keep-alive\n\n")
        except ConnectionError:
            pass
        finally:
            self.m.listeners.remove(listener)
        return resp


def mount(app: web.Application, api: AdminApi) -> WebUi:
    """Add the web UI to the admin app (after the API's routes, so its catch-all comes last)."""
    ui = WebUi(api)
    app.middlewares.append(ui.middleware)
    ui.setup(app)
    return ui
