"""The client side of the SMTP front-end: sessions with the upstream MTA (aiosmtplib), with the real
client's address and HELO passed on by XCLIENT so the MTA's relay rules see the real client. Live
traffic, replay and compensation messages all go through here."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import aiosmtplib

log = logging.getLogger("undo_proxy.smtp")
DATA_END_TIMEOUT = 600.0
HELO_NAME = re.compile(r"[A-Za-z0-9.\-\[\]:_]{1,255}")   # what goes on an EHLO line as it is


class UpstreamUnavailable(Exception):
    """The MTA cannot be reached, or dropped the session."""


class UpstreamRefused(UpstreamUnavailable):
    """The MTA refused the session for this client for good (a 5xx to XCLIENT or to the client's HELO): the
    client gets that reply, not a temporary failure to retry for ever."""

    def __init__(self, reply: "Reply") -> None:
        super().__init__(f"{reply.code} {reply.message}")
        self.reply = reply


class OutcomeUnknown(UpstreamUnavailable):
    """The message was on its way when the MTA went away or stopped answering: it may have taken it."""


@dataclass(frozen=True)
class Reply:
    code: int
    message: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def line(self) -> str:
        """As aiosmtpd wants a hook's answer: '250 2.0.0 Ok' (multi-line replies joined)."""
        return f"{self.code} {' '.join(self.message.split())}"

    def json(self) -> list[Any]:
        return [self.code, self.message]


def _xtext(value: str) -> str:
    """RFC 3461 xtext for XCLIENT attribute values."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value)


def xclient_attributes(client_addr: str, helo: str | None) -> list[str]:
    """XCLIENT's attributes for the real client: Postfix wants an IPv6 address marked as such (XCLIENT_README)."""
    addr = f"IPV6:{client_addr}" if ":" in client_addr else client_addr
    attrs = [f"ADDR={_xtext(addr)}", "NAME=[UNAVAILABLE]", "PROTO=ESMTP"]
    if helo:
        attrs.append(f"HELO={_xtext(helo)}")
    return attrs


class UpstreamSession:
    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp

    async def _command(self, *args: bytes) -> Reply:
        try:
            response = await self.smtp.execute_command(*args)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError,
                OSError) as exc:
            raise UpstreamUnavailable(str(exc)) from None
        return Reply(response.code, response.message)

    async def mail(self, sender: str, options: list[str]) -> Reply:
        return await self._command(b"MAIL", f"FROM:<{sender}>".encode(), *[o.encode() for o in options])

    async def rcpt(self, recipient: str, options: list[str]) -> Reply:
        return await self._command(b"RCPT", f"TO:<{recipient}>".encode(), *[o.encode() for o in options])

    async def data(self, message: bytes) -> Reply:
        """DATA and the message. Raises OutcomeUnknown when the MTA went away or did not answer in time once
        the message was on its way: it may have taken it."""
        try:
            # RFC 5321 4.5.3.2.6: a client waits 10 minutes for the reply to the final dot (content filters,
            # milters); giving up sooner tells the client to send again what the MTA may be delivering.
            response = await self.smtp.data(message, timeout=max(self.smtp.timeout or 0, DATA_END_TIMEOUT))
        except aiosmtplib.SMTPDataError as exc:
            return Reply(exc.code, exc.message)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise OutcomeUnknown(str(exc)) from None
        return Reply(response.code, response.message)

    async def rset(self) -> None:
        try:
            await self.smtp.rset()
        except Exception:  # noqa: BLE001 - best effort on a session we are leaving anyway
            self.smtp.close()

    async def close(self) -> None:
        try:
            if self.smtp.is_connected:
                await self.smtp.quit()
        except Exception:  # noqa: BLE001
            self.smtp.close()

    async def transaction(self, sender: str, mail_options: list[str], recipients: list[str],
                          message: bytes) -> dict[str, Any]:
        """MAIL, every RCPT, DATA if any recipient is accepted: the replies as a verb's output."""
        mail = await self.mail(sender, mail_options)
        out: dict[str, Any] = {"mail": mail.json(), "rcpt": {}, "data": None}
        if not mail.ok:
            return out
        accepted = 0
        for rcpt in recipients:
            reply = await self.rcpt(rcpt, [])
            out["rcpt"][rcpt] = reply.json()
            accepted += reply.ok
        if accepted:
            out["data"] = (await self.data(message)).json()
        else:
            await self.rset()
        return out


class SmtpUpstream:
    def __init__(self, host: str, port: int, timeout: float, local_name: str, require_xclient: bool) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.local_name = local_name
        self.require_xclient = require_xclient

    async def start(self) -> None:
        """Check the MTA once: without XCLIENT it would see every client as the proxy (an open relay when
        it trusts the proxy's address)."""
        try:
            session = await self.session(None, None)
        except XclientMissing:
            raise
        except UpstreamUnavailable as exc:
            log.warning("SMTP upstream %s:%d not reachable at start (%s); sessions will retry",
                        self.host, self.port, exc)
            return
        await session.close()

    async def close(self) -> None:
        return None

    async def session(self, client_addr: str | None, client_helo: str | None) -> UpstreamSession:
        smtp = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout,
                               local_hostname=self.local_name, start_tls=False, use_tls=False)
        try:
            await smtp.connect()
            await smtp.ehlo()
            if not smtp.supports_extension("xclient"):
                if self.require_xclient:
                    smtp.close()
                    raise XclientMissing(
                        f"the SMTP upstream {self.host}:{self.port} does not offer XCLIENT to the proxy: it would "
                        f"see every client as the proxy and its relay rules would not hold. Add the proxy's "
                        f"address to Postfix's smtpd_authorized_xclient_hosts, or set allow_without_xclient = "
                        f"true to accept the risk")
            elif client_addr:
                helo = client_helo if client_helo and HELO_NAME.fullmatch(client_helo) else None
                response = await smtp.execute_command(b"XCLIENT", *[a.encode() for a in xclient_attributes(
                    client_addr, helo)])
                if response.code != 220:
                    smtp.close()
                    if 500 <= response.code < 600:
                        raise UpstreamRefused(Reply(response.code, response.message))
                    raise UpstreamUnavailable(f"XCLIENT refused: {response.code} {response.message}")
                # The session starts again after XCLIENT: the EHLO that follows is the one the MTA's HELO
                # checks and Received header see, so it carries the client's name, not the proxy's.
                try:
                    await smtp.ehlo(hostname=helo)
                except aiosmtplib.SMTPHeloError as exc:
                    smtp.close()
                    if 500 <= exc.code < 600:
                        raise UpstreamRefused(Reply(exc.code, exc.message)) from None
                    raise UpstreamUnavailable(f"EHLO refused: {exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise UpstreamUnavailable(f"{self.host}:{self.port}: {exc}") from None
        return UpstreamSession(smtp)


class XclientMissing(UpstreamUnavailable):
    """The MTA does not offer XCLIENT and the config does not accept the risk."""

