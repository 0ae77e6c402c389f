"""`undo-proxy demo`: a whole undo cycle on real backends, verified.

It sets up a volume (btrfs on a loop-mounted image when it runs as root and btrfs is there, else the copy
backend), starts WsgiDAV and an MTA delivering to Maildirs in the volume (a private Postfix instance when
Postfix is installed, else a small aiosmtpd MTA), starts `undo-proxy serve`, drives real WebDAV and SMTP clients through it,
makes two operator errors (a mail filter rule that discards legitimate mail; a bulk DELETE that destroys
documents), rewinds, repairs, replays with the bad verbs skipped, compensates, commits — and checks the
outcome against what the good traffic alone produces.
"""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
from aiohttp import web

from storage.db import upgrade
from undo_proxy.demo_postfix import PrivatePostfix, postfix_binary

USERS = ["alice", "bob", "carol"]
DOMAIN = "demo.test"
TOKEN_BYTES = 18


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with {proc.returncode} before it listened on port {port}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise DemoError(f"{what} did not listen on port {port} within {timeout:.0f}s")


class DemoError(Exception):
    pass


def searchable_by_others(path: Path) -> bool:
    """Whether every directory above `path` lets other users pass (Postfix's and Dovecot's do)."""
    return all(os.stat(p).st_mode & 0o001 for p in path.parents)


@dataclass
class Phase:
    name: str
    seconds: float


