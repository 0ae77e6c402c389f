"""The HTTP front-end's guarantees, end to end through a real `undo-proxy serve`.

Two upstreams are used: the real WsgiDAV of `proxy_stack` (front-end "web", webdav pack), and `RawUpstream`, a
small socket server in a thread that records exactly the bytes it receives and answers however a test tells it
to (a second front-end "raw", http pack). Clients are raw sockets wherever a client library would hide bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import random
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.backends import wait_port
from tests.daemon import Stack, write_config

HOST = "127.0.0.1"


# --------------------------------------------------------------------------- raw HTTP on sockets


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def read_head(f) -> tuple[bytes, list[tuple[str, str]]]:  # noqa: ANN001
    """The start line and the header fields of one HTTP message from a binary file object."""
    first = f.readline()
    if not first:
        raise ConnectionError("connection closed before a message")
    headers, raw = [], first
    while (line := f.readline()) not in (b"\r\n", b"\n", b""):
        raw += line
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return raw, headers


def read_body(f, headers: list[tuple[str, str]], until_close: bool = False) -> bytes:  # noqa: ANN001
    """A message body framed by Content-Length or chunked; with neither, to EOF if until_close."""
    lower = {k.lower(): v for k, v in headers}
    if "chunked" in lower.get("transfer-encoding", "").lower():
        body = b""
        while size := int(f.readline().split(b";")[0].strip(), 16):
            body += f.read(size)
            f.readline()
        while f.readline() not in (b"\r\n", b"\n", b""):
            pass
        return body
    if "content-length" in lower:
        return f.read(int(lower["content-length"]))
    return f.read() if until_close else b""


def read_response(f, method: str = "GET") -> Response:  # noqa: ANN001
    raw, headers = read_head(f)
    parts = raw.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    code, reason = int(parts[1]), (parts[2] if len(parts) > 2 else "")
    no_body = method == "HEAD" or code < 200 or code in (204, 304)
    body = b"" if no_body else read_body(f, headers, until_close=True)
    return Response(code, reason.strip(), headers, body, raw)


@contextlib.contextmanager
def connect(port: int, timeout: float = 30) -> Iterator[tuple[socket.socket, Any]]:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    f = sock.makefile("rb")
    try:
        yield sock, f
    finally:
        f.close()  # the socket only really closes once its file is closed too
        sock.close()


def exchange(port: int, data: bytes, method: str = "GET", timeout: float = 30) -> Response:
    """Send raw bytes, read one response (100 Continue responses included, as they come)."""
    with connect(port, timeout) as (sock, f):
        sock.sendall(data)
        return read_response(f, method)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Response:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    return exchange(port, head.encode() + b"\r\n" + (body or b""), method)


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# --------------------------------------------------------------------------- an upstream that shows the bytes


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes | None = None  # None: the upstream never read a body
    at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


class Exchange:
    """One request as the upstream's responder sees it."""

    def __init__(self, sock: socket.socket, f: Any, received: Received, stop: threading.Event,
                 keep_alive: bool = False, nth: int = 1) -> None:
        self.sock, self.f, self.received, self.stop = sock, f, received, stop
        self.keep_alive = keep_alive
        self.nth = nth  # the how-manieth request on its connection

    def read_body(self) -> bytes:
        self.received.body = read_body(self.f, self.received.headers)
        return self.received.body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self, status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> None:
        head = f"HTTP/1.1 {status} {http.client.responses.get(status, 'X')}\r\n"
        for k, v in headers or []:
            head += f"{k}: {v}\r\n"
        if not any(k.lower() == "content-length" for k, _ in headers or []):
            head += f"Content-Length: {len(body)}\r\n"
        head_only = self.received.method == "HEAD"
        close = b"" if self.keep_alive else b"Connection: close\r\n"
        self.send(head.encode("latin-1") + close + b"\r\n" + (b"" if head_only else body))


def ok(ex: Exchange) -> None:
    """Read the body and answer 200 with what arrived, so both ends can be compared."""
    body = ex.read_body()
    ex.answer(200, b"got %d bytes" % len(body))


class RawUpstream:
    """An HTTP/1.1 server on 127.0.0.1 (one thread per connection, one request per connection unless
    `keep_alive`) that records every request head and body it received; `respond` decides what it does with
    each."""

    def __init__(self, respond: Callable[[Exchange], None] = ok, keep_alive: bool = False) -> None:
        self.respond = respond
        self.keep_alive = keep_alive
        self.received: list[Received] = []
        self.connections = 0
        self.stop = threading.Event()
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            f = conn.makefile("rb")
            nth = 0
            while True:
                raw, headers = read_head(f)
                method, target, _ = raw.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
                got = Received(method, target, headers)
                self.received.append(got)
                nth += 1
                self.respond(Exchange(conn, f, got, self.stop, self.keep_alive, nth))
                if not self.keep_alive:
                    return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    up = RawUpstream()
    yield up
    up.close()


def unclaimed_port() -> int:
    """A free port below the kernel's ephemeral range: `free_port()` (bind to port 0) elsewhere, even in other
    tests running at the same time, cannot hand it out before the daemon binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind((HOST, port))
            return port
    raise RuntimeError("no free port below the ephemeral range")


def raw_frontend(port: int, upstream: str, timeout: str = "5s") -> str:
    """The `extra` config of a second front-end, "raw", with the plain http pack."""
    return f'''
[[http]]
name = "raw"
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
verbs = "http"
timeout = "{timeout}"
'''


@dataclass
class RawStack:
    stack: Stack
    port: int  # the "raw" front-end
    up: RawUpstream


@pytest.fixture
def raw_stack(proxy_stack, raw_upstream: RawUpstream) -> Callable[..., RawStack]:  # noqa: ANN001
    def start(timeout: str = "5s") -> RawStack:
        port = unclaimed_port()
        stack = proxy_stack(extra=raw_frontend(port, raw_upstream.url, timeout))
        wait_port(port)
        return RawStack(stack, port, raw_upstream)
    return start


# --------------------------------------------------------------------------- the timeline


def verbs(stack: Stack, frontend: str | None = None, count: int = 0, timeout: float = 10) -> list[dict]:
    """The verbs of a front-end, waiting until there are at least `count` (reads are recorded in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        status, found = stack.api("GET", "/api/timeline")
        assert status == 200, found
        found = [v for v in found if frontend is None or v["frontend"] == frontend]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def output_status(stack: Stack, seq: int) -> int | None:
    status, verb = stack.api("GET", f"/api/verbs/{seq}")
    assert status == 200, verb
    return (verb["output"] or {}).get("status")


def wait_for(predicate: Callable[[], Any], timeout: float = 10, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M).group(1))


