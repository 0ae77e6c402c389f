"""The undo cycle end to end: a real `undo-proxy serve` in front of a real WsgiDAV on a loop-mounted btrfs
volume (a tiny aiohttp service where WsgiDAV cannot show something), driven through the CLI and the admin API.

Snapshot, damage, rewind, repair, replay with the bad verbs skipped, inconsistencies exactly for the reads
that saw the damage, commit; cancel; @SEQ and ISO-time rewinds; retention; a daemon killed mid-replay;
a second cycle over a committed one; compensation webhooks; server-chosen names; SQLite in WAL mode.
"""
from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from tests.backends import file_tree, free_port
from tests.daemon import UNDO_PROXY, Stack

VERB_KEYS = {"seq", "time", "protocol", "verb", "targets", "mutates", "status", "origin", "cycle", "original_seq",
             "summary"}
SNAPSHOT_KEYS = {"id", "time", "after_seq", "label", "backend", "path"}
STATUS_KEYS = {"mode", "cycle", "last_seq", "snapshots"}
CYCLE_KEYS = {"id", "state", "snapshot", "rewind_to_seq", "skipped", "replayed", "inconsistencies"}
INCONSISTENCY_KEYS = {"id", "cycle", "seq", "verb", "kind", "detail", "compensation"}


# --------------------------------------------------------------------------- helpers
@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes


def call(url: str, method: str = "GET", path: str = "/", body: bytes | None = None,
         headers: dict[str, str] | None = None) -> Resp:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def put(stack: Stack, path: str, data: bytes | str, expect: tuple[int, ...] = (201, 204)) -> None:
    r = call(stack.url, "PUT", path, data.encode() if isinstance(data, str) else data)
    assert r.status in expect, (path, r.status, r.body[:200])


def get(stack: Stack, path: str) -> Resp:
    return call(stack.url, "GET", path)


def expected_tree(files: dict[str, bytes | str], dirs: tuple[str, ...] = ()) -> dict[str, str]:
    out = {d: "dir" for d in dirs}
    for name, data in files.items():
        out[name] = hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()
    return out


def api_ok(stack: Stack, method: str, path: str, body: Any = None) -> Any:
    status, doc = stack.api(method, path, body)
    assert 200 <= status < 300, (method, path, status, doc)
    return doc


def verbs(stack: Stack, **query: Any) -> list[dict[str, Any]]:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return api_ok(stack, "GET", f"/api/timeline?{q}")


