"""The SMTP front-end (aiosmtpd): sockets and parsing only. It never stores and forwards: each MAIL and
RCPT goes to the upstream MTA as the client sends it and the client gets the MTA's own answer; at DATA the
message is recorded as an `smtp.deliver` verb (intent committed) before it is relayed, and the outcome is
committed before the client hears the MTA's reply. So the proxy can never accept mail the MTA then loses.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from storage.blobs import BlobStore
from storage.db import TimelineUnavailable
from storage.timeline import GroupCommitter, NewVerb, Timeline, iso, utcnow
from undo_proxy import metrics
from undo_proxy.config import SmtpFrontend
from undo_proxy.gate import Gate, Refused
from undo_proxy.smtp_upstream import OutcomeUnknown, SmtpUpstream, UpstreamRefused, UpstreamSession, UpstreamUnavailable
from undo_proxy.tls import server_context
from undo_proxy.tracebacks import forget_frames
from verbs.smtp import bare_line_ending, ensure_message_id, subject_of

log = logging.getLogger("undo_proxy.smtp")
CYCLE_OPEN = "451 4.3.0 Service temporarily unavailable (undo cycle in progress); try again later"
UPSTREAM_DOWN = "451 4.4.1 Upstream mail server unavailable; try again later"
TIMELINE_DOWN = "451 4.3.0 Cannot record the message; try again later"
OUTCOME_UNKNOWN = "451 4.4.2 The mail server did not answer after the message; it may have been delivered"


@dataclass
class Transaction:
    """What the proxy knows of one client session."""
    upstream: UpstreamSession | None = None
    replies: dict[str, list[Any]] = field(default_factory=dict)   # every RCPT tried -> upstream reply
    mail_reply: list[Any] | None = None
    in_data: bool = False           # between DATA and the end of its reply
    data_handled: bool = False      # the whole message arrived (handle_DATA ran)
    delivery: asyncio.Task | None = None


class UndoSMTP(SMTP):
    """aiosmtpd's server with two more facts for the handler: DATA started, and the client went away."""

    async def smtp_DATA(self, arg: str) -> None:
        tx = self.event_handler.tx(self.session)
        tx.in_data, tx.data_handled = True, False
        try:
            await super().smtp_DATA(arg)
        except (asyncio.CancelledError, asyncio.IncompleteReadError) as exc:
            # The client went away: in_data stays set so that session_over records the attempt. The frames
            # that read the message (its lines in their locals) are let go of: see forget_frames.
            forget_frames(exc)
            raise
        except BaseException as exc:
            tx.in_data = False
            forget_frames(exc)
            raise
        tx.in_data = False
        if not tx.data_handled and self.envelope is not None and self.envelope.mail_from is None:
            # aiosmtpd refused the data itself (line too long, message too big) and ended the client's
            # transaction: end the upstream one too, or the client's next MAIL would be a nested MAIL there.
            await self.event_handler._reset_upstream(tx)

    def eof_received(self) -> bool | None:
        """The client shut its side. aiosmtpd would end the session at once and drop the commands still
        buffered: a client that pipelines its last commands and QUIT (RFC 2920) and then shuts its side
        would get no answers and no delivery. Read on to the end instead: the session ends at QUIT, or
        when the input runs out (handle_exception)."""
        if self.session is None or self.session.ssl is not None or self._reader is None:
            return super().eof_received()
        self._reader.feed_eof()
        return True  # keep the transport open for the answers

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.IncompleteReadError):  # the input ran out: every command was answered
            if self.transport is not None:
                self.transport.close()
            return "421 4.4.2 Closing: end of input"
        return await super().handle_exception(error)

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        super().connection_lost(error)
        asyncio.get_running_loop().create_task(self.event_handler.session_over(session, self.envelope))