# --------------------------------------------------------------------------- WebDAV methods


PROPPATCH_BODY = b'''<?xml version="1.0" encoding="utf-8"?>
<D:propertyupdate xmlns:D="DAV:" xmlns:Z="urn:test"><D:set><D:prop><Z:color>blue</Z:color></D:prop></D:set>
</D:propertyupdate>'''
LOCK_BODY = b'''<?xml version="1.0" encoding="utf-8"?>
<D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope><D:locktype><D:write/></D:locktype>
<D:owner>test</D:owner></D:lockinfo>'''

# (method, path, body, headers, verb targets, mutates); "{base}" is the server's own URL, "{token}" the LOCK's.
DAV_SCRIPT: list[tuple[str, str, bytes | None, dict[str, str], list[str], bool]] = [
    ("OPTIONS", "/", None, {}, ["/"], False),
    ("MKCOL", "/dir", None, {}, ["/dir"], True),
    ("MKCOL", "/dir", None, {}, ["/dir"], True),                          # exists: 405
    ("PUT", "/dir/a.txt", b"alpha\n", {}, ["/dir/a.txt"], True),
    ("PUT", "/nodir/a.txt", b"x", {}, ["/nodir/a.txt"], True),             # no parent: 409
    ("GET", "/dir/a.txt", None, {}, ["/dir/a.txt"], False),
    ("HEAD", "/dir/a.txt", None, {}, ["/dir/a.txt"], False),
    ("PROPFIND", "/dir", b"", {"Depth": "1"}, ["/dir"], False),
    ("PROPPATCH", "/dir/a.txt", PROPPATCH_BODY, {"Content-Type": "application/xml"}, ["/dir/a.txt"], True),
    ("COPY", "/dir/a.txt", None, {"Destination": "{base}/dir/b.txt"}, ["/dir/a.txt", "/dir/b.txt"], True),
    ("MOVE", "/dir/b.txt", None, {"Destination": "{base}/dir/c.txt"}, ["/dir/b.txt", "/dir/c.txt"], True),
    ("MOVE", "/dir/c.txt", None, {"Destination": "{base}/dir/a.txt", "Overwrite": "F"},
     ["/dir/c.txt", "/dir/a.txt"], True),                                 # target exists: 412
    ("LOCK", "/dir/c.txt", LOCK_BODY, {"Content-Type": "application/xml", "Timeout": "Second-60"},
     ["/dir/c.txt"], True),
    ("PUT", "/dir/c.txt", b"no token", {}, ["/dir/c.txt"], True),          # locked: 423
    ("UNLOCK", "/dir/c.txt", None, {"Lock-Token": "<{token}>"}, ["/dir/c.txt"], True),
    ("DELETE", "/dir/a.txt", None, {}, ["/dir/a.txt"], True),
    ("GET", "/dir/a.txt", None, {}, ["/dir/a.txt"], False),                # gone: 404
    ("DELETE", "/missing", None, {}, ["/missing"], True),                  # 404
]


def run_dav_script(port: int) -> list[int]:
    base, token, statuses = f"http://{HOST}:{port}", "", []
    for method, path, body, headers, _, _ in DAV_SCRIPT:
        headers = {k: v.format(base=base, token=token) for k, v in headers.items()}
        if body is None and method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
            body = b""
        resp = request(port, method, path, body, headers)
        if method == "LOCK":
            token = (resp.header("Lock-Token") or "").strip("<>")
        statuses.append(resp.status)
    return statuses


def test_every_webdav_method_answers_as_wsgidav_does_and_is_recorded(proxy_stack, wsgidav_server, tmp_path):
    stack = proxy_stack()
    (tmp_path / "direct").mkdir()
    direct = wsgidav_server(tmp_path / "direct")

    through_proxy = run_dav_script(stack.http_port)
    straight = run_dav_script(direct.port)

    assert through_proxy == straight
    # The script exercises what it means to: successes and the interesting failures.
    assert straight[:5] == [200, 201, 405, 201, 409] and straight[13] == 423 and straight[-2:] == [404, 404]
    assert sorted(p.name for p in (stack.volume / "dir").iterdir()) == ["c.txt"]

    recorded = verbs(stack, "web", count=len(DAV_SCRIPT))
    assert [v["verb"] for v in recorded] == [f"webdav.{m.lower()}" for m, *_ in DAV_SCRIPT]
    assert [v["targets"] for v in recorded] == [t for *_, t, _ in DAV_SCRIPT]
    assert [v["mutates"] for v in recorded] == [m for *_, m in DAV_SCRIPT]
    assert {v["status"] for v in recorded} == {"committed"}
    assert [output_status(stack, v["seq"]) for v in recorded] == straight
    assert all(v["summary"].endswith(f"-> {s}") for v, s in zip(recorded, straight))


def test_a_read_is_recorded_before_the_clients_next_request(raw_stack):
    """Replay runs verbs in seq order: a GET the client finished before its PUT must come first, or replay
    would see the PUT's content and report a false inconsistency. Same for HEAD, empty and chunked bodies."""
    rs = raw_stack()

    def respond(ex: Exchange) -> None:
        if ex.received.method not in ("GET", "HEAD"):
            ex.read_body()
        if ex.received.target == "/chunked":
            ex.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                    b"3\r\nabc\r\n0\r\n\r\n")
        else:
            ex.answer(200, b"" if ex.received.target == "/empty" else b"content")
    rs.up.respond = respond
    script = [("GET", "/a"), ("PUT", "/a"), ("HEAD", "/a"), ("POST", "/a"), ("GET", "/empty"), ("PUT", "/b"),
              ("GET", "/chunked"), ("DELETE", "/c")]
    for method, path in script:
        assert request(rs.port, method, path, b"x" if method in ("PUT", "POST") else None).status == 200
    recorded = verbs(rs.stack, "raw", count=len(script))
    assert [(v["verb"], v["targets"][0]) for v in recorded] == [(f"http.{m.lower()}", p) for m, p in script]


# --------------------------------------------------------------------------- request bodies


