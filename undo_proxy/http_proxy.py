"""The HTTP front-end: sockets and parsing only. Each request becomes a verb through the pack, passes the
gate, is recorded in the timeline, and only then reaches the upstream.

Mutating verbs: the request body is stored (blob store) and the intent committed before anything is
forwarded; the upstream's answer is read whole and its outcome committed before the client sees it.
Reads stream straight through and are recorded in batches as they finish.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Iterator

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from yarl import URL

from storage.blobs import BlobStore
from storage.db import TimelineUnavailable
from storage.timeline import GroupCommitter, NewVerb, Timeline
from undo_proxy import metrics
from undo_proxy.config import HttpFrontend
from undo_proxy.gate import Gate, Refused
from undo_proxy.http_upstream import (READ_BODY_STORE_LIMIT, BufferedResponse, HttpUpstream, UpstreamError,
                                      classify, decoded_headers, read_whole, strip_hop_by_hop, utf8_headers)
from undo_proxy.tracebacks import forget_frames
from verbs.base import Intent
from verbs.http import HttpRequestHead

log = logging.getLogger("undo_proxy.http")
RETRY_AFTER = "30"
MAX_REQUEST_LINE = 8192
MAX_HEADER_FIELD = 8190
SMALL_BODY = 64 * 1024  # read answers up to this size are sent in one piece, not streamed
# Response headers the proxy sets itself from what it sends (a HEAD answer keeps the upstream's length).
_RESPONSE_FRAMING = frozenset({"content-length", "transfer-encoding"})
_HEAD_FRAMING = frozenset({"transfer-encoding"})


class _Handler(web_protocol.RequestHandler):
    """aiohttp's connection handler with the status codes of RFC 9110/6585 for oversized requests, and one
    log line instead of a stack trace per malformed request or per client that went away."""

    def handle_error(self, request, status=500, exc=None, message=None):  # noqa: ANN001, ANN201
        if isinstance(exc, LineTooLong):
            # aiohttp names the limit it hit: the request line's is set apart from the header fields'.
            status, message = (414, "URI Too Long") if exc.args[1:2] == (MAX_REQUEST_LINE,) \
                else (431, "Request Header Fields Too Large")
        elif isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower():
            status, message = 431, "Request Header Fields Too Large"
        if isinstance(exc, BadHttpMessage):
            metrics.FRONTEND_ERRORS.labels("http", "malformed").inc()
            log.info("refused a malformed request from %s: %s", _peer(request), str(exc)[:200])
            resp = _Whole(status=status, text=f"{status} {message or 'Bad Request'}\n")
            resp.force_close()
            return resp
        if isinstance(exc, ConnectionError):  # the client went away before its answer: nothing to tell it
            log.info("client %s went away before its response was sent", _peer(request))
            resp = _Whole(status=status)
            resp.force_close()
            return resp
        return super().handle_error(request, status, exc, message)


class _Server(web.Server):
    def __call__(self) -> _Handler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class _NoDefaultHeaders:
    """An answer carries the Content-Type and Server it was given, or none: aiohttp would add
    `application/octet-stream` (which stops a browser from sniffing the type of a relayed answer) and its own
    Server (the proxy's software and version, to anyone). Date it may add (RFC 9110 6.6.1: a proxy forwarding
    an answer without one adds it)."""
    headers: Any

    async def _prepare_headers(self) -> None:
        missing = [name for name in _NOT_ADDED if name not in self.headers]
        await super()._prepare_headers()  # type: ignore[misc]
        for name in missing:
            self.headers.popall(name, None)


_NOT_ADDED = ("Content-Type", "Server")


class _Streamed(_NoDefaultHeaders, web.StreamResponse):
    pass


class _Whole(_NoDefaultHeaders, web.Response):
    pass


def _peer(request: web.BaseRequest) -> str:
    try:
        return request.remote or ""
    except Exception:  # noqa: BLE001
        return ""


class HttpFrontendServer:
    def __init__(self, cfg: HttpFrontend, pack: Any, gate: Gate, timeline: Timeline,
                 committer: GroupCommitter, blobs: BlobStore, upstream: HttpUpstream) -> None:
        self.cfg, self.pack, self.gate = cfg, pack, gate
        self.timeline, self.committer, self.blobs, self.upstream = timeline, committer, blobs, upstream
        self.runner: web.ServerRunner | None = None
        # Counted on every request: the labelled children are looked up once.
        self._started = metrics.VERBS_STARTED.labels("http")
        self._committed = metrics.VERBS.labels("http", "committed")

    async def start(self) -> None:
        # keepalive_timeout also bounds how long a client may take to send a request's headers (aiohttp
        # closes a connection still waiting for a whole request when it expires): slowloris is cut off.
        server = _Server(self.handle, max_line_size=MAX_REQUEST_LINE, max_field_size=MAX_HEADER_FIELD, max_headers=100,
                         handler_cancellation=False, keepalive_timeout=self.cfg.client_timeout)
        self.runner = web.ServerRunner(server, shutdown_timeout=5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.listen.host, self.cfg.listen.port, reuse_address=True)
        await site.start()
        log.info("http front-end %s listening on %s, upstream %s", self.cfg.name, self.cfg.listen,
                 self.cfg.upstream)

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    # --- the one flow ----------------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.gate.refusing:
            return _plain(503, "undo-proxy: an undo cycle is open; try again later\n",
                          {"Retry-After": RETRY_AFTER})
        if request.version not in ((1, 1), (1, 0)):   # HTTP/0.9 (no version) or a 2.x/3.x line over HTTP/1
            metrics.FRONTEND_ERRORS.labels("http", "malformed").inc()
            return _plain(505, "505 HTTP Version Not Supported\n", close=True)
        fields = utf8_headers(request.raw_headers)
        if fields is None:
            # It could only be passed on re-encoded, i.e. not as the client sent it and as it is recorded.
            metrics.FRONTEND_ERRORS.labels("http", "malformed").inc()
            log.info("refused a request from %s: a header field is not UTF-8", _peer(request))
            return _plain(400, "400 Bad Request: header fields must be ASCII or UTF-8\n", close=True)
        raw_path = _origin_form(request.raw_path)
        if raw_path is None:
            return _plain(400, "400 Bad Request: unsupported request target\n")
        head = HttpRequestHead(
            method=request.method, raw_path=raw_path, version=f"{request.version.major}.{request.version.minor}",
            headers=strip_hop_by_hop(fields),
            client=_peer(request))
        intent: Intent = self.pack.parse(head)
        self._started.inc()
        if intent.mutates:
            if request.content_length is not None and request.content_length > self.cfg.max_body:
                return _plain(413, "413 Content Too Large\n")
            try:
                async with self.gate.mutation(intent.targets):
                    return await self._mutating(request, intent)
            except Refused:
                return _plain(503, "undo-proxy: an undo cycle is open; try again later\n",
                              {"Retry-After": RETRY_AFTER})
        if not self.committer.healthy:
            # The last timeline write failed: until one succeeds, a read's intent is committed before it is
            # forwarded, like a mutation's. That write is also how the front-end notices the timeline is back.
            seq = await self._commit_intent(intent)
            if seq is None:
                return _plain(503, "undo-proxy: the timeline cannot be written\n", {"Retry-After": "5"})
            return await self._read(request, intent, seq)
        return await self._read(request, intent)

    def _new_verb(self, intent: Intent, **kw: Any) -> NewVerb:
        return NewVerb(protocol=self.pack.protocol, frontend=self.cfg.name, verb=intent.verb,
                       targets=intent.targets, mutates=intent.mutates, summary=intent.summary,
                       request=intent.request, **kw)

    async def _record_aborted(self, intent: Intent, why: str, seq: int | None = None) -> None:
        metrics.VERBS.labels("http", "aborted").inc()
        verb = self._new_verb(intent, status="aborted", output={"error": why})
        verb.summary = self.pack.summary(intent.summary, None, why)
        self._record_finished(verb, seq)

    async def _store_body(self, request: web.BaseRequest) -> dict[str, Any]:
        """Raises _Unrecordable when the blob store cannot be written (disk full: as if the timeline were
        down), _TooLarge, or what reading the client's body raised."""
        writer = self.blobs.writer()
        try:
            while chunk := await asyncio.wait_for(request.content.readany(), self.cfg.client_timeout):
                with _blob_store_errors():
                    writer.write(chunk)
                if writer.size > self.cfg.max_body:
                    raise _TooLarge()
            with _blob_store_errors():
                ref = await asyncio.to_thread(writer.finish)
        except BaseException:
            writer.discard()
            raise
        metrics.BYTES_RECORDED.inc(ref.stored_size if ref.new else 0)
        return {"digest": ref.digest, "size": ref.size, "stored": True}

    async def _mutating(self, request: web.BaseRequest, intent: Intent) -> web.StreamResponse:
        expects = (request.headers.get("Expect", "").lower() == "100-continue")
        if expects:
            return await self._mutating_expect(request, intent)
        try:
            intent.request["body"] = await self._store_body(request)
        except _TooLarge:
            return _plain(413, "413 Content Too Large\n", close=True)
        except _Unrecordable as exc:
            metrics.FRONTEND_ERRORS.labels("http", "timeline").inc()
            log.error("refusing %s: %s", intent.summary, exc)
            self.committer.healthy = False  # reads now commit their intent first, and so find out when it is back
            return _unrecordable()
        except asyncio.TimeoutError:  # the body stalled for client_timeout: free the connection
            metrics.FRONTEND_ERRORS.labels("http", "client-timeout").inc()
            log.info("%s: the client sent no body for %.0f s; closing", intent.summary, self.cfg.client_timeout)
            await self._record_aborted(intent, "the client stopped sending the body")
            return _plain(408, "408 Request Timeout\n", close=True)
        except (ConnectionError, asyncio.CancelledError, Exception) as exc:  # client gone mid-body
            await self._record_aborted(intent, f"client went away while sending the body ({exc.__class__.__name__})")
            if isinstance(exc, asyncio.CancelledError):
                raise
            # Answered rather than raised: a raised HTTPException stays in a local of a frame its own
            # traceback holds, a reference cycle (as is the one forget_frames cuts) that kept the body's
            # buffers until the garbage collector came by.
            forget_frames(exc)
            return _plain(400, "400 Bad Request: the body was cut off\n", close=True)
        seq = await self._commit_intent(intent)
        if seq is None:
            return _unrecordable()
        body = intent.request["body"]
        try:
            data = self.blobs.read(body["digest"]) if body["size"] <= (4 << 20) else \
                _blob_stream(self.blobs, body["digest"])
        except OSError as exc:  # out of file descriptors, say: nothing was forwarded, and the verb says so
            log.error("%s: the stored body cannot be read back: %s", intent.summary, exc)
            return await self._finish_failed(intent, seq, UpstreamError(503, f"the stored body cannot be read: "
                                                                             f"{exc.strerror or exc}"))
        return await self._forward_buffered(request, intent, seq, data)

    async def _mutating_expect(self, request: web.BaseRequest, intent: Intent) -> web.StreamResponse:
        """Expect: 100-continue: the upstream sees the headers first; only when it asks for the body is the
        client told to send it, and the body is stored and the intent committed before it goes on."""
        state: dict[str, Any] = {"seq": None}

        async def body_after_continue() -> AsyncIterator[bytes]:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                intent.request["body"] = await self._store_body(request)
            except _Unrecordable:
                state["unrecordable"] = True
                raise
            seq = await self._commit_intent(intent)
            if seq is None:
                state["unrecordable"] = True
                raise _Unrecordable()
            state["seq"] = seq
            for chunk in self.blobs.chunks(intent.request["body"]["digest"]):
                yield chunk

        try:
            async with self.upstream.open(intent.request, body_after_continue()) as resp:
                buffered = await read_whole(resp, self.blobs)
        except Exception as exc:  # noqa: BLE001
            if state.get("unrecordable"):
                forget_frames(exc)
                return _unrecordable()
            err = classify(exc) if not isinstance(exc, _TooLarge) else UpstreamError(413, "too large")
            forget_frames(exc)
            if state["seq"] is None:
                await self._record_aborted(intent, err.reason)
                return _plain(err.status, f"{err.status} {err.reason}\n", close=True)
            return await self._finish_failed(intent, state["seq"], err)
        if state["seq"] is None:
            # The upstream answered without wanting the body: nothing was forwarded that could change state.
            intent.request["body"] = None
            output = self._output(buffered, intent)
            verb = self._new_verb(intent, status="failed", output=output)
            verb.summary = self.pack.summary(intent.summary, output)
            try:
                await self.committer.write(lambda s: Timeline.insert_verb(s, verb))
            except TimelineUnavailable:
                return _unrecordable()
            return await self._send_buffered(request, buffered, close=True)
        return await self._complete(request, intent, state["seq"], buffered)

    async def _commit_intent(self, intent: Intent) -> int | None:
        verb = self._new_verb(intent)
        try:
            return await self.committer.write(lambda s: Timeline.insert_verb(s, verb))
        except TimelineUnavailable as exc:
            metrics.FRONTEND_ERRORS.labels("http", "timeline").inc()
            log.error("refusing %s: the timeline cannot be written: %s", intent.summary, exc)
            return None

    async def _forward_buffered(self, request: web.BaseRequest, intent: Intent, seq: int,
                                data: Any) -> web.StreamResponse:
        try:
            async with self.upstream.open(intent.request, data) as resp:
                buffered = await read_whole(resp, self.blobs)
        except Exception as exc:  # noqa: BLE001
            err = classify(exc)
            forget_frames(exc)
            return await self._finish_failed(intent, seq, err)
        return await self._complete(request, intent, seq, buffered)

    def _output(self, buffered: BufferedResponse, intent: Intent) -> dict[str, Any]:
        return self.pack.output(buffered.status, buffered.reason, buffered.headers, buffered.digest,
                                buffered.size, buffered.stored, intent.request["method"], body=buffered.body)

    async def _complete(self, request: web.BaseRequest, intent: Intent, seq: int,
                        buffered: BufferedResponse) -> web.StreamResponse:
        output = self._output(buffered, intent)
        summary = self.pack.summary(intent.summary, output)
        if not await self.committer.finish_verb(seq, "committed", output, summary):
            log.error("verb %d reached the upstream but its outcome cannot be recorded yet: kept for later", seq)
            return _unrecordable()
        self._committed.inc()
        return await self._send_buffered(request, buffered)

    async def _finish_failed(self, intent: Intent, seq: int, err: UpstreamError) -> web.StreamResponse:
        metrics.VERBS.labels("http", "failed").inc()
        metrics.FRONTEND_ERRORS.labels("http", "upstream").inc()
        log.warning("%s: %s", intent.summary, err.reason)
        summary = self.pack.summary(intent.summary, None, f"{err.status} ({err.reason})")
        await self.committer.finish_verb(seq, "failed", {"error": err.reason, "status": err.status}, summary)
        return _plain(err.status, f"{err.status} undo-proxy: {err.reason}\n")

    async def _send_buffered(self, request: web.BaseRequest, buffered: BufferedResponse,
                             close: bool = False) -> web.StreamResponse:
        resp = self._response_head(buffered.status, buffered.reason, buffered.headers, request.method)
        if close:
            resp.force_close()
        if request.method == "HEAD" or buffered.status in (204, 304) or buffered.status < 200:
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        if buffered.lost:
            # The service acted and its answer is recorded by its digest, but the body is too large to have
            # been held in memory and the blob store could not keep it: it cannot be passed on.
            return _plain(502, "502 undo-proxy: the service's answer could not be kept to pass on; the request "
                               "was carried out\n", close=True)
        resp.content_length = buffered.size
        await resp.prepare(request)
        if buffered.body is not None:
            await resp.write(buffered.body)
        else:
            async for chunk in _blob_stream(self.blobs, buffered.blob or buffered.digest):
                await resp.write(chunk)
        await resp.write_eof()
        return resp

    def _response_head(self, status: int, reason: str, headers: list[tuple[str, str]],
                       method: str, kind: type[web.StreamResponse] = _Streamed) -> web.StreamResponse:
        resp = kind(status=status, reason=reason or None)
        add = resp.headers.add
        for k, v in strip_hop_by_hop(headers, _HEAD_FRAMING if method == "HEAD" else _RESPONSE_FRAMING):
            add(k, v)
        return resp

    # --- reads -------------------------------------------------------------------------------
    async def _read(self, request: web.BaseRequest, intent: Intent, seq: int | None = None) -> web.StreamResponse:
        """Stream the answer through. The verb is queued for the timeline before the client can have the
        whole answer (before the bytes that complete the body, or the end of a chunked one), so a client's
        next request is always recorded after this one and replay sees them in the order the client did.
        `seq`: the read's intent was committed first (the timeline had failed); its outcome completes it."""
        writer = self.blobs.writer(limit=READ_BODY_STORE_LIMIT)
        kept: list[bytes] = []
        resp: web.StreamResponse | None = None
        recorded = False
        has_body = request.body_exists
        data = _client_stream(request) if has_body else None

        async def record(up_status: int, reason: str, headers: list[tuple[str, str]]) -> None:
            nonlocal recorded
            ref = writer.known() or await asyncio.to_thread(writer.finish_if_possible)
            if writer.failure is not None:  # the blob store is full: replay compares a read's digest anyway
                log.warning("%s: the body is not kept: %s", intent.summary, writer.failure)
            stored = not writer.overflow
            output = self.pack.output(up_status, reason, headers, ref.digest, ref.size, stored,
                                      request.method, body=b"".join(kept) if stored else None)
            verb = self._new_verb(intent, status="committed", output=output)
            verb.summary = self.pack.summary(intent.summary, output)
            self._record_finished(verb, seq)
            self._committed.inc()
            recorded = True

        try:
            async with self.upstream.open(intent.request, data) as up:
                status, reason, headers = up.status, up.reason or "", decoded_headers(up.raw_headers)
                length = up.headers.get("Content-Length")
                expected = int(length) if length is not None and length.isdigit() else None
                no_body = request.method == "HEAD" or status in (204, 304) or expected == 0
                try:
                    if not no_body and expected is not None and expected <= SMALL_BODY:
                        # A small answer goes out in one write, head and body together.
                        body = await up.content.readexactly(expected)
                        writer.write_if_possible(body)
                        kept.append(body)
                        await record(status, reason, headers)
                        whole = self._response_head(status, reason, headers, request.method, _Whole)
                        whole.body = body
                        return whole
                    resp = self._response_head(status, reason, headers, request.method)
                    if request.method != "HEAD" and expected is not None:
                        resp.content_length = expected
                    if no_body:
                        await record(status, reason, headers)
                    await resp.prepare(request)
                    if not no_body:
                        sent = 0
                        async for chunk in up.content.iter_any():
                            writer.write_if_possible(chunk)
                            if not writer.overflow:
                                kept.append(chunk)
                            sent += len(chunk)
                            if expected is not None and sent >= expected:
                                await record(status, reason, headers)
                            await resp.write(chunk)
                    if not recorded:
                        await record(status, reason, headers)
                    await resp.write_eof()
                except (ConnectionError, RuntimeError) as exc:
                    forget_frames(exc)
                    if not recorded:
                        writer.discard()
                        await self._record_aborted(intent, f"client went away ({exc.__class__.__name__})", seq)
                    raise ConnectionResetError() from None
        except ConnectionResetError:
            raise
        except Exception as exc:  # noqa: BLE001
            writer.discard()
            err = classify(exc)
            forget_frames(exc)
            metrics.VERBS.labels("http", "failed").inc()
            verb = self._new_verb(intent, status="failed", output={"error": err.reason, "status": err.status})
            verb.summary = self.pack.summary(intent.summary, None, f"{err.status} ({err.reason})")
            self._record_finished(verb, seq)
            if resp is not None and resp.prepared:
                # Headers already sent: all we can do is cut the connection, at once, so that the client
                # sees a truncated answer (aiohttp would write an error response into the body).
                if request.transport is not None:
                    request.transport.abort()
                raise ConnectionResetError() from None
            return _plain(err.status, f"{err.status} undo-proxy: {err.reason}\n")
        return resp

    def _record_finished(self, verb: NewVerb, seq: int | None) -> None:
        """Queue a finished verb's record (batched, nobody waits), or complete its committed intent."""
        if seq is None:
            self.committer.record_nowait(verb)
        else:
            self.committer.submit_nowait(
                lambda s: Timeline.finish_verb(s, seq, verb.status, verb.output, verb.summary))