class SmtpHandler:
    def __init__(self, cfg: SmtpFrontend, pack: Any, gate: Gate, committer: GroupCommitter, blobs: BlobStore,
                 upstream: SmtpUpstream) -> None:
        self.cfg, self.pack, self.gate = cfg, pack, gate
        self.committer, self.blobs, self.upstream = committer, blobs, upstream
        self._tx: dict[int, Transaction] = {}

    def tx(self, session: Session) -> Transaction:
        return self._tx.setdefault(id(session), Transaction())

    async def session_over(self, session: Session, envelope: Envelope | None) -> None:
        tx = self._tx.pop(id(session), None)
        if tx is None:
            return
        if tx.delivery is not None:
            await asyncio.wait([tx.delivery])   # the message arrived whole: its delivery finishes
        if tx.in_data and not tx.data_handled and envelope is not None and envelope.mail_from:
            # The client went away in the middle of DATA: nothing is forwarded; the attempt is on record.
            metrics.VERBS.labels("smtp", "aborted").inc()
            intent = self.pack.parse(self._envelope_record(session, envelope, tx, None, "(aborted)", False))
            verb = NewVerb(protocol="smtp", frontend=self.cfg.name, verb=intent.verb, targets=intent.targets,
                           mutates=True, summary=f"{intent.summary} -> aborted: client went away during DATA",
                           request=intent.request, status="aborted", output={"error": "client went away"})
            self.committer.submit_nowait(lambda s: Timeline.insert_verb(s, verb))
        if tx.upstream:
            await tx.upstream.close()

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        tx = self.tx(session)
        if tx.upstream:
            # EHLO ends the client's transaction (RFC 5321 4.1.4) and names the client anew: the upstream
            # session ends with it, and the next MAIL opens one that tells the MTA the new name.
            tx.replies.clear()
            upstream, tx.upstream = tx.upstream, None
            await upstream.close()
        # aiosmtpd reads commands in order from one stream and answers each in turn: pipelining works
        # (RFC 2920), it just is not advertised by aiosmtpd itself.
        return responses[:-1] + ["250-PIPELINING"] + responses[-1:]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if self.gate.refusing:
            return CYCLE_OPEN
        tx = self.tx(session)
        try:
            if tx.upstream is None:
                tx.upstream = await self.upstream.session(session.peer[0], session.host_name)
            reply = await tx.upstream.mail(address, mail_options)
        except UpstreamRefused as exc:   # for good, for this client (its HELO, say): it hears why
            log.info("MAIL from %s: the upstream refused the session: %s", session.peer[0], exc)
            tx.upstream = None
            return exc.reply.line()
        except UpstreamUnavailable as exc:
            metrics.FRONTEND_ERRORS.labels("smtp", "upstream").inc()
            log.warning("MAIL from %s: %s", session.peer[0], exc)
            tx.upstream = None
            return UPSTREAM_DOWN
        if reply.ok:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            tx.replies.clear()
            tx.mail_reply = reply.json()
        return reply.line()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if self.gate.refusing:
            return CYCLE_OPEN
        tx = self.tx(session)
        if tx.upstream is None:
            return "503 5.5.1 Error: need MAIL command"
        try:
            reply = await tx.upstream.rcpt(address, rcpt_options)
        except UpstreamUnavailable:
            tx.upstream = None
            return UPSTREAM_DOWN
        tx.replies[address] = reply.json()
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply.line()

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        tx = self.tx(session)
        tx.replies.clear()
        if tx.upstream:
            await tx.upstream.rset()
        return "250 OK"

    def _envelope_record(self, session: Session, envelope: Envelope, tx: Transaction, message: dict | None,
                         message_id: str, added: bool, subject: str = "") -> dict[str, Any]:
        return {"sender": envelope.mail_from, "mail_options": list(envelope.mail_options),
                "recipients": list(tx.replies) or list(envelope.rcpt_tos), "client": session.peer[0],
                "helo": session.host_name, "message_id": message_id, "message_id_added": added,
                "subject": subject, "message": message, "time": iso(utcnow())}

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        tx = self.tx(session)
        tx.data_handled = True
        content: bytes = envelope.original_content or b""
        if bare_line_ending(content):
            metrics.FRONTEND_ERRORS.labels("smtp", "bare-lf").inc()
            await self._reset_upstream(tx)
            return "554 5.6.0 Message refused: bare CR or LF line endings are not allowed"
        if tx.upstream is None:
            return UPSTREAM_DOWN
        domain = self.cfg.hostname
        message, message_id, added = ensure_message_id(content, domain)
        digest = hashlib.sha256(message).hexdigest() if len(message) < (1 << 20) else \
            await asyncio.to_thread(lambda: hashlib.sha256(message).hexdigest())
        # The blob is made durable while the intent is committed (both before anything is forwarded): one
        # fsync wait instead of two. A crash in between leaves an intent that never became `committed`, so
        # nothing ever replays it.
        stored = asyncio.ensure_future(asyncio.to_thread(self.blobs.put, message))
        stored.add_done_callback(lambda f: f.cancelled() or f.exception())  # failures are handled in _deliver
        record = self._envelope_record(session, envelope, tx,
                                       {"digest": digest, "size": len(message), "stored": True},
                                       message_id, added, subject_of(message))
        intent = self.pack.parse(record)
        metrics.VERBS_STARTED.labels("smtp").inc()
        # Shielded: a client that hangs up after the final dot must not cut the delivery (and the recording
        # of its outcome) in half; session_over waits for it.
        tx.delivery = asyncio.ensure_future(self._gated_delivery(tx, intent, message, stored))
        try:
            return await asyncio.shield(tx.delivery)
        finally:
            if tx.delivery.done():
                tx.delivery = None

    async def _gated_delivery(self, tx: Transaction, intent: Any, message: bytes, stored: asyncio.Future) -> str:
        # Ordered by Message-ID only, not by recipient: deliveries of different messages to one mailbox
        # commute (the MTA queues and delivers them in its own order anyway), and holding a per-recipient
        # lock across a whole SMTP transaction would deliver one message per mailbox at a time.
        try:
            async with self.gate.mutation([intent.request["message_id"]]):
                return await self._deliver(tx, intent, message, stored)
        except Refused:
            await self._reset_upstream(tx)
            return CYCLE_OPEN

    async def _deliver(self, tx: Transaction, intent: Any, message: bytes, stored: asyncio.Future) -> str:
        verb = NewVerb(protocol="smtp", frontend=self.cfg.name, verb=intent.verb, targets=intent.targets,
                       mutates=True, summary=intent.summary, request=intent.request)
        try:
            seq = await self.committer.write(lambda s: Timeline.insert_verb(s, verb))
        except TimelineUnavailable as exc:
            metrics.FRONTEND_ERRORS.labels("smtp", "timeline").inc()
            log.error("refusing %s: the timeline cannot be written: %s", intent.summary, exc)
            await self._reset_upstream(tx)
            return TIMELINE_DOWN
        try:
            ref = await stored
        except OSError as exc:
            metrics.FRONTEND_ERRORS.labels("smtp", "blobs").inc()
            log.error("refusing %s: the message cannot be stored: %s", intent.summary, exc)
            await self.committer.finish_verb(seq, "failed", {"error": f"cannot store the message: {exc}"},
                                             self.pack.summary(intent.summary, None, "not stored"))
            await self._reset_upstream(tx)
            return TIMELINE_DOWN
        metrics.BYTES_RECORDED.inc(ref.stored_size if ref.new else 0)
        assert tx.upstream is not None
        try:
            data = await tx.upstream.data(message)
        except OutcomeUnknown as exc:
            tx.upstream = None
            metrics.VERBS.labels("smtp", "unknown").inc()
            log.warning("%s: the upstream went away after the message was sent (%s): outcome unknown",
                        intent.summary, exc)
            summary = self.pack.summary(intent.summary, None, f"outcome unknown ({exc})")
            await self.committer.finish_verb(
                seq, "unknown", {"error": f"the upstream did not answer after the message: {exc}"}, summary)
            return OUTCOME_UNKNOWN
        except UpstreamUnavailable as exc:
            tx.upstream = None
            metrics.VERBS.labels("smtp", "failed").inc()
            summary = self.pack.summary(intent.summary, None, f"upstream failed ({exc})")
            await self.committer.finish_verb(seq, "failed", {"error": str(exc)}, summary)
            return UPSTREAM_DOWN
        output = {"mail": tx.mail_reply, "rcpt": dict(tx.replies), "data": data.json()}
        if not await self.committer.finish_verb(seq, "committed", output, self.pack.summary(intent.summary, output)):
            # The MTA has the message but its outcome is not on record: say so instead of 250.
            return TIMELINE_DOWN
        metrics.VERBS.labels("smtp", "committed").inc()
        tx.replies.clear()
        return data.line()

    async def _reset_upstream(self, tx: Transaction) -> None:
        tx.replies.clear()
        if tx.upstream:
            await tx.upstream.rset()


