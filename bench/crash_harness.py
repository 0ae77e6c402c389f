#!/usr/bin/env python3
"""Crash-only harness (issue 7): kill -9 the daemon under load, again and again, and check nothing is lost.

Mixed HTTP load (PUT/GET/DELETE through undo-proxy to a real WsgiDAV) and, when Postfix is installed and we
run as root, SMTP load (through undo-proxy to a private real Postfix delivering to Maildirs in the same
volume). The daemon is `kill -9`ed at random moments (sometimes in the middle of a snapshot) and restarted;
after each restart, with the load paused:

* every request whose client got a success (HTTP 2xx, SMTP 250 after DATA) is in the timeline as
  `committed`, matched by a unique id (`X-Crash-Id` header, Message-ID);
* a successful read is in the timeline with the body digest its client saw (reads are recorded in batches
  just after they are served, so only reads served > READ_GRACE s before the kill must be there);
* no verb is `pending`; `PRAGMA integrity_check` says ok; every snapshot on record exists in the store;
* the backend equals what the timeline describes: for each path the last committed PUT/DELETE decides its
  content (an `unknown` or `failed` verb after it may or may not have happened); every message the
  timeline says was accepted is in its Maildir exactly once, and none is there that the timeline does not
  know.

Then the undo cycle: the daemon killed during a rewind, during a cancel and during a replay. After the
restart the cycle is resumed or cancelled, and cancel brings back the pre-rewind state exactly (sha256 of
every file in the volume).

Bounded: `--budget` seconds (default 170) for the kills and cycles (setting up the volume, WsgiDAV and Postfix
comes on top, about 10-30 s); loopback only. Also importable: the fast
pytest version (tests/test_crash.py) calls `run()` with a few kills.

Usage (root, repository root, project venv):
    /work/venv/bin/python bench/crash_harness.py [--kills 20] [--budget 170] [--seed N] [--no-smtp]
        [--no-btrfs] [--write-doc] [--with-tests]
`--write-doc` writes docs/reliability.md; `--with-tests` also runs tests/test_faults.py,
tests/test_hostile.py and tests/test_access.py and puts their counts in the table.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import shutil
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.backends import WsgiDav, btrfs_volume, free_port, wait_port, wsgidav_processes  # noqa: E402

HOST = "127.0.0.1"
TOKEN = "crash-harness-token"
UNDO_PROXY = str(Path(sys.executable).with_name("undo-proxy"))
PATHS = 24                 # /crash/p0 .. p23: clients race on them
READ_GRACE = 1.0           # reads served this long before a kill must be on record
DOC = ROOT / "docs" / "reliability.md"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file ("dir" for directories): the state, exactly."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = sha(fh.read())
    return out


class Failure(AssertionError):
    pass


# --------------------------------------------------------------------------- the daemon

@dataclass
class Daemon:
    workdir: Path
    volume: Path
    store: Path
    dav: WsgiDav
    backend: str
    smtp_upstream: int | None = None
    http_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    smtp_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def config(self) -> Path:
        return self.workdir / "undo-proxy.toml"

    @property
    def db(self) -> Path:
        return self.workdir / "state" / "timeline.db"

    @property
    def log(self) -> Path:
        return self.workdir / "serve.log"

    def write_config(self) -> None:
        smtp = ""
        if self.smtp_upstream:
            smtp = f'''
[[smtp]]
name = "mail"
listen = "{HOST}:{self.smtp_port}"
upstream = "{HOST}:{self.smtp_upstream}"
verbs = "smtp"
hostname = "proxy.example.test"
timeout = "10s"
'''
        self.config.write_text(f'''[state]
dir = "{self.workdir / 'state'}"

[snapshots]
backend = "{self.backend}"
volume = "{self.volume}"
store = "{self.store}"
every = "0"
keep = 1000

[admin]
listen = "{HOST}:{self.admin_port}"
token = "{TOKEN}"

[[http]]
name = "web"
listen = "{HOST}:{self.http_port}"
upstream = "{self.dav.url}"
verbs = "webdav"
timeout = "10s"
{smtp}''')

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([UNDO_PROXY, *args, "-c", str(self.config)], capture_output=True, text=True,
                              timeout=120)

    def start(self) -> float:
        """Start `undo-proxy serve`; returns the seconds until it listened (recovery included)."""
        if self.starts == 0:
            self.write_config()
            res = self.cli("db", "upgrade")
            if res.returncode:
                raise Failure(f"db upgrade failed: {res.stderr}")
        t0 = time.monotonic()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([UNDO_PROXY, "serve", "-c", str(self.config)], stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            for port in (self.http_port, self.admin_port) + ((self.smtp_port,) if self.smtp_upstream else ()):
                wait_port(port, timeout=60, proc=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            raise Failure(f"the daemon did not come back: {exc}\n{self.log_tail()}") from None
        self.starts += 1
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def api(self, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://{HOST}:{self.admin_port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def api_in_background(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """Fire an admin call from a thread (the daemon will be killed under it); returns its result box."""
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["result"] = self.api(method, path, body, timeout=120)
            except Exception as exc:  # noqa: BLE001 - the daemon died under it: expected
                box["error"] = repr(exc)
        box["thread"] = threading.Thread(target=call, daemon=True)
        box["thread"].start()
        return box

    # straight from the database (works while the daemon is down or busy)
    def query(self, sql: str, *args: Any) -> list[tuple]:
        conn = sqlite3.connect(self.db, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()


# --------------------------------------------------------------------------- the load

@dataclass
class Op:
    kind: str            # "PUT" | "GET" | "DELETE" | "SMTP"
    target: str          # path or Message-ID
    cid: str             # X-Crash-Id (HTTP) / Message-ID (SMTP)
    ok: bool = False
    status: int = 0
    digest: str | None = None   # PUT: the body sent; GET: the body received
    done: float = 0.0


class Load:
    """Client threads that keep sending requests while `running` is set; `pause()` waits until every client
    stands still."""

    def __init__(self, daemon: Daemon, rng: random.Random, http_clients: int = 4, smtp_clients: int = 1) -> None:
        self.d = daemon
        self.rng = rng
        self.ops: list[Op] = []
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.stopping = False
        self.idle = [threading.Event() for _ in range(http_clients + (smtp_clients if daemon.smtp_upstream else 0))]
        self.threads = []
        for i in range(http_clients):
            self.threads.append(threading.Thread(target=self._http_client, args=(i,), daemon=True))
        for j in range(len(self.idle) - http_clients):
            self.threads.append(threading.Thread(target=self._smtp_client, args=(http_clients + j,), daemon=True))
        for t in self.threads:
            t.start()

    def resume(self) -> None:
        for e in self.idle:
            e.clear()
        self.running.set()

    def pause(self, timeout: float = 30) -> None:
        self.running.clear()
        deadline = time.monotonic() + timeout
        for e in self.idle:
            if not e.wait(max(0.1, deadline - time.monotonic())):
                raise Failure("a load client did not stop within 30 s")

    def close(self) -> None:
        self.stopping = True
        self.running.set()
        for t in self.threads:
            t.join(15)

    def _wait_running(self, i: int) -> bool:
        while not self.running.is_set():
            self.idle[i].set()
            self.running.wait(0.2)
        return not self.stopping

    def _add(self, op: Op) -> None:
        op.done = time.monotonic()
        with self.lock:
            self.ops.append(op)

    def _http_client(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        conn: http.client.HTTPConnection | None = None
        for _ in range(10_000_000):   # bounded; ends when the harness stops it
            if not self._wait_running(i):
                return
            if conn is None:
                conn = http.client.HTTPConnection(HOST, self.d.http_port, timeout=15)
            path = f"/crash/p{rng.randrange(PATHS)}"
            kind = rng.choices(("PUT", "GET", "DELETE"), (5, 3, 2))[0]
            op = Op(kind, path, uuid.uuid4().hex)
            body = None
            if kind == "PUT":
                body = f"{op.cid} {path}\n".encode() * rng.choice((1, 4, 60, 2000))
                op.digest = sha(body)
            try:
                conn.request(kind, path, body=body, headers={"X-Crash-Id": op.cid})
                resp = conn.getresponse()
                data = resp.read()
                op.status = resp.status
                op.ok = 200 <= resp.status < 300
                if kind == "GET":
                    op.digest = sha(data)
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                time.sleep(0.05)
            self._add(op)

    def _smtp_client(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        for _ in range(10_000_000):
            if not self._wait_running(i):
                return
            mid = f"<{uuid.uuid4().hex}@crash.example.test>"
            op = Op("SMTP", mid, mid)
            msg = (f"From: crash@example.test\r\nTo: alice@example.test\r\nSubject: crash {mid}\r\n"
                   f"Message-ID: {mid}\r\n\r\n" + f"body of {mid}\r\n" * rng.choice((1, 50))).encode()
            try:
                with smtplib.SMTP(HOST, self.d.smtp_port, timeout=15) as s:
                    s.ehlo("client.example.test")
                    s.sendmail("crash@example.test", ["alice@example.test"], msg)
                op.ok, op.status = True, 250
            except smtplib.SMTPResponseException as exc:
                op.status = exc.smtp_code
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)
            self._add(op)


# --------------------------------------------------------------------------- the checks

def _headers_id(request: dict[str, Any]) -> str | None:
    for k, v in request.get("headers") or []:
        if k.lower() == "x-crash-id":
            return v
    return None


@dataclass
class Figures:
    requests: int = 0            # client requests sent (HTTP)
    http_ok: int = 0             # ... answered 2xx
    messages: int = 0            # SMTP transactions tried
    messages_ok: int = 0         # ... accepted (250)
    kills: int = 0               # kill -9 of the daemon (all kinds)
    kills_load: int = 0
    kills_snapshot: int = 0
    kills_rewind: int = 0
    kills_cancel: int = 0
    kills_replay: int = 0
    restarts: int = 0
    unknown: int = 0             # verbs whose outcome was lost (marked unknown)
    reads_unrecorded: set[str] = field(default_factory=set)  # reads served within READ_GRACE of a kill, not on
    #                                                         record (by design: reads are recorded in batches)
    orphan_snapshots: int = 0    # snapshot dirs in the store that the timeline does not list
    cycles_cancelled: int = 0
    cycles_committed: int = 0
    lost: int = 0                # acknowledged and not on record, or backend different: must be 0
    kill_times: list[float] = field(default_factory=list)
    max_restart_s: float = 0.0
    seconds: float = 0.0
    backend: str = ""
    smtp: bool = False
    problems: list[str] = field(default_factory=list)


def _effect(verb: str, output: dict[str, Any] | None, request: dict[str, Any]) -> str | None:
    """What a verb did to its path: a sha256, "absent", or None (no change)."""
    status = (output or {}).get("status") or 0
    if not 200 <= status < 300:
        return None
    if verb == "webdav.put":
        return (request.get("body") or {}).get("digest")
    if verb == "webdav.delete":
        return "absent"
    return None


def check(d: Daemon, load: Load, figures: Figures, mail_volume: Path | None) -> None:
    """Everything a restart must guarantee (see the module docstring). Appends to figures.problems."""
    problems: list[str] = []
    integrity = d.query("PRAGMA integrity_check")[0][0]
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    pending = d.query("SELECT seq, summary FROM verbs WHERE status = 'pending'")
    if pending:
        problems.append(f"{len(pending)} verbs still pending after restart: {pending[:3]}")
    rows = d.query("SELECT seq, verb, targets, status, origin, request, output FROM verbs ORDER BY seq")
    by_id: dict[str, list[tuple]] = {}
    by_path: dict[str, list[tuple]] = {}
    by_mid: dict[str, list[tuple]] = {}
    unknown = 0
    for seq, verb, targets, status, origin, request, output in rows:
        request = json.loads(request) if request else {}
        output = json.loads(output) if output else None
        unknown += status == "unknown"
        if origin != "live":
            continue
        if verb.startswith("webdav."):
            cid = _headers_id(request)
            if cid:
                by_id.setdefault(cid, []).append((seq, verb, status, request, output))
            for t in json.loads(targets):
                by_path.setdefault(t, []).append((seq, verb, status, request, output))
        elif verb == "smtp.deliver":
            by_mid.setdefault(request.get("message_id"), []).append((seq, status, output))
    figures.unknown = unknown
    with load.lock:
        ops = list(load.ops)
    # 1. every success is on record
    for op in ops:
        if not op.ok:
            continue
        if op.kind == "SMTP":
            recs = [r for r in by_mid.get(op.cid, []) if r[1] == "committed"
                    and ((r[2] or {}).get("data") or [0])[0] == 250]
            if not recs:
                problems.append(f"message {op.cid} got 250 but is not committed in the timeline")
            continue
        recs = [r for r in by_id.get(op.cid, []) if r[2] == "committed"]
        if not recs:
            if op.kind == "GET" and not by_id.get(op.cid) \
                    and any(0 <= k - op.done < READ_GRACE for k in figures.kill_times):
                figures.reads_unrecorded.add(op.cid)
                continue
            problems.append(f"{op.kind} {op.target} ({op.cid}) got {op.status} but no committed verb records it "
                            f"({[r[2] for r in by_id.get(op.cid, [])]})")
            continue
        seq, verb, status, request, output = recs[0]
        if op.kind == "PUT" and (request.get("body") or {}).get("digest") != op.digest:
            problems.append(f"PUT {op.target} verb {seq}: recorded body differs from the one sent")
        if op.kind == "GET" and ((output or {}).get("body") or {}).get("digest") != op.digest:
            problems.append(f"GET {op.target} verb {seq}: recorded output differs from what the client saw")
        if (output or {}).get("status") != op.status:
            problems.append(f"{op.kind} {op.target} verb {seq}: recorded status {(output or {}).get('status')}, "
                            f"client saw {op.status}")
    # 2. the backend is what the committed verbs say
    for i in range(PATHS):
        path = f"/crash/p{i}"
        possible: set[str] = {"absent"}
        for seq, verb, status, request, output in by_path.get(path, []):
            if status == "committed":
                eff = _effect(verb, output, request)
                if eff is not None:
                    possible = {eff}
            elif status in ("unknown", "failed") and verb in ("webdav.put", "webdav.delete"):
                # may or may not have reached WsgiDAV: either outcome is right
                possible.add(request.get("body", {}).get("digest") if verb == "webdav.put" else "absent")
        f = d.volume / "crash" / f"p{i}"
        actual = sha(f.read_bytes()) if f.is_file() else "absent"
        if actual not in possible:
            problems.append(f"{path}: the volume holds {actual[:12]}, the timeline says one of "
                            f"{sorted(p[:12] for p in possible)}")
    extra = {p.name for p in (d.volume / "crash").iterdir()} - {f"p{i}" for i in range(PATHS)}
    if extra:
        problems.append(f"files the timeline knows nothing of: {sorted(extra)[:5]}")
    # 3. mail: each accepted message delivered once; none the timeline does not know
    if mail_volume is not None:
        delivered: dict[str, int] = {}
        for sub in ("new", "cur"):
            for f in (mail_volume / "alice" / sub).glob("*") if (mail_volume / "alice" / sub).is_dir() else []:
                for line in f.read_bytes().split(b"\n"):
                    if line.lower().startswith(b"message-id:"):
                        mid = line.split(b":", 1)[1].strip().decode()
                        delivered[mid] = delivered.get(mid, 0) + 1
                        break
                    if not line.strip():
                        break
        for mid, recs in by_mid.items():
            accepted = any(r[1] == "committed" and ((r[2] or {}).get("data") or [0])[0] == 250 for r in recs)
            maybe = any(r[1] in ("unknown", "failed") for r in recs)
            n = delivered.get(mid, 0)
            if accepted and n != 1 or not accepted and not maybe and n != 0 or n > 1:
                problems.append(f"message {mid}: delivered {n} times, timeline says {[r[1] for r in recs]}")
        unknown_mail = set(delivered) - set(by_mid)
        if unknown_mail:
            problems.append(f"{len(unknown_mail)} messages delivered that the timeline does not know")
    # 4. snapshots on record exist; count orphans
    snaps = d.query("SELECT id, path FROM snapshots WHERE deleted = 0")
    for sid, path in snaps:
        if not Path(path).exists():
            problems.append(f"snapshot {sid} is on record but {path} is gone")
    listed = {s for s, _ in d.query("SELECT id, path FROM snapshots")}
    figures.orphan_snapshots = len([p for p in d.store.iterdir() if p.name not in listed
                                    and not p.name.startswith(".")])
    if problems:
        figures.lost += len(problems)
        figures.problems += problems
        raise Failure("\n".join(problems[:20]))


def wait_mail_settled(postfix: Any, timeout: float = 30) -> None:
    if postfix is not None:
        postfix.wait_queue_empty(timeout)


# --------------------------------------------------------------------------- the run

@contextlib.contextmanager
def environment(workdir: Path, use_btrfs: bool, smtp: bool) -> Iterator[tuple[Path, Path, str, Any]]:
    """(volume, store, backend, postfix or None)"""
    with contextlib.ExitStack() as stack:
        if use_btrfs:
            mnt = stack.enter_context(btrfs_volume(workdir / "btrfs"))
            volume, store, backend = mnt.volume, mnt.store, "btrfs"
            mnt.mount.chmod(0o755)
        else:
            volume, store, backend = workdir / "vol", workdir / "snaps", "copy"
            volume.mkdir()
            store.mkdir()
        postfix = None
        if smtp:
            from tests.mail import postfix_instance  # a real, private Postfix (Debian's binaries)
            postfix = stack.enter_context(postfix_instance(workdir / "postfix", volume, store))
        yield volume, store, backend, postfix




def run(kills: int = 20, budget: float = 170, seed: int | None = None, use_btrfs: bool | None = None,
        smtp: bool | None = None, replay_kills: int = 2, rewind_kills: int = 2, cancel_kills: int = 1,
        snapshot_kills: int | None = None, workdir: Path | None = None, http_clients: int = 4) -> Figures:
    """The whole harness; raises Failure on the first broken guarantee. Returns the figures."""
    t_total = time.monotonic()
    seed = seed if seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    root = os.geteuid() == 0
    if use_btrfs is None:
        use_btrfs = root and shutil.which("btrfs") is not None and shutil.which("mkfs.btrfs", path="/usr/sbin:/sbin")
    if smtp is None:
        smtp = bool(use_btrfs) and root and shutil.which("postfix", path="/usr/sbin:/sbin:/usr/bin") is not None
    snapshot_kills = snapshot_kills if snapshot_kills is not None else max(1, kills // 5)
    figures = Figures(backend="btrfs" if use_btrfs else "copy", smtp=bool(smtp))
    log(f"crash harness: seed {seed}, {kills} kills under load (+{snapshot_kills} during snapshots), "
        f"{rewind_kills} during rewinds, {cancel_kills} during cancels, {replay_kills} during replays; "
        f"{figures.backend} backend; SMTP {'on (real Postfix)' if smtp else 'off'}")
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="undo-crash-")) if own else workdir
    work.chmod(0o755)
    try:
        with environment(work, bool(use_btrfs), bool(smtp)) as (volume, store, backend, postfix), \
                wsgidav_processes(work) as dav_start:
            (volume / "crash").mkdir()
            (volume / "cycle").mkdir()
            dav = dav_start(volume)
            state = work / "daemon"
            state.mkdir()
            d = Daemon(state, volume, store, dav, backend, smtp_upstream=postfix.port if postfix else None)
            figures.max_restart_s = d.start()
            t_start = time.monotonic()    # the budget is for the kills; setting up is not charged
            load = Load(d, rng, http_clients=http_clients)
            try:
                _run_all(d, load, figures, rng, kills, snapshot_kills, rewind_kills, cancel_kills, replay_kills,
                         postfix, t_start, budget)
            finally:
                load.close()
                with load.lock:
                    figures.requests = sum(op.kind != "SMTP" for op in load.ops)
                    figures.http_ok = sum(op.ok and op.kind != "SMTP" for op in load.ops)
                    figures.messages = sum(op.kind == "SMTP" for op in load.ops)
                    figures.messages_ok = sum(op.ok and op.kind == "SMTP" for op in load.ops)
                d.stop()
                if figures.problems:
                    log("daemon log tail:\n" + d.log_tail(40))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    figures.seconds = time.monotonic() - t_total
    return figures


def _restart(d: Daemon, figures: Figures) -> None:
    figures.max_restart_s = max(figures.max_restart_s, d.start())
    figures.restarts += 1


def _kill(d: Daemon, figures: Figures, kind: str) -> float:
    d.kill()
    figures.kill_times.append(time.monotonic())
    figures.kills += 1
    setattr(figures, f"kills_{kind}", getattr(figures, f"kills_{kind}") + 1)
    return time.monotonic()


def _run_all(d: Daemon, load: Load, figures: Figures, rng: random.Random, kills: int, snapshot_kills: int,
             rewind_kills: int, cancel_kills: int, replay_kills: int, postfix: Any, t_start: float,
             budget: float) -> None:
    mail = d.volume if postfix else None
    status, snap = d.api("POST", "/api/snapshots", {"label": "crash-base"})
    if status != 201:
        raise Failure(f"first snapshot failed: {status} {snap}")
    # A kill under load, every so often in the middle of a snapshot.
    total = kills + snapshot_kills
    snapshot_rounds = set(rng.sample(range(total), snapshot_kills)) if snapshot_kills else set()
    left_for_cycles = 10.0 + 5 * (rewind_kills + cancel_kills) + 10 * replay_kills
    for n in range(total):
        if n and time.monotonic() - t_start > budget - left_for_cycles:
            log(f"time budget: stopping the load kills after {n}")
            break
        load.resume()
        time.sleep(rng.uniform(0.2, 1.5))
        if n in snapshot_rounds:
            box = d.api_in_background("POST", "/api/snapshots", {"label": f"killed-{n}"})
            time.sleep(rng.uniform(0.0, 0.06))
            _kill(d, figures, "snapshot")
            box["thread"].join(10)
        else:
            _kill(d, figures, "load")
        load.pause()
        time.sleep(0.2)              # WsgiDAV finishes what the dead daemon had sent it
        _restart(d, figures)
        wait_mail_settled(postfix)
        check(d, load, figures, mail)
        log(f"kill {figures.kills}: ok ({len(load.ops)} requests so far, {figures.unknown} unknown)")
    load.pause()
    _cycles(d, load, figures, rng, rewind_kills, cancel_kills, replay_kills, postfix, t_start, budget)


def _snapshot_now(d: Daemon, label: str) -> str:
    status, snap = d.api("POST", "/api/snapshots", {"label": label})
    if status != 201:
        raise Failure(f"snapshot {label}: {status} {snap}")
    return snap["id"]


def _open_state(d: Daemon) -> dict[str, Any]:
    status, doc = d.api("GET", "/api/status")
    if status != 200:
        raise Failure(f"status: {status} {doc}")
    return doc


def _cycles(d: Daemon, load: Load, figures: Figures, rng: random.Random, rewind_kills: int, cancel_kills: int,
            replay_kills: int, postfix: Any, t_start: float, budget: float) -> None:
    mail = d.volume if postfix else None
    # Rewinds killed part-way, then cancels killed part-way: the pre-rewind state comes back exactly.
    for n in range(rewind_kills + cancel_kills):
        wait_mail_settled(postfix)
        target = _snapshot_now(d, f"rewind-target-{n}")
        load.resume()
        time.sleep(rng.uniform(0.2, 0.6))
        load.pause()
        wait_mail_settled(postfix)
        before = tree_hashes(d.volume)
        kill_cancel = n >= rewind_kills
        if not kill_cancel:
            box = d.api_in_background("POST", "/api/rewind", {"to": target})
            time.sleep(rng.uniform(0.0, 0.15))
            _kill(d, figures, "rewind")
            box["thread"].join(10)
            _restart(d, figures)
        else:
            status, doc = d.api("POST", "/api/rewind", {"to": target})
            if status != 200:
                raise Failure(f"rewind: {status} {doc}")
        state = _open_state(d)
        if state["mode"] != "live":
            if kill_cancel:
                box = d.api_in_background("POST", "/api/cancel")
                time.sleep(rng.uniform(0.0, 0.1))
                _kill(d, figures, "cancel")
                box["thread"].join(10)
                _restart(d, figures)
                state = _open_state(d)
            if state["mode"] != "live":
                status, doc = d.api("POST", "/api/cancel")
                if status != 200:
                    raise Failure(f"cancel after a killed {'cancel' if kill_cancel else 'rewind'}: {status} {doc}")
        figures.cycles_cancelled += 1
        after = tree_hashes(d.volume)
        if after != before:
            diff = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            figures.lost += len(diff)
            figures.problems.append(f"cancel did not restore the pre-rewind state: {diff[:10]}")
            raise Failure(figures.problems[-1])
        check(d, load, figures, mail)
        log(f"kill {figures.kills}: {'cancel' if kill_cancel else 'rewind'} interrupted, "
            f"pre-rewind state back exactly ({len(before)} entries)")
    # Replays killed part-way: resume then commit, or cancel.
    for n in range(replay_kills):
        if time.monotonic() - t_start > budget - 8:
            log("time budget: no more replay kills")
            break
        wait_mail_settled(postfix)
        target = _snapshot_now(d, f"replay-target-{n}")
        sent = _cycle_writes(d, n, 120)
        load.resume()
        time.sleep(0.3)
        load.pause()
        wait_mail_settled(postfix)
        before = tree_hashes(d.volume)
        status, doc = d.api("POST", "/api/rewind", {"to": target})
        if status != 200:
            raise Failure(f"rewind before the replay: {status} {doc}")
        cid = doc["id"]
        box = d.api_in_background("POST", "/api/replay", {"skip": []})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = d.query("SELECT count(*) FROM verbs WHERE cycle = ? AND status = 'committed'", cid)[0][0]
            if done >= 5:
                break
            time.sleep(0.01)
        _kill(d, figures, "replay")
        box["thread"].join(10)
        replayed_before = d.query("SELECT count(*) FROM verbs WHERE cycle = ? AND status = 'committed'", cid)[0][0]
        _restart(d, figures)
        state = _open_state(d)
        if state["mode"] not in ("replaying", "review"):
            raise Failure(f"after a kill during replay the mode is {state['mode']}, not replaying")
        if n % 2 == 0:
            status, doc = d.api("POST", "/api/cancel")
            if status != 200:
                raise Failure(f"cancel after a killed replay: {status} {doc}")
            figures.cycles_cancelled += 1
            after = tree_hashes(d.volume)
            if after != before:
                diff = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
                figures.lost += len(diff)
                figures.problems.append(f"cancel after a killed replay did not restore the state: {diff[:10]}")
                raise Failure(figures.problems[-1])
            how = "cancelled: pre-rewind state back exactly"
        else:
            if state["mode"] == "replaying":
                status, doc = d.api("POST", "/api/replay", {"skip": []}, timeout=120)
                if status != 200 or doc["state"] != "review":
                    raise Failure(f"resumed replay: {status} {doc}")
            twice = d.query("SELECT original_seq, count(*) FROM verbs WHERE cycle = ? AND status = 'committed' "
                            "GROUP BY original_seq HAVING count(*) > 1", cid)
            if twice:
                raise Failure(f"verbs replayed twice: {twice[:5]}")
            status, doc = d.api("POST", "/api/commit")
            if status != 200:
                raise Failure(f"commit after a resumed replay: {status} {doc}")
            figures.cycles_committed += 1
            for path, digest in sent.items():
                f = d.volume / "cycle" / path
                if not f.is_file() or sha(f.read_bytes()) != digest:
                    figures.lost += 1
                    figures.problems.append(f"/cycle/{path} is not what the resumed replay should have written")
                    raise Failure(figures.problems[-1])
            how = f"resumed ({replayed_before} replayed before the kill) and committed"
        log(f"kill {figures.kills}: replay interrupted, {how}")
    if figures.cycles_committed == 0:
        check(d, load, figures, mail)


def _cycle_writes(d: Daemon, n: int, count: int) -> dict[str, str]:
    """Sequential PUTs to /cycle/ (the verbs the replay will redo); returns name -> sha256."""
    sent: dict[str, str] = {}
    conn = http.client.HTTPConnection(HOST, d.http_port, timeout=15)
    try:
        for i in range(count):
            name = f"r{n}-{i % 40}"
            body = f"{uuid.uuid4().hex} cycle write {i}\n".encode() * (1 + i % 7)
            conn.request("PUT", f"/cycle/{name}", body=body)
            resp = conn.getresponse()
            resp.read()
            if resp.status not in (201, 204):
                raise Failure(f"PUT /cycle/{name}: {resp.status}")
            sent[name] = sha(body)
    finally:
        conn.close()
    return sent


# --------------------------------------------------------------------------- docs/reliability.md

def run_tests() -> dict[str, Any]:
    """Run the fault, hostile-input and access tests; they report their counts through a JSON file."""
    stats = Path(tempfile.mkstemp(prefix="undo-reliability-", suffix=".jsonl")[1])
    env = dict(os.environ, UNDO_RELIABILITY_STATS=str(stats))
    files = ["tests/test_faults.py", "tests/test_hostile.py", "tests/test_access.py"]
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    counts: dict[str, int] = {}
    for line in stats.read_text().splitlines():
        rec = json.loads(line)
        counts[rec["kind"]] = counts.get(rec["kind"], 0) + rec["n"]
    stats.unlink()
    summary = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"counts": counts, "summary": summary, "ok": res.returncode == 0, "seconds": time.monotonic() - t0,
            "output": res.stdout[-3000:]}


def write_doc(f: Figures, seed: int, kills: int, tests: dict[str, Any] | None) -> None:
    c = (tests or {}).get("counts", {})
    rows = [
        ("load held", f"{f.requests} HTTP requests ({f.http_ok} answered 2xx)"
                      + (f", {f.messages} SMTP transactions ({f.messages_ok} accepted)" if f.smtp else
                         ", no SMTP (Postfix not available)"), ""),
        ("kills survived (kill -9, restart)", str(f.kills),
         f"{f.kills_load} under load, {f.kills_snapshot} during a snapshot, {f.kills_rewind} during a rewind, "
         f"{f.kills_cancel} during a cancel, {f.kills_replay} during a replay"),
        ("undo cycles after a kill", f"{f.cycles_cancelled} cancelled, {f.cycles_committed} resumed and committed",
         "cancel restored the pre-rewind volume exactly (sha256 of every file)"),
        ("verbs marked unknown (outcome lost in a kill)", str(f.unknown),
         "shown to the operator; never pending, never replayed blindly"),
        ("reads served < 1 s before a kill, not on record", str(len(f.reads_unrecorded)),
         "reads are recorded in batches just after they are served (README); writes never are"),
        ("orphan snapshot dirs (kill between snapshot and its record)", str(f.orphan_snapshots),
         "not listed, never used; the id is not reused"),
    ]
    if tests:
        rows += [
            ("faults injected", str(c.get("fault", 0)),
             "upstream down / slow / reset / garbage, timeline disk full, snapshot store full, btrfs failing"),
            ("hostile inputs tried", str(c.get("hostile", 0)),
             "smuggling, oversized, slowloris, non-UTF-8, SMTP bare LF, pipelining, 2000 recipients, 250 hypothesis-fuzzed requests"),
            ("access checks", str(c.get("access", 0)), "every /api route × no/wrong/near-miss tokens, paths"),
            ("fault/hostile/access tests", tests["summary"], f"{tests['seconds']:.0f} s"),
        ]
    rows.append(("**data lost**", f"**{f.lost}**", "acknowledged requests missing, or backend ≠ timeline"))
    table = "\n".join(f"| {a} | {b} | {c_} |" for a, b, c_ in rows)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(f"""# Reliability