def test_chunked_request_body_arrives_intact(proxy_stack):
    stack = proxy_stack()
    pieces = [b"first line\n", os.urandom(1), b"", os.urandom(70_000), b"\r\n0\r\n", b"last"]
    pieces = [p for p in pieces if p]  # a zero-size chunk would end the body
    head = (f"PUT /streamed.bin HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n"
            f"Connection: close\r\n\r\n").encode()
    with connect(stack.http_port) as (sock, f):
        sock.sendall(head)
        for piece in chunked(pieces).split(b"\r\n", 3):  # dribble it in a few writes
            sock.sendall(piece + b"\r\n")
            time.sleep(0.05)
        resp = read_response(f)
    assert resp.status == 201, resp
    assert (stack.volume / "streamed.bin").read_bytes() == b"".join(pieces)
    [verb] = verbs(stack, "web")
    assert (verb["verb"], verb["status"], verb["targets"]) == ("webdav.put", "committed", ["/streamed.bin"])


def test_chunked_request_body_reaches_a_raw_upstream_byte_for_byte(raw_stack):
    rs = raw_stack()
    body = os.urandom(300_000)
    head = "POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    resp = exchange(rs.port, head.encode() + chunked([body[:1], body[1:100_000], body[100_000:]]))
    assert resp.status == 200 and resp.body == b"got %d bytes" % len(body)
    [got] = rs.up.received
    assert got.body == body
    assert "transfer-encoding" not in got.names() or got.header("Content-Length") is None


