"""The `http` verb pack: any HTTP service. GET/HEAD/OPTIONS read, every other method mutates;
the target is the normalized path."""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import unquote, urlsplit

from verbs.base import (CompensationResult, Finding, Intent, RecordedVerb, ReplayContext, ReplayResult,
                        normalize_path, paths_overlap, targets_conflict)

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What a read's check ignores: these change on every response without the content changing.
VOLATILE_HEADERS = frozenset({"date", "server", "etag", "last-modified", "age", "expires", "set-cookie",
                              "x-request-id", "via", "keep-alive", "connection", "transfer-encoding"})
# Headers that may name something the server chose (a Location, a lock token): rewritten on replay.
NAME_HEADERS = ("destination", "if", "lock-token")


@dataclass
class HttpRequestHead:
    """What the front-end parsed of a request, before its body."""
    method: str
    raw_path: str                    # path and query exactly as sent
    version: str                     # "1.1"
    headers: list[tuple[str, str]]   # in order, repeated names kept, hop-by-hop already removed
    client: str                      # peer address


def header(headers: Iterable[tuple[str, str]] | Iterable[list[str]], name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _status_class(status: int | None) -> int:
    return (status or 0) // 100


@functools.lru_cache(maxsize=4)
def _names_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    """One pass, longest name first, whole names only: "/items/1" must not rewrite "/items/10", and a
    name that became another (1 -> 2) is not rewritten again by a later rename (2 -> 3). Cached: a
    replay asks for the same names verb after verb until it learns a new one."""
    alternatives = "|".join(re.escape(old) for old in sorted(names, key=len, reverse=True))
    return re.compile(f"(?:{alternatives})(?=[/?#>)\\s,]|$)")


class HttpPack:
    name = "http"
    protocol = "http"

    # --- parse -------------------------------------------------------------------------------
    def mutates(self, method: str) -> bool:
        return method not in READ_METHODS

    def targets(self, head: HttpRequestHead) -> list[str]:
        return [self.logical_path(head.raw_path)]

    def logical_path(self, raw: str) -> str:
        return normalize_path(unquote(urlsplit(raw).path if "://" in raw else raw.split("?", 1)[0]))

    def parse(self, head: HttpRequestHead) -> Intent:
        method = head.method.upper()
        return Intent(
            verb=f"{self.name}.{method.lower()}",
            targets=self.targets(head),
            mutates=self.mutates(method),
            summary=f"{method} {head.raw_path}",
            request={"method": method, "path": head.raw_path, "version": head.version,
                     "headers": [list(h) for h in head.headers], "client": head.client, "body": None},
        )

    # --- output ------------------------------------------------------------------------------
    def output(self, status: int, reason: str, headers: list[tuple[str, str]], body_digest: str,
               body_size: int, body_stored: bool, method: str, body: bytes | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": status, "reason": reason, "headers": [list(h) for h in headers],
            "body": {"digest": body_digest, "size": body_size, "stored": body_stored},
        }
        location = header(headers, "location")
        if location:
            out["location"] = self.logical_path(location)
        return out

    def summary(self, intent_summary: str, output: dict[str, Any] | None, error: str | None = None) -> str:
        if error:
            return f"{intent_summary} -> {error}"
        return f"{intent_summary} -> {output['status']}" if output else intent_summary

    # --- check -------------------------------------------------------------------------------
    def check_digest(self, verb: RecordedVerb | None, output: dict[str, Any]) -> str:
        """The digest that the consistency check compares; packs normalize volatile bodies here."""
        return output.get("check_digest") or output["body"]["digest"]

    def check(self, original: RecordedVerb, replayed: dict[str, Any]) -> Finding | None:
        before, now = original.output or {}, replayed
        b_status, n_status = before.get("status"), now.get("status")
        if not original.mutates:
            if b_status != n_status:
                return Finding("output-changed",
                               f"{original.summary.split(' -> ')[0]}: the client saw {b_status}, "
                               f"replay answers {n_status}")
            if (b_status or 0) >= 400:
                return None  # the same error both times: error pages are generated (WsgiDAV's carry a timestamp)
            if self.check_digest(original, before) != self.check_digest(original, now):
                return Finding("output-changed",
                               f"{original.summary.split(' -> ')[0]}: the body the client saw "
                               f"({before['body']['size']} bytes, sha256 {before['body']['digest'][:12]}) "
                               f"differs from the replayed one ({now['body']['size']} bytes, "
                               f"sha256 {now['body']['digest'][:12]})")
            return None
        b_ok, n_ok = _status_class(b_status) == 2, _status_class(n_status) == 2
        what = original.summary.split(" -> ")[0]
        if b_ok and not n_ok:
            return Finding("now-fails", f"{what}: succeeded with {b_status} for the client, "
                                        f"fails with {n_status} on replay")
        if not b_ok and n_ok:
            return Finding("now-succeeds", f"{what}: failed with {b_status} for the client, "
                                           f"succeeds with {n_status} on replay")
        if _status_class(b_status) != _status_class(n_status):
            return Finding("output-changed", f"{what}: answered {b_status}, replay answers {n_status}")
        return None

    # --- ordering ----------------------------------------------------------------------------
    def conflicts(self, a: list[str], b: list[str]) -> bool:
        if len(a) == 1 and len(b) == 1:  # the common case, checked against every verb in flight
            return paths_overlap(a[0], b[0])
        return targets_conflict(a, b)

    # --- replay ------------------------------------------------------------------------------
    def translate(self, request: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
        """Rewrite server-chosen names that earlier replayed verbs renamed (Locations, lock tokens)."""
        if not names:
            return request

        pattern = _names_pattern(tuple(names))

        def sub(text: str) -> str:
            return pattern.sub(lambda m: names[m.group(0)], text)

        out = dict(request)
        out["path"] = sub(request["path"])
        out["headers"] = [[k, sub(v) if k.lower() in NAME_HEADERS else v] for k, v in request["headers"]]
        return out

    def learn_names(self, original: dict[str, Any] | None, replayed: dict[str, Any],
                    names: dict[str, str]) -> None:
        if not original:
            return
        for key in ("location", "lock_token"):
            old, new = original.get(key), replayed.get(key)
            if old and new and old != new:
                names[old] = new

    async def replay(self, verb: RecordedVerb, ctx: ReplayContext) -> ReplayResult:
        request = self.translate(verb.request, ctx.names)
        targets = self.targets(HttpRequestHead(request["method"], request["path"], request.get("version", "1.1"),
                                               [(k, v) for k, v in request["headers"]], request.get("client", "")))
        body = request.get("body")
        data = ctx.blobs.read(body["digest"]) if body and body.get("stored") else None
        result = await ctx.upstream.exchange(request, data, ctx.blobs, self)
        if result.output is None:
            return ReplayResult("failed", {"error": result.error}, self.summary(verb.summary.split(" -> ")[0],
                                                                                None, result.error), request, targets)
        self.learn_names(verb.output, result.output, ctx.names)
        return ReplayResult("committed", result.output,
                            self.summary(verb.summary.split(" -> ")[0], result.output), request, targets)

    # --- compensate --------------------------------------------------------------------------
    async def compensate(self, inconsistency: dict[str, Any], verb: RecordedVerb,
                         frontend: Any) -> CompensationResult:
        """POST the inconsistency to the front-end's webhook; without one, the operator acknowledges."""
        webhook = getattr(frontend.settings, "compensation_webhook", None)
        if not webhook:
            return CompensationResult("acknowledged", "no webhook configured: the operator has taken note")
        import aiohttp

        payload = dict(inconsistency, request={"method": verb.request.get("method"),
                                               "path": verb.request.get("path"),
                                               "client": verb.request.get("client")})
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
                async with session.post(webhook, data=json.dumps(payload),
                                        headers={"Content-Type": "application/json"}) as resp:
                    if 200 <= resp.status < 300:
                        return CompensationResult("done", f"webhook answered {resp.status}")
                    return CompensationResult("failed", f"webhook answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return CompensationResult("failed", f"webhook unreachable: {exc.__class__.__name__}: {exc}")
