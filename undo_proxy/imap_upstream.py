"""The client side of the IMAP front-end: connections to the upstream IMAP server (Dovecot). Live
traffic relays through one connection per client; replay and compensation log in as the user through
the server's master user (`<user><separator><master_user>`)."""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

from undo_proxy.imap_wire import LINE_LIMIT, Closed, Message, TooBig, quote, read_message

log = logging.getLogger("undo_proxy.imap")
MAX_LITERAL = 1 << 30


class UpstreamUnavailable(Exception):
    """The IMAP server cannot be reached, dropped the connection, or timed out."""


class CommandFailed(UpstreamUnavailable):
    """A command replay or compensation cannot do without failed (e.g. the master login)."""


@dataclass
class Lit:
    """A literal argument of a command built by the proxy itself."""
    data: bytes


@dataclass
class ImapConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    timeout: float
    greeting: Message
    capabilities: set[str] = field(default_factory=set)
    _tags: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def literal_plus(self) -> bool:
        return "LITERAL+" in self.capabilities

    def next_tag(self) -> str:
        return f"U~{next(self._tags)}"

    async def read(self, timeout: float | None = -1.0) -> Message:
        """The next response; timeout None waits for ever (IDLE), -1 means the configured timeout."""
        try:
            async with asyncio.timeout(self.timeout if timeout == -1.0 else timeout):
                msg = await read_message(self.reader, MAX_LITERAL)
        except (Closed, ConnectionError, TooBig) as exc:
            raise UpstreamUnavailable(f"the IMAP server closed the connection ({exc})") from None
        except TimeoutError:
            raise UpstreamUnavailable(f"the IMAP server did not answer within {self.timeout:g}s") from None
        if msg.lines[0].startswith(b"* CAPABILITY "):
            self.capabilities = set(msg.lines[0][13:].decode("ascii", "replace").upper().split())
        return msg

    async def send(self, message: Message) -> None:
        """Send a command; its literals go as LITERAL+ when the server offers it, else each waits for the
        server's continuation."""
        try:
            if not message.literals or self.literal_plus:
                self.writer.write(message.nonsync() if message.literals else message.raw)
                await self.writer.drain()
                return
            for i, line in enumerate(message.lines):
                self.writer.write(line)
                if i < len(message.literals):
                    await self.writer.drain()
                    reply = await self.read()
                    if not reply.lines[0].startswith(b"+"):
                        raise UpstreamUnavailable(f"the IMAP server refused a literal: {reply.raw[:200]!r}")
                    self.writer.write(message.literals[i])
            await self.writer.drain()
        except ConnectionError as exc:
            raise UpstreamUnavailable(f"the IMAP server closed the connection ({exc})") from None

    async def send_raw(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError as exc:
            raise UpstreamUnavailable(f"the IMAP server closed the connection ({exc})") from None

    async def command(self, *parts: bytes | str | Lit) -> tuple[list[Message], Message]:
        """Run one command built of atoms (bytes/str, sent as they are) and literals: (untagged, tagged)."""
        tag = self.next_tag()
        lines: list[bytes] = []
        literals: list[bytes] = []
        current = tag.encode()
        for part in parts:
            if isinstance(part, Lit):
                lines.append(current + b" {%d}\r\n" % len(part.data))
                literals.append(part.data)
                current = b""
            else:
                current += b" " + (part.encode() if isinstance(part, str) else part)
        lines.append(current + b"\r\n")
        await self.send(Message(lines, literals))
        untagged: list[Message] = []
        while True:
            msg = await self.read()
            if msg.tag == tag:
                return untagged, msg
            untagged.append(msg)

    async def check(self, *parts: bytes | str | Lit) -> list[Message]:
        """command() that must succeed: the untagged responses, or CommandFailed."""
        untagged, tagged = await self.command(*parts)
        status = tagged.status()
        if not status or status[0] != "OK":
            raise CommandFailed(tagged.raw.decode("utf-8", "replace").strip())
        return untagged

    async def close(self) -> None:
        try:
            if not self.writer.is_closing():
                self.writer.write(self.next_tag().encode() + b" LOGOUT\r\n")
                self.writer.close()
                async with asyncio.timeout(2):
                    await self.writer.wait_closed()
        except (OSError, TimeoutError):
            pass


def astring(value: str | bytes) -> bytes | Lit:
    """An argument as a quoted string, or a literal when it cannot be quoted."""
    raw = value.encode() if isinstance(value, str) else value
    quoted = quote(raw)
    return quoted if quoted.startswith(b'"') else Lit(raw)


def _capabilities(greeting: Message) -> set[str]:
    line = greeting.lines[0]
    start = line.find(b"[CAPABILITY ")
    if start < 0:
        return set()
    end = line.find(b"]", start)
    return set(line[start + 12:end].decode("ascii", "replace").upper().split())


class ImapUpstream:
    def __init__(self, host: str, port: int, timeout: float, master_user: str | None = None,
                 master_password: str | None = None, separator: str = "*") -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.master_user, self.master_password, self.separator = master_user, master_password, separator

    async def connect(self) -> ImapConnection:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=LINE_LIMIT)
                greeting = await read_message(reader, 0)
        except (OSError, TimeoutError, Closed, TooBig) as exc:
            raise UpstreamUnavailable(f"{self.host}:{self.port}: {exc or type(exc).__name__}") from None
        status = greeting.status()
        if not status or status[0] not in ("OK", "PREAUTH"):
            writer.close()
            raise UpstreamUnavailable(f"{self.host}:{self.port} greeted with "
                                      f"{greeting.raw[:200].decode('utf-8', 'replace').strip()}")
        return ImapConnection(reader, writer, self.timeout, greeting, _capabilities(greeting))

    async def master_session(self, user: str) -> ImapConnection:
        """A connection logged in as `user` through the master user (replay and compensation)."""
        if not self.master_user or self.master_password is None:
            raise CommandFailed("no master_user/master_password_file is configured for this IMAP front-end")
        conn = await self.connect()
        try:
            login = f"{user}{self.separator}{self.master_user}"
            untagged, tagged = await conn.command(b"LOGIN", astring(login), astring(self.master_password))
            status = tagged.status()
            if not status or status[0] != "OK":
                raise CommandFailed(f"master login as {user!r} refused: {status[2] if status else tagged.raw!r}")
            if status[1].upper().startswith("CAPABILITY "):
                conn.capabilities = set(status[1][11:].upper().split())
            else:
                await conn.check(b"CAPABILITY")
        except BaseException:
            await conn.close()
            raise
        return conn
