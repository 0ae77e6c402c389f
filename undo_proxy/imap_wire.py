"""IMAP4rev1 wire syntax shared by the IMAP front-end, its upstream client and the `imap` verb pack:
reading one command or response with its literals, a small parser for the parts the proxy must
understand (command arguments, FETCH data, SEARCH results, status responses) and quoting.

A message is kept as the list of its pieces: text lines (ending in CRLF) alternating with literal data,
so it can be passed on byte for byte, or with its literal markers rewritten.
"""
from __future__ import annotations

import asyncio
import hashlib
from bisect import bisect_left, bisect_right
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

LITERAL = re.compile(rb"(~?)\{(\d+)([+-]?)\}\r\n$")
STATUS = re.compile(rb"^(\S+) (OK|NO|BAD|BYE|PREAUTH)(?: (.*))?\r\n$", re.IGNORECASE | re.DOTALL)
CODE = re.compile(rb"^\[([^\]]*)\]")
LINE_LIMIT = 1 << 20


class Closed(Exception):
    """The peer closed the connection."""


class TooBig(Exception):
    def __init__(self, size: int, sync: bool, first_line: bytes = b"") -> None:
        super().__init__(f"literal of {size} bytes is too large")
        self.size, self.sync, self.first_line = size, sync, first_line

    @property
    def tag(self) -> str:
        return reply_tag(self.first_line)


def reply_tag(line: bytes) -> str:
    """The tag of a client's command line to answer it with, or '*' when it has none that is valid."""
    tag = line.split(b" ", 1)[0].decode("ascii", "replace").strip()
    return tag if re.fullmatch(r"[^\s(){%*\"\\\]+]+", tag) else "*"


@dataclass
class Message:
    """One IMAP command or response: lines[i] (CRLF-terminated) followed by literals[i], if any."""
    lines: list[bytes]
    literals: list[bytes]

    @property
    def raw(self) -> bytes:
        out = []
        for i, line in enumerate(self.lines):
            out.append(line)
            if i < len(self.literals):
                out.append(self.literals[i])
        return b"".join(out)

    @property
    def tag(self) -> str:
        return self.lines[0].split(b" ", 1)[0].rstrip(b"\r\n").decode("ascii", "replace")

    def nonsync(self) -> bytes:
        """The raw message with every literal sent as LITERAL+ ({n+}), for an upstream that offers it."""
        out = []
        for i, line in enumerate(self.lines):
            if i < len(self.literals):
                line = LITERAL.sub(lambda m: m.group(1) + b"{" + m.group(2) + b"+}\r\n", line)
                out += [line, self.literals[i]]
            else:
                out.append(line)
        return b"".join(out)

    def status(self) -> tuple[str, str, str] | None:
        """('OK'|'NO'|'BAD'|'BYE'|'PREAUTH', response code without brackets, text) of a status response."""
        if self.literals:
            return None
        m = STATUS.match(self.lines[0])
        if not m:
            return None
        text = (m.group(3) or b"").decode("utf-8", "replace")
        code = CODE.match(m.group(3) or b"")
        return m.group(2).decode().upper(), code.group(1).decode("utf-8", "replace") if code else "", text


async def read_message(reader: asyncio.StreamReader, limit: int,
                       sync_literal: Callable[[int], Awaitable[None]] | None = None) -> Message:
    """Read one command/response. sync_literal(n) is awaited before a synchronising literal's data is
    read (the front-end answers the client's `{n}` with a continuation there)."""
    lines: list[bytes] = []
    literals: list[bytes] = []
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial and lines:
                raise Closed("connection closed in the middle of a message") from None
            raise Closed("connection closed") from None
        except asyncio.LimitOverrunError:
            raise TooBig(LINE_LIMIT, False) from None
        lines.append(line)
        m = LITERAL.search(line)
        if not m:
            return Message(lines, literals)
        size = int(m.group(2))
        if size > limit:
            raise TooBig(size, m.group(3) != b"+", lines[0])
        if m.group(3) != b"+" and sync_literal is not None:
            await sync_literal(size)
        try:
            literals.append(await reader.readexactly(size))
        except asyncio.IncompleteReadError:
            raise Closed("connection closed in a literal") from None


# --- parsing ------------------------------------------------------------------------------------
# Atoms are str, strings and literals bytes, NIL None, parenthesised lists Python lists.

_ATOM_END = b" ()\r\n\"{"
_LITERAL_AT = re.compile(rb"~?\{(\d+)[+-]?\}\r\n")


