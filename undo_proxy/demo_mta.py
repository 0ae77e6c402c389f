"""A small real MTA for `undo-proxy demo` on machines without Postfix: aiosmtpd delivering to Maildirs
in the volume, with a Postfix-like header filter file (`/regex/ DISCARD` lines, re-read per message) so
the demo's operator can make the classic mistake of a rule that silently eats legitimate mail.

    python -m undo_proxy.demo_mta --port 2526 --maildirs /vol/mail --users alice,bob --rules filter.txt
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session


def discard_rules(path: Path) -> list[re.Pattern[bytes]]:
    rules = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        match = re.fullmatch(r"\s*/(.+)/(i?)\s+DISCARD\b.*", line)
        if match:
            rules.append(re.compile(match.group(1).encode(), re.IGNORECASE if match.group(2) else 0))
    return rules


def deliver(maildir: Path, message: bytes) -> Path:
    """Maildir delivery: write in tmp/, fsync, rename into new/."""
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns()}.P{os.getpid()}R{os.urandom(4).hex()}.{socket.gethostname()}"
    tmp = maildir / "tmp" / name
    with open(tmp, "wb") as f:
        f.write(message)
        f.flush()
        os.fsync(f.fileno())
    final = maildir / "new" / name
    os.rename(tmp, final)
    return final


class Handler:
    def __init__(self, maildirs: Path, domain: str, users: set[str], rules: Path) -> None:
        self.maildirs, self.domain, self.users, self.rules = maildirs, domain, users, rules

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        local, _, domain = address.rpartition("@")
        if domain.lower() != self.domain:
            return "554 5.7.1 Relay access denied"
        if local.lower() not in self.users:
            return "550 5.1.1 Recipient address rejected: User unknown in virtual mailbox table"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        message: bytes = envelope.original_content or b""
        headers = message.split(b"\r\n\r\n", 1)[0]
        if any(rule.search(line) for rule in discard_rules(self.rules) for line in headers.split(b"\r\n")):
            return "250 2.0.0 Ok: queued as DISCARDED"  # what a DISCARD rule does: accept, then drop
        for rcpt in envelope.rcpt_tos:
            deliver(self.maildirs / rcpt.rpartition("@")[0].lower(), message)
        return "250 2.0.0 Ok: delivered"


async def main_async(args: argparse.Namespace) -> None:
    handler = Handler(Path(args.maildirs), args.domain, set(args.users.split(",")), Path(args.rules))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="demo-mta", ident="demo-mta", enable_SMTPUTF8=True, decode_data=False,
                     data_size_limit=50 * 1024 * 1024), "127.0.0.1", args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--maildirs", required=True)
    p.add_argument("--domain", default="demo.test")
    p.add_argument("--users", required=True)
    p.add_argument("--rules", required=True)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
