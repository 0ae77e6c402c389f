"""The SMTP front-end before a REAL Postfix (tests/mail.py), through the real daemon: delivery and what is
recorded, per-recipient replies, XCLIENT and relaying, smuggling and limits, the open cycle, and the two
undo scenarios (a DISCARD rule undone; a repair that changes who gets mail -> inconsistencies ->
explanatory messages)."""
from __future__ import annotations

import asyncio
import base64
import email
import json
import smtplib
import socket
import subprocess
import time
import uuid
from email.message import EmailMessage
from email.policy import SMTPUTF8
from pathlib import Path
from typing import Any

import pytest

from storage.blobs import BlobStore
from tests.backends import free_port, wait_port
from tests.daemon import TOKEN, UNDO_PROXY
from tests.mail import DOMAIN, POSTMASTER, SMALL_LIMIT, MailStack, Postfix, header_value, strip_trace

ALICE, BOB, CAROL, DAVE = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol", "dave"))


@pytest.fixture(autouse=True)
def _fresh_postfix(postfix: Postfix) -> None:
    """Every test starts from the default mailboxes and empty checks, with nothing queued."""
    postfix.reset()
    postfix.wait_queue_empty()


def tag() -> str:
    return uuid.uuid4().hex[:8]


# --------------------------------------------------------------------------- clients and look-ups