class SmtpFrontendServer:
    def __init__(self, cfg: SmtpFrontend, pack: Any, gate: Gate, committer: GroupCommitter, blobs: BlobStore,
                 upstream: SmtpUpstream) -> None:
        self.cfg = cfg
        self.handler = SmtpHandler(cfg, pack, gate, committer, blobs, upstream)
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        tls = server_context(self.cfg.tls_cert, self.cfg.tls_key)
        # aiosmtpd logs every command, sender and recipient at INFO: keep that out of the daemon's log
        # unless the operator asked for it.
        mail_log = logging.getLogger("mail.log")
        if mail_log.level == logging.NOTSET:
            mail_log.setLevel(logging.WARNING)

        def factory() -> UndoSMTP:
            return UndoSMTP(self.handler, hostname=self.cfg.hostname, ident="undo-proxy ESMTP",
                            data_size_limit=self.cfg.max_message_size, enable_SMTPUTF8=True,
                            decode_data=False, tls_context=tls, require_starttls=False,
                            auth_require_tls=True, timeout=300)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(factory, self.cfg.listen.host, self.cfg.listen.port,
                                               reuse_address=True)
        log.info("smtp front-end %s listening on %s, upstream %s", self.cfg.name, self.cfg.listen,
                 self.cfg.upstream)

    async def stop(self) -> None:
        if self.server:
            self.server.close()
