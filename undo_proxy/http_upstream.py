"""The client side of the HTTP front-end: one aiohttp session per upstream, used by live traffic and by
replay alike, so a replayed verb takes exactly the path its original took."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterable, Iterable, Sequence

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from storage.blobs import BlobStore
from undo_proxy.tracebacks import forget_frames

log = logging.getLogger("undo_proxy.http")
# RFC 9110 7.6.1: connection-specific header fields, never forwarded (nor those named in Connection).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"})
# Named in Connection, these would change where a request goes (Host selects the upstream's virtual host): a
# client cannot have them removed that way.
NEVER_CONNECTION_OPTIONS = frozenset({"host"})
KEEP_IN_MEMORY = 4 * 1024 * 1024   # larger response bodies of mutating verbs wait on disk
READ_BODY_STORE_LIMIT = 1024 * 1024  # read responses are hashed whole, stored up to this size
SMALL_ANSWER = 64 * 1024  # an answer up to this size (by its Content-Length) is read in one call
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PROPFIND"})


class UpstreamError(Exception):
    """The upstream could not be reached or answered badly; `status` is what the client gets."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def decoded_headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[str, str]]:
    """Header fields in order, repeated names kept. aiohttp sends header text on as UTF-8, so a field that
    is UTF-8 is decoded as such (it goes on byte for byte); any other bytes as latin-1 (RFC 9110 5.5)."""
    return [(_field_text(k), _field_text(v)) for k, v in raw]


def _field_text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def utf8_headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[str, str]] | None:
    """The fields decoded, or None when one is not UTF-8 (it could reach the upstream only re-encoded,
    i.e. not as the client sent it)."""
    try:
        return [(k.decode("utf-8"), v.decode("utf-8")) for k, v in raw]
    except UnicodeDecodeError:
        return None