class Raw:
    """A raw SMTP client socket: exact bytes out, replies in."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        code, _ = self.reply()
        assert code == 220

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; got {lines!r} {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(x[4:] for x in lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def simple_message(subject: str, body: str = "hello\r\n", mid: str | None = None, sender: str = BOB,
                   to: str = ALICE) -> bytes:
    head = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Thu, 03 Dec 2026 16:20:00 +0000\r\n"
    if mid:
        head += f"Message-ID: {mid}\r\n"
    return (head + "\r\n" + body).encode()


def smtp_send(port: int, sender: str, rcpts: list[str], message: bytes, **kw: Any) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        return s.sendmail(sender, rcpts, message, **kw)


def smtp_verbs(stack: MailStack) -> list[dict[str, Any]]:
    """The SMTP verbs on the timeline (admin API: the CLI costs a process per call)."""
    status, verbs = stack.api("GET", "/api/timeline?protocol=smtp&limit=100000")
    assert status == 200, verbs
    return verbs


def show(stack: MailStack, seq: int) -> dict[str, Any]:
    status, verb = stack.api("GET", f"/api/verbs/{seq}")
    assert status == 200, verb
    return verb


def verbs_for(stack: MailStack, message_id: str) -> list[dict[str, Any]]:
    return [v for v in smtp_verbs(stack) if v["targets"] and v["targets"][0] == message_id]


def only_verb(stack: MailStack, message_id: str, status: str = "committed") -> dict[str, Any]:
    found = verbs_for(stack, message_id)
    assert len(found) == 1, found
    assert found[0]["status"] == status, found[0]
    return show(stack, found[0]["seq"])


def blob(stack: MailStack, digest: str) -> bytes:
    return BlobStore(stack.workdir / "state" / "blobs").read(digest)


def smuggle_free(stack: MailStack, postfix: Postfix, subject: str, mid: str) -> None:
    """Nothing with this Subject was delivered and no verb for this Message-ID committed."""
    postfix.wait_queue_empty()
    assert postfix.count("alice", subject) == 0
    assert not [v for v in verbs_for(stack, mid) if v["status"] == "committed"]


# --------------------------------------------------------------------------- delivery and recording

def test_smtplib_utf8_attachment_delivered_recorded_and_stored(smtp_stack: MailStack, postfix: Postfix) -> None:
    t = tag()
    subject = f"Grüße aus Köln — 日本語 {t}"
    msg = EmailMessage(policy=SMTPUTF8)
    msg["From"] = f"Jürgen <jürgen@{DOMAIN}>"
    msg["To"] = ALICE
    msg["Subject"] = subject
    msg["Message-ID"] = f"<utf8-{t}@client.test>"
    msg["Date"] = "Thu, 03 Dec 2026 16:20:00 +0000"
    msg.set_content("Schöne Grüße, ça va? 😀 Ünïcödé body\n", cte="8bit")
    msg.add_attachment(bytes(range(256)) * 40, maintype="application", subtype="octet-stream",
                       filename="blob.bin")
    sent = msg.as_bytes(policy=SMTPUTF8.clone(linesep="\r\n"))
    with smtplib.SMTP("127.0.0.1", smtp_stack.smtp_port, timeout=20) as s:
        s.ehlo("client.test")
        assert s.has_extn("smtputf8") and s.has_extn("8bitmime") and s.has_extn("pipelining")
        refused = s.sendmail(f"jürgen@{DOMAIN}", [ALICE], sent, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    assert refused == {}
    [delivered] = postfix.wait_for("alice", subject)
    assert strip_trace(delivered) == sent                     # byte for byte what the client sent
    [verb] = verbs_for(smtp_stack, f"<utf8-{t}@client.test>")
    shown = smtp_stack.cli_json("show", str(verb["seq"]))          # the CLI, as an operator would
    assert shown["status"] == "committed" and shown["verb"] == "smtp.deliver"
    assert shown["mutates"] is True and shown["origin"] == "live"
    assert shown["targets"] == [f"<utf8-{t}@client.test>", ALICE]
    req = shown["request"]
    assert req["sender"] == f"jürgen@{DOMAIN}" and req["recipients"] == [ALICE]
    assert req["message_id_added"] is False and req["subject"] == subject
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(req["mail_options"])
    assert blob(smtp_stack, req["message"]["digest"]) == sent
    out = shown["output"]
    assert out["rcpt"][ALICE][0] == 250 and out["data"][0] == 250


def test_swaks_attachment(smtp_stack: MailStack, postfix: Postfix, tmp_path: Path) -> None:
    t = tag()
    subject = f"swaks Bericht für Jürgen {t}"
    attachment = tmp_path / "report.pdf"
    attachment.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 20)
    res = subprocess.run(["swaks", "--server", f"127.0.0.1:{smtp_stack.smtp_port}", "--from", BOB, "--to", ALICE,
                          "--header", f"Subject: {subject}", "--body", "Anbei der Bericht, schöne Grüße\n",
                          "--attach-type", "application/pdf", "--attach", f"@{attachment}"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    [delivered] = postfix.wait_for("alice", subject)
    mid = header_value(delivered, "Message-Id")
    shown = only_verb(smtp_stack, mid)
    assert shown["verb"] == "smtp.deliver" and shown["targets"] == [mid, ALICE]
    assert shown["request"]["message_id_added"] is False and shown["request"]["subject"] == subject
    stored = blob(smtp_stack, shown["request"]["message"]["digest"])
    assert strip_trace(delivered) == stored
    parts = [p for p in email.message_from_bytes(stored).walk() if p.get_filename() == "report.pdf"]
    assert base64.b64decode(parts[0].get_payload()) == attachment.read_bytes()
    assert "schöne Grüße".encode() in stored


def test_message_id_added_when_missing(smtp_stack: MailStack, postfix: Postfix) -> None:
    t = tag()
    sent = simple_message(f"no id {t}")
    smtp_send(smtp_stack.smtp_port, BOB, [ALICE], sent)
    [delivered] = postfix.wait_for("alice", f"no id {t}")
    mid = header_value(delivered, "Message-ID")          # the added id is in the delivered copy
    assert mid and mid.startswith("<") and mid.endswith("@proxy.example.test>")
    shown = only_verb(smtp_stack, mid)
    assert shown["targets"] == [mid, ALICE]
    assert shown["request"]["message_id_added"] is True and shown["request"]["message_id"] == mid
    stored = blob(smtp_stack, shown["request"]["message"]["digest"])
    assert stored == f"Message-ID: {mid}\r\n".encode() + sent
    assert strip_trace(delivered) == stored


def test_8bit_binary_content_stored_and_delivered_exactly(smtp_stack: MailStack, postfix: Postfix) -> None:
    t = tag()
    mid = f"<bin-{t}@client.test>"
    raw = bytes(b for b in range(1, 256) if b not in (10, 13))   # every octet but CR, LF (and NUL)
    body = b"".join(raw[i:i + 60] + b"\r\n" for i in range(0, len(raw), 60)) * 3
    message = simple_message(f"binary {t}", mid=mid).replace(b"hello\r\n", b"") + body
    smtp_send(smtp_stack.smtp_port, BOB, [ALICE], message, mail_options=["BODY=8BITMIME"])
    [delivered] = postfix.wait_for("alice", f"binary {t}")
    assert strip_trace(delivered) == message
    shown = only_verb(smtp_stack, mid)
    assert blob(smtp_stack, shown["request"]["message"]["digest"]) == message


# --------------------------------------------------------------------------- per-recipient replies

def test_per_recipient_replies_are_postfixs_own(smtp_stack: MailStack, postfix: Postfix) -> None:
    t = tag()
    unknown = f"nobody-{t}@{DOMAIN}"

    def rcpts(port: int) -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.ehlo("client.test")
            assert s.mail(BOB)[0] == 250
            out = [s.rcpt(ALICE), s.rcpt(unknown)]
            s.rset()
            return out

    direct, proxied = rcpts(postfix.port), rcpts(smtp_stack.smtp_port)
    assert proxied == direct
    assert proxied[0][0] == 250 and proxied[1][0] == 550 and b"User unknown" in proxied[1][1]
    mid = f"<mixed-{t}@client.test>"
    refused = smtp_send(smtp_stack.smtp_port, BOB, [ALICE, unknown], simple_message(f"mixed {t}", mid=mid))
    assert refused == {unknown: direct[1]}
    postfix.wait_for("alice", f"mixed {t}")
    shown = only_verb(smtp_stack, mid)
    assert shown["targets"] == [mid, ALICE, unknown]
    assert shown["output"]["rcpt"][ALICE][0] == 250 and shown["output"]["rcpt"][unknown][0] == 550


def test_150_pipelined_recipients(smtp_stack: MailStack, postfix: Postfix) -> None:
    t = tag()
    bad = {7, 50, 99, 120, 149}
    users = [f"p{i}-{t}" for i in range(150)]
    postfix.set_mailboxes("alice", "bob", "carol", *[f"{u}=pile-{t}" for i, u in enumerate(users) if i not in bad])
    mid = f"<pipe-{t}@client.test>"
    with Raw(smtp_stack.smtp_port) as c:
        code, text = c.cmd("EHLO client.test")
        assert code == 250 and "PIPELINING" in text
        batch = [f"MAIL FROM:<{BOB}>"] + [f"RCPT TO:<{u}@{DOMAIN}>" for u in users] + ["DATA"]
        c.send("".join(line + "\r\n" for line in batch).encode())        # all at once
        replies = [c.reply() for _ in batch]
        assert replies[0][0] == 250
        codes = [code for code, _ in replies[1:-1]]
        assert codes == [550 if i in bad else 250 for i in range(150)]
        assert replies[-1][0] == 354
        c.send(simple_message(f"pile {t}", mid=mid) + b".\r\n")
        assert c.reply()[0] == 250
        c.cmd("QUIT")
    postfix.wait_for(f"pile-{t}", f"pile {t}", count=145)
    shown = only_verb(smtp_stack, mid)
    assert len(shown["output"]["rcpt"]) == 150


# --------------------------------------------------------------------------- relaying and XCLIENT

def test_no_open_relay_through_the_proxy(smtp_stack: MailStack, postfix: Postfix) -> None:
    with Raw(smtp_stack.smtp_port, source="127.0.0.2") as c:
        assert c.cmd("EHLO outsider.test")[0] == 250
        assert (got := c.cmd(f"MAIL FROM:<{BOB}>"))[0] == 250, got
        code, text = c.cmd("RCPT TO:<victim@outside.test>")
        assert code == 554 and "Relay access denied" in text, (code, text)
        assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250          # local delivery from outside is fine
    # the same relay attempt from 127.0.0.1 (in mynetworks) is accepted at RCPT: XCLIENT made the difference
    with Raw(smtp_stack.smtp_port) as c:
        c.cmd("EHLO insider.test")
        c.cmd(f"MAIL FROM:<{BOB}>")
        assert c.cmd("RCPT TO:<victim@outside.test>")[0] == 250
        c.cmd("RSET")
    assert "client=unknown[127.0.0.2]" in postfix.maillog.read_text() or \
        "from unknown[127.0.0.2]" in postfix.maillog.read_text()
    res = subprocess.run(["swaks", "--server", f"127.0.0.1:{smtp_stack.smtp_port}", "--from", BOB,
                          "--to", "someone@outside.test", "--local-interface", "127.0.0.2"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 24, res.stdout          # swaks: the RCPT was refused


class _FakeMta:
    """An aiosmtpd upstream (no XCLIENT) in a thread: it keeps what it receives, and answers the final dot with
    `at_end(server)` (250 at once by default)."""

    def __init__(self, at_end: Any = None) -> None:
        from aiosmtpd.controller import Controller

        self.received: list[bytes] = []
        outer = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                outer.received.append(envelope.original_content)
                return await at_end(server) if at_end else "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> "_FakeMta":
        self.controller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.controller.stop()


def _config(tmp_path: Path, upstream_port: int, smtp_port: int, extra: str = "") -> Path:
    cfg = tmp_path / "undo-proxy.toml"
    (tmp_path / "vol").mkdir(exist_ok=True)
    (tmp_path / "snaps").mkdir(exist_ok=True)
    cfg.write_text(f'''[state]
dir = "{tmp_path / 'state'}"
[snapshots]
backend = "copy"
volume = "{tmp_path / 'vol'}"
store = "{tmp_path / 'snaps'}"
every = "0"
[admin]
listen = "127.0.0.1:{free_port()}"
token = "{TOKEN}"
[[smtp]]
name = "mail"
listen = "127.0.0.1:{smtp_port}"
upstream = "127.0.0.1:{upstream_port}"
{extra}
''')
    subprocess.run([UNDO_PROXY, "db", "upgrade", "-c", str(cfg)], check=True, capture_output=True, timeout=60)
    return cfg


def test_upstream_without_xclient_refuses_to_start(tmp_path: Path) -> None:
    with _FakeMta() as up:
        cfg = _config(tmp_path, up.port, free_port())
        res = subprocess.run([UNDO_PROXY, "serve", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert "XCLIENT" in res.stderr and "allow_without_xclient" in res.stderr


def test_upstream_without_xclient_allowed_when_configured(tmp_path: Path) -> None:
    with _FakeMta() as up:
        port = free_port()
        cfg = _config(tmp_path, up.port, port, "allow_without_xclient = true")
        proc = subprocess.Popen([UNDO_PROXY, "serve", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_port(port, proc=proc)
            smtp_send(port, BOB, [ALICE], simple_message("no xclient", mid="<nox@client.test>"))
            assert up.received == [simple_message("no xclient", mid="<nox@client.test>")]
        finally:
            proc.terminate()
            proc.wait(15)


def _one_message_through(tmp_path: Path, at_end: Any, extra: str, mid: str) -> tuple[tuple[int, str], list[dict]]:
    """Send one message through a proxy before a _FakeMta: the client's final reply and the smtp.deliver verbs."""
    with _FakeMta(at_end) as mta:
        port = free_port()
        cfg = _config(tmp_path, mta.port, port, "allow_without_xclient = true\n" + extra)
        proc = subprocess.Popen([UNDO_PROXY, "serve", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_port(port, proc=proc)
            with Raw(port) as c:
                c.cmd("EHLO client.test")
                c.cmd(f"MAIL FROM:<{BOB}>")
                c.cmd(f"RCPT TO:<{ALICE}>")
                assert c.cmd("DATA")[0] == 354
                c.send(simple_message(f"through {mid}", mid=mid) + b".\r\n")
                reply = c.reply()
            out = subprocess.run([UNDO_PROXY, "timeline", "--json", "-c", str(cfg)], capture_output=True,
                                 text=True, check=True)
            return reply, [v for v in json.loads(out.stdout) if v["verb"] == "smtp.deliver"]
        finally:
            proc.terminate()
            proc.wait(15)


def test_a_slow_answer_to_the_final_dot_is_waited_for_not_timed_out(tmp_path: Path) -> None:
    """Content filters take their time after the final dot: RFC 5321 gives them 10 minutes. The upstream
    timeout (1 s here) is not the wait for that answer, or the client would send again what the MTA took."""
    async def slow(server: Any) -> str:
        await asyncio.sleep(3)
        return "250 2.0.0 Ok: queued after a while"
    reply, [verb] = _one_message_through(tmp_path, slow, 'timeout = "1s"', "<slow@client.test>")
    assert reply == (250, "2.0.0 Ok: queued after a while")
    assert verb["status"] == "committed"


def test_an_mta_gone_after_the_final_dot_leaves_the_outcome_unknown(tmp_path: Path) -> None:
    """The MTA may have taken the message: the verb says `unknown`, not `failed` (which would tell replay and
    the operator that nothing was delivered); the client hears a temporary failure that says so."""
    async def vanish(server: Any) -> str:
        server.transport.abort()
        return "250 never heard"
    (code, text), [verb] = _one_message_through(tmp_path, vanish, "", "<gone@client.test>")
    assert code == 451 and "may have been delivered" in text
    assert verb["status"] == "unknown" and "outcome unknown" in verb["summary"]


def test_postfix_sees_the_clients_helo_and_a_second_ehlo_ends_both_transactions(smtp_stack: MailStack,
                                                                                postfix: Postfix) -> None:
    t = tag()
    with Raw(smtp_stack.smtp_port) as c:
        assert c.cmd(f"EHLO insider-{t}.test")[0] == 250
        assert (got := c.cmd(f"MAIL FROM:<{BOB}>"))[0] == 250, got
        assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert c.cmd(f"EHLO again-{t}.test")[0] == 250       # ends the transaction (RFC 5321 4.1.4)
        assert c.cmd(f"MAIL FROM:<{BOB}>")[0] == 250, "Postfix's transaction ended too: no nested MAIL"
        assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(simple_message(f"helo {t}") + b".\r\n")
        assert c.reply()[0] == 250
    [delivered] = postfix.wait_for("alice", f"helo {t}")
    assert f"from again-{t}.test".encode() in delivered, delivered[:400]
    with Raw(smtp_stack.smtp_port) as c:     # a name no EHLO line could carry: Postfix hears the proxy's
        assert c.cmd("EHLO weird|name!")[0] == 250
        assert (got := c.cmd(f"MAIL FROM:<{BOB}>"))[0] == 250, got


def test_xclient_names_an_ipv6_client_as_postfix_wants_it() -> None:
    from undo_proxy.smtp_upstream import xclient_attributes
    assert xclient_attributes("::1", "client.test") == ["ADDR=IPV6:::1", "NAME=[UNAVAILABLE]", "PROTO=ESMTP",
                                                        "HELO=client.test"]
    assert xclient_attributes("192.0.2.7", None) == ["ADDR=192.0.2.7", "NAME=[UNAVAILABLE]", "PROTO=ESMTP"]


# --------------------------------------------------------------------------- smuggling and limits

@pytest.mark.parametrize("trick", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n"], ids=["LF.CRLF", "CRLF.LF", "LF.LF",
                                                                                         "CR.CRLF"])
def test_end_of_data_smuggling_is_rejected(smtp_stack: MailStack, postfix: Postfix, trick: bytes) -> None:
    t = tag()
    mid, smuggled_mid = f"<outer-{t}@client.test>", f"<smuggled-{t}@client.test>"
    with Raw(smtp_stack.smtp_port) as c:
        c.cmd("EHLO client.test")
        assert (got := c.cmd(f"MAIL FROM:<{BOB}>"))[0] == 250, got
        assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(simple_message(f"outer {t}", mid=mid) + b"innocent" + trick +
               f"MAIL FROM:<{BOB}>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode() +
               simple_message(f"smuggled {t}", mid=smuggled_mid) + b".\r\n")
        code, text = c.reply()
        assert 500 <= code < 600, (code, text)
        # the session goes on: the smuggled commands were data, not commands
        assert (got := c.cmd(f"MAIL FROM:<{BOB}>"))[0] == 250, got
        assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(simple_message(f"after {t}", mid=f"<after-{t}@client.test>") + b".\r\n")
        assert c.reply()[0] == 250
    postfix.wait_for("alice", f"after {t}")
    smuggle_free(smtp_stack, postfix, f"outer {t}", mid)
    smuggle_free(smtp_stack, postfix, f"smuggled {t}", smuggled_mid)


def test_dot_stuffed_lines_arrive_as_meant(smtp_stack: MailStack, postfix: Postfix) -> None:
    t = tag()
    mid = f"<dots-{t}@client.test>"
    meant_body = b".\r\n..\r\n.x\r\n...\r\nend. \r\n .\r\n"
    stuffed = b"..\r\n...\r\n..x\r\n....\r\nend. \r\n .\r\n"
    with Raw(smtp_stack.smtp_port) as c:
        c.cmd("EHLO client.test")
        c.cmd(f"MAIL FROM:<{BOB}>")
        c.cmd(f"RCPT TO:<{ALICE}>")
        assert c.cmd("DATA")[0] == 354
        c.send(simple_message(f"dots {t}", body="", mid=mid) + stuffed + b".\r\n")
        assert c.reply()[0] == 250
    [delivered] = postfix.wait_for("alice", f"dots {t}")
    meant = simple_message(f"dots {t}", body="", mid=mid) + meant_body
    assert strip_trace(delivered) == meant
    assert blob(smtp_stack, only_verb(smtp_stack, mid)["request"]["message"]["digest"]) == meant


def _data_then(c: Raw, payload: bytes) -> tuple[int, str]:
    c.cmd("EHLO client.test")
    assert c.cmd(f"MAIL FROM:<{BOB}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(payload + b".\r\n")
    return c.reply()


def _session_still_works(c: Raw, postfix: Postfix, subject: str) -> None:
    assert c.cmd(f"MAIL FROM:<{BOB}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(simple_message(subject) + b".\r\n")
    assert c.reply()[0] == 250
    postfix.wait_for("alice", subject)


def test_line_over_1000_chars_gets_500(smtp_stack: MailStack, postfix: Postfix) -> None:
    t = tag()
    mid = f"<long-{t}@client.test>"
    with Raw(smtp_stack.smtp_port) as c:
        code, text = _data_then(c, simple_message(f"long {t}", body="x" * 1001 + "\r\nend\r\n", mid=mid))
        assert code == 500, (code, text)
        _session_still_works(c, postfix, f"after long {t}")
    smuggle_free(smtp_stack, postfix, f"long {t}", mid)
    # exactly 998 characters + CRLF is allowed
    mid_ok = f"<long-ok-{t}@client.test>"
    with Raw(smtp_stack.smtp_port) as c:
        assert _data_then(c, simple_message(f"long ok {t}", body="y" * 998 + "\r\n", mid=mid_ok))[0] == 250
    postfix.wait_for("alice", f"long ok {t}")


def test_message_over_size_gets_552(smtp_stack: MailStack, postfix: Postfix) -> None:
    t = tag()
    mid = f"<big-{t}@client.test>"
    body = ("z" * 70 + "\r\n") * (SMALL_LIMIT // 72 + 10)
    with Raw(smtp_stack.small_port) as c:
        code, text = c.cmd("EHLO client.test")
        assert f"SIZE {SMALL_LIMIT}" in text
        code, text = _data_then(c, simple_message(f"big {t}", body=body, mid=mid))
        assert code == 552, (code, text)
        _session_still_works(c, postfix, f"after big {t}")
    smuggle_free(smtp_stack, postfix, f"big {t}", mid)
    # a declared SIZE over the limit is refused at MAIL
    with Raw(smtp_stack.small_port) as c:
        c.cmd("EHLO client.test")
        assert c.cmd(f"MAIL FROM:<{BOB}> SIZE={SMALL_LIMIT + 1}")[0] == 552


def test_client_gone_mid_data_leaves_aborted_verb(smtp_stack: MailStack, postfix: Postfix) -> None:
    t = tag()
    sender = f"cut-{t}@sender.test"
    c = Raw(smtp_stack.smtp_port)
    c.cmd("EHLO client.test")
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(simple_message(f"cut {t}", mid=f"<cut-{t}@client.test>", sender=sender) + b"half a line")
    time.sleep(0.2)
    c.close()
    deadline = time.monotonic() + 10
    while True:
        mine = [v for v in smtp_verbs(smtp_stack) if sender in v["summary"]]
        if mine:
            break
        assert time.monotonic() < deadline, "no verb for the cut session"
        time.sleep(0.1)
    assert [v["status"] for v in mine] == ["aborted"], mine
    assert mine[0]["verb"] == "smtp.deliver" and mine[0]["mutates"] is True
    postfix.wait_queue_empty()
    assert postfix.count("alice", f"cut {t}") == 0


def test_client_gone_after_the_final_dot_still_delivered_and_recorded(smtp_stack: MailStack,
                                                                       postfix: Postfix) -> None:
    t = tag()
    mid = f"<hangup-{t}@client.test>"
    c = Raw(smtp_stack.smtp_port)
    c.cmd("EHLO client.test")
    c.cmd(f"MAIL FROM:<{BOB}>")
    c.cmd(f"RCPT TO:<{ALICE}>")
    assert c.cmd("DATA")[0] == 354
    c.send(simple_message(f"hangup {t}", mid=mid) + b".\r\n")
    c.close()                                      # without waiting for the reply
    time.sleep(1)
    deadline = time.monotonic() + 10
    while (found := verbs_for(smtp_stack, mid)) and found[0]["status"] == "pending":
        assert time.monotonic() < deadline, found
        time.sleep(0.1)
    postfix.wait_queue_empty()
    # either the whole message was taken (delivered once, verb committed) or none of it (no verb for it)
    if found:
        assert [v["status"] for v in found] == ["committed"]
        postfix.wait_for("alice", f"hangup {t}")
    else:
        assert postfix.count("alice", f"hangup {t}") == 0


# --------------------------------------------------------------------------- undo cycles

def refused_during_cycle(port: int, subject: str) -> None:
    """A client is told to come back later (421/451) and nothing reaches Postfix."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.test")
        code, text = s.mail(BOB)
        assert code in (421, 451), (code, text)
        try:
            s.rcpt(ALICE)
            s.data(simple_message(subject))
        except smtplib.SMTPException:
            pass


def test_discard_rule_undone_by_rewind_repair_replay(smtp_stack: MailStack, postfix: Postfix) -> None:
    t = tag()
    subj = {n: f"{n} {t}" for n in ("hello 1", "invoice 2", "invoice 3", "hello 4", "receipt 5", "late 6")}
    smtp_send(smtp_stack.smtp_port, BOB, [ALICE], simple_message(subj["hello 1"]))
    smtp_send(smtp_stack.smtp_port, BOB, [ALICE], simple_message(subj["invoice 2"]))
    postfix.wait_for("alice", subj["hello 1"])
    postfix.wait_for("alice", subj["invoice 2"])
    postfix.wait_queue_empty()      # Postfix delivers after its 250: the snapshot must see every message
    snap = smtp_stack.cli_json("snapshot", "take", "--label", f"before the rule {t}")

    # the operator's mistake: rules that silently eat legitimate mail
    postfix.set_checks(header=f"/^Subject: invoice .* {t}$/ DISCARD", body=f"/^PAYMENT-REF-{t}/ DISCARD")
    smtp_send(smtp_stack.smtp_port, BOB, [ALICE], simple_message(subj["invoice 3"]))
    smtp_send(smtp_stack.smtp_port, BOB, [ALICE], simple_message(subj["hello 4"], body="Grüße\r\n"),
              mail_options=["BODY=8BITMIME"])
    res = subprocess.run(["swaks", "--server", f"127.0.0.1:{smtp_stack.smtp_port}", "--from", BOB, "--to", ALICE,
                          "--header", f"Subject: {subj['receipt 5']}", "--body", f"PAYMENT-REF-{t}\nthanks\n"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout
    postfix.wait_for("alice", subj["hello 4"])
    postfix.wait_queue_empty()
    assert postfix.count("alice", subj["invoice 3"]) == 0 and postfix.count("alice", subj["receipt 5"]) == 0
    eaten = [v for v in smtp_verbs(smtp_stack) if v["seq"] > snap["after_seq"]]
    assert [v["status"] for v in eaten] == ["committed"] * 3        # Postfix said 250 to all three

    cycle = smtp_stack.cli_json("rewind", "--to", snap["id"], "--yes")
    assert cycle["state"] == "rewound"
    assert postfix.count("alice", subj["hello 4"]) == 0            # the volume is back at the snapshot
    refused_during_cycle(smtp_stack.smtp_port, subj["late 6"])

    postfix.set_checks()                                           # the repair
    smtp_stack.cli("repair", "--note", "removed the DISCARD rules")
    cycle = smtp_stack.cli_json("replay")
    assert cycle["replayed"] == 3 and cycle["inconsistencies"] == 0, cycle
    refused_during_cycle(smtp_stack.smtp_port, subj["late 6"])      # review: still closed
    smtp_stack.cli("commit")

    for name in ("hello 1", "invoice 2", "invoice 3", "hello 4", "receipt 5"):
        postfix.wait_for("alice", subj[name])
    replayed = [v for v in smtp_verbs(smtp_stack) if v["origin"] == "replay" and v["cycle"] == cycle["id"]]
    assert sorted(v["original_seq"] for v in replayed) == sorted(v["seq"] for v in eaten)
    assert all(v["status"] == "committed" and v["verb"] == "smtp.deliver" for v in replayed)

    smtp_send(smtp_stack.smtp_port, BOB, [ALICE], simple_message(subj["late 6"]))   # the sender's retry
    postfix.wait_for("alice", subj["late 6"])
    postfix.wait_queue_empty()
    for name, subject in subj.items():                              # nothing lost, nothing twice
        assert postfix.count("alice", subject) == 1, name


def test_repair_changing_recipients_gives_inconsistencies_and_explanations(smtp_stack: MailStack,
                                                                          postfix: Postfix) -> None:
    t = tag()
    postfix.wait_queue_empty()
    snap = smtp_stack.cli_json("snapshot", "take")
    to_carol, to_dave = f"for carol {t}", f"for dave {t}"
    mid_carol, mid_dave = f"<carol-{t}@client.test>", f"<dave-{t}@client.test>"
    smtp_send(smtp_stack.smtp_port, BOB, [CAROL], simple_message(to_carol, mid=mid_carol, to=CAROL))
    refused = smtp_send(smtp_stack.smtp_port, BOB, [ALICE, DAVE], simple_message(to_dave, mid=mid_dave))
    assert list(refused) == [DAVE]                                  # dave has no mailbox yet
    postfix.wait_for("carol", to_carol)
    postfix.wait_for("alice", to_dave)
    postfix.wait_queue_empty()

    smtp_stack.cli("rewind", "--to", snap["id"], "--yes")
    postfix.set_mailboxes("alice", "bob", "dave")                   # the repair: carol leaves, dave arrives
    smtp_stack.cli("repair", "--note", "mailbox map rebuilt")
    cycle = smtp_stack.cli_json("replay")
    assert cycle["inconsistencies"] == 2, cycle
    items = {i["seq"]: i for i in smtp_stack.cli_json("inconsistencies", "--cycle", str(cycle["id"]))}
    seq_carol, seq_dave = verbs_for(smtp_stack, mid_carol)[0]["seq"], verbs_for(smtp_stack, mid_dave)[0]["seq"]
    assert items[seq_carol]["kind"] == "now-fails" and CAROL in items[seq_carol]["detail"]
    assert items[seq_dave]["kind"] == "now-succeeds" and DAVE in items[seq_dave]["detail"]
    assert {i["compensation"] for i in items.values()} == {"pending"}
    assert {i["verb"] for i in items.values()} == {"smtp.deliver"}

    smtp_stack.cli("compensate", "--all")
    items = {i["seq"]: i for i in smtp_stack.cli_json("inconsistencies", "--cycle", str(cycle["id"]))}
    assert items[seq_carol]["compensation"] == "done" and items[seq_dave]["compensation"] == "done"
    smtp_stack.cli("commit")

    # now-fails: the original sender hears from the postmaster that carol did not get it
    [note] = postfix.wait_for("bob", f"Undelivered after repair: {to_carol}")
    assert header_value(note, "From") == POSTMASTER and header_value(note, "To") == BOB
    assert mid_carol.encode() in note and CAROL.encode() in note
    # now-succeeds: dave gets the message late, and a note saying so
    postfix.wait_for("dave", to_dave)
    [late] = postfix.wait_for("dave", f"Delivered late: {to_dave}")
    assert header_value(late, "From") == POSTMASTER and mid_dave.encode() in late
    postfix.wait_queue_empty()
    assert postfix.count("carol", to_carol) == 0                    # rewound away, refused on replay
    assert postfix.count("alice", to_dave) == 1