def test_large_body_round_trips_without_growing_the_daemon(proxy_stack):
    stack = proxy_stack()
    size, piece = 50 * 1024 * 1024, 1024 * 1024
    data = os.urandom(piece)
    rss_before = rss_kib(stack.proc.pid)
    sent = hashlib.sha256()
    with connect(stack.http_port, timeout=120) as (sock, f):
        sock.sendall(f"PUT /big.bin HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for i in range(size // piece):
            chunk = bytes([i]) + data[1:]  # every MiB different, so nothing deduplicates or compresses
            sent.update(chunk)
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        assert read_response(f).status == 201
        # Same connection: the GET streams back.
        sock.sendall(f"GET /big.bin HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        raw, headers = read_head(f)
        assert b" 200 " in raw
        got, length = hashlib.sha256(), 0
        remaining = int(dict((k.lower(), v) for k, v in headers)["content-length"])
        while remaining:
            block = f.read(min(remaining, 1 << 20))
            assert block, "body cut short"
            got.update(block)
            remaining -= len(block)
            length += len(block)
    assert length == size
    assert got.hexdigest() == sent.hexdigest()
    assert hashlib.sha256((stack.volume / "big.bin").read_bytes()).hexdigest() == sent.hexdigest()
    peak = rss_kib(stack.proc.pid, "VmHWM")
    assert peak - rss_before < 20 * 1024, f"daemon peak RSS grew by {(peak - rss_before) // 1024} MiB"
    [put, get] = verbs(stack, "web", count=2)
    assert (put["verb"], put["status"], get["verb"], get["status"]) == \
           ("webdav.put", "committed", "webdav.get", "committed")


def test_broken_off_uploads_and_answers_leave_no_memory_behind(raw_stack):
    """aiohttp's streams keep the error they raised, and its traceback the frames that read them, bodies in
    their locals: a reference cycle that only the garbage collector frees, and the daemon runs it rarely.
    Uploads the client breaks off and answers the upstream breaks off (read and mutation) must not pile up
    their buffers (before the proxy cut those cycles: about 1 MiB a round here, over 100 MiB in all)."""
    rs = raw_stack()

    def respond(ex: Exchange) -> None:
        if ex.received.method == "PUT":
            ex.read_body()
        ex.send(b"HTTP/1.1 200 OK\r\nContent-Length: 400000\r\nConnection: close\r\n\r\n" + b"s" * 200_000)
    rs.up.respond = respond
    upload = os.urandom(256 * 1024)

    def one_round(i: int) -> None:
        sock = socket.create_connection((HOST, rs.port))
        sock.sendall(b"PUT /cut/up%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (i, 4 << 20))
        for _ in range(4):
            sock.sendall(upload)
        time.sleep(0.02)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        sock.close()
        for method, body in (("GET", None), ("PUT", b"p" * 300_000)):
            with contextlib.suppress(OSError):
                request(rs.port, method, f"/cut/{method.lower()}{i}", body)

    for i in range(10):  # warm-up: the allocator, the pools, the blob store's caches
        one_round(i)
    before = rss_kib(rs.stack.proc.pid)
    for i in range(10, 90):
        one_round(i)
    grown = rss_kib(rs.stack.proc.pid) - before
    assert grown < 30 * 1024, f"the daemon grew by {grown // 1024} MiB over 80 rounds"
    statuses = {v["status"] for v in verbs(rs.stack, "raw", count=3 * 90 - 1)}
    assert statuses <= {"aborted", "failed"}, statuses   # each broken off, each recorded so


def test_an_answer_the_blob_store_cannot_keep_still_records_what_the_service_did(raw_stack):
    """The service acted; only keeping its answer failed (the blob store's temp dir made immutable here, as
    a full disk or no file descriptors would). The mutation is recorded committed, by its answer's digest,
    and the client gets the answer; one too large to have been held in memory is a 502 that says the request
    was carried out. (It used to be a 502 blaming the upstream, and the verb `failed`: replay dropped it.)"""
    rs = raw_stack()
    big = os.urandom(5 << 20)

    def respond(ex: Exchange) -> None:
        ex.read_body()
        ex.answer(201, big if ex.received.target == "/keep/big" else b"created " + os.urandom(8).hex().encode())
    rs.up.respond = respond
    same = b"a body the blob store has already"
    assert request(rs.port, "PUT", "/keep/first", same).status == 201
    tmp = rs.stack.workdir / "state" / "blobs" / "tmp"
    subprocess.run(["chattr", "+i", str(tmp)], check=True)
    try:
        small = request(rs.port, "PUT", "/keep/small", same)
        large = request(rs.port, "PUT", "/keep/big", same)
    finally:
        subprocess.run(["chattr", "-i", str(tmp)], check=True)
    assert small.status == 201 and small.body.startswith(b"created "), small
    assert large.status == 502 and b"carried out" in large.body, large
    by_target = {v["targets"][0]: v for v in verbs(rs.stack, "raw", count=3)}
    for target in ("/keep/small", "/keep/big"):
        verb = by_target[target]
        assert verb["status"] == "committed", verb
        _, shown = rs.stack.api("GET", f"/api/verbs/{verb['seq']}")
        assert shown["output"]["status"] == 201 and shown["output"]["body"]["stored"] is False, shown["output"]
    _, big_verb = rs.stack.api("GET", f"/api/verbs/{by_target['/keep/big']['seq']}")
    assert big_verb["output"]["body"]["digest"] == hashlib.sha256(big).hexdigest()
    assert "could not be kept in the blob store" in rs.stack.log_text()


# --------------------------------------------------------------------------- Expect: 100-continue


def expect_put(port: int, body: bytes, wait: float = 10) -> tuple[Response, float, Response | None]:
    """PUT with Expect: 100-continue; send the body only if 100 comes. Returns the first response, when it
    arrived, and the final response if the first was 100."""
    head = (f"PUT /expect.txt HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n"
            f"Connection: close\r\n\r\n").encode()
    with connect(port, timeout=wait) as (sock, f):
        sock.sendall(head)
        first = read_response(f, "PUT")
        at = time.monotonic()
        if first.status != 100:
            return first, at, None
        sock.sendall(body)
        return first, at, read_response(f, "PUT")


@pytest.mark.parametrize("refusal", [417, 401])
def test_expect_continue_refused_by_the_upstream_gets_its_final_status_and_no_100(raw_stack, refusal):
    rs = raw_stack()

    def refuse(ex: Exchange) -> None:
        ex.answer(refusal, b"no thanks", [("WWW-Authenticate", 'Basic realm="x"')] if refusal == 401 else [])
    rs.up.respond = refuse

    first, _, final = expect_put(rs.port, b"the body")
    assert (first.status, final) == (refusal, None), "the client must not be asked for the body"
    assert first.body == b"no thanks"
    [got] = rs.up.received
    assert got.header("Expect") == "100-continue" and got.body is None
    [verb] = verbs(rs.stack, "raw")
    assert verb["verb"] == "http.put" and verb["status"] not in ("committed", "pending")
    assert output_status(rs.stack, verb["seq"]) == refusal
    # and the front-end still works
    rs.up.respond = ok
    assert request(rs.port, "PUT", "/after", b"x").status == 200


def test_expect_continue_sends_100_only_after_the_upstream_asked(raw_stack):
    rs = raw_stack()
    asked: list[float] = []

    def slow_continue(ex: Exchange) -> None:
        time.sleep(0.5)  # a client that got 100 from the proxy itself would be faster than this
        asked.append(time.monotonic())
        ex.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = ex.read_body()
        ex.answer(201, b"stored " + body)
    rs.up.respond = slow_continue

    first, continued_at, final = expect_put(rs.port, b"0123456789")
    assert first.status == 100
    assert asked and continued_at >= asked[0]
    assert final is not None and (final.status, final.body) == (201, b"stored 0123456789")
    assert rs.up.received[0].body == b"0123456789"
    [verb] = verbs(rs.stack, "raw")
    assert (verb["verb"], verb["status"]) == ("http.put", "committed")
    assert output_status(rs.stack, verb["seq"]) == 201


def test_expect_continue_to_wsgidav_stores_the_body(proxy_stack):
    stack = proxy_stack()
    first, _, final = expect_put(stack.http_port, b"expected body")
    # WsgiDAV (cheroot) answers 100 itself when the body is read, so the client is asked for it.
    assert first.status == 100 and final is not None and final.status == 201
    assert (stack.volume / "expect.txt").read_bytes() == b"expected body"
    [verb] = verbs(stack, "web")
    assert verb["status"] == "committed"


# --------------------------------------------------------------------------- responses


def test_response_headers_and_bodies_pass_through_unchanged(raw_stack):
    rs = raw_stack()
    gz = bytes.fromhex("1f8b0800000000000003cb48cdc9c95728cf2fca4901000000ffff")  # not decompressible whole
    cookies = ["a=1; Path=/", "b=2; HttpOnly", "a=3; Path=/x"]

    def respond(ex: Exchange) -> None:
        if ex.received.method not in ("GET", "HEAD"):
            ex.read_body()
        if ex.received.target == "/gz":
            ex.answer(200, gz, [("Content-Encoding", "gzip"), ("Content-Type", "text/plain")])
        elif ex.received.method == "HEAD":
            ex.send(b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\nConnection: close\r\n\r\n")
        else:
            ex.answer(200, b"cookies", [("Set-Cookie", c) for c in cookies] + [("X-Keep", "yes")])
    rs.up.respond = respond

    head = request(rs.port, "HEAD", "/file")
    assert head.status == 200 and head.header("Content-Length") == "12345" and head.body == b""

    for method in ("GET", "POST"):  # a read streams, a mutation is buffered: both keep the headers
        resp = request(rs.port, method, "/cookies", b"" if method == "POST" else None)
        assert resp.status == 200 and resp.body == b"cookies"
        assert resp.all("Set-Cookie") == cookies
        assert resp.header("X-Keep") == "yes"

    resp = request(rs.port, "GET", "/gz", headers={"Accept-Encoding": "gzip"})
    assert resp.body == gz
    assert resp.header("Content-Encoding") == "gzip" and resp.header("Content-Length") == str(len(gz))
    assert rs.up.received[-1].header("Accept-Encoding") == "gzip"


def test_no_content_type_or_server_is_added_to_an_answer(raw_stack):
    """aiohttp gives an answer without them `application/octet-stream` (a browser then no longer sniffs the
    type) and its own Server: a relayed answer carries what the upstream sent, small or streamed, chunked,
    read or mutation, and Date, which a proxy adds where it is missing (RFC 9110 6.6.1)."""
    rs = raw_stack()
    big = b"<html>" + b"x" * 200_000

    def respond(ex: Exchange) -> None:
        if ex.received.method not in ("GET", "HEAD"):
            ex.read_body()
        if ex.received.target == "/big":
            ex.answer(200, big)
        elif ex.received.target == "/chunked":
            ex.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n<html>\r\n0\r\n\r\n")
        elif ex.received.target == "/typed":
            ex.answer(200, b"<p>", [("Content-Type", "text/html"), ("Server", "upstream/1.0")])
        else:
            ex.answer(200, b"<html>")
    rs.up.respond = respond

    for method, path, body in [("GET", "/small", b"<html>"), ("GET", "/big", big), ("GET", "/chunked", b"<html>"),
                               ("POST", "/small", b"<html>")]:
        resp = request(rs.port, method, path, b"" if method == "POST" else None)
        names = {k.lower() for k, _ in resp.headers}
        assert (resp.status, resp.body) == (200, body), path
        assert "content-type" not in names and "server" not in names, (method, path, resp.headers)
        assert "date" in names
    typed = request(rs.port, "GET", "/typed")
    assert typed.all("Content-Type") == ["text/html"] and typed.all("Server") == ["upstream/1.0"]
    # The proxy's own answers do not name its software either.
    malformed = exchange(rs.port, MALFORMED[2])
    too_big = request(rs.port, "GET", "/", headers={"X-Big": "a" * 70_000})
    for own in (malformed, too_big):
        assert own.status in (400, 431) and own.header("Server") is None, own.headers
        assert (own.header("Content-Type") or "").startswith("text/plain")


def test_response_hop_by_hop_headers_are_not_passed_back(raw_stack):
    rs = raw_stack()

    def respond(ex: Exchange) -> None:
        ex.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n"
                b"Keep-Alive: timeout=5\r\nUpgrade: h2c\r\nX-End: 1\r\n\r\nok")
    rs.up.respond = respond
    resp = request(rs.port, "GET", "/")
    names = {k.lower() for k, _ in resp.headers}
    assert resp.body == b"ok" and "x-end" in names
    assert not names & {"x-hop", "keep-alive", "upgrade"}


# --------------------------------------------------------------------------- request headers


def test_hop_by_hop_headers_are_dropped_and_forwarding_headers_added(raw_stack):
    rs = raw_stack()
    for method, body in (("GET", None), ("PUT", b"data")):  # the read and the mutating path
        head = (f"{method} /h?q=1 HTTP/1.1\r\nHost: Example.ORG:8443\r\nConnection: keep-alive, X-Foo, Host\r\n"
                f"Keep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\n"
                f"Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\nX-Foo: secret\r\n"
                f"X-Forwarded-For: 10.1.2.3\r\nForwarded: for=10.1.2.3\r\nX-Bar: stays\r\n"
                + (f"Content-Length: {len(body)}\r\n" if body else "") + "\r\n").encode() + (body or b"")
        with connect(rs.port) as (sock, f):
            sock.sendall(head)
            assert read_response(f, method).status == 200
        got = rs.up.received[-1]
        assert (got.method, got.target) == (method, "/h?q=1")
        assert not got.names() & {"te", "upgrade", "proxy-authorization", "x-foo", "keep-alive",
                                  "proxy-connection"}
        assert got.header("Connection") in (None, "keep-alive", "close")
        assert got.header("X-Bar") == "stays"
        assert got.header("Host") == "Example.ORG:8443"   # named in Connection, yet kept: it picks the site
        assert got.header("X-Forwarded-For") == "10.1.2.3, 127.0.0.1"
        forwarded = got.header("Forwarded")
        assert forwarded.startswith("for=10.1.2.3, ") and "for=127.0.0.1" in forwarded
        assert 'host="Example.ORG:8443"' in forwarded and "proto=http" in forwarded


# --------------------------------------------------------------------------- kept-alive upstream connections


def keep_alive_stack(raw_stack, respond: Callable[[Exchange], None]) -> RawStack:  # noqa: ANN001
    rs = raw_stack()
    rs.up.keep_alive, rs.up.respond = True, respond
    return rs


def test_reads_and_writes_share_kept_alive_upstream_connections(raw_stack):
    def respond(ex: Exchange) -> None:
        body = ex.read_body() if ex.received.method in ("PUT", "POST") else b""
        ex.answer(200, f"{ex.received.method} {ex.received.target} {len(body)}".encode())
    rs = keep_alive_stack(raw_stack, respond)
    for i in range(30):
        method = ("GET", "PUT", "HEAD")[i % 3]
        resp = request(rs.port, method, f"/k{i}", b"x" * i if method == "PUT" else None)
        assert resp.status == 200
        assert resp.body == (b"" if method == "HEAD" else f"{method} /k{i} {i if method == 'PUT' else 0}".encode())
    assert len(rs.up.received) == 30
    assert rs.up.connections <= 2, f"{rs.up.connections} upstream connections for 30 sequential requests"
    assert [r.header("Host") for r in rs.up.received] == [f"{HOST}:{rs.port}"] * 30


def test_a_kept_alive_connection_the_upstream_dropped_is_retried_for_a_read_only(raw_stack):
    """The upstream answers the first request of a connection and drops the connection when the next one
    arrives (its keep-alive timeout struck at that moment): a GET is sent again on a new connection, a POST
    is not (it may have had its effect) and is a failed verb."""
    def respond(ex: Exchange) -> None:
        if ex.nth > 1:
            ex.sock.shutdown(socket.SHUT_RDWR)
            raise OSError("dropped")
        if ex.received.method == "POST":
            ex.read_body()
        ex.answer(200, b"fresh")
    rs = keep_alive_stack(raw_stack, respond)
    assert request(rs.port, "GET", "/warm").body == b"fresh"
    assert request(rs.port, "GET", "/again").body == b"fresh"
    assert [r.target for r in rs.up.received] == ["/warm", "/again", "/again"]
    assert request(rs.port, "POST", "/post", b"p").status == 502   # on the retry's connection: dropped
    assert request(rs.port, "POST", "/post2", b"q").body == b"fresh"  # that one was closed: a new one
    assert [r.target for r in rs.up.received] == ["/warm", "/again", "/again", "/post", "/post2"]
    recorded = {v["targets"][0]: v for v in verbs(rs.stack, "raw", count=4)}
    assert recorded["/again"]["status"] == "committed"
    assert recorded["/post"]["status"] == "failed"
    assert recorded["/post2"]["status"] == "committed"


def test_an_answer_the_client_left_unread_never_carries_the_next_request(raw_stack):
    """A client that goes away in the middle of a long body leaves the rest of it on the upstream
    connection: that connection is closed, never handed the next request."""
    def respond(ex: Exchange) -> None:
        if ex.received.target == "/long":
            ex.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4000000\r\n\r\n" + b"a" * 100_000)
            time.sleep(1)
            with contextlib.suppress(OSError):
                ex.send(b"a" * 3_900_000)
            return
        ex.answer(200, b"short")
    rs = keep_alive_stack(raw_stack, respond)
    with connect(rs.port) as (sock, f):
        sock.sendall(f"GET /long HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        assert read_head(f)[0].startswith(b"HTTP/1.1 200")
        f.read(50_000)
    for _ in range(3):
        assert request(rs.port, "GET", "/short").body == b"short"


def test_bytes_an_upstream_sends_on_an_idle_connection_never_answer_the_next_request(raw_stack):
    """An upstream that sends a whole extra answer after its response, once the connection is back in the
    pool: the next request (another client's) must get its own answer, never that one."""
    def respond(ex: Exchange) -> None:
        if ex.received.target == "/first":
            ex.answer(200, b"first")
            time.sleep(0.2)
            ex.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
            return
        ex.answer(200, f"own answer to {ex.received.target}".encode())
    rs = keep_alive_stack(raw_stack, respond)
    assert request(rs.port, "GET", "/first").body == b"first"
    time.sleep(0.5)
    for i in range(3):
        assert request(rs.port, "GET", f"/next{i}").body == f"own answer to /next{i}".encode()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n" + b"a" * 69_861,   # 139 bytes short
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1000\r\n" + b"b" * 4096 + b"\r\n",
])
def test_an_answer_the_upstream_breaks_off_reaches_the_client_cut_never_completed(raw_stack, answer):
    """Once the head is on its way the client can only learn of a failure by a cut connection: nothing may be
    written after the bytes the upstream sent (an error response in the body, a last chunk that makes the
    truncated answer look whole)."""
    def respond(ex: Exchange) -> None:
        ex.send(answer)
        time.sleep(0.3)
        ex.sock.shutdown(socket.SHUT_RDWR)
    rs = raw_stack()
    rs.up.respond = respond
    with connect(rs.port) as (sock, f):
        sock.sendall(f"GET /cut HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        got = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 500" not in body and b"undo-proxy" not in body
    if b"chunked" in head.lower():
        assert not body.endswith(b"0\r\n\r\n"), "a final chunk would make the truncated answer look complete"
    else:
        assert len(body) < 70_000
    [verb] = verbs(rs.stack, "raw", count=1)
    assert verb["status"] == "failed"


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 000 Zero", b"HTTP/1.1 101 Switching Protocols",
                                         b"HTTP/1.1 600 Beyond"])
def test_an_answer_with_a_status_no_client_asked_for_is_a_502(raw_stack, status_line):
    def respond(ex: Exchange) -> None:
        ex.read_body()
        ex.send(status_line + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    rs = raw_stack()
    rs.up.respond = respond
    for method, body in (("GET", None), ("PUT", b"data")):
        resp = request(rs.port, method, f"/odd-{method}", body)
        assert resp.status == 502, (status_line, method, resp.status)
    assert sorted(v["status"] for v in verbs(rs.stack, "raw", count=2)) == ["failed", "failed"]


def test_the_request_head_sent_upstream() -> None:
    from undo_proxy.http_upstream import HttpUpstream, UpstreamError
    up = HttpUpstream("http://127.0.0.1:8081/app/", 5)
    head = up.request_head("PUT", "/a%20b?x=1", [("Content-Length", "99"), ("X-A", "1"), ("x-a", "2")], b"abc")
    assert head == (b"PUT /app/a%20b?x=1 HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\nHost: 127.0.0.1:8081\r\n"
                    b"Content-Length: 3\r\n\r\n")
    assert up.request_head("DELETE", "/d", [("Host", "h")], None) == b"DELETE /app/d HTTP/1.1\r\nHost: h\r\n\r\n"
    assert up.request_head("POST", "/p", [("Host", "h")], None).endswith(b"Content-Length: 0\r\n\r\n")
    with pytest.raises(UpstreamError) as err:
        up.request_head("GET", "/", [("X-Evil", "a\r\nHost: other")], None)
    assert err.value.status == 400


async def test_a_request_waits_for_a_busy_upstreams_connection_no_longer_than_the_timeout(tmp_path) -> None:
    """All of the upstream's connections busy with slow answers (one pooled, one a streamed body's): the next
    request gets 503 after the upstream timeout instead of queueing for as long as the slow ones take."""
    import asyncio
    from storage.blobs import BlobStore
    from undo_proxy.http_upstream import HttpUpstream
    from verbs.http import HttpPack

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"PUT"):
            await reader.readuntil(b"0\r\n\r\n")   # the chunked body
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n")
        for _ in range(8):   # a byte every 0.25 s: slow, but never silent for the 0.5 s timeout
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.25)
        writer.close()
    server = await asyncio.start_server(slow, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    up = HttpUpstream(f"http://{HOST}:{port}", timeout=0.5, connections=2)
    await up.start()
    request = {"method": "GET", "path": "/", "headers": [["Host", "h"]], "client": "127.0.0.1"}
    blobs = BlobStore(tmp_path / "blobs")
    try:
        async def streamed():   # a body that streams goes through aiohttp's ClientSession: the same slots
            yield b"a streamed body"
        put = {**request, "method": "PUT"}
        busy = [asyncio.create_task(up.exchange(request, None, blobs, HttpPack())),
                asyncio.create_task(up.exchange(put, streamed(), blobs, HttpPack()))]
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        third = await up.exchange(request, None, blobs, HttpPack())
        waited = time.monotonic() - t0
        assert third.extra.get("status") == 503 and "all 2 connections in use" in third.error, third
        assert 0.4 < waited < 1.5, waited
        for task in busy:   # the slow ones get their answers whole
            assert (await task).response.body == b"x" * 8
    finally:
        await up.close()
        server.close()


# --------------------------------------------------------------------------- the client goes away


def test_a_low_open_files_limit_does_not_cap_the_clients(proxy_stack):
    """Started with a soft limit of 256 open files (hard 4,096), the daemon raises it to the hard limit:
    600 idle client connections later, a new client is still served and recorded."""
    stack = proxy_stack()
    stack.stop()
    stack.open_files = (256, 4096)
    stack.start()
    limits = Path(f"/proc/{stack.proc.pid}/limits").read_text()
    assert re.search(r"Max open files\s+4096\s+4096", limits), limits
    assert "soft limit raised from 256 to 4096" in stack.log_text()
    idle = []
    try:
        for _ in range(600):
            idle.append(socket.create_connection(("127.0.0.1", stack.http_port)))
        conn = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=10)
        conn.request("PUT", "/after-600.txt", body=b"still served")
        assert conn.getresponse().status == 201
        conn.close()
    finally:
        for sock in idle:
            sock.close()
    assert (stack.volume / "after-600.txt").read_bytes() == b"still served"
    assert [v["status"] for v in stack.timeline(verb="webdav.put")] == ["committed"]


