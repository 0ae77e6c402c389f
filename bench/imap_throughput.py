#!/usr/bin/env python3
"""IMAP throughput through undo-proxy versus straight to Dovecot, side by side in one run (issue 8, "Speed").

A real Dovecot (Debian's dovecot-imapd, a private instance as in tests/imapfix.py) holds one mailbox of
--messages messages. Load clients (separate processes, raw asyncio sockets, --connections connections in
all, each logged in with INBOX selected) run a command mix as fast as they can for --duration seconds,
straight to Dovecot, through undo-proxy (durable SQLite timeline), and through bench/bare_relay.py (asyncio
streams copying bytes, nothing parsed or recorded: the floor for any proxy in Python); for each mix:

- read:  NOOP, UID FETCH <uid> (FLAGS BODY.PEEK[HEADER]), FETCH <seq> (FLAGS), UID SEARCH FLAGGED
- mixed: the read mix plus UID STORE <uid> +FLAGS/-FLAGS (\\Flagged) (mutating: intent and outcome are
         committed to the timeline before the client sees the answer)

Every tagged answer must be OK; any other counts as a protocol error. Target: proxy >= 0.8x direct.

Usage: /work/venv/bin/python bench/imap_throughput.py [--duration 8] [--connections 16] [--processes 2]
       [--messages 200] [--no-write] [--keep]    (as root: Dovecot's mail runs as uid 5000)
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _common as c  # noqa: E402

from tests.imapfix import VMAIL_UID, Dovecot, write_config  # noqa: E402

READ_MIX = ["NOOP", "UID FETCH {uid} (FLAGS BODY.PEEK[HEADER])", "FETCH {seq} (FLAGS)", "UID SEARCH FLAGGED"]
WRITE_MIX = READ_MIX + ["UID STORE {uid} +FLAGS (\\Flagged)", "UID STORE {uid} -FLAGS (\\Flagged)"]
LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


@dataclass
class Result:
    commands: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


async def _session(port: int, mix: list[str], deadline: float, messages: int, result: Result) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    await reader.readuntil(b"\r\n")
    counter = 0
    last = ""

    async def command(text: str) -> bool:
        nonlocal counter, last
        counter += 1
        tag = f"t{counter}".encode()
        writer.write(tag + b" " + text.encode() + b"\r\n")
        while True:
            line = await reader.readuntil(b"\r\n")
            while m := LITERAL.search(line):
                await reader.readexactly(int(m.group(1)))
                line = await reader.readuntil(b"\r\n")
            if line.startswith(tag + b" "):
                last = f"{text} -> {line.decode(errors='replace').strip()}"
                return line.startswith(tag + b" OK")

    ok = await command("LOGIN alice secret") and await command("SELECT INBOX")
    if not ok:
        result.errors += 1
        result.samples.append(last)
        return
    rng = random.Random(os.getpid() * 1000 + counter)
    while time.monotonic() < deadline:
        n = rng.randint(1, messages)
        text = rng.choice(mix).format(uid=n, seq=n)
        t0 = time.perf_counter()
        if await command(text):
            result.commands += 1
            result.latencies.append(time.perf_counter() - t0)
        else:
            result.errors += 1
            if len(result.samples) < 3:
                result.samples.append(last)
    await command("LOGOUT")
    writer.close()


def _client(port: int, mix: list[str], connections: int, start_at: float, duration: float, messages: int,
            queue: multiprocessing.Queue) -> None:
    async def main() -> Result:
        result = Result()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.monotonic() + duration
        await asyncio.gather(*(_session(port, mix, deadline, messages, result) for _ in range(connections)))
        return result
    r = asyncio.run(main())
    queue.put((r.commands, r.errors, r.latencies[::10]))
    for sample in r.samples:
        c.log(f"protocol error: {sample}")


def load(port: int, mix: list[str], connections: int, processes: int, duration: float,
         messages: int) -> tuple[float, int, float]:
    """(commands/s, protocol errors, median latency ms) of `connections` sessions over `processes`."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    start_at = time.time() + 1.0   # every client logs in, then all start together
    procs = [multiprocessing.Process(target=_client, args=(port, mix, connections // processes, start_at,
                                                           duration, messages, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=duration + 120) for _ in procs]
    for p in procs:
        p.join()
    lat = [x for r in results for x in r[2]]
    return (sum(r[0] for r in results) / duration, sum(r[1] for r in results),
            statistics.median(lat) * 1000 if lat else 0.0)


class ImapUndoProxy(c.UndoProxy):
    imap_table = ""

    def write_config(self) -> None:
        super().write_config()
        with self.config.open("a") as fh:
            fh.write(self.imap_table)


def populate(port: int, count: int) -> None:
    import imaplib
    m = imaplib.IMAP4("127.0.0.1", port)
    m.login("alice", "secret")
    for i in range(count):
        m.append("INBOX", None, None, (f"From: load@x.test\r\nSubject: message {i}\r\nMessage-ID: <bench{i}@x.test>"
                                       f"\r\n\r\n" + "body line\r\n" * 50).encode())
    m.logout()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    c.tool("dovecot")
    rows = []
    with c.workdir("undo-bench-imap-", args.keep) as work, c.Procs() as procs:
        work.chmod(0o755)
        (work / "mail").mkdir()
        os.chown(work / "mail", VMAIL_UID, VMAIL_UID)
        (work / "dovecot").mkdir()
        dc = Dovecot(workdir=work / "dovecot", port=c.free_port(), volume=work / "mail", store=work / "unused")
        write_config(dc)
        dc.start()
        try:
            populate(dc.port, args.messages)
            proxy = ImapUndoProxy(workdir=work / "proxy", upstream=f"http://127.0.0.1:{c.free_port()}")
            imap_port = c.free_port()
            proxy.imap_table = dc.imap_table(imap_port)
            proxy.start(procs)
            c.wait_port(imap_port, proxy.proc)
            relay_port = c.free_port()
            relay = procs.start([sys.executable, str(Path(__file__).with_name("bare_relay.py")), "tcp",
                                 str(relay_port), str(dc.port)], work / "relay.log")
            c.wait_port(relay_port, relay, logfile=work / "relay.log")
            paths = (("Dovecot directly", dc.port), ("through undo-proxy", imap_port),
                     ("through a bare TCP relay (nothing recorded)", relay_port))
            for name, mix in (("read", READ_MIX), ("mixed", WRITE_MIX)):
                figures = {}
                for target, port in paths:
                    c.log(f"{name} mix, {target}: {args.connections} connections, {args.duration:g}s")
                    figures[target] = load(port, mix, args.connections, args.processes, args.duration, args.messages)
                    c.log(f"  {figures[target][0]:.0f} commands/s, {figures[target][1]} errors, "
                          f"p50 {figures[target][2]:.2f} ms")
                direct = figures["Dovecot directly"][0]
                port_of = dict(paths)
                for target, (rate, errors, p50) in figures.items():
                    ratio = rate / direct if direct else 0.0
                    verdict = ("" if target == "Dovecot directly" else f"{ratio:.2f}x" if port_of[target] == relay_port
                               else f"{ratio:.2f}x {c.verdict(ratio >= 0.8)}")
                    rows.append(f"| {name} | {target} | {rate:,.0f} | {p50:.2f} | {errors} | {verdict} |")
            verbs = proxy.metrics()
        finally:
            dc.stop()
    recorded = sum(v for k, v in verbs.items() if k.startswith("undo_proxy_verbs_total{") and 'protocol="imap"' in k)
    body = ("IMAP commands/s with " f"{args.connections} concurrent sessions (all one user, INBOX of "
            f"{args.messages} messages) from {args.processes} client processes, {args.duration:g}s per row; "
            "the proxy records every FETCH/SEARCH (read verbs, batched) and every STORE (intent and outcome "
            "durable before the answer). Target: through undo-proxy >= 0.8x Dovecot directly. The bare relay "
            "is the floor: what a Python proxy costs before it parses or records anything.\n\n"
            "| mix | path | commands/s | p50 latency (ms) | protocol errors | vs direct |\n"
            "|---|---|---:|---:|---:|---|\n" + "\n".join(rows) + "\n\n"
            f"Verbs the proxy recorded during the run: {recorded:,.0f}.\n")
    print(body)
    if not args.no_write:
        c.write_section("imap_throughput", body, c.command_line())


if __name__ == "__main__":
    main()
