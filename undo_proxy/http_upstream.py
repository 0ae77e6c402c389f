"""The client side of the HTTP front-end: one aiohttp session per upstream, used by live traffic and by
replay alike, so a replayed verb takes exactly the path its original took."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterable, Iterable, Sequence

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from storage.blobs import BlobStore

# RFC 9110 7.6.1: connection-specific header fields, never forwarded (nor those named in Connection).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"})
KEEP_IN_MEMORY = 4 * 1024 * 1024   # larger response bodies of mutating verbs wait on disk
READ_BODY_STORE_LIMIT = 1024 * 1024  # read responses are hashed whole, stored up to this size
SMALL_ANSWER = 64 * 1024  # an answer up to this size (by its Content-Length) is read in one call


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


def utf8_fields(raw: tuple[tuple[bytes, bytes], ...]) -> bool:
    """True when every field is UTF-8, i.e. would reach the upstream exactly as the client sent it."""
    try:
        for k, v in raw:
            k.decode("utf-8")
            v.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def strip_hop_by_hop(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    named = {token.strip().lower() for k, v in headers if k.lower() == "connection" for token in v.split(",")}
    drop = HOP_BY_HOP | named
    return [(k, v) for k, v in headers if k.lower() not in drop]


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


@dataclass
class ExchangeResult:
    output: dict[str, Any] | None
    error: str | None = None
    response: BufferedResponse | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class HttpUpstream:
    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=30, force_close=False)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, connect=min(self.timeout, 10), sock_read=self.timeout),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self.session:
            await self.session.close()

    def open(self, request: dict[str, Any], data: bytes | AsyncIterable[bytes] | None):
        """Start the upstream request for a recorded request (returns aiohttp's request context)."""
        assert self.session is not None
        headers = CIMultiDict(forwarded_headers(request["headers"], request.get("client", "")))
        if data is None and request["method"] not in ("GET", "HEAD", "OPTIONS", "DELETE"):
            headers.setdefault("Content-Length", "0")
        # encoded=True: the path goes upstream byte for byte as the client sent it.
        url = URL(self.base_url + request["path"], encoded=True)
        return self.session.request(request["method"], url, headers=headers, data=data, allow_redirects=False)

    async def exchange(self, request: dict[str, Any], data: bytes | AsyncIterable[bytes] | None,
                       blobs: BlobStore, pack: Any) -> ExchangeResult:
        """Send, read the whole answer into the blob store, and describe it as the pack's output."""
        try:
            async with self.open(request, data) as resp:
                buffered = await read_whole(resp, blobs)
        except UpstreamError as exc:
            return ExchangeResult(None, exc.reason, extra={"status": exc.status})
        except Exception as exc:  # noqa: BLE001 - every upstream failure becomes 502/504
            err = classify(exc)
            return ExchangeResult(None, err.reason, extra={"status": err.status})
        buffered.output = pack.output(buffered.status, buffered.reason, buffered.headers, buffered.digest,
                                      buffered.size, True, request["method"], body=buffered.body)
        return ExchangeResult(buffered.output, response=buffered)


async def read_whole(resp: aiohttp.ClientResponse, blobs: BlobStore) -> BufferedResponse:
    writer = blobs.writer()
    kept: list[bytes] = []
    kept_size = 0
    try:
        if resp.content_length is not None and resp.content_length <= SMALL_ANSWER:
            # Read in one call: most answers are this small, and replay reads tens of thousands of them.
            body = await resp.read()
            writer.write(body)
            ref = writer.known() or await asyncio.to_thread(writer.finish)
            return BufferedResponse(resp.status, resp.reason or "", decoded_headers(resp.raw_headers), ref.digest,
                                    ref.size, body, None)
        async for chunk in resp.content.iter_any():
            writer.write(chunk)
            if kept_size <= KEEP_IN_MEMORY:
                kept.append(chunk)
                kept_size += len(chunk)
        ref = writer.known() or await asyncio.to_thread(writer.finish)
    except BaseException:
        writer.discard()
        raise
    in_memory = kept_size <= KEEP_IN_MEMORY
    return BufferedResponse(resp.status, resp.reason or "", decoded_headers(resp.raw_headers), ref.digest,
                            ref.size, b"".join(kept) if in_memory else None,
                            None if in_memory else ref.digest)


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
    logging.getLogger("undo_proxy.http").error("unexpected error talking to the upstream", exc_info=exc)
    return UpstreamError(502, f"proxy error: {exc.__class__.__name__}")