def test_running_out_of_file_descriptors_refuses_cleanly_and_leaves_no_verb_pending(proxy_stack):
    """At its open-files limit (here 160, soft = hard) the daemon cannot open a stored body, a blob or a
    connection: idle clients are added one by one across that edge, and after each a PUT is tried. A PUT is
    either refused (503 or a closed connection) or done; none gets a 500, and no verb stays pending."""
    stack = proxy_stack()
    stack.stop()
    stack.open_files = (160, 160)
    stack.start()
    idle, answers = [], []
    try:
        for i in range(170):
            with contextlib.suppress(OSError):
                idle.append(socket.create_connection(("127.0.0.1", stack.http_port), timeout=5))
            try:
                conn = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=10)
                conn.request("PUT", f"/edge-{i}.txt", body=b"x" * 5000)
                answers.append(conn.getresponse().status)
                conn.close()
            except OSError:
                answers.append(None)   # refused or closed before an answer: nothing was forwarded
    finally:
        for sock in idle:
            sock.close()
    assert 500 not in answers, answers
    assert set(answers) - {201, 503, None} == set(), answers
    assert None in answers or 503 in answers, "the limit was never reached"
    time.sleep(1)
    conn = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=10)
    conn.request("PUT", "/after-the-edge.txt", body=b"fine")
    assert conn.getresponse().status == 201
    conn.close()
    recorded = stack.timeline()
    assert not [v for v in recorded if v["status"] == "pending"], [v for v in recorded if v["status"] == "pending"]


