"""The `smtp` verb pack: `smtp.deliver`, one mail transaction.

Logical name: the message's Message-ID (the front-end adds one when a message has none), plus the
recipients' addresses. The request is the envelope and the exact message bytes (a blob); the output is
the upstream's reply to MAIL, to each RCPT and to DATA.
"""
from __future__ import annotations

import re
import uuid
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from verbs.base import CompensationResult, Finding, Intent, RecordedVerb, ReplayContext, ReplayResult

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)\r\n", re.IGNORECASE | re.MULTILINE)
_SUBJECT = re.compile(rb"^subject:[ \t]*(.*(?:\r\n[ \t].*)*)\r\n", re.IGNORECASE | re.MULTILINE)

DEFAULT_TEMPLATE = """\
{% if kind == "now-fails" -%}
Your message {{ message_id }}{% if subject %} ("{{ subject }}"){% endif %}, sent {{ time }},
was accepted for {{ recipient }} at the time. The mail service has since been repaired
after a fault, and on re-examination the message is now refused for that recipient:

    {{ reply }}

The message has not been delivered to {{ recipient }}. Please contact the recipient by
other means if it matters.
{%- else -%}
A message {{ message_id }}{% if subject %} ("{{ subject }}"){% endif %} from {{ sender }},
sent {{ time }}, was refused or lost for you at the time. The mail service has since been
repaired after a fault, and the message has now been delivered to your mailbox.
It may appear out of order.
{%- endif %}

-- 
The postmaster ({{ postmaster }})
"""


def header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message[: end + 2] if end >= 0 else message


def message_id_of(message: bytes) -> str | None:
    match = _MESSAGE_ID.search(header_block(message))
    if not match:
        return None
    value = b" ".join(match.group(1).split()).decode("utf-8", "replace").strip()
    return value or None


def decoded_subject(header: bytes, pattern: re.Pattern[bytes] = _SUBJECT) -> str:
    """The Subject of a header block, RFC 2047 encoded-words decoded ("" when there is none)."""
    match = pattern.search(header)
    if not match:
        return ""
    from email.header import decode_header, make_header
    raw = b" ".join(match.group(1).split()).decode("utf-8", "replace")
    try:
        return str(make_header(decode_header(raw)))
    except Exception:  # noqa: BLE001 - a broken encoded-word is shown as it is
        return raw


def subject_of(message: bytes) -> str:
    return decoded_subject(header_block(message))


def ensure_message_id(message: bytes, domain: str) -> tuple[bytes, str, bool]:
    """The message with a Message-ID (added at the top when missing), the id, and whether it was added."""
    existing = message_id_of(message)
    if existing:
        return message, existing, False
    new = f"<{uuid.uuid4().hex}@{domain}>"
    return f"Message-ID: {new}\r\n".encode() + message, new, True


def bare_line_ending(message: bytes) -> bool:
    """A lone LF or CR: the end-of-data smuggling tricks (<LF>.<CR><LF> and friends) rely on them."""
    crlf = message.count(b"\r\n")   # every LF and every CR is part of a CRLF pair, or there is a lone one
    return message.count(b"\n") != crlf or message.count(b"\r") != crlf