@dataclass
class Demo:
    workdir: Path
    keep: bool
    say: Any = print
    procs: list[subprocess.Popen] = field(default_factory=list)
    mount: Path | None = None
    phases: list[Phase] = field(default_factory=list)
    token: str = field(default_factory=lambda: os.urandom(TOKEN_BYTES).hex())
    docs: dict[str, bytes] = field(default_factory=dict)      # what the good traffic alone leaves
    sent: dict[str, str] = field(default_factory=dict)        # Message-ID -> recipient user
    webhook_calls: list[dict[str, Any]] = field(default_factory=list)
    mail: Any = None

    # --- set-up ----------------------------------------------------------------------------------
    def volume_setup(self) -> tuple[str, Path, Path, str]:
        """btrfs on a loop-mounted image when possible, else plain directories with the copy backend."""
        why = ""
        if os.geteuid() != 0:
            why = "not running as root"
        elif not shutil.which("mkfs.btrfs") or not shutil.which("btrfs"):
            why = "btrfs-progs not installed"
        if not why:
            image, mnt = self.workdir / "volume.img", self.workdir / "mnt"
            mnt.mkdir(exist_ok=True)
            with open(image, "wb") as f:
                f.truncate(1 << 30)
            steps = [["mkfs.btrfs", "-q", str(image)], ["mount", "-o", "loop", str(image), str(mnt)]]
            for step in steps:
                res = subprocess.run(step, capture_output=True, text=True)
                if res.returncode != 0:
                    why = f"{step[0]} failed: {res.stderr.strip()[:120]}"
                    break
            else:
                self.mount = mnt
                subprocess.run(["btrfs", "subvolume", "create", str(mnt / "vol")], check=True, capture_output=True)
                (mnt / "snaps").mkdir()
                return "btrfs", mnt / "vol", mnt / "snaps", "btrfs subvolume on a loop-mounted 1 GiB image"
        vol, snaps = self.workdir / "vol", self.workdir / "snaps"
        vol.mkdir(exist_ok=True)
        snaps.mkdir(exist_ok=True)
        return "copy", vol, snaps, f"copy backend in {self.workdir} ({why})"

    def spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        logf = open(self.workdir / log, "ab")
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.workdir)
        self.procs.append(proc)
        return proc

    def write_config(self, backend: str, volume: Path, store: Path, ports: dict[str, int]) -> Path:
        cfg = self.workdir / "undo-proxy.toml"
        cfg.write_text(f'''# written by `undo-proxy demo`
[state]
dir = "{self.workdir / 'state'}"

[snapshots]
backend = "{backend}"
volume = "{volume}"
store = "{store}"
every = "0"
every_verbs = 60
keep = 50

[admin]
listen = "127.0.0.1:{ports['admin']}"
token = "{self.token}"

[[http]]
name = "web"
listen = "127.0.0.1:{ports['http']}"
upstream = "http://127.0.0.1:{ports['dav']}"
verbs = "webdav"
timeout = "30s"
compensation_webhook = "http://127.0.0.1:{ports['hook']}/undo-hook"

[[smtp]]
name = "mail"
listen = "127.0.0.1:{ports['smtp']}"
upstream = "127.0.0.1:{ports['mta']}"
verbs = "smtp"
hostname = "mail.{DOMAIN}"
postmaster = "postmaster@{DOMAIN}"
{self.mail.smtp_settings}
[service]
{self.mail.service_settings}
''')
        return cfg

    async def start_webhook(self, port: int) -> web.AppRunner:
        async def hook(request: web.Request) -> web.Response:
            self.webhook_calls.append(await request.json())
            return web.json_response({"ok": True})
        app = web.Application()
        app.router.add_post("/undo-hook", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    # --- the run ---------------------------------------------------------------------------------
    async def timed(self, name: str, coro: Any) -> Any:
        t0 = time.monotonic()
        try:
            return await coro
        finally:
            self.phases.append(Phase(name, time.monotonic() - t0))

    async def run(self) -> int:
        t_start = time.monotonic()
        backend, volume, store, how = self.volume_setup()
        self.say(f"volume: {how}")
        (volume / "dav").mkdir(exist_ok=True)
        (volume / "mail").mkdir(exist_ok=True)
        ports = {k: free_port() for k in ("dav", "mta", "http", "smtp", "admin", "hook")}
        self.mail = self.choose_mail(volume / "mail", ports["mta"])
        self.say("web backend: WsgiDAV serving the volume's dav/")
        self.say(f"mail backend: {self.mail.description}")
        cfg = self.write_config(backend, volume, store, ports)
        hook = await self.start_webhook(ports["hook"])
        try:
            await self.timed("setup", self.start_services(cfg, volume, ports))
            self.say(f"undo-proxy serving: web on 127.0.0.1:{ports['http']}, mail on 127.0.0.1:{ports['smtp']}, "
                     f"admin on 127.0.0.1:{ports['admin']}")
            async with aiohttp.ClientSession(auto_decompress=False) as http:
                report = await self.scenario(http, ports)
            report["total"] = time.monotonic() - t_start
            ok = self.print_summary(report, backend, how)
            if self.keep:
                stop = self.write_stop_script()
                self.say(f"--keep: still running. admin UI: http://127.0.0.1:{ports['admin']}/  token: {self.token}\n"
                         f"  config: {cfg}   (e.g. undo-proxy -c {cfg} timeline)\n"
                         f"  stop and clean up with: sh {stop}")
            return 0 if ok else 1
        finally:
            await hook.cleanup()

    def choose_mail(self, maildirs: Path, port: int) -> "MailBackend":
        """Postfix when it is installed and we are root (a private instance), else the embedded MTA."""
        if os.geteuid() != 0:
            why = "not running as root"
        elif not postfix_binary():
            why = "Postfix is not installed"
        elif not searchable_by_others(self.workdir):
            why = f"Postfix's users cannot enter {self.workdir}: a parent directory is not searchable by others"
        else:
            return PostfixMail(PrivatePostfix(self.workdir / "postfix", maildirs, DOMAIN, USERS, port))
        return EmbeddedMail(self, maildirs, port, why)

    async def start_services(self, cfg: Path, volume: Path, ports: dict[str, int]) -> None:
        # Modules of this interpreter, not console scripts: their shebangs may point where another user
        # cannot follow.
        dav = self.spawn([sys.executable, "-m", "wsgidav.server.server_cli", "--host", "127.0.0.1", "--port", str(ports["dav"]), "--root",
                                    str(volume / "dav"), "--auth", "anonymous", "--no-config", "-q"], "wsgidav.log")
        await asyncio.to_thread(self.mail.start)
        await wait_port(ports["dav"], dav, "WsgiDAV")
        await self.mail.wait_ready()
        await asyncio.to_thread(upgrade, f"sqlite:///{self.workdir / 'state' / 'timeline.db'}")
        serve = self.spawn([sys.executable, "-m", "undo_proxy.cli", "serve", "-c", str(cfg)], "serve.log")
        await wait_port(ports["http"], serve, "undo-proxy serve")
        await wait_port(ports["admin"], serve, "undo-proxy serve")

    async def api(self, http: aiohttp.ClientSession, port: int, method: str, path: str, body: Any = None) -> Any:
        async with http.request(method, f"http://127.0.0.1:{port}/api{path}", json=body,
                                headers={"Authorization": f"Bearer {self.token}"}) as resp:
            doc = await resp.json()
            if resp.status >= 400:
                raise DemoError(f"{method} /api{path}: {resp.status} {doc.get('error')}")
            return doc

    # --- traffic ---------------------------------------------------------------------------------
    async def put(self, http: aiohttp.ClientSession, base: str, path: str, body: bytes, good: bool = True) -> int:
        async with http.put(base + path, data=body) as resp:
            await resp.read()
            if good and resp.status in (200, 201, 204):
                self.docs[path] = body
            return resp.status

    async def web_traffic(self, http: aiohttp.ClientSession, base: str, rng: random.Random, n: int,
                          tag: str) -> int:
        """Writers add and revise documents, readers read them; a few documents are moved."""
        done = 0
        for i in range(n):
            path = f"/docs/{tag}-{i:03d}.txt"
            await self.put(http, base, path, f"{tag} document {i}\n{'lorem ipsum ' * rng.randint(5, 200)}\n".encode())
            done += 1
            if i % 4 == 3:
                async with http.get(base + path) as resp:
                    await resp.read()
                done += 1
            if i % 10 == 9:
                dest = f"/docs/archive/{tag}-{i:03d}.txt"
                async with http.request("MOVE", base + path, headers={"Destination": base + dest}) as resp:
                    if resp.status in (201, 204):
                        self.docs[dest] = self.docs.pop(path)
                done += 1
        return done

    def message(self, rng: random.Random, i: int, subject: str, user: str) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = f"sender{i % 7}@example.net"
        msg["To"] = f"{user}@{DOMAIN}"
        msg["Subject"] = subject
        msg["Message-ID"] = make_msgid(domain="example.net")
        msg.set_content(f"Hello {user},\n\n" + "Grüße aus dem Büro. " * rng.randint(1, 80) + "\n")
        if i % 5 == 0:
            msg.add_attachment(rng.randbytes(rng.randint(1000, 40000)), maintype="application",
                               subtype="octet-stream", filename=f"attachment-{i}.bin")
        return msg

    async def mail_traffic(self, smtp_port: int, rng: random.Random, n: int, start: int) -> int:
        async def worker(indices: list[int]) -> None:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, timeout=30)
            await client.connect()
            try:
                for i in indices:
                    user = USERS[i % len(USERS)]
                    kind = "Invoice" if i % 6 == 0 else "Status"
                    msg = self.message(rng, i, f"{kind} {i} — Übersicht ✓", user)
                    await client.send_message(msg)
                    self.sent[msg["Message-ID"]] = user
            finally:
                await client.quit()
        indices = list(range(start, start + n))
        await asyncio.gather(*(worker(indices[k::4]) for k in range(4)))
        return n

    async def scenario(self, http: aiohttp.ClientSession, ports: dict[str, int]) -> dict[str, Any]:
        base = f"http://127.0.0.1:{ports['http']}"
        rng = random.Random(20261203)
        report: dict[str, Any] = {}

        async def good_traffic() -> None:
            async with http.request("MKCOL", base + "/docs/") as r:
                await r.read()
            async with http.request("MKCOL", base + "/docs/archive/") as r:
                await r.read()
            await asyncio.gather(self.web_traffic(http, base, rng, 80, "plan"),
                                 self.mail_traffic(ports["smtp"], rng, 160, 0))
        await self.timed("traffic before the errors", good_traffic())
        snap = await self.api(http, ports["admin"], "POST", "/snapshots", {"label": "demo: known good"})
        self.say(f"snapshot {snap['id']} after verb {snap['after_seq']}")

        async def errors_and_more_traffic() -> list[int]:
            # Operator error 1: a filter rule meant for spam also eats every invoice.
            await asyncio.to_thread(self.mail.set_filter, "/^Subject: .*Invoice/ DISCARD\n")
            # Operator error 2: a clean-up script deletes the wrong documents.
            last = (await self.api(http, ports["admin"], "GET", "/status"))["last_seq"]
            victims = sorted(p for p in self.docs if p.startswith("/docs/plan-"))[:12]
            for path in victims:
                async with http.delete(base + path) as r:
                    await r.read()
            bad = [v["seq"] for v in await self.api(http, ports["admin"], "GET",
                                                    f"/timeline?after={last}&verb=webdav.delete")]
            self.say(f"operator errors: a DISCARD rule for invoices; a bulk DELETE of {len(bad)} documents")
            # Users keep working and some of them see the damage.
            for path in victims[::3]:
                async with http.get(base + path) as r:
                    await r.read()
            await asyncio.gather(self.web_traffic(http, base, rng, 40, "memo"),
                                 self.mail_traffic(ports["smtp"], rng, 140, 160))
            return bad
        bad = await self.timed("errors and traffic after them", errors_and_more_traffic())
        report["bad"] = bad
        await asyncio.to_thread(self.mail.settle)
        missing = self.count_missing_mail()
        self.say(f"damage: {missing} messages discarded by the filter, {len(bad)} documents deleted")

        snaps = await self.api(http, ports["admin"], "GET", "/snapshots")
        target = max((s for s in snaps if s["valid"] and s["after_seq"] < min(bad)), key=lambda s: s["after_seq"])
        cycle = await self.timed("rewind", self.api(http, ports["admin"], "POST", "/rewind", {"to": target["id"]}))
        self.say(f"rewound to snapshot {target['id']} (after verb {target['after_seq']}), cycle {cycle['id']}")
        await asyncio.to_thread(self.mail.set_filter, "")
        await self.api(http, ports["admin"], "POST", "/repair",
                       {"note": "removed the invoice DISCARD rule; skipping the bulk DELETE"})
        cycle = await self.timed("replay", self.api(http, ports["admin"], "POST", "/replay", {"skip": bad}))
        self.say(f"replayed {cycle['replayed']} verbs, skipped {len(cycle['skipped'])}, "
                 f"{cycle['inconsistencies']} inconsistencies")
        incs = await self.api(http, ports["admin"], "GET", f"/inconsistencies?cycle={cycle['id']}")
        cycle = await self.timed("commit", self.api(http, ports["admin"], "POST", "/commit"))
        comps = await self.timed("compensate", self.api(http, ports["admin"], "POST", "/compensate", {"all": True}))
        report.update(cycle=cycle, inconsistencies=incs, compensations=comps, snapshot=target,
                      status=await self.api(http, ports["admin"], "GET", "/status"),
                      verbs=await self.api(http, ports["admin"], "GET", "/timeline?limit=1000000"))
        await asyncio.to_thread(self.mail.settle)
        report["verify"] = await self.timed("verify", self.verify(http, base))
        return report

    # --- checks ----------------------------------------------------------------------------------
    def delivered(self) -> dict[str, int]:
        """Message-ID -> copies in the Maildirs."""
        from verbs.smtp import message_id_of
        counts: dict[str, int] = {}
        mail = (self.mount / "vol" if self.mount else self.workdir / "vol") / "mail"
        for f in mail.glob("*/*/*"):
            if f.parent.name in ("new", "cur"):
                mid = message_id_of(f.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
                if mid:
                    counts[mid] = counts.get(mid, 0) + 1
        return counts

    def count_missing_mail(self) -> int:
        have = self.delivered()
        return sum(1 for mid in self.sent if have.get(mid, 0) == 0)

    async def verify(self, http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
        have = self.delivered()
        mail_ok = sum(1 for mid in self.sent if have.get(mid) == 1)
        dupes = sum(1 for mid in self.sent if have.get(mid, 0) > 1)
        docs_ok = 0
        wrong = []
        for path, body in sorted(self.docs.items()):
            async with http.get(base + path) as resp:
                got = await resp.read()
            if resp.status == 200 and got == body:
                docs_ok += 1
            else:
                wrong.append(f"{path}: {resp.status}")
        return {"mail_ok": mail_ok, "mail_total": len(self.sent), "dupes": dupes, "docs_ok": docs_ok,
                "docs_total": len(self.docs), "wrong": wrong[:5]}

    def print_summary(self, r: dict[str, Any], backend: str, how: str) -> bool:
        v = r["verify"]
        verbs = r["verbs"]
        live = [x for x in verbs if x["origin"] == "live"]
        by_proto: dict[str, int] = {}
        for x in live:
            by_proto[x["protocol"]] = by_proto.get(x["protocol"], 0) + 1
        kinds: dict[str, int] = {}
        for i in r["inconsistencies"]:
            kinds[i["kind"]] = kinds.get(i["kind"], 0) + 1
        comp: dict[str, int] = {}
        for c in r["compensations"]:
            comp[c["compensation"]] = comp.get(c["compensation"], 0) + 1
        ok = (v["mail_ok"] == v["mail_total"] and v["dupes"] == 0 and v["docs_ok"] == v["docs_total"]
              and r["cycle"]["state"] == "committed" and r["status"]["mode"] == "live"
              and len(r["inconsistencies"]) > 0 and all(c["compensation"] == "done" for c in r["compensations"]))
        duplicated = f" ({v['dupes']} duplicated)" if v["dupes"] else ""
        lines = [
            f"undo-proxy demo: {'all checks hold' if ok else 'CHECKS FAILED'} ({r['total']:.1f} s)",
            f"  volume:           {how}",
            f"  verbs recorded:   {len(live)} ({', '.join(f'{k} {n}' for k, n in sorted(by_proto.items()))})",
            f"  rewind point:     snapshot {r['snapshot']['id']} (after verb {r['snapshot']['after_seq']})",
            f"  verbs replayed:   {r['cycle']['replayed']} (skipped {len(r['cycle']['skipped'])} bad verbs: "
            f"{', '.join(map(str, r['cycle']['skipped']))})",
            f"  inconsistencies:  {len(r['inconsistencies'])} "
            f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or 'none'})",
            f"  compensations:    {', '.join(f'{n} {k}' for k, n in sorted(comp.items())) or 'none'}"
            f" ({len(self.webhook_calls)} webhook calls received)",
            "  time per phase:   " + " · ".join(f"{p.name} {p.seconds:.1f} s" for p in self.phases),
            f"  verified:         {v['mail_ok']}/{v['mail_total']} messages present exactly once"
            f"{duplicated}; "
            f"{v['docs_ok']}/{v['docs_total']} documents right",
        ]
        if v["wrong"]:
            lines.append(f"  wrong documents:  {'; '.join(v['wrong'])}")
        self.say("\n".join(lines))
        return ok

    def write_stop_script(self) -> Path:
        """For --keep: one command that ends what the demo left running and removes what it made."""
        script = self.workdir / "stop.sh"
        lines = ["#!/bin/sh", "# written by `undo-proxy demo --keep`: stops the demo and removes its files"]
        lines += [f"kill -TERM -{p.pid} 2>/dev/null" for p in self.procs]
        lines.append("sleep 2")
        lines += self.mail.stop_commands if self.mail else []
        lines += [f"kill -KILL -{p.pid} 2>/dev/null" for p in self.procs]
        if self.mount:
            lines.append(f"umount -l {self.mount}")
        lines.append(f"rm -rf --one-file-system {self.workdir}")
        script.write_text("\n".join(lines) + "\n")
        script.chmod(0o755)
        return script

    # --- clean-up --------------------------------------------------------------------------------
    def cleanup(self) -> None:
        if self.mail is not None:
            with suppress(Exception):
                self.mail.stop()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.mount:
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)


