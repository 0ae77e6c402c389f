"""The timeline store on a real SQLite file and a real PostgreSQL database: schema upgrades, verb queries,
effective history, snapshots/cycles/inconsistencies, and the group committer."""
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from storage.db import TimelineUnavailable, head_revision, normalize_url, upgrade
from storage.timeline import GroupCommitter, NewVerb, Timeline, VerbFilter

CONTRACT_VERB_KEYS = {"seq", "time", "protocol", "verb", "targets", "mutates", "status", "origin", "cycle",
                      "original_seq", "summary"}
CONTRACT_SNAPSHOT_KEYS = {"id", "time", "after_seq", "label", "backend", "path"}
CONTRACT_CYCLE_KEYS = {"id", "state", "snapshot", "rewind_to_seq", "skipped", "replayed", "inconsistencies"}
CONTRACT_INCONSISTENCY_KEYS = {"id", "cycle", "seq", "verb", "kind", "detail", "compensation"}
TABLES = {"verbs", "blobs", "snapshots", "cycles", "inconsistencies", "alembic_version"}


# --- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'timeline.db'}"
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def tl(db_url: str):
    upgrade(db_url)
    timeline = Timeline(db_url)
    yield timeline
    timeline.close()


def new_verb(verb: str = "webdav.put", targets: list[str] | None = None, **kw) -> NewVerb:
    protocol = kw.pop("protocol", verb.split(".")[0] if not verb.startswith("webdav") else "http")
    values = dict(protocol=protocol, frontend="web", verb=verb, targets=targets or ["/a"],
                  mutates=verb not in ("http.get", "webdav.get", "imap.fetch"),
                  summary=f"{verb} {' '.join(targets or ['/a'])}", request={"method": verb.upper()})
    values.update(kw)
    return NewVerb(**values)


def add(tl: Timeline, verb: str = "webdav.put", targets: list[str] | None = None, **kw) -> int:
    v = new_verb(verb, targets, **kw)
    return tl.run(lambda s: Timeline.insert_verb(s, v))


def finish(tl: Timeline, seq: int, status: str = "committed", output: dict | None = None,
           summary: str = "done") -> None:
    tl.run(lambda s: Timeline.finish_verb(s, seq, status, output, summary))


def admin_sql(url: str, sql: str) -> None:
    """Run one statement on the PostgreSQL server hosting url, from its maintenance database."""
    engine = create_engine(make_url(normalize_url(url)).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def assert_utc_iso(value: str) -> datetime:
    assert isinstance(value, str) and value.endswith("+00:00"), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0)
    return parsed


# --- schema --------------------------------------------------------------------------------------
def test_upgrade_creates_schema_and_is_idempotent(db_url: str) -> None:
    fresh = Timeline(db_url)
    try:
        with pytest.raises(TimelineUnavailable, match="db upgrade"):
            fresh.check_schema()
    finally:
        fresh.close()

    head = head_revision(db_url)
    assert head and upgrade(db_url) == head
    tl = Timeline(db_url)
    try:
        tl.check_schema()
        assert TABLES <= set(inspect(tl.engine).get_table_names())
        seq = add(tl)
        assert upgrade(db_url) == head  # a second upgrade is a no-op that keeps the data
        tl.check_schema()
        assert tl.verb(seq)["verb"] == "webdav.put"
        assert tl.last_seq() == seq
    finally:
        tl.close()