def parse(data: bytes, pos: int = 0) -> list[Any]:
    """Tokens of IMAP data (a command's arguments, a FETCH response's parenthesised list)."""
    stack: list[list[Any]] = [[]]
    n = len(data)
    while pos < n:
        c = data[pos]
        if c in b" \r\n":
            pos += 1
        elif c == 0x28:  # (
            stack.append([])
            pos += 1
        elif c == 0x29:  # )
            if len(stack) > 1:
                done = stack.pop()
                stack[-1].append(done)
            pos += 1
        elif c == 0x22:  # "
            out = bytearray()
            pos += 1
            while pos < n and data[pos] != 0x22:
                if data[pos] == 0x5C and pos + 1 < n:
                    pos += 1
                out.append(data[pos])
                pos += 1
            stack[-1].append(bytes(out))
            pos += 1
        elif c == 0x7B or (c == 0x7E and data[pos + 1:pos + 2] == b"{"):  # {n} ~{n}
            m = _LITERAL_AT.match(data, pos)
            if not m:
                stack[-1].append(data[pos:pos + 1].decode("latin-1"))
                pos += 1
                continue
            start = m.end()
            stack[-1].append(data[start:start + int(m.group(1))])
            pos = start + int(m.group(1))
        else:
            start = pos
            depth = 0
            while pos < n and (depth or data[pos] not in _ATOM_END):
                if data[pos] == 0x5B:  # [ ... ] may hold spaces and parentheses (BODY[HEADER.FIELDS (X)])
                    depth += 1
                elif data[pos] == 0x5D and depth:
                    depth -= 1
                pos += 1
            atom = data[start:pos].decode("utf-8", "replace")
            stack[-1].append(None if atom.upper() == "NIL" else atom)
    while len(stack) > 1:
        done = stack.pop()
        stack[-1].append(done)
    return stack[0]


def text(value: Any) -> str:
    """An astring (atom or string) as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def mailbox_name(value: Any) -> str:
    name = text(value)
    return "INBOX" if name.upper() == "INBOX" else name


def quote(value: str | bytes) -> bytes:
    """An IMAP string: quoted when it can be, a LITERAL+ literal otherwise."""
    raw = value.encode() if isinstance(value, str) else value
    if all(0x20 <= b < 0x7F for b in raw) and len(raw) < 1000:
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d+}\r\n" % len(raw) + raw


def fetch_items(message: Message) -> tuple[int, dict[str, Any]] | None:
    """`* 3 FETCH (UID 7 FLAGS (\\Seen) BODY[] {12}...)` -> (3, {"UID": "7", "FLAGS": [...], ...})."""
    head = message.lines[0]
    m = re.match(rb"\* (\d+) FETCH \(", head, re.IGNORECASE)
    if not m:
        return None
    tokens = parse(message.raw, m.end() - 1)
    if not tokens or not isinstance(tokens[0], list):
        return None
    items = tokens[0]
    out: dict[str, Any] = {}
    for i in range(0, len(items) - 1, 2):
        if isinstance(items[i], str):
            out[items[i].upper()] = items[i + 1]
    return int(m.group(1)), out


def search_numbers(message: Message) -> list[int] | None:
    """`* SEARCH 2 5 7` -> [2, 5, 7] (None for other responses)."""
    m = re.match(rb"\* SEARCH((?: \d+)*)", message.lines[0], re.IGNORECASE)
    if not m:
        return None
    return [int(x) for x in m.group(1).split()]


def set_ranges(spec: str, star: int) -> list[tuple[int, int]]:
    """'1:3,7,9:*' -> [(1, 3), (7, 7), (9, star)] (an unparsable set: no ranges)."""
    out = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition(":")
            if "0" in (lo, hi) or not all(x == "*" or x.isdigit() for x in (lo, hi or lo)):
                return []   # not a set (numbers start at 1): the server answers BAD, nothing is named
            a, b = (star if x == "*" else int(x) for x in (lo, hi or lo))
            out.append((min(a, b), max(a, b)))
    except ValueError:
        return []
    return out


def select_uids(order: list[int], spec: str, uid: bool) -> list[int]:
    """The UIDs that a sequence set (uid False) or a UID set names, in sequence order. `order` holds the
    mailbox's UIDs in sequence order, so ascending: a range is found by bisection, not by a walk over the
    whole mailbox for every command."""
    star = (order[-1] if order else 0) if uid else len(order)
    spans = []   # [lo, hi) index ranges into order
    for a, b in set_ranges(spec, star):
        lo, hi = (bisect_left(order, a), bisect_right(order, b)) if uid else (max(a, 1) - 1, min(b, len(order)))
        if lo < hi:
            spans.append((lo, hi))
    # Merged before they are expanded: a client repeating `1:*` a hundred thousand times in one command
    # costs a sort of the spans, not a hundred thousand walks over the mailbox.
    picked: list[int] = []
    end = 0
    for lo, hi in sorted(spans):
        lo = max(lo, end)
        if lo < hi:
            picked.extend(order[lo:hi])
            end = hi
    return picked


def sequence_number(order: list[int], uid: int) -> int | None:
    """The message's sequence number in a mailbox whose UIDs in sequence order are `order`."""
    i = bisect_left(order, uid)
    return i + 1 if i < len(order) and order[i] == uid else None


def compact_set(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1:3,7'."""
    parts: list[str] = []
    for n in sorted(set(numbers)):
        if parts and parts[-1].split(":")[-1] == str(n - 1):
            parts[-1] = parts[-1].split(":")[0] + f":{n}"
        else:
            parts.append(str(n))
    return ",".join(parts)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def message_id_in(header: bytes) -> str | None:
    m = re.search(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", header, re.IGNORECASE | re.MULTILINE)
    if not m:
        return None
    value = b" ".join(m.group(1).split()).decode("utf-8", "replace").strip()
    return value or None
