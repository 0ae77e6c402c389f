"""The IMAP front-end: sockets and parsing only. Each client connection is relayed to its own upstream
connection, one command at a time: the front-end reads a whole command (answering the client's
synchronising literals itself, so the command is complete before anything is forwarded), turns the ones
that matter into verbs, and passes the server's responses back unchanged (only the capability list is
adjusted to what the proxy supports: no COMPRESS, STARTTLS only when the proxy terminates TLS, AUTH=PLAIN
and AUTH=LOGIN only).

Messages are named by Message-ID, never by UID: before a STORE/COPY/MOVE/FETCH of a set the front-end
asks the server, on the same connection and with its own tag, for the set's UIDs and header blocks
(`FETCH <set> (UID BODY.PEEK[HEADER])`); before an EXPUNGE it asks `UID SEARCH DELETED` first. Those
responses never reach the client (other untagged data that arrives meanwhile does). The answers are
cached per mailbox and UIDVALIDITY, so UID commands on known UIDs cost no extra round trip.

Mutating verbs: intent committed before the command is forwarded, outcome committed before the client
sees the command's responses. Reads (SELECT/EXAMINE, FETCH, SEARCH) are recorded once answered.
Credentials (LOGIN, AUTHENTICATE) are passed through and never recorded.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from storage.blobs import BlobStore
from storage.db import TimelineUnavailable
from storage.timeline import GroupCommitter, NewVerb, Timeline, utcnow
from undo_proxy import metrics
from undo_proxy.config import ImapFrontend
from undo_proxy.gate import Gate, Refused
from undo_proxy.imap_upstream import ImapConnection, ImapUpstream, UpstreamUnavailable
from undo_proxy.imap_wire import (LINE_LIMIT, Closed, Message, TooBig, compact_set, fetch_items,
                                  mailbox_name, parse, read_message, reply_tag, search_numbers, select_uids,
                                  sequence_number, text)
from undo_proxy.tls import server_context
from undo_proxy.tracebacks import forget_frames
from verbs.imap import HEADER_ITEM, content_digest, describe, header_of, name_refs, status_output

log = logging.getLogger("undo_proxy.imap")
MAX_LITERAL = 64 << 20
CYCLE_OPEN = "NO [UNAVAILABLE] An undo cycle is in progress; mail is unavailable for now, try again later"
TIMELINE_DOWN = "NO [UNAVAILABLE] Cannot record the command; try again later"
UPSTREAM_DOWN = "NO [UNAVAILABLE] The mail server is unavailable; try again later"
LOCAL_CAPS = "IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN AUTH=LOGIN"
COMMAND = re.compile(rb"^([^\s(){%*\"\\\]]+) (?:(UID) )?([A-Za-z]+)(?= |\r\n)", re.IGNORECASE)
SET_AND_REST = re.compile(rb"^\S+ (?:UID )?[A-Za-z]+ (\S+) (.*)\r\n$", re.IGNORECASE | re.DOTALL)
CAPS = re.compile(rb"(\* CAPABILITY |\[CAPABILITY )([^\]\r\n]*)", re.IGNORECASE)
EXPUNGED = re.compile(rb"^\* (?:\d+ EXPUNGE|VANISHED)", re.IGNORECASE)
EXPUNGE_N = re.compile(rb"^\* (\d+) EXPUNGE\b", re.IGNORECASE)
EXISTS_N = re.compile(rb"^\* (\d+) EXISTS\b", re.IGNORECASE)
AUTH_OK = {"PLAIN", "LOGIN"}
# Not offered through the proxy: either the proxy handles them itself (STARTTLS), or a command they enable
# would change mail in a way the proxy cannot name and so could not replay: CATENATE builds a message from
# parts, SEARCHRES lets `$` stand for messages the proxy never saw named, the rest set state it does not
# record.
DROP_CAPS = {"STARTTLS", "COMPRESS=DEFLATE", "NOTIFY", "CATENATE", "SEARCHRES", "URLAUTH", "METADATA",
             "METADATA-SERVER", "ACL", "QUOTA", "QUOTASET", "REPLACE", "X-DOVECOT-REPLACE"}
# Commands relayed as they are: they change nothing that a rewind restores (or are refused by the server
# before login). Any other command without a handler of its own is refused rather than passed unrecorded.
PASS_THROUGH = {"CAPABILITY", "NOOP", "LOGOUT", "LIST", "LSUB", "XLIST", "STATUS", "NAMESPACE", "ID", "ENABLE",
                "UNSELECT", "CHECK", "SORT", "THREAD", "GETQUOTA", "GETQUOTAROOT", "MYRIGHTS", "GETACL",
                "LISTRIGHTS", "GETMETADATA"}
FIRST_ARG = re.compile(rb"^\S+ (?:UID )?[A-Za-z]+ (\S+)", re.IGNORECASE)


@dataclass
class Named:
    """A set of messages resolved to logical names."""
    refs: list[dict[str, Any]] = field(default_factory=list)
    by_seq: dict[int, str] = field(default_factory=dict)
    by_uid: dict[int, str] = field(default_factory=dict)


class ImapSession:
    """One client connection and its upstream connection."""

    def __init__(self, fe: ImapFrontendServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.fe, self.reader, self.writer = fe, reader, writer
        self.up: ImapConnection | None = None
        self.user: str | None = None
        self.selected: str | None = None
        self.readonly = False
        self.stale = False                 # logged in when a cycle opened: must reconnect after it
        self.tls_active = False
        self.uidvalidity: int | None = None
        self.uids: list[int] | None = None           # the selected mailbox's UIDs in sequence order (None: unknown)
        self.pending = bytearray()                   # responses not yet written to the client
        self.peer = (writer.get_extra_info("peername") or ("?",))[0]

    # --- plumbing ----------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        self.pending += data

    def reply(self, tag: str, line: str) -> None:
        self.pending += f"{tag} {line}\r\n".encode()

    async def flush(self) -> None:
        """Write what is pending in one go (one system call per command, not one per response)."""
        if self.pending:
            self.writer.write(bytes(self.pending))
            self.pending.clear()
        await self.writer.drain()

    def caps(self, data: bytes) -> bytes:
        """The server's capability lists, as the proxy supports them."""
        if b"CAPABILITY" not in data[:300].upper():
            return data

        def fix(m: re.Match[bytes]) -> bytes:
            words = [w for w in m.group(2).decode("ascii", "replace").split()
                     if w.upper() not in DROP_CAPS
                     and not (w.upper().startswith("AUTH=") and w.upper()[5:] not in AUTH_OK)]
            if self.fe.tls and not self.tls_active and not self.user:
                words.append("STARTTLS")
            return m.group(1) + " ".join(words).encode()
        return CAPS.sub(fix, data, count=1)

    async def _go_ahead(self, size: int) -> None:
        self.write(b"+ Ready for literal data\r\n")
        await self.flush()

    def _watch(self, resp: Message) -> None:
        """Keep the sequence number -> UID list in step with what the client is told."""
        line = resp.lines[0]
        if self.uids is None or not line.startswith(b"* ") or line[2:3] not in b"0123456789V":
            return
        if m := EXPUNGE_N.match(line):
            n = int(m.group(1))
            if 0 < n <= len(self.uids):
                del self.uids[n - 1]
            else:
                self.uids = None
        elif m := EXISTS_N.match(line):
            if int(m.group(1)) != len(self.uids):
                self.uids = None     # new messages: their UIDs are asked for when needed
        elif line[2:10].upper() == b"VANISHED":
            self.uids = None

    async def _relay(self, tag: str, observe: Callable[[Message], None] | None = None,
                     buffer: list[bytes] | None = None, timeout: float | None = -1.0) -> Message:
        """Pass the server's responses to the client (or into buffer) until the tagged one, returned
        unsent."""
        assert self.up is not None
        while True:
            resp = await self.up.read(timeout)
            if resp.tag == tag:
                return resp
            self._watch(resp)
            if observe:
                observe(resp)
            data = self.caps(resp.raw) if not resp.literals else resp.raw
            if buffer is not None:
                buffer.append(data)
            else:
                self.write(data)
                if timeout is None or len(self.pending) > 1 << 18:   # IDLE: at once; big answers: in parts
                    await self.flush()

    def _send_tagged(self, tagged: Message) -> None:
        self.write(self.caps(tagged.raw))

    async def _forward(self, msg: Message, tag: str, observe: Callable[[Message], None] | None = None) -> Message:
        assert self.up is not None
        await self.up.send(msg)
        return await self._relay(tag, observe)

    async def _hidden(self, command: bytes, keep: Callable[[Message], bool]) -> tuple[list[Message], Message]:
        """A command of the proxy's own on the client's connection: the responses `keep` accepts are
        returned and never reach the client; any other untagged data is passed on."""
        assert self.up is not None
        tag = self.up.next_tag()
        await self.up.send_raw(tag.encode() + b" " + command + b"\r\n")
        kept: list[Message] = []
        while True:
            resp = await self.up.read()
            if resp.tag == tag:
                return kept, resp
            if keep(resp):
                kept.append(resp)
            else:
                self._watch(resp)
                self.write(self.caps(resp.raw) if not resp.literals else resp.raw)

    async def _sequence(self) -> list[int]:
        if self.uids is None:
            kept, _ = await self._hidden(b"UID SEARCH ALL", lambda r: search_numbers(r) is not None)
            self.uids = sorted(u for r in kept for u in (search_numbers(r) or []))
        return self.uids

    async def _name(self, spec: str, uid: bool) -> Named:
        """The messages of a sequence set or UID set in the selected mailbox, by logical name. UIDs come
        from the tracked sequence, header blocks from the cache: the server is asked only for what is not
        known yet."""
        uids = select_uids(await self._sequence(), spec, uid)
        assert self.user is not None and self.selected is not None
        cache = self.fe.described(self.user, self.selected, self.uidvalidity)
        missing = [u for u in uids if u not in cache]
        if missing:
            def is_header(m: Message) -> bool:
                return b" FETCH " in m.lines[0][:40] and b"BODY[HEADER]" in m.lines[0]
            kept, _ = await self._hidden(f"UID FETCH {compact_set(missing)} (UID {HEADER_ITEM})".encode(), is_header)
            for m in kept:
                parsed = fetch_items(m)
                if parsed and "UID" in parsed[1]:
                    cache[int(parsed[1]["UID"])] = describe(parsed[1].get("BODY[HEADER]") or b"")
        uids = [u for u in uids if u in cache]
        refs = name_refs(self.user, self.selected, [cache[u] for u in uids])
        named = Named(refs=refs)
        order = self.uids or []      # as it is now: an EXPUNGE may have come with the header fetch
        for u, ref in zip(uids, refs):
            named.by_uid[u] = ref["name"]
            if seq := sequence_number(order, u):
                named.by_seq[seq] = ref["name"]
        return named

    # --- the session -------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            if self.fe.gate.refusing:
                self.write(f"* OK [CAPABILITY {self._local_caps()}] undo-proxy: an undo cycle is in progress; "
                           f"mail is unavailable for now\r\n".encode())
            else:
                try:
                    self.up = await self.fe.upstream.connect()
                except UpstreamUnavailable as exc:
                    log.warning("imap %s: %s", self.fe.cfg.name, exc)
                    metrics.FRONTEND_ERRORS.labels("imap", "upstream").inc()
                    self.write(b"* BYE [UNAVAILABLE] The mail server is unavailable; try again later\r\n")
                    return
                self.write(self.caps(self.up.greeting.raw))
            while True:
                await self.flush()
                try:
                    msg = await read_message(self.reader, MAX_LITERAL, self._go_ahead)
                except TooBig as exc:
                    if not exc.sync:
                        self.write(b"* BYE [TOOBIG] Command too large\r\n")
                        return
                    # The client waits for a continuation that does not come, so it sends no data: the
                    # command ends here, with its tag (RFC 7888 4).
                    self.reply(exc.tag, "NO [TOOBIG] Literal too large")
                    continue
                if not await self.handle(msg):
                    return
        except (Closed, ConnectionError) as exc:
            forget_frames(exc)   # the client went away, maybe in the middle of a literal: see forget_frames
        except UpstreamUnavailable as exc:
            forget_frames(exc)
            metrics.FRONTEND_ERRORS.labels("imap", "upstream").inc()
            log.warning("imap %s: session of %s ended: %s", self.fe.cfg.name, self.user or self.peer, exc)
            try:
                self.write(b"* BYE [UNAVAILABLE] The mail server went away\r\n")
                await self.flush()
            except ConnectionError:
                pass
        finally:
            if self.up:
                await self.up.close()
            try:
                await self.flush()
            except ConnectionError:
                pass
            self.writer.close()

    def _local_caps(self) -> str:
        return LOCAL_CAPS + (" STARTTLS" if self.fe.tls and not self.tls_active else "")

    async def handle(self, msg: Message) -> bool:
        """One client command; False ends the session."""
        m = COMMAND.match(msg.lines[0])
        if not m:
            if msg.lines[0].strip():
                self.reply(reply_tag(msg.lines[0]), "BAD Invalid command")
            return True
        tag, uid, name = m.group(1).decode("ascii", "replace"), bool(m.group(2)), m.group(3).decode().upper()
        args = parse(msg.raw, m.end())
        if name == "STARTTLS":
            return await self._starttls(tag)
        if name == "COMPRESS":
            self.reply(tag, "NO [CANNOT] COMPRESS is not supported through undo-proxy")
            return True
        if self.fe.gate.refusing or (self.up is None and self.stale):
            return await self._refusing(tag, name)
        if self.up is None:
            try:
                self.up = await self.fe.upstream.connect()
            except UpstreamUnavailable:
                self.reply(tag, UPSTREAM_DOWN)
                return True
        handler = {"LOGIN": self._login, "AUTHENTICATE": self._authenticate, "IDLE": self._idle,
                   "SELECT": self._select, "EXAMINE": self._select, "FETCH": self._fetch, "SEARCH": self._search,
                   "STORE": self._store, "COPY": self._copy, "MOVE": self._copy, "EXPUNGE": self._expunge,
                   "CLOSE": self._expunge, "APPEND": self._append, "CREATE": self._mailbox_op,
                   "DELETE": self._mailbox_op, "SUBSCRIBE": self._mailbox_op, "UNSUBSCRIBE": self._mailbox_op,
                   "RENAME": self._mailbox_op}.get(name)
        needs_mailbox = name in ("FETCH", "SEARCH", "STORE", "COPY", "MOVE", "EXPUNGE", "CLOSE")
        if uid and name not in ("FETCH", "SEARCH", "STORE", "COPY", "MOVE", "EXPUNGE"):
            handler = None
        if self.user and name in ("FETCH", "STORE", "COPY", "MOVE", "EXPUNGE") and \
                (m := FIRST_ARG.match(msg.lines[0])) and b"$" in m.group(1):
            self.reply(tag, "BAD [CANNOT] the saved search result ($) is not available through undo-proxy")
            return True
        if self.user and handler is None and name not in PASS_THROUGH:
            metrics.FRONTEND_ERRORS.labels("imap", "unsupported").inc()
            self.reply(tag, f"NO [CANNOT] {'UID ' if uid else ''}{name} is not available through undo-proxy "
                            f"(it would not be recorded, so it could not be undone)")
            return True
        if handler is None or (needs_mailbox and not self.selected) or \
                (name not in ("LOGIN", "AUTHENTICATE", "IDLE") and not self.user):
            tagged = await self._forward(msg, tag)
            status = tagged.status()
            if name in ("UNSELECT",) and status and status[0] == "OK":
                self.selected = None
            self._send_tagged(tagged)
            return name != "LOGOUT"
        await handler(msg, tag, name, uid, args)
        return True

    async def _refusing(self, tag: str, name: str) -> bool:
        if name == "LOGOUT":
            self.write(b"* BYE undo-proxy: logging out\r\n")
            self.reply(tag, "OK LOGOUT completed")
            return False
        if self.stale and not self.fe.gate.refusing:
            self.write(b"* BYE [UNAVAILABLE] Your mailboxes were restored by an undo cycle; please reconnect\r\n")
            return False
        if name == "CAPABILITY":
            self.write(f"* CAPABILITY {self._local_caps()}\r\n".encode())
            self.reply(tag, "OK CAPABILITY completed")
        elif name == "NOOP":
            self.reply(tag, "OK NOOP completed")
        else:
            metrics.FRONTEND_ERRORS.labels("imap", "cycle-open").inc()
            if self.up is not None and self.user:
                await self.up.close()          # its view of the mailboxes is about to be rewound
                self.up, self.stale = None, True
            self.reply(tag, CYCLE_OPEN)
        return True

    async def _starttls(self, tag: str) -> bool:
        if not self.fe.tls or self.tls_active or self.user:
            self.reply(tag, "BAD STARTTLS is not available")
            return True
        if self.reader._buffer:  # type: ignore[attr-defined]  # plaintext after STARTTLS: injection
            self.reply(tag, "BAD Data after STARTTLS")
            return False
        self.reply(tag, "OK Begin TLS negotiation now")
        await self.flush()
        await self.writer.start_tls(self.fe.tls)
        self.tls_active = True
        return True

    # --- authentication (passed through, never recorded) -------------------------------------------
    async def _login(self, msg: Message, tag: str, name: str, uid: bool, args: list[Any]) -> None:
        tagged = await self._forward(msg, tag)
        if (tagged.status() or ("",))[0] == "OK" and args:
            self.user = text(args[0])
        self._send_tagged(tagged)

    async def _authenticate(self, msg: Message, tag: str, name: str, uid: bool, args: list[Any]) -> None:
        mech = text(args[0]).upper() if args else ""
        if mech not in AUTH_OK:
            self.reply(tag, "NO [CANNOT] Only PLAIN and LOGIN authentication work through undo-proxy")
            return
        assert self.up is not None
        responses = [text(args[1]).encode()] if len(args) > 1 else []
        await self.up.send(msg)
        while True:
            resp = await self.up.read()
            if resp.tag == tag:
                break
            self.write(resp.raw)
            if resp.lines[0].startswith(b"+"):
                await self.flush()
                line = await self.reader.readuntil(b"\r\n")
                responses.append(line.strip())
                await self.up.send_raw(line)
        if (resp.status() or ("",))[0] == "OK":
            self.user = _sasl_user(mech, responses)
        self._send_tagged(resp)

    async def _idle(self, msg: Message, tag: str, name: str, uid: bool, args: list[Any]) -> None:
        assert self.up is not None
        up = self.up

        async def done() -> None:
            line = await self.reader.readuntil(b"\r\n")
            await up.send_raw(line)
        await up.send(msg)
        waiter = asyncio.create_task(done())
        try:
            tagged = await self._relay(tag, timeout=None)
        finally:
            waiter.cancel()
        self._send_tagged(tagged)

    # --- reads --------------------------------------------------------------------------------------
    def _readable(self, tag: str) -> bool:
        if self.fe.committer.healthy:
            return True
        metrics.FRONTEND_ERRORS.labels("imap", "timeline").inc()
        self.reply(tag, TIMELINE_DOWN)
        return False

    def _record_read(self, record: dict[str, Any], output: dict[str, Any]) -> None:
        intent = self.fe.pack.parse(record)
        metrics.VERBS_STARTED.labels("imap").inc()
        # Reads need not be durable before the client sees them: the committer writes them in batches.
        self.fe.committer.record_nowait(NewVerb(
            protocol="imap", frontend=self.fe.cfg.name, verb=intent.verb, targets=intent.targets, mutates=False,
            summary=self.fe.pack.summary(intent.summary, output), request=intent.request, status="committed",
            output=output, time=utcnow()))
        metrics.VERBS.labels("imap", "committed").inc()

    async def _select(self, msg: Message, tag: str, name: str, uid: bool, args: list[Any]) -> None:
        if not args or not self._readable(tag):
            return
        mailbox = mailbox_name(args[0])
        facts: dict[str, int] = {}

        def observe(resp: Message) -> None:
            line = resp.lines[0]
            if m := re.match(rb"\* (\d+) EXISTS", line, re.IGNORECASE):
                facts["exists"] = int(m.group(1))
            elif m := re.match(rb"\* OK \[UIDVALIDITY (\d+)\]", line, re.IGNORECASE):
                facts["uidvalidity"] = int(m.group(1))
        self.selected = None
        tagged = await self._forward(msg, tag, observe)
        status = tagged.status() or ("BAD", "", "")
        self.uids, self.uidvalidity = None, facts.get("uidvalidity")
        if status[0] == "OK":
            self.selected = mailbox
            self.readonly = name == "EXAMINE" or status[1].upper() == "READ-ONLY"
        output = dict(status_output(tagged), exists=facts.get("exists", 0), uidvalidity=facts.get("uidvalidity"))
        self._record_read({"action": "select", "user": self.user, "mailbox": mailbox, "readonly": name == "EXAMINE"},
                          output)
        self._send_tagged(tagged)

    async def _fetch(self, msg: Message, tag: str, name: str, uid: bool, args: list[Any]) -> None:
        if not self._readable(tag):
            return
        m = SET_AND_REST.match(msg.lines[0])
        if not m or msg.literals:
            self._send_tagged(await self._forward(msg, tag))
            return
        spec, items = m.group(1).decode("ascii", "replace"), m.group(2).decode("utf-8", "replace")
        named = await self._name(spec, uid)
        seen: dict[str, dict[str, Any]] = {}

        def observe(resp: Message) -> None:
            if b" FETCH " not in resp.lines[0][:40]:
                return
            parsed = fetch_items(resp)
            if not parsed:
                return
            seq, data = parsed
            who = named.by_uid.get(int(data["UID"])) if "UID" in data else named.by_seq.get(seq)
            if who:
                seen.setdefault(who, {}).update(data)
        tagged = await self._forward(msg, tag, observe)
        output = dict(status_output(tagged), messages={n: content_digest(d) for n, d in seen.items()})
        self._record_read({"action": "fetch", "user": self.user, "mailbox": self.selected, "readonly": self.readonly,
                           "uid": uid, "items": items, "messages": named.refs}, output)
        self._send_tagged(tagged)

    async def _search(self, msg: Message, tag: str, name: str, uid: bool, args: list[Any]) -> None:
        if not self._readable(tag):
            return
        raw = msg.nonsync()
        command = COMMAND.match(raw)
        assert command is not None   # handle() matched it
        criteria = raw[command.end():].strip().decode("latin-1")
        numbers: list[int] = []

        def observe(resp: Message) -> None:
            found = search_numbers(resp)
            if found:
                numbers.extend(found)
        tagged = await self._forward(msg, tag, observe)
        names: list[str] = []
        if numbers and (tagged.status() or ("",))[0] == "OK":
            named = await self._name(compact_set(numbers), uid)
            index = named.by_uid if uid else named.by_seq
            names = [index[n] for n in numbers if n in index]
        output = dict(status_output(tagged), found=names)
        self._record_read({"action": "search", "user": self.user, "mailbox": self.selected,
                           "readonly": self.readonly, "criteria": criteria}, output)
        self._send_tagged(tagged)

    # --- mutations ----------------------------------------------------------------------------------
    async def _mutation(self, msg: Message, tag: str, record: dict[str, Any]) -> None:
        pack, committer = self.fe.pack, self.fe.committer
        intent = pack.parse(record)
        metrics.VERBS_STARTED.labels("imap").inc()
        try:
            async with self.fe.gate.mutation(intent.targets):
                verb = NewVerb(protocol="imap", frontend=self.fe.cfg.name, verb=intent.verb, targets=intent.targets,
                               mutates=True, summary=intent.summary, request=intent.request)
                try:
                    seq = await committer.write(lambda s: Timeline.insert_verb(s, verb))
                except TimelineUnavailable as exc:
                    metrics.FRONTEND_ERRORS.labels("imap", "timeline").inc()
                    log.error("refusing %s: the timeline cannot be written: %s", intent.summary, exc)
                    self.reply(tag, TIMELINE_DOWN)
                    return
                buffer: list[bytes] = []
                expunges: list[Message] = []
                assert self.up is not None
                try:
                    await self.up.send(msg)
                    tagged = await self._relay(tag, lambda r: expunges.append(r) if EXPUNGED.match(r.lines[0])
                                               else None, buffer)
                except UpstreamUnavailable as exc:
                    metrics.VERBS.labels("imap", "failed").inc()
                    await committer.finish_verb(seq, "failed", {"error": str(exc)},
                                                pack.summary(intent.summary, None, f"upstream failed ({exc})"))
                    raise
                output = status_output(tagged, expunges)
                recorded = await committer.finish_verb(seq, "committed", output, pack.summary(intent.summary, output))
                for data in buffer:
                    self.write(data)
                if recorded:
                    metrics.VERBS.labels("imap", "committed").inc()
                    self._send_tagged(tagged)
                else:  # the server did it, but its outcome is not on record: say so instead of OK
                    self.reply(tag, TIMELINE_DOWN)
        except Refused:
            metrics.FRONTEND_ERRORS.labels("imap", "cycle-open").inc()
            self.reply(tag, CYCLE_OPEN)

    def _base(self, action: str, **more: Any) -> dict[str, Any]:
        return {"action": action, "user": self.user, "mailbox": self.selected, **more}

    async def _store(self, msg: Message, tag: str, name: str, uid: bool, args: list[Any]) -> None:
        m = SET_AND_REST.match(msg.lines[0])
        if not m or self.readonly:
            self._send_tagged(await self._forward(msg, tag))
            return
        named = await self._name(m.group(1).decode("ascii", "replace"), uid)
        await self._mutation(msg, tag, self._base("store", messages=named.refs,
                                                  op=m.group(2).decode("utf-8", "replace")))

    async def _copy(self, msg: Message, tag: str, name: str, uid: bool, args: list[Any]) -> None:
        if len(args) < 2 or not isinstance(args[0], str) or (name == "MOVE" and self.readonly):
            self._send_tagged(await self._forward(msg, tag))
            return
        named = await self._name(args[0], uid)
        await self._mutation(msg, tag, self._base(name.lower(), messages=named.refs, dest=mailbox_name(args[1])))

    async def _expunge(self, msg: Message, tag: str, name: str, uid: bool, args: list[Any]) -> None:
        if self.readonly or (uid and not args):
            tagged = await self._forward(msg, tag)
        else:
            spec = f"UID {args[0]} " if uid else ""
            kept, _ = await self._hidden(f"UID SEARCH {spec}DELETED".encode(), lambda r: search_numbers(r) is not None)
            uids = [u for r in kept for u in (search_numbers(r) or [])]
            named = await self._name(compact_set(uids), True) if uids else Named()
            via = "UID EXPUNGE" if uid else name
            await self._mutation(msg, tag, self._base("expunge", messages=named.refs, via=via))
            if name == "CLOSE":
                self.selected = None
            return
        if name == "CLOSE" and (tagged.status() or ("",))[0] == "OK":
            self.selected = None
        self._send_tagged(tagged)

    async def _append(self, msg: Message, tag: str, name: str, uid: bool, args: list[Any]) -> None:
        if len(args) < 2:
            self._send_tagged(await self._forward(msg, tag))   # malformed: the server says BAD
            return
        if not all(isinstance(a, (list, bytes)) for a in args[1:]):
            # Not a plain APPEND (CATENATE, an extension's parts): the proxy could not name the message.
            self.reply(tag, "NO [CANNOT] this form of APPEND is not available through undo-proxy")
            return
        mailbox = mailbox_name(args[0])
        descs: list[dict[str, Any]] = []
        flags: list[str] = []
        date: str | None = None
        rest = args[1:]
        for i, tok in enumerate(rest):
            if isinstance(tok, list):
                flags = [text(f) for f in tok]
            elif i + 1 < len(rest) and isinstance(rest[i + 1], bytes):
                date = text(tok)
            else:
                ref = await asyncio.to_thread(self.fe.blobs.put, tok)
                metrics.BYTES_RECORDED.inc(ref.stored_size if ref.new else 0)
                descs.append(dict(describe(header_of(tok)), flags=flags, date=date, blob=ref.digest, size=len(tok)))
                flags, date = [], None
        assert self.user is not None
        refs = name_refs(self.user, mailbox, descs)
        await self._mutation(msg, tag, {"action": "append", "user": self.user, "mailbox": mailbox, "messages": refs})

    async def _mailbox_op(self, msg: Message, tag: str, name: str, uid: bool, args: list[Any]) -> None:
        if not args or (name == "RENAME" and len(args) < 2):
            self._send_tagged(await self._forward(msg, tag))
            return
        action = {"UNSUBSCRIBE": "subscribe"}.get(name, name.lower())
        record = {"action": action, "user": self.user, "mailbox": mailbox_name(args[0]), "command": name}
        if name == "RENAME":
            record["dest"] = mailbox_name(args[1])
        await self._mutation(msg, tag, record)