def test_sqlite_wal_mode_and_private_files(tmp_path: Path) -> None:
    state = tmp_path / "state"
    url = f"sqlite:///{state / 'timeline.db'}"
    upgrade(url)
    tl = Timeline(url)
    try:
        add(tl)
        with tl.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        # WAL is a property of the file: a plain sqlite3 connection sees it too.
        with sqlite3.connect(state / "timeline.db") as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in ("timeline.db", "timeline.db-wal", "timeline.db-shm"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    finally:
        tl.close()


# --- verbs ---------------------------------------------------------------------------------------
def test_insert_finish_and_show(tl: Timeline) -> None:
    before = datetime.now(timezone.utc)
    seq = add(tl, "webdav.put", ["/notes/a.txt"], request={"method": "PUT", "body": {"size": 2}})
    pending = tl.verb(seq)
    assert pending["status"] == "pending" and pending["finished"] is None and pending["output"] is None

    finish(tl, seq, "committed", {"status": 201, "headers": {"etag": "x"}}, "PUT /notes/a.txt -> 201")
    doc = tl.verb(seq)
    assert CONTRACT_VERB_KEYS | {"request", "output"} <= set(doc)
    assert doc == {**doc, "seq": seq, "protocol": "http", "verb": "webdav.put", "targets": ["/notes/a.txt"],
                   "mutates": True, "status": "committed", "origin": "live", "cycle": None,
                   "original_seq": None, "summary": "PUT /notes/a.txt -> 201",
                   "request": {"method": "PUT", "body": {"size": 2}},
                   "output": {"status": 201, "headers": {"etag": "x"}}}
    assert json.loads(json.dumps(doc)) == doc  # plain JSON, no datetimes or rows
    when = assert_utc_iso(doc["time"])
    assert before - timedelta(seconds=5) <= when <= datetime.now(timezone.utc) + timedelta(seconds=5)
    assert assert_utc_iso(doc["finished"]) >= when

    listed = tl.verbs(VerbFilter())
    assert len(listed) == 1
    assert CONTRACT_VERB_KEYS <= set(listed[0]) and "request" not in listed[0]
    assert {k: listed[0][k] for k in CONTRACT_VERB_KEYS} == {k: doc[k] for k in CONTRACT_VERB_KEYS}
    assert tl.verb(seq + 1000) is None


def test_json_columns_keep_what_the_standard_library_would(tl: Timeline) -> None:
    """orjson writes and reads the JSON columns; what it refuses takes the standard library's path."""
    request = {"method": "PUT", "big": 2**70, "numbers": [1.5, -0, None, True], "text": "caf\u00e9 \U0001f600",
               "nested": {"a": [{"b": "c"}]}}
    seq = add(tl, "webdav.put", ["/j"], request=request)
    finish(tl, seq, "committed", {"status": 201, 7: "int key"}, "PUT /j -> 201")
    doc = tl.verb(seq)
    assert doc["request"] == request
    assert doc["output"] == {"status": 201, "7": "int key"}  # as json.dumps would have stored it
    assert [r.request for r in tl.effective_verbs(0, seq)] == [request]


def test_json_codec_fallbacks() -> None:
    from storage.db import json_text, json_value
    assert json.loads(json_text({"a": 2**70})) == {"a": 2**70}
    assert json_value("[NaN]")[0] != json_value("[NaN]")[0]  # NaN as the standard library reads it
    assert json_value(b'{"x": [1, "y"]}') == {"x": [1, "y"]}


def test_inserting_a_finished_verb_sets_finished(tl: Timeline) -> None:
    seq = add(tl, "http.get", ["/x"], status="committed", output={"status": 200})
    doc = tl.verb(seq)
    assert doc["status"] == "committed" and doc["mutates"] is False
    assert doc["finished"] == doc["time"]


def test_times_are_utc_whatever_the_server_time_zone(db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        admin_sql(db_url, f"ALTER DATABASE \"{make_url(db_url).database}\" SET timezone TO 'America/New_York'")
    upgrade(db_url)
    tl = Timeline(db_url)
    try:
        seq = add(tl, time=datetime(2026, 12, 3, 16, 20, 0, 123456, tzinfo=timezone.utc))
        assert tl.verb(seq)["time"] == "2026-12-03T16:20:00.123456+00:00"
        assert tl.verbs(VerbFilter())[0]["time"] == "2026-12-03T16:20:00.123456+00:00"
    finally:
        tl.close()


def test_seqs_strictly_increase(tl: Timeline) -> None:
    seqs = [add(tl, targets=[f"/f{i}"]) for i in range(25)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [v["seq"] for v in tl.verbs(VerbFilter())] == seqs
    assert tl.last_seq() == seqs[-1]


def test_batched_inserts_store_what_single_inserts_do_in_order(tl: Timeline) -> None:
    """insert_verbs writes many rows to a statement (64, then powers of two): 150 verbs of every kind of
    value come back as the one-by-one inserts store them, in the order given."""
    when = datetime(2026, 12, 4, 9, 30, 0, 654321, tzinfo=timezone.utc)

    def verbs(tag: str) -> list[NewVerb]:
        return [new_verb("http.get" if i % 3 else "webdav.put", [f"/{tag}/{i}", f"/{tag}/x{i}"][: 1 + i % 2],
                         status="committed" if i % 2 else "pending", time=when if i % 5 == 0 else None,
                         output=None if i % 4 == 0 else {"status": 200, "big": 2**70 if i == 7 else i},
                         request={"method": "GET", "n": i, "text": "caf\u00e9 'q' \"d\" %s ?"},
                         cycle=None, original_seq=i if i % 6 == 0 else None, origin="live")
                for i in range(150)]

    singles = [tl.run(lambda s, v=v: Timeline.insert_verb(s, v)) for v in verbs("one")]
    tl.run(lambda s: Timeline.insert_verbs(s, verbs("many")))
    docs = [tl.verb(v["seq"]) for v in tl.verbs(VerbFilter())]
    assert [d["seq"] for d in docs[:150]] == singles
    batched = docs[150:]
    assert len(batched) == 150
    assert [d["targets"][0] for d in batched] == [f"/many/{i}" for i in range(150)]  # in the order given

    def comparable(doc: dict) -> dict:
        out = {k: v for k, v in doc.items() if k not in ("seq", "time", "finished", "summary", "targets")}
        out["targets"] = [t.split("/", 2)[2] for t in doc["targets"]]
        out["fixed time"] = doc["time"] if doc["time"].startswith("2026-12-04T09:30:00.654321") else None
        out["finished is time"] = doc["finished"] == doc["time"] if doc["finished"] else None
        return out
    assert [comparable(d) for d in batched] == [comparable(d) for d in docs[:150]]
    assert batched[0]["output"] is None and batched[7]["output"] == {"status": 200, "big": 2**70}
    assert batched[0]["time"] == "2026-12-04T09:30:00.654321+00:00"


@pytest.fixture
def populated(tl: Timeline) -> dict[str, int]:
    """A small mixed history; returns name -> seq."""
    cid = tl.create_cycle(state="committed", snapshot="s1", pre_rewind_snapshot=None, rewind_to_seq=0,
                          base_seq=0, end_seq=0)
    seqs = {
        "put_a": add(tl, "webdav.put", ["/docs/a.txt"]),
        "get_a": add(tl, "http.get", ["/docs/a.txt"]),
        "move": add(tl, "webdav.move", ["/docs/a.txt", "/archive/a.txt"]),
        "mkcol": add(tl, "webdav.mkcol", ["/archive"]),
        "deliver": add(tl, "smtp.deliver", ["<m1@example.org>", "INBOX"], protocol="smtp"),
        "store": add(tl, "imap.store", ["INBOX/<m1@example.org>"], protocol="imap"),
        "replay_put": add(tl, "webdav.put", ["/docs/a.txt"], origin="replay", cycle=cid, original_seq=1),
        "put_b": add(tl, "webdav.put", ["/docs/b.txt"]),
    }
    seqs["cycle"] = cid
    return seqs


def seqs_of(verbs: list[dict]) -> list[int]:
    return [v["seq"] for v in verbs]


def test_filter_limit_and_after(tl: Timeline, populated: dict[str, int]) -> None:
    everything = seqs_of(tl.verbs(VerbFilter()))
    assert len(everything) == 8 and everything == sorted(everything)
    assert seqs_of(tl.verbs(VerbFilter(limit=3))) == everything[:3]
    assert seqs_of(tl.verbs(VerbFilter(after=everything[4]))) == everything[5:]
    assert seqs_of(tl.verbs(VerbFilter(after=everything[2], limit=2))) == everything[3:5]
    assert tl.verbs(VerbFilter(after=everything[-1])) == []
    assert tl.verbs(VerbFilter(limit=0)) == []
    assert seqs_of(tl.verbs(VerbFilter(limit=2, newest_first=True))) == everything[:-3:-1]


def test_filter_protocol_and_verb(tl: Timeline, populated: dict[str, int]) -> None:
    p = populated
    assert seqs_of(tl.verbs(VerbFilter(protocol="smtp"))) == [p["deliver"]]
    assert seqs_of(tl.verbs(VerbFilter(protocol="imap"))) == [p["store"]]
    assert seqs_of(tl.verbs(VerbFilter(protocol="http"))) == sorted(
        p[k] for k in ("put_a", "get_a", "move", "mkcol", "replay_put", "put_b"))
    assert seqs_of(tl.verbs(VerbFilter(verb="webdav.put"))) == [p["put_a"], p["replay_put"], p["put_b"]]
    assert seqs_of(tl.verbs(VerbFilter(verb="webdav.put", limit=1, after=p["put_a"]))) == [p["replay_put"]]
    assert tl.verbs(VerbFilter(verb="webdav.nothing")) == []
    assert tl.verbs(VerbFilter(protocol="smtp", verb="webdav.put")) == []


def test_filter_target_glob_matches_any_target(tl: Timeline, populated: dict[str, int]) -> None:
    p = populated
    # "/archive/*" matches the MOVE through its second target and nothing else ('*' crosses '/').
    assert seqs_of(tl.verbs(VerbFilter(target="/archive/*"))) == [p["move"]]
    assert seqs_of(tl.verbs(VerbFilter(target="/archive*"))) == [p["move"], p["mkcol"]]
    # A collection named with its trailing slash, as "MKCOL /archive/" spells it, is the target /archive.
    assert seqs_of(tl.verbs(VerbFilter(target="/archive/"))) == [p["mkcol"]]
    assert seqs_of(tl.verbs(VerbFilter(target="/"))) == []
    assert seqs_of(tl.verbs(VerbFilter(target="/docs/a.txt"))) == [p["put_a"], p["get_a"], p["move"],
                                                                    p["replay_put"]]
    assert seqs_of(tl.verbs(VerbFilter(target="/docs/?.txt"))) == [p["put_a"], p["get_a"], p["move"],
                                                                    p["replay_put"], p["put_b"]]
    assert seqs_of(tl.verbs(VerbFilter(target="*m1@example.org*"))) == [p["deliver"], p["store"]]
    assert seqs_of(tl.verbs(VerbFilter(target="/docs/*", limit=2))) == [p["put_a"], p["get_a"]]
    assert seqs_of(tl.verbs(VerbFilter(target="/docs/*", verb="webdav.put", after=p["put_a"]))) == [
        p["replay_put"], p["put_b"]]
    # No SQL LIKE semantics leak through: '%' and '_' are literal characters here.
    assert tl.verbs(VerbFilter(target="/docs/%")) == []
    assert tl.verbs(VerbFilter(target="/docs/_.txt")) == []


def test_filter_cycle(tl: Timeline, populated: dict[str, int]) -> None:
    only = tl.verbs(VerbFilter(cycle=populated["cycle"]))
    assert seqs_of(only) == [populated["replay_put"]]
    assert only[0]["origin"] == "replay" and only[0]["cycle"] == populated["cycle"]
    assert only[0]["original_seq"] == 1
    assert tl.verbs(VerbFilter(cycle=populated["cycle"] + 1)) == []


def test_mark_pending_unknown(tl: Timeline) -> None:
    done = add(tl)
    finish(tl, done)
    lost = [add(tl, targets=["/p1"]), add(tl, targets=["/p2"])]
    failed = add(tl, targets=["/f"])
    finish(tl, failed, "failed")
    assert tl.mark_pending_unknown() == 2
    assert {v["seq"]: v["status"] for v in tl.verbs(VerbFilter())} == {
        done: "committed", lost[0]: "unknown", lost[1]: "unknown", failed: "failed"}
    assert tl.mark_pending_unknown() == 0
    assert seqs_of(tl.verbs(VerbFilter(status="unknown"))) == lost


# --- effective history ---------------------------------------------------------------------------
def test_effective_verbs(tl: Timeline) -> None:
    def live(target: str, status: str = "committed") -> int:
        seq = add(tl, targets=[target])
        finish(tl, seq, status)
        return seq

    def replay(cycle: int, original: int, status: str = "committed") -> int:
        seq = add(tl, targets=["/r"], origin="replay", cycle=cycle, original_seq=original)
        finish(tl, seq, status)
        return seq

    a, b = live("/a"), live("/b")
    c, d_failed, e = live("/c"), live("/d", "failed"), live("/e")
    pending = add(tl, targets=["/pending"])  # never finished: not part of the history
    committed = tl.create_cycle(state="replaying", snapshot="snap-b", pre_rewind_snapshot="pre-1",
                                rewind_to_seq=b, base_seq=b, end_seq=pending)
    r_c = replay(committed, c)
    r_e_failed = replay(committed, e, "failed")
    tl.update_cycle(committed, state="committed")
    f = live("/f")
    cancelled = tl.create_cycle(state="review", snapshot="snap-f", pre_rewind_snapshot="pre-2",
                                rewind_to_seq=r_c, base_seq=r_c, end_seq=f)
    r_f = replay(cancelled, f)
    tl.update_cycle(cancelled, state="cancelled")
    g = live("/g")
    still_open = tl.create_cycle(state="review", snapshot="snap-g", pre_rewind_snapshot="pre-3",
                                 rewind_to_seq=g, base_seq=g, end_seq=g)
    r_g = replay(still_open, g)
    last = tl.last_seq()
    assert last == r_g

    history = [r.seq for r in tl.effective_verbs(0, last)]
    # Cycle 1 superseded (b, pending]: c, d, e and the pending verb; its committed replay counts, its failed
    # replay does not. The cancelled cycle superseded nothing and its replay does not count; the open
    # cycle's replay does not count (yet).
    assert history == [a, b, r_c, f, g]
    assert r_e_failed not in history and r_f not in history and d_failed not in history
    assert [r.seq for r in tl.effective_verbs(b, f)] == [r_c, f]
    assert [r.seq for r in tl.effective_verbs(0, e)] == [a, b]
    assert [r.seq for r in tl.effective_verbs(f, last)] == [g]
    assert tl.effective_verbs(last, last) == []

    # Committing the open cycle supersedes g (in (g, g] nothing) and makes its replay count.
    tl.update_cycle(still_open, state="committed")
    assert [r.seq for r in tl.effective_verbs(0, last)] == [a, b, r_c, f, g, r_g]


# --- snapshots, cycles, inconsistencies ----------------------------------------------------------
def snapshot_row(sid: str, minute: int, after_seq: int, **kw) -> dict:
    row = dict(id=sid, time=datetime(2026, 12, 3, 16, minute, tzinfo=timezone.utc), after_seq=after_seq,
               label=None, backend="copy", path=f"/snaps/{sid}", kind="periodic", valid=True,
               duration_ms=12.345, pause_ms=1.5, deleted=False)
    row.update(kw)
    return row


def test_snapshots_round_trip(tl: Timeline) -> None:
    tl.add_snapshot(snapshot_row("s2", 10, 5, label="before upgrade", kind="manual"))
    tl.add_snapshot(snapshot_row("s1", 0, 0))
    tl.add_snapshot(snapshot_row("s3", 20, 9, backend="btrfs"))
    snaps = tl.snapshots()
    assert [s["id"] for s in snaps] == ["s1", "s2", "s3"]  # oldest first
    s2 = tl.snapshot("s2")
    assert CONTRACT_SNAPSHOT_KEYS <= set(s2)
    assert s2 == {**s2, "id": "s2", "time": "2026-12-03T16:10:00+00:00", "after_seq": 5,
                  "label": "before upgrade", "backend": "copy", "path": "/snaps/s2", "kind": "manual",
                  "valid": True, "duration_ms": 12.35, "pause_ms": 1.5}
    assert json.loads(json.dumps(snaps)) == snaps
    assert tl.snapshot_count() == 3

    assert tl.rewind_base(7)["id"] == "s2"
    assert tl.rewind_base(9)["id"] == "s3"
    assert tl.rewind_base(0)["id"] == "s1"
    tl.set_snapshot("s2", valid=False)
    assert tl.rewind_base(7)["id"] == "s1"

    tl.set_snapshot("s3", deleted=True)
    assert tl.snapshot("s3") is None
    assert [s["id"] for s in tl.snapshots()] == ["s1", "s2"]
    assert [s["id"] for s in tl.snapshots(include_deleted=True)] == ["s1", "s2", "s3"]
    assert tl.snapshot_count() == 2
    assert tl.rewind_base(100)["id"] == "s1"


def test_cycles_and_status_round_trip(tl: Timeline) -> None:
    assert tl.status() == {**tl.status(), "mode": "live", "cycle": None, "last_seq": 0, "snapshots": 0}
    tl.add_snapshot(snapshot_row("s1", 0, 0))
    seqs = [add(tl, targets=[f"/{i}"]) for i in range(3)]
    cid = tl.create_cycle(state="rewound", snapshot="s1", pre_rewind_snapshot="pre", rewind_to_seq=seqs[0],
                          base_seq=0, end_seq=seqs[-1])
    cycle = tl.cycle(cid)
    assert CONTRACT_CYCLE_KEYS <= set(cycle)
    assert cycle == {**cycle, "id": cid, "state": "rewound", "snapshot": "s1", "rewind_to_seq": seqs[0],
                     "skipped": [], "replayed": 0, "inconsistencies": 0, "notes": [], "closed": None}
    assert_utc_iso(cycle["opened"])
    assert tl.open_cycle()["id"] == cid
    assert tl.status() == {**tl.status(), "mode": "rewound", "cycle": cid, "last_seq": seqs[-1], "snapshots": 1}

    tl.add_note(cid, "rolled back the upgrade")
    tl.update_cycle(cid, state="replaying", skipped=[seqs[1]], to_replay=2, replayed=1)
    cycle = tl.cycle(cid)
    assert (cycle["state"], cycle["skipped"], cycle["replayed"], cycle["to_replay"]) == ("replaying", [seqs[1]], 1, 2)
    assert [n["note"] for n in cycle["notes"]] == ["rolled back the upgrade"]
    assert_utc_iso(cycle["notes"][0]["time"])
    assert tl.status()["mode"] == "replaying"

    tl.update_cycle(cid, state="committed", closed=datetime.now(timezone.utc))
    assert tl.open_cycle() is None
    assert tl.status()["mode"] == "live"
    assert_utc_iso(tl.cycle(cid)["closed"])
    assert [c["id"] for c in tl.cycles()] == [cid]
    assert tl.cycle(cid + 1) is None
    assert json.loads(json.dumps(tl.cycles())) == tl.cycles()


def test_inconsistencies_round_trip(tl: Timeline) -> None:
    cid = tl.create_cycle(state="review", snapshot="s1", pre_rewind_snapshot=None, rewind_to_seq=0,
                          base_seq=0, end_seq=0)
    other = tl.create_cycle(state="committed", snapshot="s1", pre_rewind_snapshot=None, rewind_to_seq=0,
                            base_seq=0, end_seq=0)
    dropped = tl.create_cycle(state="cancelled", snapshot="s1", pre_rewind_snapshot=None, rewind_to_seq=0,
                              base_seq=0, end_seq=0)

    def insert(cycle: int, seq: int, kind: str, compensation: str = "pending") -> int:
        return tl.run(lambda s: Timeline.insert_inconsistency(
            s, cycle=cycle, seq=seq, replay_seq=seq + 100, verb="http.get", kind=kind,
            detail=f"verb {seq}: {kind}", compensation=compensation))

    first = insert(cid, 23, "output-changed")
    second = insert(cid, 24, "status-changed", "none")
    third = insert(other, 25, "output-changed")
    fourth = insert(dropped, 26, "output-changed")  # a cancelled cycle's: never compensated
    assert first < second < third < fourth

    items = tl.inconsistencies(cycle=cid)
    assert [i["id"] for i in items] == [first, second]
    assert CONTRACT_INCONSISTENCY_KEYS <= set(items[0])
    assert items[0] == {**items[0], "id": first, "cycle": cid, "seq": 23, "verb": "http.get",
                        "kind": "output-changed", "detail": "verb 23: output-changed", "compensation": "pending",
                        "replay_seq": 123, "compensation_detail": None}
    assert_utc_iso(items[0]["time"])
    assert [i["id"] for i in tl.inconsistencies()] == [first, second, third, fourth]
    assert [i["id"] for i in tl.inconsistencies(ids=[third, first])] == [first, third]
    assert [i["id"] for i in tl.inconsistencies(pending_only=True)] == [first, third]
    assert tl.cycle(cid)["inconsistencies"] == 2 and tl.cycle(other)["inconsistencies"] == 1

    tl.set_compensation(first, "failed", "webhook answered 500")
    assert [i["id"] for i in tl.inconsistencies(pending_only=True)] == [first, third]  # failed ones are retried
    tl.set_compensation(first, "done", "webhook answered 200")
    assert [i["id"] for i in tl.inconsistencies(pending_only=True)] == [third]
    done = tl.inconsistencies(ids=[first])[0]
    assert (done["compensation"], done["compensation_detail"]) == ("done", "webhook answered 200")


def test_run_turns_database_errors_into_timeline_unavailable(tl: Timeline) -> None:
    with pytest.raises(TimelineUnavailable):
        tl.run(lambda s: s.execute(text("SELECT * FROM no_such_table")))


# --- group commit --------------------------------------------------------------------------------
async def test_group_committer_batches_concurrent_writes(tl: Timeline) -> None:
    committer = GroupCommitter(tl)
    committer.start()
    try:
        order: list[int] = []

        async def client(i: int) -> int:
            await asyncio.sleep(0.001 * (i % 7))  # arrive spread out, as real requests do
            order.append(i)
            v = new_verb(targets=[f"/c{i}"])
            return await committer.write(lambda s: Timeline.insert_verb(s, v))

        results = await asyncio.gather(*(client(i) for i in range(200)))
        batches, ops = committer.batches, committer.ops
    finally:
        await committer.stop()

    assert ops == 200
    assert 1 <= batches <= 40, f"{batches} transactions for 200 concurrent writes: not batched"
    assert len(set(results)) == 200
    by_submission = [results[i] for i in order]
    assert by_submission == sorted(by_submission), "seqs must follow submission order"
    assert committer.healthy
    stored = {v["targets"][0]: v["seq"] for v in tl.verbs(VerbFilter())}
    assert stored == {f"/c{i}": results[i] for i in range(200)}


async def test_an_outcome_that_cannot_be_written_now_is_kept_and_written_once_it_can(tl: Timeline) -> None:
    """write_or_keep: the first two attempts find the database full (the awaited one and the one queued for
    later); the write is kept, and made with the first batch that succeeds."""
    from sqlalchemy.exc import OperationalError
    committer = GroupCommitter(tl)
    committer.start()
    attempts = 0
    v = new_verb(targets=["/late"])

    def op(s) -> None:  # noqa: ANN001
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise OperationalError("INSERT", {}, Exception("database or disk is full"))
        Timeline.insert_verb(s, v)
    try:
        assert await committer.write_or_keep(op) is False
        for _ in range(100):   # the queued attempt lingers, then fails and is kept
            if attempts >= 2:
                break
            await asyncio.sleep(0.01)
        assert attempts == 2 and not tl.verbs(VerbFilter())
        await committer.write(lambda s: Timeline.insert_verb(s, new_verb(targets=["/next"])))
        await committer.flush()
        assert attempts == 3
        assert sorted(x["targets"][0] for x in tl.verbs(VerbFilter())) == ["/late", "/next"]
        assert committer.unawaited_failures == 0
    finally:
        await committer.stop()


async def test_group_committer_one_bad_write_does_not_sink_its_batch(tl: Timeline) -> None:
    committer = GroupCommitter(tl)
    committer.start()
    try:
        good = [committer.submit(lambda s, i=i: Timeline.insert_verb(s, new_verb(targets=[f"/g{i}"])))
                for i in range(10)]
        # A replay verb pointing at a cycle that does not exist violates the foreign key.
        bad = committer.submit(lambda s: Timeline.insert_verb(s, new_verb(origin="replay", cycle=999_999)))
        more = [committer.submit(lambda s, i=i: Timeline.insert_verb(s, new_verb(targets=[f"/h{i}"])))
                for i in range(10)]
        results = await asyncio.gather(*good, *more)
        with pytest.raises(TimelineUnavailable):
            await bad
        assert results == sorted(results) and len(set(results)) == 20
        await committer.write(lambda s: None)
        assert committer.healthy
    finally:
        await committer.stop()
    assert len(tl.verbs(VerbFilter())) == 20


def _make_unwritable(url: str, path_or_db: str, on: bool) -> None:
    if url.startswith("sqlite"):
        # The database and its WAL become immutable (not the -shm file: it is mmapped, and a write to an
        # immutable mapping is a SIGBUS rather than an error).
        files = [path_or_db, path_or_db + "-wal"]
        subprocess.run(["chattr", "+i" if on else "-i", *files], check=True)
    else:
        setting = "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
        admin_sql(url, f'ALTER DATABASE "{path_or_db}" {setting}')
        # Existing sessions keep their settings: end them; the pool reconnects.
        admin_sql(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       f"WHERE datname = '{path_or_db}' AND pid <> pg_backend_pid()")


async def test_records_kept_through_an_outage_keep_their_place(tl: Timeline, db_url: str) -> None:
    """A read answered while the timeline could not be written is kept; the client's next request (a write
    that waits for its intent) comes after it on the timeline, not before."""
    target = make_url(db_url).database
    committer = GroupCommitter(tl)
    committer.start()
    try:
        await committer.write(lambda s: Timeline.insert_verb(s, new_verb(targets=["/start"])))
        _make_unwritable(db_url, target, True)
        try:
            committer.record_nowait(new_verb("http.get", ["/o1"], status="committed", output={"status": 200}))
            futures = [committer.submit(lambda s, i=i: Timeline.insert_verb(s, new_verb(targets=[f"/down{i}"])))
                       for i in range(20)]
            assert all(isinstance(o, TimelineUnavailable)
                       for o in await asyncio.gather(*futures, return_exceptions=True))
            assert committer.healthy is False and len(tl.verbs(VerbFilter())) == 1
        finally:
            _make_unwritable(db_url, target, False)
        put = await committer.write(lambda s: Timeline.insert_verb(s, new_verb("http.put", ["/o2"])))
        assert committer.healthy is True
    finally:
        await committer.stop()
    got = [(v["seq"], v["targets"][0]) for v in tl.verbs(VerbFilter())]
    assert [t for _, t in got] == ["/start", "/o1", "/o2"] and got[2][0] == put
    assert committer.unawaited_failures == 0


def test_a_database_that_cannot_be_written_fails_a_batch_at_once(tl: Timeline) -> None:
    """Locked, full or read-only, the database refuses every op of a batch alike: they fail together, not
    one by one (with SQLite's 30 s lock timeout, a batch of 20 would have waited 10 minutes)."""
    from sqlalchemy.exc import OperationalError
    calls: list[int] = []

    def op(i: int):  # noqa: ANN202
        def run(s) -> None:  # noqa: ANN001
            calls.append(i)
            raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))
        return run
    results = GroupCommitter(tl)._commit([op(i) for i in range(20)])
    assert calls == [0] and len(results) == 20
    assert all(not ok and isinstance(err, TimelineUnavailable) for ok, err in results)


async def test_a_timeline_known_to_be_failing_is_probed_not_waited_for(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock. Once the committer knows the timeline is failing, a write
    gives up after about a second (a 503 for its client), not after the whole 30 s lock timeout; once the
    lock is gone, the next write succeeds and the timeline is healthy again."""
    url = f"sqlite:///{tmp_path / 'state' / 'timeline.db'}"
    upgrade(url)
    tl = Timeline(url)
    holder = sqlite3.connect(tmp_path / "state" / "timeline.db", isolation_level=None)
    committer = GroupCommitter(tl)
    committer.start()
    try:
        holder.execute("BEGIN IMMEDIATE")
        committer.healthy = False   # as after a failed write
        t0 = time.monotonic()
        with pytest.raises(TimelineUnavailable):
            await committer.write(lambda s: Timeline.insert_verb(s, new_verb(targets=["/locked"])))
        assert time.monotonic() - t0 < 5
        holder.execute("ROLLBACK")
        await committer.write(lambda s: Timeline.insert_verb(s, new_verb(targets=["/free"])))
        assert committer.healthy
    finally:
        holder.close()
        await committer.stop()
        tl.close()
    assert [v["targets"] for v in tl.verbs(VerbFilter())] == [["/free"]]


async def test_group_committer_fails_closed_and_recovers(tl: Timeline, db_url: str) -> None:
    target = make_url(db_url).database
    committer = GroupCommitter(tl)
    committer.start()
    try:
        first = await committer.write(lambda s: Timeline.insert_verb(s, new_verb(targets=["/before"])))
        assert committer.healthy
        if db_url.startswith("sqlite"):
            assert os.path.exists(target + "-wal")
        _make_unwritable(db_url, target, True)
        try:
            futures = [committer.submit(lambda s, i=i: Timeline.insert_verb(s, new_verb(targets=[f"/x{i}"])))
                       for i in range(5)]
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            assert all(isinstance(o, TimelineUnavailable) for o in outcomes), outcomes
            assert committer.healthy is False
        finally:
            _make_unwritable(db_url, target, False)
        after = await committer.write(lambda s: Timeline.insert_verb(s, new_verb(targets=["/after"])))
        assert committer.healthy is True
        assert after > first
    finally:
        await committer.stop()
    assert [v["targets"] for v in tl.verbs(VerbFilter())] == [["/before"], ["/after"]]
    assert tl.integrity_ok()