Produced by `bench/crash_harness.py` (rerun: `/work/venv/bin/python bench/crash_harness.py --write-doc
--with-tests`, as root from the repository root; `--seed {seed}` repeats this run's kill moments).
Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {f.seconds:.0f} s, {f.backend} snapshots,
{os.cpu_count()} cores, slowest restart (recovery included) {f.max_restart_s:.1f} s.

| what | figure | notes |
|---|---|---|
{table}

## What is checked after every restart
- every request whose client got a success (HTTP 2xx, SMTP 250) is in the timeline as `committed`, matched
  by a unique id (`X-Crash-Id`, Message-ID), with the body digest that was sent (PUT) or seen (GET);
- no verb is `pending` (a lost outcome is `unknown`); `PRAGMA integrity_check` is `ok`; every snapshot on
  record exists;
- the WsgiDAV volume equals what the timeline describes: for each path, the last committed PUT/DELETE decides
  its content (an `unknown` or `failed` verb after it may or may not have reached WsgiDAV); with SMTP, each
  accepted message is in its Maildir exactly once and no message is there that the timeline does not know;
- kill during a rewind or a cancel: the restart brings the pre-rewind state back (or the cycle is open and
  `cancel` does), equal to before by sha256 of every file; kill during a replay: the cycle is `replaying`
  after the restart, `replay` resumes (no verb replayed twice) and commit gives the replayed state, or
  `cancel` gives the pre-rewind state exactly.

The fast version runs in CI: `tests/test_crash.py` (a few kills under load, one during a replay).
Faults, hostile input and access: `tests/test_faults.py`, `tests/test_hostile.py`, `tests/test_access.py`.
""")
    log(f"wrote {DOC}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kills under load (default 20)")
    ap.add_argument("--budget", type=float, default=170, help="seconds for the kills and cycles, set-up not counted (default 170)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--no-smtp", action="store_true")
    ap.add_argument("--no-btrfs", action="store_true")
    ap.add_argument("--write-doc", action="store_true")
    ap.add_argument("--with-tests", action="store_true")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    try:
        figures = run(kills=args.kills, budget=args.budget, seed=seed, use_btrfs=False if args.no_btrfs else None,
                      smtp=False if args.no_smtp else None)
    except Failure as exc:
        log(f"FAILED: {exc}")
        return 1
    log(f"crash harness: {figures.kills} kills survived, {figures.requests} HTTP requests, {figures.messages} "
        f"SMTP transactions, {figures.unknown} unknown, data lost {figures.lost} ({figures.seconds:.0f} s)")
    tests = None
    if args.with_tests:
        tests = run_tests()
        log(f"fault/hostile/access tests: {tests['summary']}")
        if not tests["ok"]:
            print(tests["output"], file=sys.stderr)
    if args.write_doc:
        write_doc(figures, seed, args.kills, tests)
    return 0 if figures.lost == 0 and (tests is None or tests["ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())