def strip_hop_by_hop(headers: list[tuple[str, str]], also: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """The fields that are not connection-specific (nor named in `also`), in order."""
    names = [k.lower() for k, _ in headers]
    drop = HOP_BY_HOP | also
    if "connection" in names:
        named = {token.strip().lower() for name, (_, v) in zip(names, headers) if name == "connection"
                 for token in v.split(",")}
        drop = drop | (named - NEVER_CONNECTION_OPTIONS)
    return [h for name, h in zip(names, headers) if name not in drop]


def forwarded_headers(headers: Iterable[Sequence[str]], client: str, proto: str = "http") -> list[tuple[str, str]]:
    """Add X-Forwarded-For and Forwarded (RFC 7239) for the client, after any the client brought."""
    out: list[tuple[str, str]] = []
    xff: list[str] = []
    prior: list[str] = []
    host = None
    for k, v in headers:
        name = k.lower()
        if name == "x-forwarded-for":
            xff.append(v)
        elif name == "forwarded":
            prior.append(v)
        else:
            if name == "host" and host is None:
                host = v
            out.append((k, v))
    out.append(("X-Forwarded-For", ", ".join(xff + [client])))
    node = f'"[{client}]"' if ":" in client else client
    fwd = f"for={node};proto={proto}" + (f';host="{host}"' if host else "")
    out.append(("Forwarded", ", ".join(prior + [fwd])))
    return out


@dataclass
class BufferedResponse:
    """An upstream response read whole (mutating verbs and replay): its output record and its body."""
    status: int
    reason: str
    headers: list[tuple[str, str]]
    digest: str
    size: int
    body: bytes | None            # in memory when small
    blob: str | None              # else on disk in the blob store
    output: dict[str, Any] | None = None
    error: str | None = None
    stored: bool = True           # False: the blob store failed; the digest is known, the body maybe not

    @property
    def lost(self) -> bool:
        """The body is neither in memory nor in the blob store: it cannot be passed on."""
        return self.body is None and self.blob is None


@dataclass
class ExchangeResult:
    output: dict[str, Any] | None
    error: str | None = None
    response: BufferedResponse | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class HttpUpstream:
    """Requests whose body is known whole (none, or bytes: every read, every buffered mutation, replay) go
    over a pool of kept-alive connections speaking through aiohttp's own response protocol and parser; a
    body that streams or waits for `100 Continue` goes through an aiohttp ClientSession. The pool exists
    for speed: a ClientSession request costs about four times the CPU, and the proxy forwards thousands a
    second."""

    def __init__(self, base_url: str, timeout: float, connections: int = 256) -> None:
        self.base_url = base_url.rstrip("/")
        url = URL(self.base_url)
        self.host, self.port = url.host or "127.0.0.1", url.port or 80
        self.authority = url.raw_authority
        self.prefix = url.raw_path.rstrip("/")
        self.timeout = timeout
        self.keepalive = 30.0
        self.session: aiohttp.ClientSession | None = None
        self._idle: list[tuple[float, ResponseHandler]] = []
        self.connections = connections
        self._slots = asyncio.Semaphore(connections)

    async def start(self) -> None:
        # No limit of its own: its requests take the same slots as the pool's (the upstream sees `connections`).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self.keepalive, force_close=False)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, connect=min(self.timeout, 10), sock_read=self.timeout),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        for _, proto in self._idle:
            proto.close()
        self._idle.clear()
        if self.session:
            await self.session.close()

    def open(self, request: dict[str, Any], data: bytes | AsyncIterable[bytes] | None) -> Any:
        """Start the upstream request for a recorded request: an async context manager giving the response
        (status, reason, raw_headers, headers, content_length, content, read())."""
        headers = forwarded_headers(request["headers"], request.get("client", ""))
        if data is None or isinstance(data, bytes):
            if not any(k.lower() == "expect" for k, _ in headers):
                return _PooledExchange(self, request["method"], request["path"], headers, data)
        assert self.session is not None
        fields = CIMultiDict(headers)
        if data is None and request["method"] not in ("GET", "HEAD", "OPTIONS", "DELETE"):
            fields.setdefault("Content-Length", "0")
        # encoded=True: the path goes upstream byte for byte as the client sent it.
        url = URL(self.base_url + request["path"], encoded=True)
        return _SessionExchange(self, self.session.request(request["method"], url, headers=fields, data=data,
                                                           allow_redirects=False))

    async def take_slot(self) -> None:
        """One of the `connections` the upstream is sent at once; waited for no longer than the timeout."""
        if not self._slots.locked():
            await self._slots.acquire()   # at once: no timer to set and cancel on every request
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:  # the upstream is saturated: a request does not wait for a slot for ever
            raise UpstreamError(503, f"upstream busy: all {self.connections} connections in use "
                                     f"for {self.timeout:g} s") from None

    async def exchange(self, request: dict[str, Any], data: bytes | AsyncIterable[bytes] | None,
                       blobs: BlobStore, pack: Any) -> ExchangeResult:
        """Send, read the whole answer into the blob store, and describe it as the pack's output."""
        try:
            async with self.open(request, data) as resp:
                buffered = await read_whole(resp, blobs)
        except UpstreamError as exc:
            forget_frames(exc)
            return ExchangeResult(None, exc.reason, extra={"status": exc.status})
        except Exception as exc:  # noqa: BLE001 - every upstream failure becomes 502/504
            err = classify(exc)
            forget_frames(exc)
            return ExchangeResult(None, err.reason, extra={"status": err.status})
        buffered.output = pack.output(buffered.status, buffered.reason, buffered.headers, buffered.digest,
                                      buffered.size, buffered.stored, request["method"], body=buffered.body)
        return ExchangeResult(buffered.output, response=buffered)

    # --- the pool of kept-alive connections ------------------------------------------------------
    async def _connection(self) -> tuple[ResponseHandler, bool]:
        """An idle connection (True: reused) or a new one."""
        now = time.monotonic()
        while self._idle:
            since, proto = self._idle.pop()
            # should_close also catches bytes the upstream sent while the connection was idle: parsed as an
            # answer, they would be handed to the next request, somebody else's.
            if proto.is_connected() and not proto.should_close and now - since < self.keepalive:
                return proto, True
            proto.close()
        try:
            async with asyncio.timeout(min(self.timeout, 10)):
                loop = asyncio.get_running_loop()
                _, proto = await loop.create_connection(lambda: ResponseHandler(loop), self.host, self.port)
        except OSError as exc:
            raise UpstreamError(502, f"upstream unreachable: {exc.strerror or exc}") from None
        return proto, False

    def _release(self, proto: ResponseHandler) -> None:
        if proto.should_close or not proto.is_connected():
            proto.close()
        else:
            self._idle.append((time.monotonic(), proto))

    def request_head(self, method: str, path: str, headers: list[tuple[str, str]], data: bytes | None) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1"]
        host = length = False
        for k, v in headers:
            name = k.lower()
            if name == "content-length":
                if data is not None:
                    continue  # the length of the body sent is the one that counts
                length = True
            host = host or name == "host"
            lines.append(f"{k}: {v}")
        if not host:
            lines.append(f"Host: {self.authority}")
        if data is not None:
            lines.append(f"Content-Length: {len(data)}")
        elif not length and method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
            lines.append("Content-Length: 0")
        if any("\n" in line or "\r" in line for line in lines):
            raise UpstreamError(400, "a header field holds a line break")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("utf-8")


class _PooledResponse:
    """The answer on a pooled connection, with the attributes of aiohttp's ClientResponse that the proxy
    uses."""
    __slots__ = ("status", "reason", "raw_headers", "headers", "content")

    def __init__(self, message: Any, content: aiohttp.StreamReader) -> None:
        self.status: int = message.code
        self.reason: str = message.reason
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = message.raw_headers
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self) -> bytes:
        return await self.content.read()


