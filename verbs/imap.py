"""The `imap` verb pack: what a mail user does to their mailboxes through IMAP.

Verbs: imap.append, imap.store, imap.copy, imap.move, imap.expunge (EXPUNGE, UID EXPUNGE and CLOSE),
imap.create, imap.delete, imap.rename, imap.subscribe (and UNSUBSCRIBE), and the reads imap.fetch,
imap.search and imap.select.

Logical names: a message is `<user>/<mailbox>/<Message-ID>`, with `#<digest>` added when the same
Message-ID occurs more than once among the messages a command touches (and `#<digest>` alone for a
message without a Message-ID); the digest is a SHA-256 of the message's header block. Never a UID or a
sequence number: those change when replay rebuilds a mailbox. A mailbox is `<user>/<mailbox>`.

Each recorded message reference carries message_id, digest and subject; replay finds the message's
current UID with `UID SEARCH HEADER Message-ID` (and the digest when that finds several).
"""
from __future__ import annotations

import json
import re
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from undo_proxy.imap_wire import Message, fetch_items, message_id_in, search_numbers, sha, text
from verbs.base import CompensationResult, Finding, Intent, RecordedVerb, ReplayContext, ReplayResult
from verbs.smtp import decoded_subject

MESSAGE_VERBS = {"store", "copy", "move", "expunge", "fetch"}
MAILBOX_VERBS = {"create", "delete", "rename", "subscribe"}
READS = {"fetch", "search", "select"}
VOLATILE_ITEMS = {"UID", "FLAGS", "MODSEQ", "INTERNALDATE"}  # not what a user "saw" of a message
HEADER_ITEM = "BODY.PEEK[HEADER]"
_SUBJECT = re.compile(rb"^subject:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def subject_in(header: bytes) -> str:
    return decoded_subject(header, _SUBJECT)


def header_of(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message[: end + 4] if end >= 0 else message


def describe(header: bytes) -> dict[str, Any]:
    """What names a message, from its header block."""
    return {"message_id": message_id_in(header), "digest": sha(header)[:16], "subject": subject_in(header)}


def name_refs(user: str, mailbox: str, descs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Message references with their logical names (`user/mailbox/<id>`, `#digest` when ambiguous)."""
    counts: dict[str | None, int] = {}
    for d in descs:
        counts[d["message_id"]] = counts.get(d["message_id"], 0) + 1
    out = []
    for d in descs:
        mid = d["message_id"]
        local = mid if mid and counts[mid] == 1 else f"{mid or ''}#{d['digest']}"
        out.append(dict(d, name=f"{user}/{mailbox}/{local}"))
    return out


def content_digest(items: dict[str, Any]) -> str | None:
    """A digest of what a FETCH showed of a message's content (None: only flags/UIDs were fetched)."""
    seen = {k: v for k, v in items.items() if k not in VOLATILE_ITEMS}
    if not seen:
        return None
    return sha(json.dumps(seen, sort_keys=True, default=lambda b: b.decode("latin-1")).encode())[:24]


def status_output(tagged: Message, untagged: list[Message] | None = None) -> dict[str, Any]:
    status = tagged.status() or ("BAD", "", tagged.raw.decode("utf-8", "replace").strip())
    out: dict[str, Any] = {"status": status[0], "code": status[1], "text": status[2].strip()[:500]}
    if untagged is not None:
        out["expunged"] = sum(1 for m in untagged if re.match(rb"\* \d+ EXPUNGE\b", m.lines[0], re.I)
                              or m.lines[0].upper().startswith(b"* VANISHED"))
    return out


class ImapPack:
    name = "imap"
    protocol = "imap"

    # --- recording ---------------------------------------------------------------------------------
    def parse(self, record: dict[str, Any]) -> Intent:
        """record: action, user, mailbox and the action's own keys (see the front-end)."""
        action, user, mailbox = record["action"], record["user"], record.get("mailbox")
        box = f"{user}/{mailbox}"
        refs = record.get("messages", [])
        names = [r["name"] for r in refs]
        shown = ", ".join(r.get("message_id") or r["name"].rsplit("/", 1)[-1] for r in refs[:3]) + \
            (f" and {len(refs) - 3} more" if len(refs) > 3 else "")
        if action == "append":
            targets, summary = names, f"APPEND {shown} to {box}"
        elif action in ("copy", "move"):
            dest = [f"{user}/{record['dest']}/{n.split('/', 2)[2]}" for n in names]
            targets, summary = names + dest, f"{action.upper()} {shown or 'nothing'} from {box} to {record['dest']}"
        elif action == "store":
            targets, summary = names, f"STORE {record['op']} on {shown or 'nothing'} in {box}"
        elif action == "expunge":
            targets, summary = names or [box], f"{record.get('via', 'EXPUNGE')} {shown or 'nothing'} in {box}"
        elif action == "fetch":
            targets, summary = names or [box], f"FETCH {record['items']} of {shown or 'nothing'} in {box}"
        elif action == "rename":
            targets, summary = [box, f"{user}/{record['dest']}"], f"RENAME {box} to {record['dest']}"
        elif action in ("create", "delete", "subscribe"):
            targets, summary = [box], f"{record['command']} {box}"
        elif action == "search":
            targets, summary = [box], f"SEARCH {record['criteria'][:80]} in {box}"
        elif action == "select":
            targets, summary = [box], f"{'EXAMINE' if record.get('readonly') else 'SELECT'} {box}"
        else:
            raise ValueError(f"unknown imap action {action!r}")
        return Intent(verb=f"imap.{action}", targets=targets, mutates=action not in READS, summary=summary,
                      request=record)

    def summary(self, intent_summary: str, output: dict[str, Any] | None, error: str | None = None) -> str:
        if error:
            return f"{intent_summary} -> {error}"
        if not output:
            return intent_summary
        extra = ""
        if "found" in output:
            extra = f", {len(output['found'])} found"
        elif "messages" in output:
            extra = f", {len(output['messages'])} messages"
        if output.get("missing"):
            extra += f", {len(output['missing'])} missing"
        return f"{intent_summary} -> {output.get('status')}{extra}"

    def conflicts(self, a: list[str], b: list[str]) -> bool:
        """One user's verbs keep their recorded order (their mailboxes share sequence numbers, UIDs and
        the server's per-user connection limit); different users' verbs commute."""
        return bool({t.split("/", 1)[0] for t in a} & {t.split("/", 1)[0] for t in b})

    # --- checks ------------------------------------------------------------------------------------
    def check(self, original: RecordedVerb, replayed: dict[str, Any]) -> Finding | None:
        action = original.verb.split(".", 1)[1]
        before = original.output or {}
        missing = replayed.get("missing", [])
        if action == "fetch":
            problems = [f"{n}: gone" for n in missing]
            for name, digest in (before.get("messages") or {}).items():
                now = replayed.get("messages", {}).get(name)
                if name not in missing and digest is not None and now != digest:
                    problems.append(f"{name}: changed")
            if not problems:
                return None
            kind = "message-gone" if missing else "message-changed"
            return Finding(kind, f"{original.summary.split(' -> ')[0]}: " + "; ".join(problems))
        if action == "search":
            then, now = before.get("found", []), replayed.get("found", [])
            if before.get("status") == "OK" and set(then) != set(now):
                return Finding("output-changed", f"SEARCH {original.request['criteria'][:80]} in "
                                                 f"{original.request['mailbox']}: found {', '.join(then) or 'nothing'} "
                                                 f"then, {', '.join(now) or 'nothing'} now")
            return None
        if action == "select":
            return None
        if action in ("expunge", "move", "copy") and missing and before.get("status") == "OK":
            return Finding("now-fails", f"{original.summary.split(' -> ')[0]}: " +
                           "; ".join(f"{n}: gone from {original.request['mailbox']}" for n in missing))
        was, now_ok = before.get("status") == "OK", replayed.get("status") == "OK"
        if was and not now_ok:
            return Finding("now-fails", f"{original.summary.split(' -> ')[0]}: OK then, now "
                                        f"{replayed.get('status')} {replayed.get('text', '')}")
        if now_ok and not was and before.get("status"):
            return Finding("now-succeeds", f"{original.summary.split(' -> ')[0]}: {before.get('status')} "
                                           f"{before.get('text', '')} then, OK now")
        return None

    # --- replay ------------------------------------------------------------------------------------
    async def replay(self, verb: RecordedVerb, ctx: ReplayContext) -> ReplayResult:
        from undo_proxy.imap_upstream import UpstreamUnavailable
        req = verb.request
        action = verb.verb.split(".", 1)[1]
        summary = verb.summary.split(" -> ")[0]
        try:
            conn = await ctx.upstream.master_session(req["user"])
            try:
                output = await getattr(self, f"_replay_{action}")(conn, req, ctx)
            finally:
                await conn.close()
        except UpstreamUnavailable as exc:
            return ReplayResult("failed", {"error": str(exc)}, f"{summary} -> upstream failed", req)
        return ReplayResult("committed", output, self.summary(summary, output), req)

    @staticmethod
    async def _open(conn: Any, req: dict[str, Any], readonly: bool = False) -> dict[str, Any] | None:
        """SELECT (EXAMINE) the verb's mailbox; a status output when that fails."""
        from undo_proxy.imap_upstream import astring
        untagged, tagged = await conn.command(b"EXAMINE" if readonly else b"SELECT", astring(req["mailbox"]))
        out = status_output(tagged)
        if out["status"] != "OK":
            out["missing"] = [r["name"] for r in req.get("messages", [])]
            return out
        return None

    @staticmethod
    async def locate(conn: Any, refs: list[dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], list[str]]:
        """The recorded messages' UIDs in the selected mailbox now: ({uid: ref}, names not found)."""
        from undo_proxy.imap_upstream import astring
        found: dict[int, dict[str, Any]] = {}
        missing: list[str] = []
        for ref in refs:
            mid = ref.get("message_id")
            criteria = [b"HEADER", b"Message-ID", astring(mid)] if mid else [b"ALL"]
            uids = [u for m in await conn.check(b"UID", b"SEARCH", *criteria) for u in (search_numbers(m) or [])]
            uids = [u for u in uids if u not in found]
            if len(uids) != 1 or not mid:
                headers = await ImapPack.headers(conn, uids, uid=True) if uids else {}
                exact = [u for u, (_, h) in headers.items() if message_id_in(h) == mid]
                same = [u for u in exact if describe(headers[u][1])["digest"] == ref["digest"]]
                uids = same or (exact if mid else [])
            if uids:
                found[uids[0]] = ref
            else:
                missing.append(ref["name"])
        return found, missing

    @staticmethod
    async def headers(conn: Any, numbers: list[int] | str, uid: bool) -> dict[int, tuple[int, bytes]]:
        """{uid: (seq, header block)} of a set of UIDs or sequence numbers."""
        from undo_proxy.imap_wire import compact_set
        spec = numbers if isinstance(numbers, str) else compact_set(numbers)
        cmd = [b"UID", b"FETCH"] if uid else [b"FETCH"]
        out: dict[int, tuple[int, bytes]] = {}
        for m in await conn.check(*cmd, spec.encode(), f"(UID {HEADER_ITEM})".encode()):
            parsed = fetch_items(m)
            if parsed and "UID" in parsed[1] and "BODY[HEADER]" in parsed[1]:
                out[int(parsed[1]["UID"])] = (parsed[0], parsed[1]["BODY[HEADER]"] or b"")
        return out

    async def _replay_select(self, conn: Any, req: dict[str, Any], ctx: ReplayContext) -> dict[str, Any]:
        from undo_proxy.imap_upstream import astring
        untagged, tagged = await conn.command(b"EXAMINE" if req.get("readonly") else b"SELECT",
                                              astring(req["mailbox"]))
        out = status_output(tagged)
        out["exists"] = next((int(m.lines[0].split()[1]) for m in untagged
                              if re.match(rb"\* \d+ EXISTS", m.lines[0], re.I)), 0)
        return out

    async def _replay_fetch(self, conn: Any, req: dict[str, Any], ctx: ReplayContext) -> dict[str, Any]:
        failed = await self._open(conn, req, bool(req.get("readonly")))
        if failed:
            return failed
        found, missing = await self.locate(conn, req["messages"])
        out: dict[str, Any] = {"status": "OK", "messages": {}, "missing": missing}
        if found:
            from undo_proxy.imap_wire import compact_set
            untagged, tagged = await conn.command(b"UID", b"FETCH", compact_set(list(found)).encode(),
                                                  req["items"].encode())
            out.update(status_output(tagged))
            merged: dict[int, dict[str, Any]] = {}
            for m in untagged:
                parsed = fetch_items(m)
                if parsed and "UID" in parsed[1]:
                    merged.setdefault(int(parsed[1]["UID"]), {}).update(parsed[1])
            for uid, ref in found.items():
                out["messages"][ref["name"]] = content_digest(merged.get(uid, {}))
        return out

    async def _replay_search(self, conn: Any, req: dict[str, Any], ctx: ReplayContext) -> dict[str, Any]:
        failed = await self._open(conn, req, bool(req.get("readonly")))
        if failed:
            return failed
        criteria = req["criteria"].encode("latin-1")
        untagged, tagged = await conn.command(b"UID", b"SEARCH", *self._criteria_parts(criteria))
        out = status_output(tagged)
        uids = [u for m in untagged for u in (search_numbers(m) or [])]
        heads = await self.headers(conn, uids, uid=True) if uids else {}
        refs = name_refs(req["user"], req["mailbox"], [describe(heads[u][1]) for u in uids if u in heads])
        out["found"] = [r["name"] for r in refs]
        return out

    @staticmethod
    def _criteria_parts(criteria: bytes) -> list[Any]:
        """Recorded search criteria (literals as {n+}) as command parts."""
        from undo_proxy.imap_upstream import Lit
        parts: list[Any] = []
        pos = 0
        for m in re.finditer(rb"\{(\d+)\+?\}\r\n", criteria):
            parts.append(criteria[pos:m.start()].rstrip(b" "))
            size = int(m.group(1))
            parts.append(Lit(criteria[m.end():m.end() + size]))
            pos = m.end() + size
        if criteria[pos:].strip():
            parts.append(criteria[pos:].strip(b" "))
        return [p for p in parts if p != b""]

    async def _messages_op(self, conn: Any, req: dict[str, Any], *command: bytes,
                           delete_first: bool = False) -> dict[str, Any]:
        """Run a UID command on the recorded messages found now (`delete_first`: flag them \\Deleted
        before, as an expunge of exactly them needs)."""
        failed = await self._open(conn, req)
        if failed:
            return failed
        found, missing = await self.locate(conn, req["messages"])
        if not found:
            return {"status": "OK", "code": "", "text": "nothing to do", "missing": missing, "expunged": 0}
        from undo_proxy.imap_wire import compact_set
        uids = compact_set(list(found)).encode()
        if delete_first:
            await conn.check(b"UID", b"STORE", uids, b"+FLAGS.SILENT", b"(\\Deleted)")
        untagged, tagged = await conn.command(b"UID", command[0], uids, *command[1:])
        out = status_output(tagged, untagged)
        out["missing"] = missing
        return out

    async def _replay_store(self, conn: Any, req: dict[str, Any], ctx: ReplayContext) -> dict[str, Any]:
        return await self._messages_op(conn, req, b"STORE", req["op"].encode())

    async def _replay_copy(self, conn: Any, req: dict[str, Any], ctx: ReplayContext) -> dict[str, Any]:
        from undo_proxy.imap_upstream import astring
        return await self._messages_op(conn, req, b"COPY", astring(req["dest"]))

    async def _replay_move(self, conn: Any, req: dict[str, Any], ctx: ReplayContext) -> dict[str, Any]:
        from undo_proxy.imap_upstream import astring
        return await self._messages_op(conn, req, b"MOVE", astring(req["dest"]))

    async def _replay_expunge(self, conn: Any, req: dict[str, Any], ctx: ReplayContext) -> dict[str, Any]:
        """Exactly the recorded messages: flagged \\Deleted, then UID EXPUNGE of just them (UIDPLUS)."""
        return await self._messages_op(conn, req, b"EXPUNGE", delete_first=True)

    async def _replay_append(self, conn: Any, req: dict[str, Any], ctx: ReplayContext) -> dict[str, Any]:
        from undo_proxy.imap_upstream import Lit, astring
        parts: list[Any] = [b"APPEND", astring(req["mailbox"])]
        for msg in req["messages"]:
            if msg.get("flags"):
                parts.append(b"(" + " ".join(msg["flags"]).encode() + b")")
            if msg.get("date"):
                parts.append(astring(msg["date"]))
            parts.append(Lit(ctx.blobs.read(msg["blob"])))
        untagged, tagged = await conn.command(*parts)
        return status_output(tagged)

    async def _replay_create(self, conn: Any, req: dict[str, Any], ctx: ReplayContext) -> dict[str, Any]:
        from undo_proxy.imap_upstream import astring
        untagged, tagged = await conn.command(req["command"].encode(), astring(req["mailbox"]))
        return status_output(tagged)

    _replay_delete = _replay_create
    _replay_subscribe = _replay_create

    async def _replay_rename(self, conn: Any, req: dict[str, Any], ctx: ReplayContext) -> dict[str, Any]:
        from undo_proxy.imap_upstream import astring
        untagged, tagged = await conn.command(b"RENAME", astring(req["mailbox"]), astring(req["dest"]))
        return status_output(tagged)

    # --- compensation ------------------------------------------------------------------------------
    @staticmethod
    async def where_now(conn: Any, message_id: str | None) -> list[str]:
        """The mailboxes that hold a message with this Message-ID now."""
        from undo_proxy.imap_upstream import astring
        from undo_proxy.imap_wire import parse as parse_tokens
        if not message_id:
            return []
        boxes = []
        for m in await conn.check(b"LIST", b'""', b'"*"'):
            tokens = parse_tokens(m.raw, 7) if m.lines[0].upper().startswith(b"* LIST ") else []
            if len(tokens) >= 3 and not any(str(f).lower() == "\\noselect" for f in tokens[0] or []):
                boxes.append(text(tokens[2]))
        where = []
        for box in boxes:
            untagged, tagged = await conn.command(b"EXAMINE", astring(box))
            if (tagged.status() or ("",))[0] != "OK":
                continue
            found = [u for m in await conn.check(b"UID", b"SEARCH", b"HEADER", b"Message-ID", astring(message_id))
                     for u in (search_numbers(m) or [])]
            if found:
                where.append(box)
        return where

    def explanation(self, kind: str, problem: str, ref: dict[str, Any], verb: RecordedVerb, where: list[str],
                    settings: Any) -> EmailMessage:
        req = verb.request
        what = f"the message \"{ref.get('subject') or '(no subject)'}\" {ref.get('message_id') or ''}".rstrip()
        box = req.get("mailbox", "")
        now = (f"It is now in {', '.join(where)}." if where else "It is no longer in any of your folders.")
        action = verb.verb.split(".", 1)[1]
        if kind in ("message-gone", "message-changed"):
            subject = f"A message you read has changed: {ref.get('subject') or ref.get('message_id')}"
            if problem == "changed":
                body = (f"On {verb.time} you read {what} in your folder {box}.\n\nThe mail service has since "
                        f"been repaired after a fault, and that message now reads differently from what you saw "
                        f"then. The version in your mailbox now is the corrected one; please read it again.")
            else:
                body = (f"On {verb.time} you read {what} in your folder {box}.\n\nThe mail service has since "
                        f"been repaired after a fault, and after the repair that message is not in {box}. {now}")
        else:
            did = {"expunge": "deleted", "move": f"moved to {req.get('dest')}",
                   "copy": f"copied to {req.get('dest')}"}.get(action, action)
            subject = f"An action on your mail was not repeated: {ref.get('subject') or ref.get('message_id')}"
            body = (f"On {verb.time} you {did} {what} from your folder {box}.\n\nThe mail service has since been "
                    f"repaired after a fault, and your actions were applied again to the repaired mailboxes. "
                    f"This one could not be: after the repair the message was not in {box}. {now}\n"
                    f"Please look at it again and repeat the action if you still want it.")
        msg = EmailMessage()
        msg["From"] = settings.postmaster
        msg["To"] = req["user"]
        msg["Subject"] = subject
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain=settings.postmaster.rsplit("@", 1)[-1])
        msg["Auto-Submitted"] = "auto-generated"
        if ref.get("message_id"):
            msg["References"] = ref["message_id"]
        msg["X-Undo-Explains"] = f"{ref['name']}:{problem}"
        msg.set_content(f"{body}\n\n-- \nThe postmaster ({settings.postmaster})\n")
        return msg

    def _generic(self, inconsistency: dict[str, Any], verb: RecordedVerb, settings: Any) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = settings.postmaster
        msg["To"] = verb.request["user"]
        msg["Subject"] = "Your mailbox after a repair of the mail service"
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain=settings.postmaster.rsplit("@", 1)[-1])
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Undo-Explains"] = f"seq {verb.seq}"
        msg.set_content(f"The mail service has been repaired after a fault and your actions were applied "
                        f"again. One of them turned out differently:\n\n  {verb.time}: "
                        f"{inconsistency['detail']}\n\n-- \nThe postmaster ({settings.postmaster})\n")
        return msg

    @staticmethod
    def _about(kind: str, verb: RecordedVerb) -> str:
        return "seen" if kind in ("message-gone", "message-changed") else verb.verb

    async def compensate(self, inconsistency: dict[str, Any], verb: RecordedVerb,
                         frontend: Any) -> CompensationResult:
        """Append an explanatory message to the user's INBOX (through the master user) for each message
        the inconsistency names: what they saw or did, what changed, where the message is now."""
        from undo_proxy.imap_upstream import Lit, UpstreamUnavailable, astring
        detail, kind = inconsistency["detail"], inconsistency["kind"]
        if verb.verb in ("imap.search", "imap.select"):
            return CompensationResult("acknowledged", "a search or select shows no message content: what the "
                                                      "user saw of the messages is checked by their FETCHes")
        refs = verb.request.get("messages", [])
        affected = [(r, p) for r in refs for p in ("gone", "changed") if f"{r['name']}: {p}" in detail]
        try:
            conn = await frontend.upstream.master_session(verb.request["user"])
            try:
                messages = []
                for ref, problem in affected:
                    where = await self.where_now(conn, ref.get("message_id")) if problem == "gone" else []
                    messages.append(self.explanation(kind, problem, ref, verb, where, frontend.settings))
                if not affected:
                    messages.append(self._generic(inconsistency, verb, frontend.settings))
                ids = []
                await conn.check(b"SELECT", b"INBOX")
                for msg in messages:
                    # once per cycle, message and problem: several reads of one message need one letter
                    key = f"{inconsistency['cycle']}:{self._about(kind, verb)}:{msg['X-Undo-Explains']}"
                    del msg["X-Undo-Explains"]
                    msg["X-Undo-Explains"] = key
                    sent = [u for m in await conn.check(b"UID", b"SEARCH", b"HEADER", b"X-Undo-Explains",
                                                        astring(key)) for u in (search_numbers(m) or [])]
                    if sent:
                        continue
                    data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
                    await conn.check(b"APPEND", astring("INBOX"), Lit(data))
                    ids.append(msg["Message-ID"])
            finally:
                await conn.close()
        except UpstreamUnavailable as exc:
            return CompensationResult("failed", f"could not append the explanation: {exc}")
        if not ids:
            return CompensationResult("done", "explained already by an earlier explanation in this cycle")
        return CompensationResult("done", f"{len(ids)} explanation(s) appended to {verb.request['user']}'s INBOX: "
                                          f"{', '.join(ids)}")
