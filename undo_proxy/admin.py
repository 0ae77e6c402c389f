"""The admin listener: the JSON API under /api (bearer token), Prometheus metrics at /metrics, and the web
UI (undo_proxy.ui) everywhere else."""
from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from storage.timeline import VerbFilter
from undo_proxy import metrics
from undo_proxy.manager import OperationError, UndoManager

log = logging.getLogger("undo_proxy.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def token_ok(given: str | None, token: str) -> bool:
    # surrogateescape: header bytes that are not UTF-8 come back as they were sent (and simply do not match)
    return bool(token) and given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                                                     token.encode())


def bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def _int(value: str | None, name: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        n = int(value)
    except ValueError:
        raise OperationError(400, f"{name} must be a whole number, not {value!r}") from None
    if n < 0:
        raise OperationError(400, f"{name} must not be negative")
    if n >= 1 << 63:  # beyond any database's integers
        raise OperationError(400, f"{name} is too large")
    return n


def _numbers(value: Any, refusal: str) -> list[int]:
    """A JSON list of verb or inconsistency numbers (booleans are not numbers, nor is what no database holds)."""
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 63
                                              for i in value):
        raise OperationError(400, refusal)
    return value


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OperationError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise OperationError(400, "the body must be a JSON object")
    return body


class AdminApi:
    def __init__(self, manager: UndoManager, token: str, authenticated: Callable[[web.Request], bool]
                 | None = None) -> None:
        self.manager = manager
        self.token = token
        self.session_ok = authenticated  # the web UI's session check, when the UI is mounted

    def authorized(self, request: web.Request) -> bool:
        if token_ok(bearer(request), self.token):
            return True
        return bool(self.session_ok and self.session_ok(request))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api") or request.path == "/metrics":
            if not self.authorized(request):
                return error(401, "a valid admin token is required (Authorization: Bearer <token>)")
            try:
                return await handler(request)
            except OperationError as exc:
                return error(exc.status, exc.message)
            except web.HTTPException as exc:
                if exc.status >= 400:
                    return error(exc.status, exc.reason)
                raise
        return await handler(request)

    def routes(self) -> list[web.RouteDef]:
        m = self.manager
        tl = m.timeline

        async def status(request: web.Request) -> web.Response:
            return web.json_response(await m.status())

        async def timeline(request: web.Request) -> web.Response:
            q = request.query
            f = VerbFilter(limit=_int(q.get("limit"), "limit"), after=_int(q.get("after"), "after"),
                           protocol=q.get("protocol") or None, verb=q.get("verb") or None,
                           target=q.get("target") or None, cycle=_int(q.get("cycle"), "cycle"),
                           status=q.get("status") or None)
            return web.json_response(await m.db(tl.verbs, f))

        async def verb(request: web.Request) -> web.Response:
            seq = _int(request.match_info["seq"], "seq")
            doc = await m.db(tl.verb, seq)
            if doc is None:
                raise OperationError(404, f"no verb {seq}")
            return web.json_response(doc)

        async def snapshots(request: web.Request) -> web.Response:
            return web.json_response(await m.db(tl.snapshots))

        async def take(request: web.Request) -> web.Response:
            body = await _json_body(request)
            label = body.get("label")
            if label is not None and not isinstance(label, str):
                raise OperationError(400, "label must be a string")
            return web.json_response(await m.take_snapshot(label), status=201)

        async def delete(request: web.Request) -> web.Response:
            await m.delete_snapshot(request.match_info["id"])
            return web.json_response({"deleted": request.match_info["id"]})

        async def rewind(request: web.Request) -> web.Response:
            to = (await _json_body(request)).get("to")
            if not isinstance(to, str) or not to:
                raise OperationError(400, "give the rewind target as {\"to\": \"ID\" | \"@SEQ\" | \"TIME\"}")
            return web.json_response(await m.rewind(to))

        async def repair(request: web.Request) -> web.Response:
            note = (await _json_body(request)).get("note")
            if not isinstance(note, str):
                raise OperationError(400, "give the note as {\"note\": \"...\"}")
            return web.json_response(await m.repair(note))

        async def replay(request: web.Request) -> web.Response:
            skip = _numbers((await _json_body(request)).get("skip", []), "skip must be a list of verb numbers")
            return web.json_response(await m.replay(skip))

        async def commit(request: web.Request) -> web.Response:
            return web.json_response(await m.commit())

        async def cancel(request: web.Request) -> web.Response:
            return web.json_response(await m.cancel())

        async def cycles(request: web.Request) -> web.Response:
            return web.json_response(await m.db(tl.cycles))

        async def cycle(request: web.Request) -> web.Response:
            return web.json_response(await m.cycle_or_404(_int(request.match_info["id"], "id")))

        async def inconsistencies(request: web.Request) -> web.Response:
            cid = _int(request.query.get("cycle"), "cycle")
            return web.json_response(await m.db(lambda: tl.inconsistencies(cycle=cid)))

        async def compensate(request: web.Request) -> web.Response:
            body = await _json_body(request)
            ids = body.get("ids")
            if ids is not None:
                _numbers(ids, "ids must be a list of inconsistency ids")
            return web.json_response(await m.compensate(ids, bool(body.get("all"))))

        async def prometheus(request: web.Request) -> web.Response:
            resp = web.Response(body=generate_latest(metrics.REGISTRY))
            resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
            return resp

        return [
            web.get("/api/status", status), web.get("/api/timeline", timeline),
            web.get("/api/verbs/{seq}", verb), web.get("/api/snapshots", snapshots),
            web.post("/api/snapshots", take), web.delete("/api/snapshots/{id}", delete),
            web.post("/api/rewind", rewind), web.post("/api/repair", repair), web.post("/api/replay", replay),
            web.post("/api/commit", commit), web.post("/api/cancel", cancel), web.get("/api/cycles", cycles),
            web.get("/api/cycles/{id}", cycle), web.get("/api/inconsistencies", inconsistencies),
            web.post("/api/compensate", compensate), web.get("/metrics", prometheus),
        ]


def make_admin_app(api: AdminApi) -> web.Application:
    app = web.Application(middlewares=[api.middleware], client_max_size=1 << 20)
    app.add_routes(api.routes())

    async def api_not_found(request: web.Request) -> web.Response:
        if not api.authorized(request):
            return error(401, "a valid admin token is required")
        return error(404, f"no route {request.method} {request.path}")
    app.router.add_route("*", "/api/{tail:.*}", api_not_found)
    from undo_proxy import ui  # the web UI builds on this module

    ui.mount(app, api)
    return app