class SmtpPack:
    name = "smtp"
    protocol = "smtp"

    def parse(self, envelope: dict[str, Any]) -> Intent:
        """envelope: sender, mail_options, recipients (every RCPT tried), client, helo, message_id,
        message_id_added, message (blob ref), subject."""
        targets = [envelope["message_id"]] + [r.lower() for r in envelope["recipients"]]
        return Intent(verb="smtp.deliver", targets=targets, mutates=True,
                      summary=f"deliver {envelope['message_id']} from <{envelope['sender']}> to "
                              f"{', '.join(envelope['recipients'][:3])}"
                              f"{' …' if len(envelope['recipients']) > 3 else ''}",
                      request=envelope)

    def summary(self, intent_summary: str, output: dict[str, Any] | None, error: str | None = None) -> str:
        if error:
            return f"{intent_summary} -> {error}"
        if not output:
            return intent_summary
        accepted = sum(1 for code, _ in output["rcpt"].values() if 200 <= code < 300)
        data = output.get("data")
        return f"{intent_summary} -> {accepted}/{len(output['rcpt'])} accepted, " \
               f"{data[0] if data else 'no'} DATA"

    @staticmethod
    def delivered_to(output: dict[str, Any] | None) -> dict[str, tuple[bool, str]]:
        """Recipient -> (accepted for delivery?, reply), from a transaction's replies."""
        if not output:
            return {}
        data = output.get("data")
        data_ok = bool(data) and 200 <= data[0] < 300
        result = {}
        for rcpt, (code, message) in output.get("rcpt", {}).items():
            ok = 200 <= code < 300 and data_ok
            result[rcpt] = (ok, f"{data[0]} {data[1]}" if ok or (200 <= code < 300 and data)
                            else f"{code} {message}")
        return result

    def check(self, original: RecordedVerb, replayed: dict[str, Any]) -> Finding | None:
        before, now = self.delivered_to(original.output), self.delivered_to(replayed)
        fails = [r for r, (ok, _) in before.items() if ok and not now.get(r, (False, ""))[0]]
        succeeds = [r for r, (ok, _) in now.items() if ok and not before.get(r, (False, ""))[0]]
        mid = original.request.get("message_id")
        if fails:
            return Finding("now-fails", f"{mid}: accepted for {', '.join(fails)} at the time, refused now: "
                                        f"{now.get(fails[0], (False, 'no reply'))[1]}")
        if succeeds:
            return Finding("now-succeeds", f"{mid}: refused for {', '.join(succeeds)} at the time "
                                           f"({before.get(succeeds[0], (False, 'no reply'))[1]}), delivered now")
        return None

    def conflicts(self, a: list[str], b: list[str]) -> bool:
        return bool(set(a) & set(b))

    async def replay(self, verb: RecordedVerb, ctx: ReplayContext) -> ReplayResult:
        from undo_proxy.smtp_upstream import UpstreamUnavailable
        req = verb.request
        message = ctx.blobs.read(req["message"]["digest"])
        summary = verb.summary.split(" -> ")[0]
        try:
            session = await ctx.upstream.session(req.get("client"), req.get("helo"))
            try:
                output = await session.transaction(req["sender"], req.get("mail_options", []), req["recipients"],
                                                   message)
            finally:
                await session.close()
        except UpstreamUnavailable as exc:
            return ReplayResult("failed", {"error": str(exc)}, f"{summary} -> upstream failed", req)
        return ReplayResult("committed", output, self.summary(summary, output), req)

    def explanation(self, inconsistency: dict[str, Any], verb: RecordedVerb, settings: Any) -> EmailMessage:
        """The explanatory message for an inconsistency (template: settings.compensation_template)."""
        req = verb.request
        fails = inconsistency["kind"] == "now-fails"
        detail = inconsistency["detail"]
        recipients = [r for r in req["recipients"] if r in detail] or req["recipients"]
        to = req["sender"] if fails else recipients[0]
        template_path = getattr(settings, "compensation_template", None)
        env = Environment(undefined=StrictUndefined, autoescape=select_autoescape([]),
                          loader=FileSystemLoader(str(template_path.parent)) if template_path else None)
        template = env.get_template(template_path.name) if template_path else env.from_string(DEFAULT_TEMPLATE)
        reply = detail.split("refused now: ", 1)[-1] if fails else ""
        body = template.render(kind=inconsistency["kind"], message_id=req["message_id"], subject=req.get("subject", ""),
                               sender=req["sender"], recipient=", ".join(recipients), reply=reply,
                               time=verb.time or "", postmaster=settings.postmaster, detail=detail)
        msg = EmailMessage()
        msg["From"] = settings.postmaster
        msg["To"] = to
        msg["Subject"] = ("Undelivered after repair: " if fails else "Delivered late: ") + \
                         (req.get("subject") or req["message_id"])
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain=settings.postmaster.rsplit("@", 1)[-1])
        msg["Auto-Submitted"] = "auto-generated"
        msg["References"] = req["message_id"]
        msg.set_content(body)
        return msg

    async def compensate(self, inconsistency: dict[str, Any], verb: RecordedVerb,
                         frontend: Any) -> CompensationResult:
        """Send the explanatory message through the upstream to the affected party."""
        from undo_proxy.smtp_upstream import UpstreamUnavailable
        settings, upstream = frontend.settings, frontend.upstream
        msg = self.explanation(inconsistency, verb, settings)
        data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
        try:
            session = await upstream.session(None, None)
            try:
                out = await session.transaction(settings.postmaster, [], [msg["To"]], data)
            finally:
                await session.close()
        except UpstreamUnavailable as exc:
            return CompensationResult("failed", f"the MTA is unreachable: {exc}")
        ok = self.delivered_to(out).get(msg["To"], (False, ""))
        if ok[0]:
            return CompensationResult("done", f"explanation {msg['Message-ID']} sent to {msg['To']}")
        return CompensationResult("failed", f"the MTA refused the explanation to {msg['To']}: {ok[1]}")