def run_demo(workdir: str | None, keep: bool) -> int:
    made = workdir is None
    path = Path(workdir or tempfile.mkdtemp(prefix="undo-proxy-demo-")).absolute()
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise DemoError(f"{path} is not empty; give an empty or new --workdir")
    path.chmod(0o755)
    demo = Demo(workdir=path, keep=keep)
    print(f"undo-proxy demo in {path}", flush=True)
    try:
        return asyncio.run(demo.run())
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if not keep:
            demo.cleanup()
            if made:
                shutil.rmtree(path, ignore_errors=True)
            elif demo.mount:
                with suppress(OSError):
                    (path / "volume.img").unlink()



class MailBackend:
    description: str
    smtp_settings = ""       # more keys of the [[smtp]] table
    service_settings = ""    # keys of [service]
    stop_commands: list[str] = []

    def start(self) -> None: ...
    async def wait_ready(self) -> None: ...
    def set_filter(self, rules: str) -> None: ...
    def settle(self) -> None: ...
    def stop(self) -> None: ...


class PostfixMail(MailBackend):
    def __init__(self, postfix: PrivatePostfix) -> None:
        self.postfix = postfix
        self.description = (f"Postfix (a private instance of the installed one, on 127.0.0.1:{postfix.port}, "
                            f"config in {postfix.etc}) delivering to Maildirs in the volume's mail/")
        # Postfix answers 250 before it delivers: snapshots wait for an empty queue.
        self.service_settings = f"settle = '{postfix.settle_command}'\n"
        self.stop_commands = [f"{postfix.binary} -c {postfix.etc} stop"]

    def start(self) -> None:
        self.postfix.start()

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.postfix.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise DemoError(f"Postfix did not listen on port {self.postfix.port}")

    def set_filter(self, rules: str) -> None:
        self.postfix.set_header_checks(rules)

    def settle(self) -> None:
        self.postfix.wait_queue_empty()

    def stop(self) -> None:
        self.postfix.stop()


class EmbeddedMail(MailBackend):
    def __init__(self, demo: Demo, maildirs: Path, port: int, why: str) -> None:
        self.demo, self.maildirs, self.port = demo, maildirs, port
        self.rules = demo.workdir / "mail-filter.txt"
        self.description = (f"an embedded aiosmtpd MTA delivering to Maildirs in the volume's mail/ ({why})")
        # The demo's own MTA runs on this machine's loopback and has no XCLIENT.
        self.smtp_settings = "allow_without_xclient = true\n"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.set_filter("")
        self.proc = self.demo.spawn([sys.executable, "-m", "undo_proxy.demo_mta", "--port", str(self.port),
                                     "--maildirs", str(self.maildirs), "--domain", DOMAIN, "--users",
                                     ",".join(USERS), "--rules", str(self.rules)], "mta.log")

    async def wait_ready(self) -> None:
        assert self.proc is not None
        await wait_port(self.port, self.proc, "the demo MTA")

    def set_filter(self, rules: str) -> None:
        self.rules.write_text("# header filter of the demo MTA (Postfix header_checks syntax)\n" + rules)

    def settle(self) -> None:
        return None  # it delivers before it answers 250