class _TooLarge(Exception):
    pass


class _Unrecordable(Exception):
    pass


@contextlib.contextmanager
def _blob_store_errors() -> Iterator[None]:
    """An OSError of the blob store (ENOSPC, EIO) is not the client's fault: the verb cannot be recorded."""
    try:
        yield
    except OSError as exc:
        raise _Unrecordable(f"the blob store cannot be written: {exc}") from exc


def _origin_form(target: str) -> str | None:
    """The request target as path and query, exactly as sent. An absolute-form target (RFC 9112 3.2.2) is
    reduced to its path and query: the upstream is fixed by the configuration, never named by the client
    (pasted onto the upstream's URL, the client's scheme and authority could change the host connected to).
    None when it is neither (authority-form, asterisk-form)."""
    if target.startswith("/"):
        return target
    try:
        url = URL(target, encoded=True)
    except ValueError:
        return None
    if url.scheme.lower() not in ("http", "https") or not url.raw_host:
        return None
    path = url.raw_path or "/"
    return path + (f"?{url.raw_query_string}" if url.raw_query_string else "")


def _plain(status: int, text: str, headers: dict[str, str] | None = None, close: bool = False) -> web.Response:
    resp = _Whole(status=status, text=text, headers=headers)
    if close:
        resp.force_close()
    return resp


def _unrecordable() -> web.Response:
    return _plain(503, "undo-proxy: the timeline cannot be written; nothing was forwarded\n",
                  {"Retry-After": "5"}, close=True)


async def _client_stream(request: web.BaseRequest) -> AsyncIterator[bytes]:
    while chunk := await request.content.readany():
        yield chunk


async def _blob_stream(blobs: BlobStore, digest: str) -> AsyncIterator[bytes]:
    it = iter(blobs.chunks(digest))
    while True:
        chunk = await asyncio.to_thread(next, it, None)
        if chunk is None:
            return
        yield chunk