class _PooledExchange:
    def __init__(self, upstream: HttpUpstream, method: str, path: str, headers: list[tuple[str, str]],
                 data: bytes | None) -> None:
        self.upstream, self.method, self.data = upstream, method, data
        self.head = upstream.request_head(method, path, headers, data)
        self.proto: ResponseHandler | None = None
        self.response: _PooledResponse | None = None

    async def __aenter__(self) -> _PooledResponse:
        await self.upstream.take_slot()
        try:
            proto, reused = await self.upstream._connection()
            try:
                return await self._exchange(proto)
            except aiohttp.ServerDisconnectedError:
                # A kept-alive connection the upstream had closed meanwhile: once more on a new one when
                # the method may be repeated (RFC 9112 9.3.1), as aiohttp does.
                if not reused or self.method not in IDEMPOTENT:
                    raise
                proto, _ = await self.upstream._connection()
                return await self._exchange(proto)
        except BaseException:
            if self.proto is not None:
                self.proto.abort()
                self.proto = None
            self.upstream._slots.release()
            raise

    async def _exchange(self, proto: ResponseHandler) -> _PooledResponse:
        self.proto = proto
        proto.set_response_params(skip_payload=self.method == "HEAD", read_until_eof=True, auto_decompress=False,
                                  read_timeout=self.upstream.timeout)
        assert proto.transport is not None
        proto.transport.write(self.head + self.data if self.data else self.head)
        if self.data and proto.transport.get_write_buffer_size() > (1 << 16):
            await proto._drain_helper()
        proto.start_timeout()
        try:
            message, payload = await proto.read()
        except HttpProcessingError as exc:
            raise UpstreamError(502, f"upstream answered garbage: {exc.message}") from None
        while 100 <= message.code < 200 and message.code != 101:  # interim answers (RFC 9110 15.2)
            message, payload = await proto.read()
        if not 200 <= message.code <= 599:
            # 101 included: the proxy passes no Upgrade on, so the client asked for no protocol switch.
            raise UpstreamError(502, f"upstream answered with status {message.code:03d}")
        self.response = _PooledResponse(message, payload)
        return self.response

    async def __aexit__(self, *exc: Any) -> None:
        proto, self.proto = self.proto, None
        try:
            if proto is not None:
                if exc[0] is None and self.response is not None and self.response.content.is_eof():
                    self.upstream._release(proto)
                else:
                    proto.abort()   # an answer not read to its end cannot carry the next request
        finally:
            self.upstream._slots.release()

class _SessionExchange:
    """A ClientSession request (a streamed body, Expect: 100-continue) holding one of the upstream's slots."""

    def __init__(self, upstream: HttpUpstream, request: Any) -> None:
        self.upstream, self.request = upstream, request

    async def __aenter__(self) -> aiohttp.ClientResponse:
        await self.upstream.take_slot()
        try:
            return await self.request.__aenter__()
        except BaseException:
            self.upstream._slots.release()
            raise

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.request.__aexit__(*exc)
        finally:
            self.upstream._slots.release()


async def read_whole(resp: aiohttp.ClientResponse, blobs: BlobStore) -> BufferedResponse:
    writer = blobs.writer()
    kept: list[bytes] = []
    kept_size = 0
    try:
        if resp.content_length is not None and resp.content_length <= SMALL_ANSWER:
            # Read in one call: most answers are this small, and replay reads tens of thousands of them.
            body = await resp.read()
            writer.write_if_possible(body)
            ref = writer.known() or await asyncio.to_thread(writer.finish_if_possible)
            return BufferedResponse(resp.status, resp.reason or "", decoded_headers(resp.raw_headers), ref.digest,
                                    ref.size, body, None, stored=_stored(writer))
        async for chunk in resp.content.iter_any():
            writer.write_if_possible(chunk)
            if kept_size <= KEEP_IN_MEMORY:
                kept.append(chunk)
                kept_size += len(chunk)
        ref = writer.known() or await asyncio.to_thread(writer.finish_if_possible)
    except BaseException:
        writer.discard()
        raise
    in_memory = kept_size <= KEEP_IN_MEMORY
    stored = _stored(writer)
    return BufferedResponse(resp.status, resp.reason or "", decoded_headers(resp.raw_headers), ref.digest,
                            ref.size, b"".join(kept) if in_memory else None,
                            None if in_memory or not stored else ref.digest, stored=stored)


def _stored(writer: Any) -> bool:
    """An answer's body is kept unless the blob store failed (logged: the service acted all the same)."""
    if writer.failure is None:
        return True
    log.warning("an upstream answer's body could not be kept in the blob store (%s): recorded by its digest",
                writer.failure)
    return False


def classify(exc: BaseException) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamError(504, "upstream timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(502, f"upstream unreachable: {exc.os_error.strerror or exc}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamError(502, "upstream closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamError(502, "upstream sent a broken body")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamError(502, f"upstream answered garbage: {exc.message}")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return UpstreamError(502, f"upstream failed: {exc.__class__.__name__}: {exc}")
    log.error("unexpected error talking to the upstream", exc_info=exc)
    return UpstreamError(502, f"proxy error: {exc.__class__.__name__}")