def test_client_disconnect_mid_body_aborts_the_verb(proxy_stack):
    stack = proxy_stack()
    for i in range(5):
        with connect(stack.http_port) as (sock, _):
            sock.sendall(f"PUT /cut{i}.bin HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n".encode()
                         + os.urandom(50_000))
            time.sleep(0.1)
        # and once with a chunked body cut between chunks
        with connect(stack.http_port) as (sock, _):
            sock.sendall(f"PUT /cutc{i}.bin HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                         + b"400\r\n" + os.urandom(1024) + b"\r\n")
            time.sleep(0.1)
    recorded = verbs(stack, "web", count=10)
    assert len(recorded) == 10
    assert {(v["verb"], v["status"]) for v in recorded} == {("webdav.put", "aborted")}
    assert not any(stack.volume.iterdir()), "nothing reached WsgiDAV"
    # still serving
    assert request(stack.http_port, "PUT", "/whole.txt", b"whole").status == 201
    assert (stack.volume / "whole.txt").read_bytes() == b"whole"
    assert verbs(stack, "web", count=11)[-1]["status"] == "committed"
    assert stack.log_text().count("Traceback") == 0, stack.log_text()[-3000:]


def test_client_disconnect_before_the_upstream_answers_keeps_the_outcome(raw_stack):
    """A mutation that reached the upstream is committed with the upstream's answer even if the client has
    gone; a read whose client vanished mid-response is aborted."""
    rs = raw_stack()
    release = threading.Event()

    def slow(ex: Exchange) -> None:
        ex.read_body()
        release.wait(10)
        ex.answer(200, b"x" * (4 << 20) if ex.received.method == "GET" else b"done")
    rs.up.respond = slow

    with connect(rs.port) as (sock, _):
        sock.sendall(b"PUT /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
        wait_for(lambda: rs.up.received and rs.up.received[-1].body == b"abc", what="the PUT upstream")
    release.set()
    [put] = wait_for(lambda: [v for v in verbs(rs.stack, "raw") if v["status"] != "pending"], what="PUT done")
    assert (put["verb"], put["status"]) == ("http.put", "committed")

    with connect(rs.port) as (sock, f):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
        f.read(1000)
    recorded = verbs(rs.stack, "raw", count=2)
    assert [(v["verb"], v["status"]) for v in recorded] == [("http.put", "committed"), ("http.get", "aborted")]
    assert request(rs.port, "GET", "/again").status == 200
    assert rs.stack.log_text().count("Traceback") == 0, rs.stack.log_text()[-3000:]


# --------------------------------------------------------------------------- the upstream fails


def test_upstream_down_answers_502_and_is_not_committed(proxy_stack):
    stack = proxy_stack()
    stack.dav.kill()
    put = request(stack.http_port, "PUT", "/down.txt", b"lost?")
    get = request(stack.http_port, "GET", "/down.txt")
    assert (put.status, get.status) == (502, 502)
    recorded = verbs(stack, "web", count=2)
    assert [v["verb"] for v in recorded] == ["webdav.put", "webdav.get"]
    assert all(v["status"] == "failed" for v in recorded), recorded
    stack.dav.restart()
    assert request(stack.http_port, "PUT", "/down.txt", b"back").status == 201
    assert verbs(stack, "web", count=3)[-1]["status"] == "committed"


def never_answers(ex: Exchange) -> None:
    ex.stop.wait(60)


def test_upstream_that_never_answers_gives_504_after_the_timeout(proxy_stack, raw_upstream):
    raw_upstream.respond = never_answers
    port = unclaimed_port()
    stack = proxy_stack(extra=raw_frontend(port, raw_upstream.url, timeout="1s"))
    wait_port(port)
    for method, body in (("PUT", b"data"), ("GET", None)):
        t0 = time.monotonic()
        resp = request(port, method, "/slow", body)
        took = time.monotonic() - t0
        assert resp.status == 504, resp
        assert 0.9 <= took < 4, took
    recorded = verbs(stack, "raw", count=2)
    assert [v["verb"] for v in recorded] == ["http.put", "http.get"]
    assert all(v["status"] == "failed" for v in recorded), recorded
    assert len(raw_upstream.received) == 2  # the intent was recorded, then forwarded


# --------------------------------------------------------------------------- malformed requests


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET /x HTTP/9.9 extra\r\nHost: h\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: h\r\nBad Header Line\r\nContent-Length: 1\r\n\r\nx",
    b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET x HTTP/1.1\r\nHost: h\r\n\r\n",
]


def test_malformed_request_is_400_and_goes_nowhere(raw_stack):
    rs = raw_stack()
    statuses = [exchange(rs.port, data).status for data in MALFORMED]
    assert statuses == [400] * len(MALFORMED)
    time.sleep(0.3)  # anything that was going to reach the upstream or the timeline has by now
    assert rs.up.connections == 0
    assert verbs(rs.stack) == []
    assert request(rs.port, "GET", "/fine").status == 200
    assert [v["targets"] for v in verbs(rs.stack, count=1)] == [["/fine"]]
    assert rs.stack.log_text().count("Traceback") == 0


def test_request_lines_of_other_http_versions_are_505_and_go_nowhere(raw_stack):
    rs = raw_stack()
    for line in (b"GET /old\r\n\r\n", b"GET /two HTTP/2.0\r\nHost: h\r\n\r\n"):
        with connect(rs.port) as (sock, f):
            sock.sendall(line)
            assert f.readline().split(b" ")[1] == b"505", line   # in the version it was asked in
    assert rs.up.connections == 0
    assert request(rs.port, "GET", "/fine").status == 200
    assert [v["targets"] for v in verbs(rs.stack, count=1)] == [["/fine"]]


def test_oversized_header_is_431_and_goes_nowhere(raw_stack):
    rs = raw_stack()
    fits = request(rs.port, "GET", "/ok", headers={"X-Big": "a" * 8000})
    assert fits.status == 200 and rs.up.received[-1].header("X-Big") == "a" * 8000
    resp = request(rs.port, "PUT", "/x", b"x", headers={"X-Big": "a" * 8200})
    assert resp.status == 431, resp
    assert len(rs.up.received) == 1
    assert [v["targets"] for v in verbs(rs.stack, count=1)] == [["/ok"]]
    assert rs.stack.log_text().count("Traceback") == 0


# --------------------------------------------------------------------------- durability


def test_acknowledged_put_survives_kill_9(proxy_stack):
    stack = proxy_stack()
    assert request(stack.http_port, "PUT", "/durable.txt", b"kept").status == 201
    stack.kill()
    assert [(v["verb"], v["status"]) for v in stack.timeline()] == [("webdav.put", "committed")]
    stack.start()
    assert [(v["verb"], v["status"]) for v in verbs(stack)] == [("webdav.put", "committed")]


def test_verb_in_flight_during_kill_is_unknown_after_restart(raw_stack):
    rs = raw_stack()
    rs.up.respond = never_answers
    sock = socket.create_connection((HOST, rs.port))
    try:
        sock.sendall(b"PUT /inflight HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
        wait_for(lambda: rs.up.received, what="the PUT to reach the upstream")
        rs.stack.kill()
    finally:
        sock.close()
    rs.stack.start()
    [verb] = verbs(rs.stack, "raw")
    assert (verb["verb"], verb["status"], verb["targets"]) == ("http.put", "unknown", ["/inflight"])
    assert "in flight" in rs.stack.log_text()


# --------------------------------------------------------------------------- the timeline cannot be written


@pytest.fixture
def small_state_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB ext4 loop-mounted at tmp_path/stack/state, to be filled up."""
    image, mount = tmp_path / "state.img", tmp_path / "stack" / "state"
    mount.mkdir(parents=True)
    with open(image, "wb") as fh:
        fh.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image)], check=True,
                   capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full."""
    filler = directory / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    with contextlib.suppress(OSError):  # and the last few blocks
        for i in range(1000):
            (directory / f"filler{i}").write_bytes(b"\0" * 1024)
    return filler


def small_state_stack(small_state_fs: Path, wsgidav_server, tmp_path: Path, files: dict[str, bytes]) -> Stack:  # noqa: ANN001
    """A daemon whose state dir is a small filesystem of its own (to be filled), WsgiDAV serving `files`."""
    work = small_state_fs.parent
    volume, store = work / "dav", work / "snaps"
    volume.mkdir()
    store.mkdir()
    for name, data in files.items():
        (volume / name).write_bytes(data)
    stack = Stack(workdir=work, config=work / "undo-proxy.toml", volume=volume, store=store,
                  http_port=unclaimed_port(), admin_port=unclaimed_port(), dav=wsgidav_server(volume),
                  log=tmp_path / "serve.log")
    write_config(stack, "copy", None, "")
    stack.start()
    return stack


def test_reads_answered_while_the_timeline_filled_up_are_on_it_once_it_has_room(small_state_fs, wsgidav_server,
                                                                                tmp_path):
    """Reads are written in batches after their answer: those answered just before a batch found the disk
    full are kept, and written once the timeline has room again (none of what clients saw is lost)."""
    import concurrent.futures
    stack = small_state_stack(small_state_fs, wsgidav_server, tmp_path, {"page.txt": b"seen"})
    try:
        assert request(stack.http_port, "GET", "/page.txt").status == 200
        assert len(verbs(stack, count=1)) == 1
        fill(small_state_fs)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda i: request(stack.http_port, "GET", f"/page.txt?n={i}").status,
                                     range(48)))
        assert set(statuses) <= {200, 503}, statuses
        answered = statuses.count(200)
        assert answered, "the first reads are answered before any batch fails"
        for p in small_state_fs.glob("filler*"):
            p.unlink()
        for _ in range(50):   # the first read after the room came back finds the timeline writable again
            if request(stack.http_port, "GET", "/page.txt?n=after").status == 200:
                break
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while True:   # the last read's outcome is batched too
            recorded = verbs(stack, count=1 + answered + 1)
            if all(v["status"] == "committed" for v in recorded) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(recorded) >= 1 + answered + 1, (answered, [v["summary"] for v in recorded])
        assert all(v["status"] == "committed" for v in recorded), [(v["seq"], v["status"]) for v in recorded]
        # (whether a batch failed at all depends on how much room SQLite's WAL still had: the count is the point)
        assert stack.log_text().count("Traceback") == 0
    finally:
        stack.kill()


