"""Hostile input against the live daemon (issue 7), over raw sockets and with hypothesis: request smuggling
(CL.TE, TE.TE, duplicate Content-Length, CR or LF inside a header value, LF inside chunk extensions),
oversized headers and bodies, slowloris, non-UTF-8 bytes in paths and headers; for SMTP bare LF and
<LF>.<CR><LF>, commands before EHLO, pipelined sessions that end with EOF, thousands of recipients.

None may crash the daemon, desynchronise a connection (a follow-up request on the same connection gets its
own answer, or the connection is closed), reach the upstream in a form different from what the timeline
recorded (the raw upstreams capture what arrives), or lose a recorded verb."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.backends import free_port, wait_port, wsgidav_processes
from tests.daemon import Stack, write_config
from tests.rawnet import HOST, RawUpstream, count, exchange, metric, raw_frontend, statuses

CLIENT_TIMEOUT = 2.0
MAX_BODY = 65536
FOLLOW = b"GET /follow-up HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


class Sink:
    """A tiny MTA that keeps every transaction it receives."""

    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
        self.got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok: queued"


@dataclass
class Hostile:
    stack: Stack
    up: RawUpstream
    raw_port: int
    smtp_port: int
    sink: Sink

    def verbs(self, frontend: str) -> list[dict[str, Any]]:
        """Straight from the timeline database (the daemon keeps running)."""
        conn = sqlite3.connect(self.stack.workdir / "state" / "timeline.db", timeout=30)
        try:
            rows = conn.execute("SELECT seq, verb, status, mutates, request, output FROM verbs WHERE frontend = ? "
                                "ORDER BY seq", (frontend,)).fetchall()
        finally:
            conn.close()
        return [dict(seq=r[0], verb=r[1], status=r[2], mutates=bool(r[3]), request=json.loads(r[4]),
                     output=json.loads(r[5]) if r[5] else None) for r in rows]

    def alive(self) -> None:
        assert self.stack.proc is not None and self.stack.proc.poll() is None, self.stack.log_text()[-3000:]
        assert self.stack.api("GET", "/api/status")[0] == 200

    def upstream_matches_timeline(self, settle: float = 3.0) -> None:
        """Every request the raw upstream received is a recorded verb, sent exactly as recorded (method, path
        byte for byte, body digest); every verb recorded as forwarded and answered reached it."""
        deadline = time.monotonic() + settle
        while True:
            got = Counter((r.method, r.target, hashlib.sha256(r.body).hexdigest() if r.body else None)
                          for r in self.up.received)
            verbs = self.verbs("raw")
            recorded = Counter()
            for v in verbs:
                if v["status"] in ("committed", "failed", "unknown"):
                    body = v["request"].get("body")
                    digest = body["digest"] if body and body.get("size") else None
                    recorded[(v["request"]["method"], v["request"]["path"], digest)] += 1
            committed = sum(v["status"] == "committed" for v in verbs)
            if got == recorded or time.monotonic() > deadline:
                break
            time.sleep(0.1)    # reads are recorded in batches just after they are served
        extra = got - recorded
        missing = recorded - got
        assert not extra, f"reached the upstream but not recorded (or recorded differently): {list(extra)[:5]}"
        assert not missing, f"recorded but never reached the upstream: {list(missing)[:5]}"
        assert committed <= sum(got.values())


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    work = tmp_path_factory.mktemp("hostile")
    up = RawUpstream().start()
    sink = Sink()
    mta = Controller(sink, hostname=HOST, port=free_port())
    mta.start()
    raw_port, smtp_port = free_port(), free_port()
    try:
        with wsgidav_processes(work) as dav_start:
            (work / "dav").mkdir()
            (work / "snaps").mkdir()
            stack = Stack(workdir=work, config=work / "undo-proxy.toml", volume=work / "dav", store=work / "snaps",
                          http_port=free_port(), admin_port=free_port(), dav=dav_start(work / "dav"),
                          log=work / "serve.log")
            write_config(stack, "copy", None,
                         raw_frontend("raw", raw_port, up.url, more=f'max_body = {MAX_BODY}\n'
                                                                     f'client_timeout = "{CLIENT_TIMEOUT:.0f}s"')
                         + f'''
[[smtp]]
name = "mail"
listen = "{HOST}:{smtp_port}"
upstream = "{HOST}:{mta.port}"
allow_without_xclient = true
timeout = "20s"
''')
            stack.start()
            wait_port(raw_port)
            wait_port(smtp_port)
            try:
                yield Hostile(stack, up, raw_port, smtp_port, sink)
            finally:
                stack.kill()
    finally:
        mta.stop()
        up.stop()


def followed_up(answer: bytes) -> bool:
    return answer.rstrip().endswith(b"GET /follow-up")


# --------------------------------------------------------------------------- smuggling

SMUGGLING = {
    # name: request bytes (a follow-up GET is sent right behind them on the same connection)
    "CL.TE": b"POST /s/clte HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    "TE.CL": b"POST /s/tecl HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
             b"8\r\nSMUGGLED\r\n0\r\n\r\n",
    "TE.TE obfuscated": b"POST /s/tete HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n"
                        b"5\r\nhello\r\n0\r\n\r\n",
    "TE with space before colon": b"POST /s/tesp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n"
                                  b"Content-Length: 3\r\n\r\nabc",
    "TE not last chunked": b"POST /s/tenl HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                           b"5\r\nhello\r\n0\r\n\r\n",
    "TE tab": b"POST /s/tetab HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "TE in HTTP/1.0": b"POST /s/te10 HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "duplicate Content-Length": b"POST /s/dupcl HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\n"
                                b"abcde",
    "duplicate equal Content-Length": b"POST /s/dupcl2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                      b"Content-Length: 3\r\n\r\nabc",
    "Content-Length list": b"POST /s/cllist HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
    "signed Content-Length": b"POST /s/clsign HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
    "CR inside a header value": b"POST /s/cr HTTP/1.1\r\nHost: x\r\nX-A: a\rContent-Length: 3\r\n\r\nabc",
    "LF inside a header value": b"POST /s/lf HTTP/1.1\r\nHost: x\r\nX-A: a\nContent-Length: 3\r\n\r\nabc",
    "NUL inside a header value": b"POST /s/nul HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nContent-Length: 3\r\n\r\nabc",
    "obs-fold": b"POST /s/fold HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Content-Length: 3\r\n\r\nabc",
    "LF inside a chunk extension": b"POST /s/ext HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"5;ext=a\nb\r\nhello\r\n0\r\n\r\n",
    "bare LF line ends": b"POST /s/barelf HTTP/1.1\nHost: x\nContent-Length: 3\n\nabc",
    "chunk size overflow": b"POST /s/ovf HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"FFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n",
    "negative chunk size": b"POST /s/neg HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "space in request target": b"GET /s/a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-form target": b"GET http://evil.example/s/abs HTTP/1.1\r\nHost: x\r\n\r\n",
    "header without colon": b"GET /s/nocolon HTTP/1.1\r\nHost: x\r\nX-A b\r\n\r\n",
    "space in header name": b"GET /s/sp HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n",
    "two Host headers": b"GET /s/twohost HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
}


def test_request_smuggling_never_desynchronises_or_reaches_the_upstream_unrecorded(hostile):
    outcomes = {}
    for name, data in SMUGGLING.items():
        answer = exchange(hostile.raw_port, data + FOLLOW)
        codes = statuses(answer)
        assert codes, f"{name}: no answer at all"
        if codes[0] == 400:
            # refused: a 400, the connection closed right after it, the follow-up never parsed as a request
            assert codes == [400], (name, answer)
        else:
            # accepted: exactly one answer per request and the follow-up gets its own, so the proxy and the
            # client agree on where each request ends
            assert len(codes) == 2 and followed_up(answer), (name, answer)
        outcomes[name] = codes[0]
        hostile.alive()
    count("hostile", len(SMUGGLING))
    # the classic smuggling vectors are all refused outright
    for name in ("CL.TE", "TE.CL", "TE.TE obfuscated", "TE with space before colon", "duplicate Content-Length",
                 "CR inside a header value", "LF inside a header value", "LF inside a chunk extension",
                 "chunk size overflow", "obs-fold", "bare LF line ends"):
        assert outcomes[name] == 400, (name, outcomes[name])
    hostile.upstream_matches_timeline()
    # an absolute-form target is reduced to its path: the client never picks the host the proxy connects to
    assert [r.target for r in hostile.up.received if r.target.endswith("/s/abs")] == ["/s/abs"]
    # nothing smuggled ever arrived
    assert not [r for r in hostile.up.received if b"SMUGGLED" in r.body or r.method.startswith("G") and
                r.method != "GET"]


# --------------------------------------------------------------------------- fuzzing (hypothesis)

_TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                 min_size=1, max_size=12)
_NASTY = st.binary(max_size=24).map(lambda b: b.replace(b"\r\n\r\n", b"\r\n"))
_VALUE = st.one_of(_NASTY, st.sampled_from([b"chunked", b"identity", b"0", b"3", b"-1", b"5, 5", b" chunked",
                                            b"chunked\r\nContent-Length: 3", b"\xff\xfe", "caf\u00e9".encode()]))
_NAME = st.one_of(_TOKEN.map(str.encode), st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Host",
                                                           b"Expect", b"Connection", b"Content-Length ", b"X\x00"]))


@st.composite
def requests(draw: Any) -> bytes:
    method = draw(st.sampled_from([b"GET", b"PUT", b"POST", b"DELETE", b"PROPFIND", b"G\x00T", b"get"]))
    path = b"/fz/" + draw(st.binary(max_size=12).map(lambda b: b.replace(b" ", b"%20")))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0", b"HTTP/1.1 x"]))
    headers = draw(st.lists(st.tuples(_NAME, _VALUE), max_size=5))
    sep = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    body = draw(st.binary(max_size=40))
    head = method + b" " + path + b" " + version + sep + b"Host: x" + sep
    head += b"".join(k + b": " + v + sep for k, v in headers)
    return head + sep + body


def test_fuzzed_requests_never_crash_desynchronise_or_pass_unrecorded(hostile):
    tried = 0

    @settings(max_examples=int(os.environ.get("UNDO_FUZZ_EXAMPLES", "250")), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def one(data: bytes) -> None:
        nonlocal tried
        tried += 1
        answer = exchange(hostile.raw_port, data + FOLLOW, wait=3)
        codes = statuses(answer)
        # never a desync: after the last answer the connection either closed (a 4xx/5xx for the garbage) or
        # the follow-up got its own answer; never an answer to something the client did not send
        if codes and codes[-1] == 200:
            assert followed_up(answer), answer
        assert len(codes) <= 2, answer
    one()
    hostile.alive()
    hostile.upstream_matches_timeline()
    count("hostile", tried)


# --------------------------------------------------------------------------- oversized

def test_oversized_headers_and_bodies_are_refused_before_the_upstream(hostile):
    n0 = len(hostile.up.received)
    big = b"X-Big: " + b"a" * 20_000 + b"\r\n"
    cases = [
        (b"GET /big/header HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n", 431),
        (b"GET /big/many HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n", 431),
        (b"GET /big/" + b"u" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"PUT /big/cl HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1) + b"z" * (MAX_BODY + 1), 413),
        (b"PUT /big/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         + b"".join(b"4000\r\n" + b"c" * 0x4000 + b"\r\n" for _ in range(6)) + b"0\r\n\r\n", 413),
        (b"PUT /big/huge-cl HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
    ]
    for data, want in cases:
        try:
            answer = exchange(hostile.raw_port, data)
        except ConnectionResetError:
            answer = b""
        wanted = (want,) if isinstance(want, int) else want
        assert statuses(answer)[:1] in [[w] for w in wanted], (data[:40], answer[:200])
        hostile.alive()
    assert len(hostile.up.received) == n0, "an oversized request reached the upstream"
    assert metric(hostile.stack, 'undo_proxy_frontend_errors_total{protocol="http",reason="malformed"}') >= 3
    # right at the limit is fine
    answer = exchange(hostile.raw_port, b"PUT /big/fits HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                      b"Connection: close\r\n\r\n" % MAX_BODY + b"f" * MAX_BODY)
    assert statuses(answer) == [200], answer[:200]
    hostile.upstream_matches_timeline()
    count("hostile", len(cases) + 1)


# --------------------------------------------------------------------------- slow clients

def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_slowloris_and_stalled_bodies_are_cut_off_and_free_their_connections(hostile):
    pid = hostile.stack.proc.pid
    base = _open_fds(pid)
    socks = []
    for i in range(30):   # slowloris: headers that never end
        s = socket.create_connection((HOST, hostile.raw_port))
        s.sendall(b"GET /slow/%d HTTP/1.1\r\nHost: x\r\n" % i)
        socks.append(s)
    stalled = socket.create_connection((HOST, hostile.raw_port))   # a body that stops half-way
    stalled.sendall(b"PUT /slow/body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    idle = socket.create_connection((HOST, hostile.raw_port))      # connects and says nothing
    deadline = time.monotonic() + 5
    while _open_fds(pid) < base + 30 and time.monotonic() < deadline:   # accepted by the daemon
        time.sleep(0.05)
    assert _open_fds(pid) >= base + 30
    t0 = time.monotonic()
    closed: dict[int, float] = {}
    for s in socks + [idle]:
        s.setblocking(False)
    for _ in range(200):     # trickle a header byte every 0.1 s; each connection must be closed anyway
        for i, s in enumerate(socks + [idle]):
            if i in closed:
                continue
            try:
                if s is not idle:
                    s.send(b"X")
                if s.recv(4096) == b"":
                    closed[i] = time.monotonic() - t0
            except BlockingIOError:
                pass
            except OSError:
                closed[i] = time.monotonic() - t0
        # a normal client is served meanwhile
        if len(closed) == len(socks) + 1 or time.monotonic() - t0 > 4 * CLIENT_TIMEOUT + 5:
            break
        time.sleep(0.1)
    assert len(closed) == len(socks) + 1, f"only {len(closed)} of {len(socks) + 1} slow connections were cut"
    assert max(closed.values()) < 2 * CLIENT_TIMEOUT + 3, closed
    stalled.settimeout(2 * CLIENT_TIMEOUT + 5)
    answer = stalled.recv(4096)
    assert statuses(answer) == [408], answer
    for s in socks + [idle, stalled]:
        s.close()
    answer = exchange(hostile.raw_port, b"GET /slow/normal HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.rstrip().endswith(b"GET /slow/normal")
    deadline = time.monotonic() + 5
    while _open_fds(pid) > base + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _open_fds(pid) <= base + 2, "the slow clients' connections were not freed"
    assert not [r for r in hostile.up.received if r.target == "/slow/body"], "a stalled body was forwarded"
    deadline = time.monotonic() + 5   # an aborted verb's record is batched, as a read's is
    while True:
        statuses_ = {v["request"]["path"]: v["status"] for v in hostile.verbs("raw")
                     if v["request"]["path"].startswith("/slow/")}
        if "/slow/body" in statuses_ or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert statuses_.get("/slow/body") == "aborted", statuses_
    hostile.alive()
    count("hostile", len(socks) + 2)


# --------------------------------------------------------------------------- non-UTF-8

def test_non_utf8_bytes_in_paths_and_headers(hostile):
    n0 = len(hostile.up.received)
    # raw non-UTF-8 (and non-ASCII) bytes in a path are not HTTP: 400, nothing forwarded
    for path in (b"/u/caf\xe9", b"/u/\xff\xfe", b"/u/\xc3\x28", "/u/caf\u00e9".encode()):
        answer = exchange(hostile.raw_port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n" + FOLLOW)
        assert statuses(answer) == [400], (path, answer)
    # header values that are not UTF-8 could only be forwarded re-encoded: refused
    answer = exchange(hostile.raw_port, b"PUT /u/h1 HTTP/1.1\r\nHost: x\r\nX-Bin: \xff\xfe\xe9\r\n"
                      b"Content-Length: 2\r\n\r\nhi" + FOLLOW)
    assert statuses(answer) == [400], answer
    assert len(hostile.up.received) == n0
    # percent-encoded bytes and UTF-8 header values go through byte for byte, as recorded
    answer = exchange(hostile.raw_port, b"PUT /u/%FF%fe%C3%A9/x HTTP/1.1\r\nHost: x\r\nX-Name: caf\xc3\xa9 \xe2\x9c\x93\r\n"
                      b"Content-Length: 3\r\nConnection: close\r\n\r\n\xff\x00\xfe")
    assert statuses(answer) == [200], answer
    got = hostile.up.received[-1]
    assert (got.target, got.body) == ("/u/%FF%fe%C3%A9/x", b"\xff\x00\xfe")
    raw = bytes(hostile.up.raw[-1])
    assert b"X-Name: caf\xc3\xa9 \xe2\x9c\x93\r\n" in raw, raw
    verb = [v for v in hostile.verbs("raw") if v["request"]["path"] == "/u/%FF%fe%C3%A9/x"][-1]
    assert ["X-Name", "caf\u00e9 \u2713"] in verb["request"]["headers"]
    hostile.upstream_matches_timeline()
    hostile.alive()
    count("hostile", 7)


# --------------------------------------------------------------------------- SMTP

class SmtpClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=20)
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[bytes]:
        """One whole (possibly multi-line) reply."""
        lines: list[bytes] = []
        while True:
            while b"\r\n" not in self.buf:
                piece = self.sock.recv(65536)
                if not piece:
                    raise ConnectionError(f"closed after {lines}")
                self.buf += piece
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    def code(self) -> int:
        return int(self.reply()[-1][:3])

    def rest(self) -> bytes:
        self.sock.settimeout(5)
        out = self.buf
        while True:
            try:
                piece = self.sock.recv(65536)
            except (TimeoutError, socket.timeout, ConnectionResetError):
                break
            if not piece:
                break
            out += piece
        return out

    def close(self) -> None:
        self.sock.close()


def _mail(mid: str, body: bytes = b"hello\r\n") -> bytes:
    return (f"From: a@example.test\r\nTo: b@example.test\r\nSubject: {mid}\r\nMessage-ID: <{mid}@h.test>\r\n\r\n"
            .encode() + body)


def test_smtp_hostile_sessions(hostile):
    sink = hostile.sink
    delivered0 = len(sink.got)
    # commands before EHLO are refused, the session stays usable
    c = SmtpClient(hostile.smtp_port)
    c.send(b"MAIL FROM:<a@example.test>\r\n")
    assert c.code() == 503
    c.send(b"RCPT TO:<b@example.test>\r\n")
    assert c.code() == 503
    c.send(b"DATA\r\n")
    assert c.code() == 503
    c.send(b"EHLO client.example\r\n")
    assert c.code() == 250
    # bare LF, and <LF>.<CR><LF> (SMTP smuggling): refused as a whole, nothing relayed
    for n, evil in enumerate((b"line one\nline two\r\n",
                              b"before\n.\r\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@example.test>\r\n"
                              b"DATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n",
                              b"before\r\n.\nafter\r\n", b"cr\ralone\r\n")):
        c.send(b"MAIL FROM:<a@example.test>\r\n")
        assert c.code() == 250
        c.send(b"RCPT TO:<b@example.test>\r\n")
        assert c.code() == 250
        c.send(b"DATA\r\n")
        assert c.code() == 354
        c.send(_mail(f"evil{n}", evil) + b".\r\n")
        assert c.code() == 554, n
    # the connection is still in step: a clean message goes through on it
    c.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert [c.code(), c.code(), c.code()] == [250, 250, 354]
    c.send(_mail("clean-after") + b".\r\nQUIT\r\n")
    assert c.code() == 250
    assert c.code() == 221
    c.close()
    assert [g for g in sink.got[delivered0:] if b"smuggled" in g[2] or b"evil" in g[2] or "evil@" in g[0]] == []
    # a pipelined session that ends with EOF right after its last command
    c = SmtpClient(hostile.smtp_port)
    c.send(b"EHLO pipe.example\r\nMAIL FROM:<p@example.test>\r\nRCPT TO:<b@example.test>\r\n"
           b"RCPT TO:<c@example.test>\r\nDATA\r\n" + _mail("pipelined") + b".\r\nQUIT\r\n")
    c.sock.shutdown(socket.SHUT_WR)
    answer = c.rest()
    c.close()
    assert [int(line[:3]) for line in answer.split(b"\r\n") if line[3:4] == b" "] == [250, 250, 250, 250, 354,
                                                                                        250, 221], answer
    # ... and one that ends with EOF in the middle of DATA: nothing is relayed, the attempt is on record
    c = SmtpClient(hostile.smtp_port)
    c.send(b"EHLO pipe.example\r\nMAIL FROM:<cut@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
           + _mail("cut-off") + b"no final dot")
    c.sock.shutdown(socket.SHUT_WR)
    c.rest()
    c.close()
    # thousands of recipients
    rcpts = [f"r{i}@example.test" for i in range(2000)]
    c = SmtpClient(hostile.smtp_port)
    c.send(b"EHLO many.example\r\nMAIL FROM:<m@example.test>\r\n"
           + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts) + b"DATA\r\n")
    codes = [c.code() for _ in range(2 + len(rcpts) + 1)]
    assert codes[:2] == [250, 250] and set(codes[2:-1]) == {250} and codes[-1] == 354
    c.send(_mail("many") + b".\r\nQUIT\r\n")
    assert c.code() == 250
    c.close()
    hostile.alive()

    # what the MTA received is exactly what the timeline recorded, and every recorded delivery arrived
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        verbs = [v for v in hostile.verbs("mail") if v["verb"] == "smtp.deliver"]
        if any(v["request"]["sender"] == "cut@example.test" for v in verbs):
            break
        time.sleep(0.1)
    by_id = {v["request"]["message_id"]: v for v in verbs}
    assert [v["status"] for v in verbs if v["request"]["sender"] == "cut@example.test"] == ["aborted"]
    committed = [v for v in verbs if v["status"] == "committed"]
    got = sink.got[delivered0:]
    assert len(got) == len(committed) == 3, (len(got), [v["request"]["message_id"] for v in committed])
    for (sender, tos, content), v in zip(got, committed):
        req = v["request"]
        assert sender == req["sender"]
        assert tos == [r for r in req["recipients"]]
        assert hashlib.sha256(content).hexdigest() == req["message"]["digest"], req["message_id"]
    assert len(by_id["<many@h.test>"]["request"]["recipients"]) == len(rcpts)
    for evil in ("<evil0@h.test>", "<evil1@h.test>"):
        assert evil not in by_id or by_id[evil]["status"] != "committed"
    count("hostile", 10)
