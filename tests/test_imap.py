"""The IMAP front-end before a REAL Dovecot (tests/imapfix.py), through the real daemon: the undo scenario
of a user reading, flagging, filing and deleting mail while a broken delivery filter misfiles and mangles
messages; protocol correctness (literals, LITERAL+, UID commands, IDLE, untagged responses unchanged,
AUTHENTICATE PLAIN); what is recorded (logical names, no credentials); the open cycle; a load client.

Run with `-p tests.imapfix` until tests.imapfix is in tests/conftest.py's pytest_plugins."""
from __future__ import annotations

import asyncio
import email
import imaplib
import json
import re
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.backends import free_port, wait_port
from tests.daemon import Stack
from tests.imapfix import Dovecot

def message(mid: str, subject: str, sender: str = "friend@x.test", body: str = "hello") -> bytes:
    return (f"From: {sender}\r\nTo: alice@example.test\r\nSubject: {subject}\r\nMessage-ID: <{mid}@x.test>\r\n"
            f"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n\r\n{body}\r\n").encode()


def start(proxy_stack: Callable[..., Stack], dovecot: Dovecot, extra: str = "") -> tuple[Stack, int]:
    port = free_port()
    stack = proxy_stack(volume=dovecot.volume, store=dovecot.store, backend="btrfs",
                        extra=dovecot.imap_table(port, extra=extra))
    wait_port(port, proc=stack.proc)
    return stack, port


def proxied(port: int, user: str = "alice", password: str = "secret") -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    m.login(user, password)
    return m


def uid_of(m: imaplib.IMAP4, mid: str) -> bytes:
    typ, data = m.uid("SEARCH", "HEADER", "Message-ID", f'"<{mid}@x.test>"')
    assert typ == "OK" and data[0], (mid, data)
    return data[0].split()[0]


def mailbox(dc: Dovecot, box: str, user: str = "alice") -> dict[str, dict[str, Any]]:
    """Message-ID -> {subject, flags} of a mailbox, read straight from Dovecot."""
    m = dc.imap(user)
    try:
        typ, count = m.select(f'"{box}"', readonly=True)
        if typ != "OK" or count[0] == b"0":
            return {}
        typ, data = m.fetch("1:*", "(FLAGS BODY.PEEK[])")
        out = {}
        for item in data:
            if isinstance(item, tuple):
                head = email.message_from_bytes(item[1])
                flags = re.search(rb"FLAGS \(([^)]*)\)", item[0])
                out[head["Message-ID"] or ""] = {"subject": head["Subject"], "flags": flags.group(1).decode().split()
                                                 if flags else [], "head": head}
        return out
    finally:
        m.logout()


