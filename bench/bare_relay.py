#!/usr/bin/env python3
"""The floor for the mail benchmarks: the least a proxy on this stack does, with nothing recorded.

- `smtp PORT UPSTREAM_PORT`: aiosmtpd in front, one aiosmtplib session per client to the upstream, MAIL,
  RCPT and DATA forwarded one by one and the upstream's reply given back (what undo-proxy's SMTP front-end
  does, minus the blob, the timeline and XCLIENT).
- `tcp PORT UPSTREAM_PORT`: asyncio streams copying bytes both ways, nothing parsed (less than any IMAP
  proxy that knows where a command ends can do).

On uvloop where it is installed, as `undo-proxy serve` is. Not a product: bench/smtp_throughput.py and
bench/imap_throughput.py run it beside the real thing so the gap between the two is the price of recording.
"""
from __future__ import annotations

import asyncio
import sys
from typing import Any

UPSTREAM = ("127.0.0.1", 0)


class SmtpRelay:
    """aiosmtpd handler hooks (handle_MAIL, handle_RCPT, handle_DATA) relaying to the upstream."""

    def __init__(self) -> None:
        self.sessions: dict[int, Any] = {}

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list) -> str:
        import aiosmtplib
        upstream = self.sessions.get(id(session))
        if upstream is None:
            upstream = aiosmtplib.SMTP(hostname=UPSTREAM[0], port=UPSTREAM[1], start_tls=False,
                                       local_hostname="bare-relay.bench.test")
            await upstream.connect()
            await upstream.ehlo()
            self.sessions[id(session)] = upstream
        reply = await upstream.execute_command(b"MAIL", f"FROM:<{address}>".encode())
        envelope.mail_from = address
        return f"{reply.code} {reply.message}"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list) -> str:
        reply = await self.sessions[id(session)].execute_command(b"RCPT", f"TO:<{address}>".encode())
        envelope.rcpt_tos.append(address)
        return f"{reply.code} {reply.message}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await self.sessions[id(session)].data(envelope.original_content)
        return f"{reply.code} {reply.message}"


async def smtp(port: int) -> None:
    from aiosmtpd.smtp import SMTP
    handler = SmtpRelay()
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: SMTP(handler, decode_data=False, hostname="bare-relay.bench.test"),
                             "127.0.0.1", port)
    await asyncio.Event().wait()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def tcp(port: int) -> None:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*UPSTREAM)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    await asyncio.start_server(client, "127.0.0.1", port)
    await asyncio.Event().wait()


def main() -> None:
    global UPSTREAM
    mode, port, upstream_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    UPSTREAM = ("127.0.0.1", upstream_port)
    serve = {"smtp": smtp, "tcp": tcp}[mode](port)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve)
    else:
        uvloop.run(serve)


if __name__ == "__main__":
    main()