def _sasl_user(mech: str, responses: list[bytes]) -> str | None:
    """The user a PLAIN or LOGIN exchange authenticated (authorization id first), never the password."""
    if not responses:
        return None
    try:
        first = base64.b64decode(responses[0] if responses[0] != b"=" else b"", validate=True)
    except (binascii.Error, ValueError):
        return None
    if mech == "LOGIN":
        return first.decode("utf-8", "replace") or None
    parts = first.split(b"\0")
    if len(parts) != 3:
        return None
    return (parts[0] or parts[1]).decode("utf-8", "replace") or None


class ImapFrontendServer:
    def __init__(self, cfg: ImapFrontend, pack: Any, gate: Gate, committer: GroupCommitter, blobs: BlobStore,
                 upstream: ImapUpstream) -> None:
        self.cfg, self.pack, self.gate, self.committer, self.blobs, self.upstream = \
            cfg, pack, gate, committer, blobs, upstream
        self.server: asyncio.base_events.Server | None = None
        self.tls = server_context(self.cfg.tls_cert, self.cfg.tls_key)
        self.sessions: set[asyncio.Task] = set()
        # (user, mailbox, UIDVALIDITY) -> {uid: what names the message}: a UID names one immutable message
        # for as long as UIDVALIDITY holds, except across a rewind, hence the gate's epoch
        self._described: dict[tuple[str, str, int | None], dict[int, dict[str, Any]]] = {}
        self._epoch = gate.epoch

    def described(self, user: str, mailbox: str, uidvalidity: int | None) -> dict[int, dict[str, Any]]:
        if self._epoch != self.gate.epoch or len(self._described) > 10_000:
            self._described.clear()
            self._epoch = self.gate.epoch
        if uidvalidity is None:      # a server that names no UIDVALIDITY: nothing is shared
            return {}
        return self._described.setdefault((user, mailbox, uidvalidity), {})

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        try:
            await ImapSession(self, reader, writer).run()
        finally:
            self.sessions.discard(task)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, self.cfg.listen.host, self.cfg.listen.port,
                                                 limit=LINE_LIMIT, reuse_address=True)
        log.info("imap front-end %s listening on %s, upstream %s", self.cfg.name, self.cfg.listen, self.cfg.upstream)

    async def stop(self) -> None:
        if self.server:
            self.server.close()
        for task in list(self.sessions):
            task.cancel()