def seq_of(stack: Stack, verb: str, target: str, timeout: float = 5) -> int:
    """The latest `verb` on `target` (reads are recorded in batches: wait for it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [v["seq"] for v in verbs(stack, verb=verb, target=target) if v["origin"] == "live"]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no {verb} on {target} in the timeline"
        time.sleep(0.05)


def settle(stack: Stack, n_verbs: int, timeout: float = 5) -> list[dict[str, Any]]:
    """Wait until the timeline holds n_verbs live verbs (batched reads included); return them."""
    deadline = time.monotonic() + timeout
    while True:
        live = [v for v in verbs(stack, limit=100000) if v["origin"] == "live"]
        if len(live) >= n_verbs:
            return live
        assert time.monotonic() < deadline, f"{len(live)} verbs recorded, expected {n_verbs}"
        time.sleep(0.05)


def status(stack: Stack) -> dict[str, Any]:
    return api_ok(stack, "GET", "/api/status")


def cycle_of(stack: Stack, cid: int) -> dict[str, Any]:
    return api_ok(stack, "GET", f"/api/cycles/{cid}")


def assert_refused(stack: Stack, volume: Path) -> None:
    """While a cycle is open: 503 + Retry-After for reads and writes, and nothing reaches the backend."""
    before_tree, before_seq = file_tree(volume), api_ok(stack, "GET", "/api/status")["last_seq"]
    for method, path, body in (("PUT", "/intruder.txt", b"x"), ("GET", "/intruder.txt", None),
                               ("DELETE", "/", None), ("MKCOL", "/intruder", None), ("PROPFIND", "/", None)):
        r = call(stack.url, method, path, body)
        assert r.status == 503, (method, r.status)
        assert r.headers.get("retry-after", "").isdigit(), r.headers
    assert file_tree(volume) == before_tree
    assert api_ok(stack, "GET", "/api/status")["last_seq"] == before_seq


def set_config(stack: Stack, old: str, new: str) -> None:
    text = stack.config.read_text()
    assert old in text, old
    stack.config.write_text(text.replace(old, new))


def timeline_db(stack: Stack) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{stack.workdir / 'state' / 'timeline.db'}?mode=ro", uri=True, timeout=5)


class AioServer:
    """An aiohttp application served from a thread, for upstreams and webhooks the test controls."""

    def __init__(self, app: web.Application) -> None:
        self.app, self.port = app, free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "AioServer":
        self.thread.start()
        self.runner = web.AppRunner(self.app, access_log=None)
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result(10)
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        asyncio.run_coroutine_threadsafe(site.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def btrfs_stack(btrfs_mount, proxy_stack) -> Stack:
    return proxy_stack(volume=btrfs_mount.volume, store=btrfs_mount.store, backend="btrfs")


# --------------------------------------------------------------------------- the scenario
def test_undo_cycle_skips_the_bad_verbs_and_flags_exactly_the_reads_that_saw_the_damage(btrfs_stack):
    stack, vol = btrfs_stack, btrfs_stack.volume
    assert call(stack.url, "MKCOL", "/docs").status == 201
    for name, data in (("/docs/a.txt", "alpha"), ("/docs/b.txt", "beta"), ("/docs/c.txt", "gamma"),
                       ("/index.html", "<h1>home</h1>")):
        put(stack, name, data)
    snap = stack.cli_json("snapshot", "take", "--label", "before")
    assert SNAPSHOT_KEYS <= snap.keys() and snap["label"] == "before" and snap["backend"] == "btrfs"
    assert Path(snap["path"]).is_dir()
    at_snapshot = file_tree(vol)

    put(stack, "/notes.txt", "n1")                                   # good
    assert get(stack, "/docs/a.txt").body == b"alpha"                # a read before the damage
    assert call(stack.url, "DELETE", "/docs").status == 204          # BAD: deletes three files
    bad_delete = seq_of(stack, "webdav.delete", "/docs")
    assert get(stack, "/docs/b.txt").status == 404                   # saw the damage
    put(stack, "/news.txt", "fresh")                                 # good
    put(stack, "/index.html", "<h1>pwned</h1>")                      # BAD: vandalizes the page
    bad_put = seq_of(stack, "webdav.put", "/index.html")
    assert get(stack, "/index.html").body == b"<h1>pwned</h1>"       # saw the damage
    assert get(stack, "/news.txt").body == b"fresh"                  # unaffected
    assert call(stack.url, "PROPFIND", "/docs", headers={"Depth": "1"}).status == 404   # saw the damage
    put(stack, "/notes.txt", "n2")                                   # good
    assert get(stack, "/notes.txt").body == b"n2"                    # unaffected
    live = settle(stack, 16)
    saw = {seq_of(stack, "webdav.get", "/docs/b.txt"), seq_of(stack, "webdav.get", "/index.html"),
           seq_of(stack, "webdav.propfind", "/docs")}
    assert all(VERB_KEYS <= v.keys() for v in live)
    after_snapshot = [v["seq"] for v in live if v["seq"] > snap["after_seq"]]
    assert len(after_snapshot) == 11

    cycle = stack.cli_json("rewind", "--to", snap["id"], "--yes")
    assert CYCLE_KEYS <= cycle.keys()
    assert cycle["state"] == "rewound" and cycle["snapshot"] == snap["id"]
    assert cycle["rewind_to_seq"] == snap["after_seq"]
    cid = cycle["id"]
    st = stack.cli_json("status")                       # read straight from the timeline database
    assert STATUS_KEYS <= st.keys() and st["mode"] == "rewound" and st["cycle"] == cid
    assert file_tree(vol) == at_snapshot
    assert_refused(stack, vol)

    assert "bad delete" in stack.cli("repair", "--note", "bad delete and defacement skipped").stdout + \
        json.dumps(cycle_of(stack, cid)["notes"])
    assert status(stack)["mode"] == "rewound"

    replayed = stack.cli_json("replay", "--skip", f"{bad_delete},{bad_put}")
    assert CYCLE_KEYS <= replayed.keys()
    assert replayed["id"] == cid and replayed["state"] == "review"
    assert replayed["skipped"] == sorted([bad_delete, bad_put])
    assert replayed["replayed"] == len(after_snapshot) - 2
    assert replayed["inconsistencies"] == 3
    assert status(stack)["mode"] == "review"
    assert_refused(stack, vol)

    items = stack.cli_json("inconsistencies", "--cycle", str(cid))
    assert all(INCONSISTENCY_KEYS <= i.keys() for i in items)
    assert {i["seq"] for i in items} == saw
    assert all(i["cycle"] == cid and i["kind"] == "output-changed" and i["compensation"] == "pending"
               for i in items)
    assert {i["verb"] for i in items} == {"webdav.get", "webdav.propfind"}

    replays = verbs(stack, cycle=cid)
    assert all(v["origin"] == "replay" and v["cycle"] == cid and v["status"] == "committed" for v in replays)
    assert sorted(v["original_seq"] for v in replays) == [s for s in after_snapshot if s not in (bad_delete, bad_put)]
    by_original = {v["original_seq"]: v for v in replays}
    assert all(by_original[s]["verb"] == next(v["verb"] for v in live if v["seq"] == s) for s in by_original)

    good = expected_tree({"docs/a.txt": "alpha", "docs/b.txt": "beta", "docs/c.txt": "gamma",
                          "index.html": "<h1>home</h1>", "notes.txt": "n2", "news.txt": "fresh"}, dirs=("docs",))
    assert file_tree(vol) == good

    done = stack.cli_json("commit")
    assert done["state"] == "committed"
    assert status(stack)["mode"] == "live"
    assert get(stack, "/index.html").body == b"<h1>home</h1>"
    assert get(stack, "/docs/b.txt").body == b"beta"
    assert get(stack, "/intruder.txt").status == 404
    assert file_tree(vol) == good

    acked = stack.cli_json("compensate", "--all")
    assert sorted(i["id"] for i in acked) == sorted(i["id"] for i in items)
    assert {i["compensation"] for i in api_ok(stack, "GET", f"/api/inconsistencies?cycle={cid}")} == {"acknowledged"}
    # The daemon's log tells the whole cycle, for whoever reads it afterwards.
    logged = stack.log_text()
    for line in (f"cycle {cid}: rewound to snapshot {snap['id']}", f"cycle {cid}: repair noted: 'bad delete",
                 f"cycle {cid}: replaying {len(after_snapshot) - 2} verbs, skipping {min(bad_delete, bad_put)}",
                 f"cycle {cid}: replayed {len(after_snapshot) - 2} verbs, 3 inconsistencies; in review",
                 f"cycle {cid} committed", f"inconsistency {items[0]['id']} (cycle {cid}, verb {items[0]['seq']}): "
                 f"compensation acknowledged"):
        assert line in logged, line


# --------------------------------------------------------------------------- @SEQ, ISO time, cancel
def test_at_seq_and_iso_time_rewinds_are_exact_and_cancel_restores_byte_for_byte(btrfs_stack):
    stack, vol = btrfs_stack, btrfs_stack.volume
    put(stack, "/a.txt", "a1")
    put(stack, "/b.txt", "b1")
    snap = api_ok(stack, "POST", "/api/snapshots", {"label": "base"})
    put(stack, "/c.txt", "c1")
    seq_c = seq_of(stack, "webdav.put", "/c.txt")
    put(stack, "/a.txt", "a2")
    time.sleep(0.05)
    when = datetime.now(timezone.utc).isoformat()
    time.sleep(0.05)
    assert call(stack.url, "DELETE", "/b.txt").status == 204
    put(stack, "/d.txt", os.urandom(100_000))
    pre = file_tree(vol)
    d_stat = os.stat(vol / "d.txt")

    cycle = stack.cli_json("rewind", "--to", f"@{seq_c}", "--yes")
    assert cycle["rewind_to_seq"] == seq_c and cycle["snapshot"] == snap["id"] and cycle["state"] == "rewound"
    assert file_tree(vol) == expected_tree({"a.txt": "a1", "b.txt": "b1", "c.txt": "c1"})
    assert_refused(stack, vol)

    stack.kill()
    assert stack.cli_json("status")["mode"] == "rewound"        # with the daemon down, from the database
    stack.start()  # the cycle survives a daemon restart
    assert status(stack)["mode"] == "rewound"
    assert call(stack.url, "PUT", "/x.txt", b"x").status == 503
    assert file_tree(vol) == expected_tree({"a.txt": "a1", "b.txt": "b1", "c.txt": "c1"})
    # replaying everything after SEQ gives the same content back (new files, though: cancel must undo it)
    replayed = api_ok(stack, "POST", "/api/replay", {"skip": []})
    assert replayed["replayed"] == 3 and replayed["inconsistencies"] == 0
    assert replayed["to_replay"] == 3, "progress counts the verbs after the rewind point, not the @SEQ prefix"
    assert file_tree(vol) == pre

    cancelled = stack.cli_json("cancel")
    assert cancelled["state"] == "cancelled"
    assert status(stack)["mode"] == "live"
    assert file_tree(vol) == pre
    now = os.stat(vol / "d.txt")
    assert (now.st_ino, now.st_mtime_ns, now.st_size) == (d_stat.st_ino, d_stat.st_mtime_ns, d_stat.st_size)
    assert get(stack, "/a.txt").body == b"a2"

    assert api_ok(stack, "POST", "/api/rewind", {"to": when})["rewind_to_seq"] == seq_c + 1
    assert file_tree(vol) == expected_tree({"a.txt": "a2", "b.txt": "b1", "c.txt": "c1"})
    api_ok(stack, "POST", "/api/cancel")
    assert file_tree(vol) == pre
    # pre-rewind snapshots of cancelled cycles are gone; the base snapshot stays
    assert [s["id"] for s in api_ok(stack, "GET", "/api/snapshots")] == [snap["id"]]
    assert sorted(p.name for p in stack.store.iterdir()) == [snap["id"]]

    # a target that cannot be reached changes nothing
    beyond = stack.cli("rewind", "--to", "@999999", "--yes", check=False)
    assert beyond.returncode == 1 and "does not exist yet" in beyond.stderr  # names nothing: failed, as `show`
    assert stack.api("POST", "/api/rewind", {"to": "20990101T000000Z"})[0] == 404
    assert stack.api("POST", "/api/rewind", {"to": "2000-01-01T00:00:00Z"})[0] == 409
    assert stack.api("POST", "/api/rewind", {"to": "yesterday"})[0] == 404   # no such label, nor a time
    assert stack.api("POST", "/api/rewind", {"to": "@x"})[0] == 400          # malformed: a usage error
    assert status(stack)["mode"] == "live" and file_tree(vol) == pre


# --------------------------------------------------------------------------- snapshots: CLI and retention
def test_snapshot_cli_and_retention_never_touch_the_open_cycle(btrfs_stack):
    stack = btrfs_stack
    stack.kill()
    set_config(stack, "keep = 20", "keep = 3")
    stack.start()

    taken = []
    for i in range(5):
        put(stack, f"/f{i}.txt", str(i))
        snap = stack.cli_json("snapshot", "take", "--label", f"s{i}") if i == 0 else \
            api_ok(stack, "POST", "/api/snapshots", {"label": f"s{i}"})
        assert SNAPSHOT_KEYS <= snap.keys()
        assert snap["label"] == f"s{i}" and snap["backend"] == "btrfs"
        assert snap["path"] == str(stack.store / snap["id"])
        taken.append(snap)
    assert len({s["id"] for s in taken}) == 5
    assert [s["after_seq"] for s in taken] == sorted(s["after_seq"] for s in taken)

    listed = stack.cli_json("snapshot", "list")
    assert all(SNAPSHOT_KEYS <= s.keys() for s in listed)
    assert [s["id"] for s in listed] == [s["id"] for s in taken[2:]]       # oldest first, newest 3 kept
    assert sorted(p.name for p in stack.store.iterdir()) == sorted(s["id"] for s in taken[2:])
    assert status(stack)["snapshots"] == 3

    stack.cli("snapshot", "delete", taken[3]["id"])
    assert [s["id"] for s in stack.cli_json("snapshot", "list")] == [taken[2]["id"], taken[4]["id"]]
    assert not (stack.store / taken[3]["id"]).exists()
    assert f"deleted snapshot {taken[3]['id']}" in stack.log_text()
    assert stack.api("DELETE", f"/api/snapshots/{taken[3]['id']}")[0] == 404
    assert stack.cli("snapshot", "delete", "../vol", check=False).returncode == 1  # no snapshot is called that
    assert stack.volume.is_dir()

    # an open cycle: its snapshot and the pre-rewind state cannot be deleted, and nothing is taken or pruned
    oldest = taken[2]["id"]
    cycle = api_ok(stack, "POST", "/api/rewind", {"to": oldest})
    res = stack.cli("snapshot", "delete", oldest, check=False)
    assert res.returncode == 1 and "cycle" in res.stderr
    assert stack.api("DELETE", f"/api/snapshots/{cycle['pre_rewind_snapshot']}")[0] == 409
    assert stack.api("POST", "/api/snapshots", {})[0] == 409
    ids = {s["id"] for s in api_ok(stack, "GET", "/api/snapshots")}
    assert {oldest, cycle["pre_rewind_snapshot"]} <= ids
    assert (stack.store / oldest).is_dir() and (stack.store / cycle["pre_rewind_snapshot"]).is_dir()

    api_ok(stack, "POST", "/api/replay", {"skip": []})
    api_ok(stack, "POST", "/api/commit")
    # the commit's snapshot is taken and retention applies again (newest 3)
    listed = api_ok(stack, "GET", "/api/snapshots")
    assert len(listed) == 3 and listed[-1]["kind"] == "commit"
    assert sorted(p.name for p in stack.store.iterdir()) == sorted(s["id"] for s in listed)


# --------------------------------------------------------------------------- crash during replay
def _replay_and_kill(stack: Stack, skip: int | None, total: int) -> int:
    """Start `replay` from the CLI, kill -9 the daemon part-way through; return how many were committed."""
    args = [UNDO_PROXY, "replay", "-c", str(stack.config), "--json"] + (["--skip", str(skip)] if skip else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cid = None
    deadline = time.monotonic() + 60
    with timeline_db(stack) as db:
        while True:
            row = db.execute("SELECT id FROM cycles WHERE state IN ('replaying','rewound') "
                             "ORDER BY id DESC LIMIT 1").fetchone()
            cid = row[0] if row else cid
            n = db.execute("SELECT count(*) FROM verbs WHERE cycle = ? AND status = 'committed'",
                           (cid,)).fetchone()[0] if cid else 0
            if n >= 20:
                assert call(stack.url, "PUT", "/live.txt", b"x").status == 503   # refused while replaying
                break
            assert time.monotonic() < deadline and proc.poll() is None, "replay did not get going"
            time.sleep(0.01)
    stack.kill()
    proc.communicate(timeout=30)
    assert proc.returncode != 0          # the CLI lost its daemon
    with timeline_db(stack) as db:
        n = db.execute("SELECT count(*) FROM verbs WHERE cycle = ? AND status = 'committed'", (cid,)).fetchone()[0]
    assert 0 < n < total, f"the kill did not land mid-replay ({n} of {total} replayed)"
    return n


def test_a_daemon_killed_mid_replay_resumes_or_cancels(btrfs_stack):
    stack, vol = btrfs_stack, btrfs_stack.volume
    put(stack, "/keep.txt", "keep")
    snap = api_ok(stack, "POST", "/api/snapshots", {})
    assert call(stack.url, "DELETE", "/keep.txt").status == 204       # the bad verb
    bad = seq_of(stack, "webdav.delete", "/keep.txt")
    n = 300
    bodies = {f"/p{i % 60:02d}-{i // 60}.txt": f"payload {i} ".encode() * 50 for i in range(n)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: put(stack, *kv), bodies.items()))
    pre = file_tree(vol)
    good = expected_tree({"keep.txt": "keep", **{k.lstrip("/"): v for k, v in bodies.items()}})

    # 1: killed mid-replay, restarted: still replaying, and `cancel` restores the pre-rewind tree
    api_ok(stack, "POST", "/api/rewind", {"to": snap["id"]})
    _replay_and_kill(stack, bad, n)
    stack.start()
    st = status(stack)
    assert st["mode"] == "replaying"
    assert call(stack.url, "GET", "/keep.txt").status == 503
    api_ok(stack, "POST", "/api/cancel")
    assert status(stack)["mode"] == "live"
    assert file_tree(vol) == pre

    # 2: killed mid-replay, restarted: `replay` resumes where it stopped and finishes, no verb twice
    cycle = api_ok(stack, "POST", "/api/rewind", {"to": snap["id"]})
    cid = cycle["id"]
    first = _replay_and_kill(stack, bad, n)
    stack.start()
    assert status(stack)["mode"] == "replaying"
    assert cycle_of(stack, cid)["state"] == "replaying"
    resumed = stack.cli_json("replay")                    # no --skip: the skip was recorded
    assert resumed["state"] == "review" and resumed["skipped"] == [bad]
    replays = [v for v in verbs(stack, cycle=cid, limit=100000) if v["status"] == "committed"]
    originals = [v["original_seq"] for v in replays]
    assert len(originals) == len(set(originals)) == n
    assert bad not in originals
    assert len(replays) > first
    assert file_tree(vol) == good
    api_ok(stack, "POST", "/api/commit")
    assert status(stack)["mode"] == "live"
    assert get(stack, "/keep.txt").body == b"keep"


# --------------------------------------------------------------------------- a second cycle
def test_a_second_cycle_replays_the_effective_history(btrfs_stack):
    stack, vol = btrfs_stack, btrfs_stack.volume
    put(stack, "/a.txt", "a")
    snap = api_ok(stack, "POST", "/api/snapshots", {})
    put(stack, "/b.txt", "b")
    put(stack, "/c.txt", "vandal")                               # bad in cycle 1
    bad = seq_of(stack, "webdav.put", "/c.txt")
    assert get(stack, "/c.txt").status == 200                    # saw it
    settle(stack, 4)
    c1 = api_ok(stack, "POST", "/api/rewind", {"to": snap["id"]})["id"]
    assert api_ok(stack, "POST", "/api/replay", {"skip": [bad]})["inconsistencies"] == 1
    api_ok(stack, "POST", "/api/commit")
    first_replays = verbs(stack, cycle=c1)
    assert len(first_replays) == 2

    put(stack, "/d.txt", "d")
    d_seq = seq_of(stack, "webdav.put", "/d.txt")
    c2 = api_ok(stack, "POST", "/api/rewind", {"to": snap["id"]})
    assert file_tree(vol) == expected_tree({"a.txt": "a"})
    cycle = api_ok(stack, "POST", "/api/replay", {"skip": []})
    # the committed replay's GET saw the 404 (an error page with another timestamp is still the same 404)
    assert cycle["inconsistencies"] == 0, api_ok(stack, "GET", f"/api/inconsistencies?cycle={c2['id']}")
    second = verbs(stack, cycle=c2["id"])
    # the committed replays and the later live verb; never the superseded originals (nor the bad one)
    assert sorted(v["original_seq"] for v in second) == sorted([v["seq"] for v in first_replays] + [d_seq])
    assert file_tree(vol) == expected_tree({"a.txt": "a", "b.txt": "b", "d.txt": "d"})
    api_ok(stack, "POST", "/api/commit")
    assert get(stack, "/c.txt").status == 404


# --------------------------------------------------------------------------- compensation
def _one_inconsistency(stack: Stack) -> list[dict[str, Any]]:
    put(stack, "/page.html", "good")
    snap = api_ok(stack, "POST", "/api/snapshots", {})
    put(stack, "/page.html", "defaced")
    bad = seq_of(stack, "webdav.put", "/page.html")
    assert get(stack, "/page.html").body == b"defaced"
    assert get(stack, "/page.html").body == b"defaced"
    settle(stack, 4)
    cid = api_ok(stack, "POST", "/api/rewind", {"to": snap["id"]})["id"]
    api_ok(stack, "POST", "/api/replay", {"skip": [bad]})
    api_ok(stack, "POST", "/api/commit")
    items = api_ok(stack, "GET", f"/api/inconsistencies?cycle={cid}")
    assert len(items) == 2 and {i["compensation"] for i in items} == {"pending"}
    return items


def test_compensation_webhook_done_failed_and_retried(proxy_stack):
    received: list[dict[str, Any]] = []
    answer = {"status": 500}

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=answer["status"])

    app = web.Application()
    app.router.add_post("/hook", hook)
    with AioServer(app) as server:
        stack = proxy_stack(extra=f'compensation_webhook = "{server.url}/hook"')
        items = _one_inconsistency(stack)
        first, second = items

        res = stack.cli("compensate", str(first["id"]), "--json", check=False)
        assert res.returncode == 1                           # the webhook answered 500
        assert [i["compensation"] for i in json.loads(res.stdout)] == ["failed"]
        assert len(received) == 1
        assert INCONSISTENCY_KEYS <= received[0].keys()
        assert received[0]["id"] == first["id"] and received[0]["seq"] == first["seq"]
        assert received[0]["kind"] == "output-changed" and received[0]["verb"] == "webdav.get"

        answer["status"] = 200
        done = stack.cli_json("compensate", "--all")         # retries the failed one and runs the pending one
        assert sorted(i["id"] for i in done) == sorted(i["id"] for i in items)
        assert {i["compensation"] for i in done} == {"done"}
        assert sorted(r["id"] for r in received[1:]) == sorted(i["id"] for i in items)
        assert {i["compensation"] for i in api_ok(stack, "GET", "/api/inconsistencies")} == {"done"}
        # nothing pending: --all has nothing to do, and done ones are not sent again
        assert api_ok(stack, "POST", "/api/compensate", {"all": True}) == []
        assert api_ok(stack, "POST", "/api/compensate", {"ids": [first["id"]]})[0]["compensation"] == "done"
        assert len(received) == 3
        # ids are numbers a database can hold; true is not an id
        for ids in ([True], [10**23], [-1], "1"):
            status, answer_ = stack.api("POST", "/api/compensate", {"ids": ids})
            assert status == 400 and "ids must be a list" in answer_["error"], (ids, status, answer_)
        assert stack.api("POST", "/api/replay", {"skip": [10**23]})[0] == 400
        huge = stack.cli("compensate", str(10**23), check=False)
        assert huge.returncode == 2 and "Traceback" not in huge.stderr
        empty = stack.cli("snapshot", "delete", "", check=False)
        assert empty.returncode == 2 and "name the snapshot" in empty.stderr


# --------------------------------------------------------------------------- server-chosen names
def items_service(root: Path) -> tuple[web.Application, dict[str, int]]:
    """POST /items creates /items/<n> (n from an in-memory counter, so a rewound volume gets new ids)."""
    state = {"next": 1}
    (root / "items").mkdir(exist_ok=True)

    async def create(request: web.Request) -> web.Response:
        n, state["next"] = state["next"], state["next"] + 1
        (root / "items" / str(n)).write_bytes(await request.read())
        return web.Response(status=201, headers={"Location": f"/items/{n}"}, text="created\n")

    async def read(request: web.Request) -> web.Response:
        f = root / "items" / request.match_info["n"]
        return web.Response(body=f.read_bytes()) if f.is_file() else web.Response(status=404)

    async def update(request: web.Request) -> web.Response:
        f = root / "items" / request.match_info["n"]
        if not f.is_file():
            return web.Response(status=404)
        f.write_bytes(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/items", create)
    app.router.add_get("/items/{n}", read)
    app.router.add_put("/items/{n}", update)
    return app, state


def test_replay_translates_server_chosen_locations(proxy_stack, tmp_path):
    volume = tmp_path / "items-volume"
    volume.mkdir()
    app, counter = items_service(volume)
    with AioServer(app) as service:
        stack = proxy_stack(volume=volume, backend="copy")
        stack.kill()
        set_config(stack, f'upstream = "{stack.dav.url}"', f'upstream = "{service.url}"')
        set_config(stack, 'verbs = "webdav"', 'verbs = "http"')
        stack.start()

        r = call(stack.url, "POST", "/items", b"first")
        assert r.status == 201 and r.headers["location"] == "/items/1"
        snap = api_ok(stack, "POST", "/api/snapshots", {})
        r = call(stack.url, "POST", "/items", b"second")
        assert r.headers["location"] == "/items/2"
        assert call(stack.url, "PUT", "/items/2", b"second, edited").status == 204
        assert get(stack, "/items/2").body == b"second, edited"
        put_seq = seq_of(stack, "http.put", "/items/2")
        get_seq = seq_of(stack, "http.get", "/items/2")

        cid = api_ok(stack, "POST", "/api/rewind", {"to": snap["id"]})["id"]
        assert sorted(os.listdir(volume / "items")) == ["1"]
        cycle = api_ok(stack, "POST", "/api/replay", {"skip": []})
        assert cycle["inconsistencies"] == 0
        assert counter["next"] == 4 and sorted(os.listdir(volume / "items")) == ["1", "3"]
        assert (volume / "items" / "3").read_bytes() == b"second, edited"

        replays = {v["original_seq"]: v for v in verbs(stack, cycle=cid)}
        for original in (put_seq, get_seq):
            shown = api_ok(stack, "GET", f"/api/verbs/{replays[original]['seq']}")
            assert shown["request"]["path"] == "/items/3", shown
        api_ok(stack, "POST", "/api/commit")

        # a second cycle replays the first one's replays, as they were sent: /items/3 is now /items/4
        cid = api_ok(stack, "POST", "/api/rewind", {"to": snap["id"]})["id"]
        assert api_ok(stack, "POST", "/api/replay", {"skip": []})["inconsistencies"] == 0
        assert (volume / "items" / "4").read_bytes() == b"second, edited"
        assert sorted(os.listdir(volume / "items")) == ["1", "4"]


# --------------------------------------------------------------------------- SQLite in WAL mode
def test_sqlite_wal_database_in_the_volume_comes_back_intact(btrfs_stack):
    stack, vol = btrfs_stack, btrfs_stack.volume
    db = vol / "app.db"
    con = sqlite3.connect(db, isolation_level=None)
    assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    con.execute("PRAGMA wal_autocheckpoint=0")                 # every frame stays in the WAL
    con.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, payload BLOB)")
    for batch in range(20):
        con.execute("BEGIN")
        con.executemany("INSERT INTO rows (payload) VALUES (?)", [(os.urandom(200),) for _ in range(50)])
        con.execute("COMMIT")
    put(stack, "/marker.txt", "m")
    at_snapshot = con.execute("SELECT count(*) FROM rows").fetchone()[0]
    assert (vol / "app.db-wal").stat().st_size > 0

    snap = stack.cli_json("snapshot", "take")                  # taken with uncheckpointed WAL frames
    assert (Path(snap["path"]) / "app.db-wal").stat().st_size > 0
    con.execute("BEGIN")
    con.executemany("INSERT INTO rows (payload) VALUES (?)", [(b"later",) for _ in range(500)])
    con.execute("COMMIT")
    con.close()

    api_ok(stack, "POST", "/api/rewind", {"to": snap["id"]})
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert check.execute("SELECT count(*) FROM rows").fetchone()[0] == at_snapshot == 1000
        assert check.execute("SELECT count(*) FROM rows WHERE payload = 'later'").fetchone()[0] == 0
    finally:
        check.close()
    api_ok(stack, "POST", "/api/cancel")
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert check.execute("SELECT count(*) FROM rows").fetchone()[0] == 1500
    finally:
        check.close()
