"""Helpers for the fault, hostile-input and access tests: a scriptable raw HTTP upstream on 127.0.0.1 that
records exactly what reaches it, raw-socket clients, the daemon's metrics, and the counts the reliability
report (bench/crash_harness.py --with-tests) collects."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from tests.daemon import TOKEN, Stack

HOST = "127.0.0.1"


def count(kind: str, n: int = 1) -> None:
    """Add n to a figure of docs/reliability.md ("fault", "hostile", "access") when the harness asks."""
    path = os.environ.get("UNDO_RELIABILITY_STATS")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"kind": kind, "n": n}) + "\n")


# --------------------------------------------------------------------------- a raw upstream

@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class RawUpstream:
    """An HTTP/1.1 server written on raw asyncio streams, so it can misbehave on purpose.

    mode: "ok" (200, body = "METHOD TARGET"), "garbage" (a reply that is not HTTP), "reset" (a response head
    and half a body, then a TCP RST), "slow" (reads the request, never answers), "close" (closes without a
    word). Every request that arrives whole is appended to `received`; raw bytes per connection to `raw`.
    """
    port: int = 0
    mode: str = "ok"
    received: list[Received] = field(default_factory=list)
    raw: list[bytearray] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.base_events.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, port: int = 0) -> "RawUpstream":
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()

            async def up() -> None:
                self._server = await asyncio.start_server(self._conn, HOST, port, reuse_address=True)
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()
            self._loop.run_until_complete(up())
            self._loop.run_forever()
            self._loop.close()
        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("raw upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def down() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = None

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = bytearray()
        self.raw.append(raw)
        try:
            for _ in range(10_000):
                head = await reader.readuntil(b"\r\n\r\n")
                raw += head
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [(k, v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
                names = {k.lower(): v for k, v in headers}
                body = b""
                if names.get("transfer-encoding", "").lower() == "chunked":
                    for _ in range(1_000_000):
                        size_line = await reader.readuntil(b"\r\n")
                        raw += size_line
                        size = int(size_line.split(b";")[0], 16)
                        chunk = await reader.readexactly(size + 2)
                        raw += chunk
                        body += chunk[:-2]
                        if size == 0:
                            break
                elif "content-length" in names:
                    body = await reader.readexactly(int(names["content-length"]))
                    raw += body
                self.received.append(Received(method, target, headers, body))
                if self.mode == "slow":
                    await asyncio.sleep(3600)
                elif self.mode == "close":
                    break
                elif self.mode == "garbage":
                    writer.write(b"\x00\xffTHIS IS NOT HTTP\r\n\r\n\x16\x03\x01garbage")
                    await writer.drain()
                    break
                elif self.mode == "reset":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
                    await writer.drain()
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                else:
                    reply = f"{method} {target}".encode("latin-1")
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                                 + str(len(reply)).encode() + b"\r\n\r\n" + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()


def raw_frontend(name: str, port: int, upstream: str, timeout: str = "5s", more: str = "") -> str:
    """An extra [[http]] table for proxy_stack(extra=...)."""
    return f'''
[[http]]
name = "{name}"
listen = "{HOST}:{port}"
upstream = "{upstream}"
verbs = "http"
timeout = "{timeout}"
{more}
'''


# --------------------------------------------------------------------------- raw clients

def exchange(port: int, data: bytes, wait: float = 1.5, half_close: bool = False) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or `wait` s of silence."""
    with socket.create_connection((HOST, port), timeout=wait) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        out = bytearray()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except (TimeoutError, socket.timeout):
                break
            except ConnectionResetError:
                break
            if not piece:
                break
            out += piece
        return bytes(out)


STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")


def statuses(answer: bytes) -> list[int]:
    return [int(m.group(1)) for m in STATUS_LINE.finditer(answer)]


# --------------------------------------------------------------------------- the daemon's side

def metrics(stack: Stack) -> dict[str, float]:
    """/metrics on the admin port as {'name{labels}': value}."""
    req = urllib.request.Request(stack.admin + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(stack: Stack, key: str) -> float:
    return metrics(stack).get(key, 0.0)


def all_verbs(stack: Stack, timeout: float = 5, count: int = 0) -> list[dict[str, Any]]:
    """Every verb with its request and output (waits until at least `count`: reads are batched)."""
    deadline = time.monotonic() + timeout
    while True:
        status, found = stack.api("GET", "/api/timeline")
        assert status == 200, found
        if len(found) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out = []
    for v in found:
        status, full = stack.api("GET", f"/api/verbs/{v['seq']}")
        assert status == 200, full
        out.append(full)
    return out


def alive(stack: Stack) -> bool:
    return stack.proc is not None and stack.proc.poll() is None and stack.api("GET", "/api/status")[0] == 200