def test_timeline_unavailable_refuses_traffic_and_recovers(small_state_fs, wsgidav_server, tmp_path):
    stack = small_state_stack(small_state_fs, wsgidav_server, tmp_path, {})
    volume = stack.volume
    try:
        assert request(stack.http_port, "PUT", "/before.txt", b"ok").status == 201
        fill(small_state_fs)

        refused = [request(stack.http_port, "PUT", f"/during{i}.txt", os.urandom(20_000)) for i in range(3)]
        refused.append(request(stack.http_port, "DELETE", "/before.txt"))
        assert [r.status for r in refused] == [503] * 4, refused
        assert refused[0].header("Retry-After")
        assert sorted(p.name for p in volume.iterdir()) == ["before.txt"], "nothing was forwarded"
        # A read goes through only if it can be recorded first (SQLite may still have room in its WAL).
        reads = [request(stack.http_port, "GET", "/before.txt").status for _ in range(3)]
        assert set(reads) <= {200, 503}, reads

        for p in small_state_fs.glob("filler*"):
            p.unlink()
        assert request(stack.http_port, "GET", "/before.txt").status == 200  # recovers without a mutation
        assert request(stack.http_port, "PUT", "/after.txt", b"back").status == 201
        assert (volume / "after.txt").read_bytes() == b"back"
        recorded = [v for v in verbs(stack, count=3) if v["status"] == "committed"]
        assert [v["verb"] for v in recorded] == ["webdav.put"] + ["webdav.get"] * (reads.count(200) + 1) + \
               ["webdav.put"]
        assert [v["targets"][0] for v in recorded if v["mutates"]] == ["/before.txt", "/after.txt"]
        assert "the blob store cannot be written" in stack.log_text()
        assert stack.log_text().count("Traceback") == 0
    finally:
        stack.kill()