class Raw:
    """A raw IMAP client socket: exact bytes out, exact responses in."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; have {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, tag: bytes) -> list[bytes]:
        """Responses (literals included, as they came) up to and including the tagged one."""
        out = []
        while True:
            line = self.line()
            m = re.search(rb"\{(\d+)\}\r\n$", line)
            while m:
                need = int(m.group(1))
                while len(self.buf) < need:
                    self.buf += self.sock.recv(65536)
                line += self.buf[:need]
                self.buf = self.buf[need:]
                rest = self.line()
                line += rest
                m = re.search(rb"\{(\d+)\}\r\n$", rest)
            out.append(line)
            if line.startswith(tag + b" "):
                return out

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- the undo scenario

ORIGINALS = {
    "boss1": message("boss1", "Quarterly numbers", "boss@x.test"),
    "boss2": message("boss2", "Team offsite", "boss@x.test"),
    "friend1": message("friend1", "Lunch?"),
    "friend2": message("friend2", "Photos from the trip"),
    "news1": message("news1", "Weekly news", "news@x.test"),
}


def broken_filter(key: str, raw: bytes) -> tuple[str, bytes]:
    """The fault: mail from the boss is filed as Junk and tagged; the trip photos are tagged as spam."""
    if b"boss@" in raw or key == "friend2":
        tagged = raw.replace(b"Subject: ", b"Subject: [SPAM] ", 1)
        return ("Junk" if b"boss@" in raw else "INBOX"), tagged
    return "INBOX", raw


def test_undo_scenario_misfiling_filter(proxy_stack: Callable[..., Stack], dovecot: Dovecot) -> None:
    stack, port = start(proxy_stack, dovecot)
    dovecot.doveadm("mailbox", "create", "-u", "alice", "Junk")
    snap = stack.cli_json("snapshot", "take", "--label", "before the filter upgrade")["id"]

    for key, raw in ORIGINALS.items():           # delivery through the broken filter
        box, data = broken_filter(key, raw)
        dovecot.deliver("alice", box, data)

    m = proxied(port)                              # what the user does, through the proxy
    assert m.select("INBOX")[0] == "OK"
    typ, listing = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])")
    assert typ == "OK" and b"[SPAM] Photos" in b"".join(x[1] for x in listing if isinstance(x, tuple))
    assert m.uid("FETCH", uid_of(m, "friend1"), "(BODY[])")[0] == "OK"            # reads
    assert m.uid("STORE", uid_of(m, "friend1"), "+FLAGS", "(\\Flagged)")[0] == "OK"  # flags
    assert m.create("Archive")[0] == "OK"
    assert m.uid("COPY", uid_of(m, "friend1"), "Archive")[0] == "OK"               # files a copy
    assert m.create("Lists")[0] == "OK"
    assert m.uid("MOVE", uid_of(m, "news1"), "Lists")[0] == "OK"                   # files
    typ, photos = m.uid("FETCH", uid_of(m, "friend2"), "(BODY[])")                 # reads the tagged one
    assert b"[SPAM] Photos" in photos[0][1]
    assert m.select("Junk")[0] == "OK"
    assert m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])")[0] == "OK"
    typ, data = m.search(None, 'HEADER Message-ID "<boss1@x.test>"')
    assert m.fetch(data[0], "(BODY[])")[0] == "OK"
    assert m.copy(data[0], "INBOX")[0] == "OK"                                      # rescues boss1...
    assert m.store(data[0], "+FLAGS", "\\Deleted")[0] == "OK"
    typ, data = m.search(None, 'HEADER Message-ID "<boss2@x.test>"')
    assert m.store(data[0], "+FLAGS", "\\Deleted")[0] == "OK"                      # ...and deletes boss2
    assert m.expunge()[0] == "OK"
    m.logout()

    verbs = stack.timeline(protocol="imap")
    names = {v["verb"] for v in verbs}
    assert {"imap.select", "imap.fetch", "imap.store", "imap.create", "imap.copy", "imap.move", "imap.search",
            "imap.expunge"} <= names, names
    for v in verbs:
        for t in v["targets"]:
            assert t.startswith("alice/") and not re.fullmatch(r"alice/[^/]+/\d+", t), t
    store = next(v for v in verbs if v["verb"] == "imap.store")
    assert store["targets"] == ["alice/INBOX/<friend1@x.test>"]
    expunge = [v for v in verbs if v["verb"] == "imap.expunge"][-1]
    assert sorted(expunge["targets"]) == ["alice/Junk/<boss1@x.test>", "alice/Junk/<boss2@x.test>"]

    # rewind, repair (the fixed filter re-delivers the same mail, unmangled), replay
    stack.cli("rewind", "--to", snap, "--yes")
    assert mailbox(dovecot, "INBOX") == {}
    for key, raw in ORIGINALS.items():
        dovecot.deliver("alice", "INBOX", raw)
    stack.cli("repair", "--note", "filter fixed; the day's mail re-delivered")
    cycle = stack.cli_json("replay")
    assert cycle["state"] == "review", cycle
    incs = stack.cli_json("inconsistencies")
    kinds = {(i["verb"], i["kind"]) for i in incs}
    assert ("imap.fetch", "message-changed") in kinds, incs     # the photos' subject is not [SPAM] now
    assert ("imap.fetch", "message-gone") in kinds, incs        # boss1/boss2 are not in Junk now
    assert ("imap.expunge", "now-fails") in kinds, incs
    changed = [i for i in incs if i["kind"] == "message-changed"]
    assert all("<friend2@x.test>: changed" in i["detail"] for i in changed), changed
    assert not any("<friend1@x.test>: " in i["detail"] for i in incs), incs
    done = stack.cli("compensate", "--all")
    assert done.returncode == 0
    assert re.search(r"^inconsistency \d+ \(verb \d+\): (done|acknowledged): \S", done.stdout, re.M), done.stdout
    assert all(i["compensation"] in ("done", "acknowledged") for i in stack.cli_json("inconsistencies")), \
        stack.cli_json("inconsistencies")
    stack.cli("commit")

    # the mailboxes as the user meant them
    inbox, archive, lists, junk = (mailbox(dovecot, b) for b in ("INBOX", "Archive", "Lists", "Junk"))
    assert "\\Flagged" in inbox["<friend1@x.test>"]["flags"] and "\\Seen" in inbox["<friend1@x.test>"]["flags"]
    assert "<friend1@x.test>" in archive
    assert "<news1@x.test>" in lists and "<news1@x.test>" not in inbox
    assert inbox["<friend2@x.test>"]["subject"] == "Photos from the trip"
    assert "\\Seen" in inbox["<friend2@x.test>"]["flags"]
    assert "<boss1@x.test>" in inbox and "<boss2@x.test>" in inbox     # nothing of the boss's mail is lost
    assert junk == {}
    # ...and an explanatory message for each message they saw that changed
    letters = [v for v in inbox.values() if v["head"]["Auto-Submitted"] == "auto-generated"]
    about = {str(v["head"]["References"]) for v in letters}
    assert {"<friend2@x.test>", "<boss1@x.test>", "<boss2@x.test>"} <= about, [v["subject"] for v in letters]
    assert len([v for v in letters if v["head"]["References"] == "<friend2@x.test>"]) == 1
    assert all(v["head"]["From"] == "postmaster@example.test" for v in letters)
    photos = next(v for v in letters if v["head"]["References"] == "<friend2@x.test>")
    assert "reads differently" in photos["head"].get_payload()
    boss2 = [v["head"].get_payload() for v in letters if v["head"]["References"] == "<boss2@x.test>"]
    assert any("It is now in INBOX" in text for text in boss2), boss2


def test_expunge_undone_and_later_flag_reapplied(proxy_stack: Callable[..., Stack], dovecot: Dovecot) -> None:
    """The acceptance story in miniature: skip the bad EXPUNGE; the later flag lands on the new UID."""
    stack, port = start(proxy_stack, dovecot)
    m = proxied(port)
    for i in (1, 2, 3):
        assert m.append("INBOX", None, None, message(f"note{i}", f"note {i}"))[0] == "OK"
    m.logout()
    snap = stack.cli_json("snapshot", "take")["id"]
    m = proxied(port)
    m.select("INBOX")
    m.uid("STORE", uid_of(m, "note1"), "+FLAGS", "(\\Deleted)")
    m.expunge()
    m.uid("STORE", uid_of(m, "note2"), "+FLAGS", "(\\Flagged)")
    m.logout()
    bad = [v["seq"] for v in stack.timeline(protocol="imap") if v["verb"] == "imap.expunge"][0]
    stack.cli("rewind", "--to", snap, "--yes")
    stack.cli("replay", "--skip", str(bad))
    stack.cli("commit")
    inbox = mailbox(dovecot, "INBOX")
    assert set(inbox) == {"<note1@x.test>", "<note2@x.test>", "<note3@x.test>"}
    assert "\\Flagged" in inbox["<note2@x.test>"]["flags"]
    assert "\\Deleted" in inbox["<note1@x.test>"]["flags"]     # flagged, never expunged


def test_append_replayed_with_bytes_and_flags(proxy_stack: Callable[..., Stack], dovecot: Dovecot) -> None:
    stack, port = start(proxy_stack, dovecot)
    snap = stack.cli_json("snapshot", "take")["id"]
    m = proxied(port)
    raw = message("app1", "appended", body="x" * 5000)
    assert m.append("INBOX", "(\\Seen \\Flagged)", imaplib.Time2Internaldate(time.time()), raw)[0] == "OK"
    assert m.create("Drafts")[0] == "OK"
    assert m.append("Drafts", "(\\Draft)", None, message("draft1", "draft"))[0] == "OK"
    assert m.rename("Drafts", '"Old drafts"')[0] == "OK"
    assert m.subscribe('"Old drafts"')[0] == "OK"
    m.logout()
    stack.cli("rewind", "--to", snap, "--yes")
    stack.cli("replay")
    assert stack.cli_json("inconsistencies") == []
    stack.cli("commit")
    inbox = mailbox(dovecot, "INBOX")
    assert set(inbox["<app1@x.test>"]["flags"]) >= {"\\Seen", "\\Flagged"}
    d = dovecot.imap()
    d.select("INBOX", readonly=True)
    typ, data = d.fetch("1", "(BODY.PEEK[])")
    assert data[0][1] == raw
    assert "<draft1@x.test>" in mailbox(dovecot, "Old drafts")
    assert b"Old drafts" in b"".join(d.lsub()[1])
    d.logout()


# --------------------------------------------------------------------------- protocol correctness

def test_untagged_responses_unchanged(proxy_stack: Callable[..., Stack], dovecot: Dovecot) -> None:
    stack, port = start(proxy_stack, dovecot)
    for i in range(3):
        dovecot.deliver("alice", "INBOX", message(f"u{i}", f"subject {i}", body="b" * (100 * i)))
    script = [b"a1 LOGIN alice secret\r\n", b"a2 EXAMINE INBOX\r\n",
              b"a3 FETCH 1:* (FLAGS UID RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[])\r\n",
              b"a4 UID SEARCH ALL\r\n", b"a5 STATUS INBOX (MESSAGES UIDNEXT)\r\n", b'a6 LIST "" "*"\r\n',
              b"a7 NOOP\r\n", b"a8 LOGOUT\r\n"]
    answers = []
    for p in (dovecot.port, port):
        raw = Raw(p)
        got = []
        for cmd in script:
            raw.send(cmd)
            got.append(raw.until(cmd.split(b" ")[0]))
        answers.append(got)
        raw.close()
    direct, through = answers

    def timing(lines: list[bytes]) -> list[bytes]:  # Dovecot's tagged lines say how long they took
        return [re.sub(rb" \([\d.+ ]+secs\)", b"", line) for line in lines]
    for cmd, a, b in zip(script, direct, through):
        if cmd.startswith(b"a1"):   # the capability list in LOGIN's answer is the proxy's
            continue
        assert timing(a) == timing(b), (cmd, a, b)


def test_literals_literal_plus_and_uid_commands(proxy_stack: Callable[..., Stack], dovecot: Dovecot) -> None:
    stack, port = start(proxy_stack, dovecot)
    raw = Raw(port)
    raw.send(b"a1 LOGIN {5}\r\n")
    assert raw.line().startswith(b"+")                 # a synchronising literal: the proxy says go on
    raw.send(b"alice {6+}\r\nsecret\r\n")              # and LITERAL+ needs no continuation
    assert raw.until(b"a1")[-1].startswith(b"a1 OK")
    body = message("lit1", "literal plus")
    raw.send(b"a2 APPEND INBOX (\\Flagged) {%d+}\r\n" % len(body) + body + b"\r\n")
    resp = raw.until(b"a2")
    assert resp[-1].startswith(b"a2 OK") and b"APPENDUID" in resp[-1]
    body2 = message("lit2", "synchronising")
    raw.send(b"a3 APPEND INBOX {%d}\r\n" % len(body2))
    assert raw.line().startswith(b"+")
    raw.send(body2 + b"\r\n")
    assert raw.until(b"a3")[-1].startswith(b"a3 OK")
    raw.send(b"a4 SELECT INBOX\r\n")
    raw.until(b"a4")
    raw.send(b'a5 UID SEARCH HEADER Message-ID "<lit2@x.test>"\r\n')
    found = raw.until(b"a5")
    uid = found[0].split()[-1]
    raw.send(b"a6 UID STORE " + uid + b" +FLAGS (\\Answered)\r\n")
    resp = raw.until(b"a6")
    assert resp[-1].startswith(b"a6 OK") and b"\\Answered" in resp[0]
    raw.send(b"a7 UID FETCH " + uid + b" (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
    resp = raw.until(b"a7")
    assert b"synchronising" in resp[0] and b"U~" not in b"".join(resp)   # the proxy's own commands stay hidden
    raw.send(b"a8 CREATE Kept\r\na9 UID MOVE " + uid + b" Kept\r\n")     # pipelined
    assert raw.until(b"a8")[-1].startswith(b"a8 OK")
    assert raw.until(b"a9")[-1].startswith(b"a9 OK")
    raw.send(b"b1 LOGOUT\r\n")
    raw.until(b"b1")
    verbs = stack.timeline(protocol="imap")
    move = next(v for v in verbs if v["verb"] == "imap.move")
    assert move["targets"] == ["alice/INBOX/<lit2@x.test>", "alice/Kept/<lit2@x.test>"]
    appends = [v for v in verbs if v["verb"] == "imap.append"]
    assert [v["targets"] for v in appends] == [["alice/INBOX/<lit1@x.test>"], ["alice/INBOX/<lit2@x.test>"]]


def test_idle_relays_until_done(proxy_stack: Callable[..., Stack], dovecot: Dovecot) -> None:
    stack, port = start(proxy_stack, dovecot)
    raw = Raw(port)
    raw.send(b"a1 LOGIN alice secret\r\na2 SELECT INBOX\r\n")
    raw.until(b"a2")
    raw.send(b"a3 IDLE\r\n")
    assert raw.line().startswith(b"+")
    other = proxied(port)
    other.append("INBOX", None, None, message("idle1", "while idling"))
    other.logout()
    assert re.match(rb"\* 1 EXISTS", raw.line())
    raw.send(b"DONE\r\n")
    rest = raw.until(b"a3")
    assert rest[-1].startswith(b"a3 OK")
    raw.close()


def test_no_credentials_recorded_and_authenticate_plain(proxy_stack: Callable[..., Stack],
                                                         dovecot: Dovecot) -> None:
    stack, port = start(proxy_stack, dovecot)
    m = imaplib.IMAP4("127.0.0.1", port)
    assert m.authenticate("PLAIN", lambda _: b"\0bob\0hunter2")[0] == "OK"
    assert m.append("INBOX", None, None, message("b1", "for bob"))[0] == "OK"
    m.select("INBOX")
    m.store("1", "+FLAGS", "\\Seen")
    m.logout()
    m = proxied(port)
    m.select("INBOX")
    m.logout()
    verbs = stack.timeline(protocol="imap")
    assert {v["targets"][0].split("/")[0] for v in verbs} == {"alice", "bob"}
    for v in verbs:
        shown = stack.cli("show", str(v["seq"]), "--json").stdout
        assert "hunter2" not in shown and "secret" not in shown
    db = Path(stack.workdir / "state" / "timeline.db")
    dump = "\n".join(sqlite3.connect(db).iterdump())
    assert "hunter2" not in dump and "aHVudGVyMg" not in dump and "AGJvYgBodW50ZXIy" not in dump


def test_open_cycle_answers_unavailable(proxy_stack: Callable[..., Stack], dovecot: Dovecot) -> None:
    stack, port = start(proxy_stack, dovecot)
    snap = stack.cli_json("snapshot", "take")["id"]
    live = proxied(port)
    live.select("INBOX")
    stack.cli("rewind", "--to", snap, "--yes")
    raw = Raw(port)
    assert raw.greeting.startswith(b"* OK") and b"undo cycle" in raw.greeting
    raw.send(b"a1 CAPABILITY\r\n")
    assert raw.until(b"a1")[-1].startswith(b"a1 OK")
    raw.send(b"a2 LOGIN alice secret\r\n")
    assert raw.until(b"a2")[-1].startswith(b"a2 NO [UNAVAILABLE]")
    raw.send(b"a3 LOGOUT\r\n")
    assert raw.until(b"a3")[-1].startswith(b"a3 OK")
    typ, data = live.append("INBOX", None, None, message("c1", "during the cycle"))
    assert typ == "NO" and b"[UNAVAILABLE]" in data[0], data
    stack.cli("cancel")
    m = proxied(port)                                  # after the cycle: traffic resumes
    assert m.append("INBOX", None, None, message("c2", "after"))[0] == "OK"
    m.logout()
    assert not [v for v in stack.timeline(protocol="imap") if "c1@" in " ".join(v["targets"])]


# --------------------------------------------------------------------------- load

def test_load_client_reports_no_protocol_errors(proxy_stack: Callable[..., Stack], dovecot: Dovecot) -> None:
    aioimaplib = pytest.importorskip("aioimaplib")
    stack, port = start(proxy_stack, dovecot)
    for i in range(20):
        dovecot.deliver("alice", "INBOX", message(f"load{i}", f"load {i}", body="z" * 2000))
    errors: list[str] = []

    async def client(n: int) -> int:
        c = aioimaplib.IMAP4(host="127.0.0.1", port=port, timeout=30)
        await c.wait_hello_from_server()
        done = 0
        for cmd in [lambda: c.login("alice", "secret"), lambda: c.select("INBOX")] + [
                lambda: c.fetch("1:5", "(FLAGS BODY.PEEK[HEADER])"), lambda: c.uid("fetch", "1:3", "(UID FLAGS)"),
                lambda: c.search("ALL"), lambda: c.store("2", "+FLAGS", "(\\Seen)"), lambda: c.noop(),
                lambda: c.append(message(f"l{n}x{done}", "appended by load"), mailbox="INBOX")] * 5 + [
                lambda: c.logout()]:
            resp = await cmd()
            done += 1
            if resp.result not in ("OK", "BYE"):
                errors.append(f"client {n}: {resp.result} {resp.lines[-1:]}")
        return done

    async def main() -> list[int]:
        return await asyncio.gather(*(client(n) for n in range(20)))
    counts = asyncio.run(main())
    assert not errors, errors[:5]
    assert sum(counts) == 20 * 33
    assert "Traceback" not in stack.log_text()


def test_what_the_proxy_could_not_record_is_refused_not_passed(proxy_stack: Callable[..., Stack], dovecot: Dovecot) -> None:
    """Dovecot offers CATENATE and SEARCHRES (and ACL, METADATA, ... with plugins): through the proxy an APPEND
    built from parts, a set named `$`, or a command the proxy has no handler for would change mail with no
    verb naming what changed. They are refused; nothing reaches Dovecot."""
    stack, port = start(proxy_stack, dovecot)
    seed = proxied(port)
    seed.append("INBOX", None, None, message("cat1", "kept"))
    seed.logout()
    raw = Raw(port)
    raw.send(b"c1 LOGIN alice secret\r\n")
    caps = b" ".join(raw.until(b"c1")).upper()
    for dropped in (b"CATENATE", b"SEARCHRES"):
        assert dropped not in caps
    raw.send(b"c2 CAPABILITY\r\n")
    caps = b" ".join(raw.until(b"c2")).upper()
    assert b"CATENATE" not in caps and b"SEARCHRES" not in caps and b"IMAP4REV1" in caps
    part = b"Message-ID: <cat2@x.test>\r\nSubject: parts\r\n\r\nbody\r\n"
    raw.send(b"c3 APPEND INBOX CATENATE (TEXT {%d+}\r\n" % len(part) + part + b")\r\n")
    assert raw.until(b"c3")[-1].startswith(b"c3 NO [CANNOT]")
    raw.send(b"c4 SELECT INBOX\r\n")
    raw.until(b"c4")
    raw.send(b"c5 SEARCH RETURN (SAVE) SUBJECT kept\r\n")
    raw.until(b"c5")
    for n, command in enumerate((b"STORE $ +FLAGS (\\Flagged)", b"COPY $ INBOX", b"UID MOVE $ INBOX", b"FETCH $ FLAGS")):
        tag = b"d%d" % n
        raw.send(tag + b" " + command + b"\r\n")
        assert raw.until(tag)[-1].startswith(tag + b" BAD [CANNOT]"), command
    raw.send(b"e1 SETMETADATA INBOX (/private/comment \"x\")\r\ne2 XFROB INBOX\r\ne3 NOOP\r\ne4 LIST \"\" *\r\n")
    assert raw.until(b"e1")[-1].startswith(b"e1 NO [CANNOT] SETMETADATA")
    assert raw.until(b"e2")[-1].startswith(b"e2 NO [CANNOT] XFROB")
    assert raw.until(b"e3")[-1].startswith(b"e3 OK")
    assert raw.until(b"e4")[-1].startswith(b"e4 OK")
    raw.send(b"z LOGOUT\r\n")
    raw.until(b"z")
    box = mailbox(dovecot, "INBOX")
    assert len(box) == 1, "the CATENATE message never reached Dovecot"
    assert not any("\\Flagged" in m["flags"] for m in box.values()), "STORE $ never reached Dovecot"
    assert [v["verb"] for v in stack.timeline(protocol="imap") if v["mutates"]] == ["imap.append"]


def test_a_literal_too_large_ends_its_command_with_its_tag_and_a_tag_may_contain_search(
        proxy_stack: Callable[..., Stack], dovecot: Dovecot) -> None:
    stack, port = start(proxy_stack, dovecot)
    raw = Raw(port)
    raw.send(b"f1 LOGIN alice secret\r\n")
    raw.until(b"f1")
    raw.send(b"f2 APPEND INBOX {99999999999999999999}\r\n")   # synchronising: the client waits for "+"
    assert raw.until(b"f2")[-1].startswith(b"f2 NO [TOOBIG]")
    raw.send(b"f3 SELECT INBOX\r\nSEARCHME SEARCH SUBJECT nothing-like-this\r\n")
    raw.until(b"f3")
    assert raw.until(b"SEARCHME")[-1].startswith(b"SEARCHME OK")
    raw.send(b"z LOGOUT\r\n")
    raw.until(b"z")
    [search] = [v for v in stack.timeline(protocol="imap") if v["verb"] == "imap.search"]
    shown = json.loads(stack.cli("show", str(search["seq"]), "--json").stdout)
    assert shown["request"]["criteria"] == "SUBJECT nothing-like-this"
