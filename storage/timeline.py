"""The timeline: verbs, snapshots, cycles and inconsistencies, and the queries over them.

`Timeline` is the synchronous store (used by the CLI straight from the database, and by the daemon
from worker threads). `GroupCommitter` is the daemon's single writer: concurrent requests hand it their
writes and share one transaction and one fsync.
"""
from __future__ import annotations

import asyncio
import fnmatch
import functools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

from sqlalchemy import Select, and_, bindparam, func, insert, not_, or_, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from storage.db import TimelineUnavailable, current_revision, head_revision, make_engine
from storage.models import CycleRow, InconsistencyRow, SnapshotRow, VerbRow

log = logging.getLogger("undo_proxy.timeline")

OPEN_CYCLE_STATES = ("rewinding", "rewound", "replaying", "review", "cancelling")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:  # SQLite hands back naive datetimes; every stored time is UTC
        return t.isoformat() + "+00:00"
    # PostgreSQL hands back times in the session's time zone: always answer in UTC (+00:00).
    return t.astimezone(timezone.utc).isoformat()


@dataclass
class NewVerb:
    protocol: str
    frontend: str
    verb: str
    targets: list[str]
    mutates: bool
    summary: str
    request: dict[str, Any]
    status: str = "pending"
    origin: str = "live"
    cycle: int | None = None
    original_seq: int | None = None
    output: dict[str, Any] | None = None
    time: datetime | None = None


def verb_json(row: VerbRow, full: bool = False) -> dict[str, Any]:
    doc = {
        "seq": row.seq, "time": iso(row.time), "protocol": row.protocol, "verb": row.verb,
        "targets": list(row.targets), "mutates": bool(row.mutates), "status": row.status,
        "origin": row.origin, "cycle": row.cycle, "original_seq": row.original_seq,
        "summary": row.summary, "frontend": row.frontend, "finished": iso(row.finished),
    }
    if full:
        doc["request"] = row.request
        doc["output"] = row.output
    return doc


def snapshot_json(row: SnapshotRow) -> dict[str, Any]:
    return {"id": row.id, "time": iso(row.time), "after_seq": row.after_seq, "label": row.label,
            "backend": row.backend, "path": row.path, "kind": row.kind, "valid": bool(row.valid),
            "duration_ms": round(row.duration_ms, 2), "pause_ms": round(row.pause_ms, 2)}


def cycle_json(row: CycleRow, inconsistencies: int) -> dict[str, Any]:
    return {"id": row.id, "state": row.state, "snapshot": row.snapshot,
            "pre_rewind_snapshot": row.pre_rewind_snapshot, "rewind_to_seq": row.rewind_to_seq,
            "base_seq": row.base_seq, "end_seq": row.end_seq, "skipped": list(row.skipped),
            "replayed": row.replayed, "to_replay": row.to_replay, "inconsistencies": inconsistencies,
            "notes": list(row.notes), "opened": iso(row.opened), "closed": iso(row.closed),
            "error": row.error}


def inconsistency_json(row: InconsistencyRow) -> dict[str, Any]:
    return {"id": row.id, "cycle": row.cycle, "seq": row.seq, "replay_seq": row.replay_seq,
            "verb": row.verb, "kind": row.kind, "detail": row.detail, "compensation": row.compensation,
            "compensation_detail": row.compensation_detail, "time": iso(row.created)}


@dataclass
class VerbFilter:
    limit: int | None = None
    after: int | None = None
    before: int | None = None
    protocol: str | None = None
    verb: str | None = None
    target: str | None = None
    cycle: int | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    newest_first: bool = False


# The statements of every request, built once: Core statements with bound parameters skip the
# ORM's per-call statement building and cache-key work (about 4x cheaper per verb than .values(...)).
_VERBS = VerbRow.__table__
_INSERT_VERB = insert(_VERBS).returning(_VERBS.c.seq)
_FINISH_VERB = update(_VERBS).where(_VERBS.c.seq == bindparam("seq_"))
_ROWS_PER_INSERT = 64  # 64 rows of 14 columns: under SQLite's oldest limit of 999 bound parameters
_VERB_COLUMNS = ("time", "protocol", "frontend", "verb", "targets", "mutates", "status", "origin", "cycle",
                 "original_seq", "summary", "request", "output", "finished")


class _RowsInsert:
    """Verb rows inserted many to a statement, the SQL compiled once per dialect and size, the values put
    through the columns' own bind processors. Not an executemany: SQLite's driver lets go of the GIL and takes
    it back for every row it steps, and each time the proxy's event loop is made to wait for it. Not
    SQLAlchemy's multi-row .values(): its per-execution work on hundreds of parameters costs more than the
    insert itself."""

    def __init__(self, dialect: Any) -> None:
        self.dialect = dialect
        self.processors = [_VERBS.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in _VERB_COLUMNS]
        self._sql: dict[int, tuple[str, list[int] | None, list[str] | None]] = {}

    def insert(self, s: Session, rows: list[tuple[Any, ...]]) -> None:
        start = 0
        while start < len(rows):
            # 64 rows at a time, then the rest by powers of two: seven statements to compile, not 64.
            count = min(_ROWS_PER_INSERT, 1 << ((len(rows) - start).bit_length() - 1))
            sql, positions, names = self._statement(count)
            values = [value if process is None else process(value)
                      for row in rows[start:start + count] for value, process in zip(row, self.processors)]
            if names is not None:
                params: Any = dict(zip(names, values))
            else:
                params = tuple(values) if positions is None else tuple(values[i] for i in positions)
            s.connection().exec_driver_sql(sql, params)
            start += count

    def _statement(self, rows: int) -> tuple[str, list[int] | None, list[str] | None]:
        """(SQL, for positional parameters their order when it is not row by row, for named ones the names
        row by row)."""
        found = self._sql.get(rows)
        if found is None:
            names = [f"{c}_{i}" for i in range(rows) for c in _VERB_COLUMNS]
            stmt = insert(_VERBS).values([{c: bindparam(f"{c}_{i}") for c in _VERB_COLUMNS} for i in range(rows)])
            compiled = stmt.compile(dialect=self.dialect)
            if compiled.positional:
                positions = [names.index(name) for name in compiled.positiontup]
                found = (compiled.string, None if positions == list(range(len(names))) else positions, None)
            else:
                found = (compiled.string, None, names)
            self._sql[rows] = found
        return found


@functools.cache
def _rows_insert(dialect: Any) -> _RowsInsert:
    return _RowsInsert(dialect)


def _verb_row(v: NewVerb) -> tuple[Any, ...]:
    """The verb's values in the order of _VERB_COLUMNS."""
    now = v.time or utcnow()
    return (now, v.protocol, v.frontend, v.verb, v.targets, v.mutates, v.status, v.origin, v.cycle, v.original_seq,
            v.summary, v.request, v.output, now if v.status != "pending" else None)


class Timeline:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def check_schema(self) -> None:
        """Raise TimelineUnavailable unless the schema is at the newest migration."""
        try:
            current = current_revision(self.engine)
        except SQLAlchemyError as exc:
            raise TimelineUnavailable(f"cannot open the timeline database: {_short(exc)}") from None
        head = head_revision(self.url)
        if current != head:
            state = "has no schema" if current is None else f"is at schema {current}, not {head}"
            raise TimelineUnavailable(f"the timeline database {state}: run `undo-proxy db upgrade`")

    def session(self, lock_wait_ms: int | None = None) -> Session:
        """lock_wait_ms: how long SQLite waits for another writer's lock in this session (default 30 s)."""
        bind = self.engine if lock_wait_ms is None else self.engine.execution_options(lock_wait_ms=lock_wait_ms)
        return Session(bind, expire_on_commit=False)

    def run(self, fn: Callable[[Session], Any]) -> Any:
        """Run fn in one transaction; database errors become TimelineUnavailable."""
        try:
            with self.session() as s, s.begin():
                return fn(s)
        except (OperationalError, DBAPIError) as exc:
            raise TimelineUnavailable(_short(exc)) from exc

    # --- verbs ---------------------------------------------------------------------------------
    @staticmethod
    def insert_verb(s: Session, v: NewVerb) -> int:
        return s.execute(_INSERT_VERB, dict(zip(_VERB_COLUMNS, _verb_row(v)))).scalar_one()

    @staticmethod
    def insert_verbs(s: Session, verbs: Sequence[NewVerb]) -> None:
        """Several verbs, many to a statement, in their order (no seqs returned): the batched reads."""
        _rows_insert(s.get_bind().dialect).insert(s, [_verb_row(v) for v in verbs])

    @staticmethod
    def finish_verb(s: Session, seq: int, status: str, output: dict[str, Any] | None, summary: str) -> None:
        s.execute(_FINISH_VERB, {"seq_": seq, "status": status, "output": output, "summary": summary,
                                 "finished": utcnow()})

    def last_seq(self) -> int:
        return self.run(lambda s: s.scalar(select(func.max(VerbRow.seq))) or 0)

    def verbs(self, f: VerbFilter) -> list[dict[str, Any]]:
        def q(s: Session) -> list[dict[str, Any]]:
            stmt: Select = select(VerbRow)
            if f.after is not None:
                stmt = stmt.where(VerbRow.seq > f.after)
            if f.before is not None:
                stmt = stmt.where(VerbRow.seq < f.before)
            if f.protocol:
                stmt = stmt.where(VerbRow.protocol == f.protocol)
            if f.verb:
                stmt = stmt.where(VerbRow.verb == f.verb)
            if f.cycle is not None:
                stmt = stmt.where(VerbRow.cycle == f.cycle)
            if f.status:
                stmt = stmt.where(VerbRow.status == f.status)
            if f.since:
                stmt = stmt.where(VerbRow.time >= f.since)
            if f.until:
                stmt = stmt.where(VerbRow.time <= f.until)
            stmt = stmt.order_by(VerbRow.seq.desc() if f.newest_first else VerbRow.seq)
            if not f.target:
                if f.limit is not None:
                    stmt = stmt.limit(f.limit)
                return [verb_json(r) for r in s.scalars(stmt)]
            # Target globs match any of a verb's targets; filtered here so '*' and '?' mean what they
            # mean in a shell, whatever the database's LIKE does. Targets are logical names without a trailing
            # slash ("MKCOL /dir/" names /dir): '/dir/' finds them as the summary's spelling suggests.
            globs = {f.target, f.target.rstrip("/") or "/"}
            out = []
            for row in s.scalars(stmt.execution_options(yield_per=1000)):
                if any(fnmatch.fnmatchcase(t, g) for t in row.targets for g in globs):
                    out.append(verb_json(row))
                    if f.limit is not None and len(out) >= f.limit:
                        break
            return out
        return self.run(q)

    def verb(self, seq: int) -> dict[str, Any] | None:
        return self.run(lambda s: (lambda r: verb_json(r, full=True) if r else None)(s.get(VerbRow, seq)))

    def verb_rows(self, seqs: Iterable[int]) -> dict[int, VerbRow]:
        seqs = list(seqs)
        return self.run(lambda s: {r.seq: r for r in s.scalars(select(VerbRow).where(VerbRow.seq.in_(seqs)))})

    def mark_pending_unknown(self) -> int:
        """After a crash: a verb still pending lost its outcome. Returns how many."""
        return self.run(lambda s: s.execute(
            update(VerbRow).where(VerbRow.status == "pending").values(status="unknown")).rowcount)

    def effective_verbs(self, after_seq: int, up_to_seq: int) -> list[VerbRow]:
        """The verbs that make up the service's current history in (after_seq, up_to_seq], oldest first:
        committed live verbs and committed cycles' replays, minus what a committed cycle superseded.
        Read-only rows with VerbRow's attributes (a replay loads tens of thousands: no ORM identity map)."""
        def q(s: Session) -> list[VerbRow]:
            committed = s.execute(select(CycleRow.id, CycleRow.base_seq, CycleRow.end_seq)
                                  .where(CycleRow.state == "committed")).all()
            ids = [c.id for c in committed]
            stmt = (select(VerbRow.__table__).where(VerbRow.seq > after_seq, VerbRow.seq <= up_to_seq,
                                          VerbRow.status == "committed")
                    .where(or_(VerbRow.origin == "live", VerbRow.cycle.in_(ids) if ids else False)))
            for c in committed:
                stmt = stmt.where(not_(and_(VerbRow.seq > c.base_seq, VerbRow.seq <= c.end_seq)))
            return list(s.execute(stmt.order_by(VerbRow.seq)))  # type: ignore[arg-type]
        return self.run(q)

    # --- snapshots -----------------------------------------------------------------------------
    def snapshots(self, include_deleted: bool = False) -> list[dict[str, Any]]:
        def q(s: Session) -> list[dict[str, Any]]:
            stmt = select(SnapshotRow).order_by(SnapshotRow.time, SnapshotRow.id)
            if not include_deleted:
                stmt = stmt.where(SnapshotRow.deleted.is_(False))
            return [snapshot_json(r) for r in s.scalars(stmt)]
        return self.run(q)

    def snapshot(self, sid: str) -> dict[str, Any] | None:
        return self.run(lambda s: (lambda r: snapshot_json(r) if r and not r.deleted else None)(
            s.get(SnapshotRow, sid)))

    def add_snapshot(self, row: dict[str, Any]) -> None:
        self.run(lambda s: s.add(SnapshotRow(**row)))

    def set_snapshot(self, sid: str, **values: Any) -> None:
        self.run(lambda s: s.execute(update(SnapshotRow).where(SnapshotRow.id == sid).values(**values)))

    def snapshot_count(self) -> int:
        return self.run(lambda s: s.scalar(select(func.count()).select_from(SnapshotRow)
                                           .where(SnapshotRow.deleted.is_(False))) or 0)

    def rewind_base(self, seq: int) -> dict[str, Any] | None:
        """The newest valid snapshot taken at or before verb `seq`."""
        def q(s: Session) -> dict[str, Any] | None:
            row = s.scalars(select(SnapshotRow).where(SnapshotRow.after_seq <= seq, SnapshotRow.valid.is_(True),
                                                      SnapshotRow.deleted.is_(False))
                            .order_by(SnapshotRow.after_seq.desc(), SnapshotRow.time.desc()).limit(1)).first()
            return snapshot_json(row) if row else None
        return self.run(q)

    def last_seq_at(self, when: datetime) -> int:
        return self.run(lambda s: s.scalar(select(func.max(VerbRow.seq)).where(VerbRow.time <= when)) or 0)

    # --- cycles --------------------------------------------------------------------------------
    def open_cycle(self) -> dict[str, Any] | None:
        def q(s: Session) -> dict[str, Any] | None:
            row = s.scalars(select(CycleRow).where(CycleRow.state.in_(OPEN_CYCLE_STATES))
                            .order_by(CycleRow.id.desc()).limit(1)).first()
            return self._cycle(s, row) if row else None
        return self.run(q)

    def cycle(self, cid: int) -> dict[str, Any] | None:
        return self.run(lambda s: (lambda r: self._cycle(s, r) if r else None)(s.get(CycleRow, cid)))

    def cycles(self) -> list[dict[str, Any]]:
        return self.run(lambda s: [self._cycle(s, r) for r in s.scalars(select(CycleRow).order_by(CycleRow.id))])

    @staticmethod
    def _cycle(s: Session, row: CycleRow) -> dict[str, Any]:
        n = s.scalar(select(func.count()).select_from(InconsistencyRow).where(InconsistencyRow.cycle == row.id))
        return cycle_json(row, n or 0)

    def create_cycle(self, **values: Any) -> int:
        def q(s: Session) -> int:
            row = CycleRow(skipped=[], notes=[], replayed=0, to_replay=0, opened=utcnow(), **values)
            s.add(row)
            s.flush()
            return row.id
        return self.run(q)

    def update_cycle(self, cid: int, **values: Any) -> None:
        self.run(lambda s: s.execute(update(CycleRow).where(CycleRow.id == cid).values(**values)))

    @staticmethod
    def commit_cycle(s: Session, cycle: dict[str, Any]) -> None:
        """Close a cycle as committed. Snapshots taken inside the history it replaced are no longer rewind
        points: their state includes what the cycle undid."""
        s.execute(update(SnapshotRow).where(SnapshotRow.after_seq > cycle["base_seq"],
                                            SnapshotRow.after_seq <= cycle["end_seq"]).values(valid=False))
        s.execute(update(CycleRow).where(CycleRow.id == cycle["id"])
                  .values(state="committed", closed=utcnow()))

    def add_note(self, cid: int, note: str) -> None:
        def q(s: Session) -> None:
            row = s.get(CycleRow, cid)
            row.notes = list(row.notes) + [{"time": iso(utcnow()), "note": note}]
        self.run(q)

    def replayed_originals(self, cid: int) -> set[int]:
        """Original seqs this cycle has already replayed to completion (for resuming a replay)."""
        return set(self.run(lambda s: s.scalars(
            select(VerbRow.original_seq).where(VerbRow.cycle == cid, VerbRow.status == "committed")).all()))

    # --- inconsistencies -----------------------------------------------------------------------
    def inconsistencies(self, cycle: int | None = None, ids: Sequence[int] | None = None,
                        pending_only: bool = False) -> list[dict[str, Any]]:
        def q(s: Session) -> list[dict[str, Any]]:
            stmt = select(InconsistencyRow).order_by(InconsistencyRow.id)
            if cycle is not None:
                stmt = stmt.where(InconsistencyRow.cycle == cycle)
            if ids is not None:
                stmt = stmt.where(InconsistencyRow.id.in_(list(ids)))
            if pending_only:  # what `compensate --all` runs: findings of cycles in review or committed
                committed = select(CycleRow.id).where(CycleRow.state.in_(("review", "committed")))
                stmt = stmt.where(InconsistencyRow.compensation.in_(("pending", "failed")),
                                  InconsistencyRow.cycle.in_(committed))
            return [inconsistency_json(r) for r in s.scalars(stmt)]
        return self.run(q)

    def void_compensations(self, cid: int) -> None:
        """A cancelled cycle's findings describe a history that was thrown away: nothing to compensate."""
        self.run(lambda s: s.execute(
            update(InconsistencyRow).where(InconsistencyRow.cycle == cid,
                                           InconsistencyRow.compensation.in_(("pending", "failed")))
            .values(compensation="none", compensation_detail="the cycle was cancelled")))

    @staticmethod
    def insert_inconsistency(s: Session, **values: Any) -> int:
        row = InconsistencyRow(created=utcnow(), compensation_detail=None, **values)
        s.add(row)
        s.flush()
        return row.id

    def set_compensation(self, iid: int, state: str, detail: str) -> None:
        self.run(lambda s: s.execute(update(InconsistencyRow).where(InconsistencyRow.id == iid)
                                     .values(compensation=state, compensation_detail=detail)))

    # --- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        cycle = self.open_cycle()
        return {"mode": mode_of(cycle), "cycle": cycle["id"] if cycle else None,
                "last_seq": self.last_seq(), "snapshots": self.snapshot_count(),
                "cycle_state": cycle["state"] if cycle else None}

    def integrity_ok(self) -> bool:
        if not self.url.startswith("sqlite"):
            return True
        return self.run(lambda s: s.execute(text("PRAGMA integrity_check")).scalar() == "ok")


def mode_of(cycle: dict[str, Any] | None) -> str:
    if cycle is None:
        return "live"
    return {"rewinding": "rewound", "cancelling": "rewound"}.get(cycle["state"], cycle["state"])


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig or exc).splitlines()[0][:300]


PROBE_LOCK_WAIT_MS = 1000


class GroupCommitter:
    """The daemon's one writer. Operations queued while a transaction is being committed go together
    into the next one, so N concurrent requests cost one fsync, not N."""

    def __init__(self, timeline: Timeline, max_batch: int = 512, linger: float = 0.02) -> None:
        self.timeline = timeline
        self.max_batch = max_batch
        # A batch of unawaited writes only (reads, replay records) waits this long for company: nobody waits
        # for it, and a transaction of a hundred rows costs far less per row than one of a few.
        self.linger = linger
        self._queue: asyncio.Queue[tuple[Callable[[Session], Any], asyncio.Future | None]] = asyncio.Queue()
        self._awaited = asyncio.Event()  # set when a write somebody waits for is queued: the linger ends
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.ops = 0
        self.healthy = True  # False after a write failed, until one succeeds again
        self.unawaited_failures = 0  # writes queued without a waiter that were given up (logged)
        # Writes nobody waits for (reads: their answer is already out) that failed while the timeline could not
        # be written: kept, and written once it can again, so that an outage does not lose what clients saw.
        self._failed: deque[Callable[[Session], Any]] = deque()
        self.max_failed_kept = 100_000
        self.on_commit: Callable[[int, float, bool], None] | None = None  # (batch size, seconds, ok)
        # A thread of its own: in the shared default executor, commits queued behind blob writes and
        # snapshot copies, and every request waiting on a commit waited for them too.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="timeline-writer")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="timeline-writer")

    async def stop(self) -> None:
        await self.flush()
        if self._failed:
            log.error("%d batched timeline writes could not be written before the daemon stopped: lost",
                      len(self._failed))
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=False)

    def submit(self, op: Callable[[Session], Any]) -> asyncio.Future:
        """Queue op; the future resolves with its result once it is committed (or fails)."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, fut))
        self._awaited.set()
        return fut

    async def write(self, op: Callable[[Session], Any]) -> Any:
        return await self.submit(op)

    async def write_or_keep(self, op: Callable[[Session], Any]) -> bool:
        """Commit op and wait for it (True); if the timeline cannot be written now, op is kept and written
        once it can (False): an outcome that happened is recorded late rather than never."""
        try:
            await self.submit(op)
            return True
        except TimelineUnavailable:
            self.submit_nowait(op)
            return False

    async def finish_verb(self, seq: int, status: str, output: dict[str, Any] | None, summary: str) -> bool:
        """A verb's outcome, committed (True) or kept to be written once the timeline can be (False)."""
        return await self.write_or_keep(lambda s: Timeline.finish_verb(s, seq, status, output, summary))

    def submit_nowait(self, op: Callable[[Session], Any]) -> None:
        """Queue op without anyone waiting (batched reads); a failure is logged."""
        self._queue.put_nowait((op, None))
        self._full_batch_ends_linger()

    def record_nowait(self, verb: NewVerb) -> None:
        """Queue a finished verb's record without anyone waiting (reads). Consecutive ones in a batch are
        inserted with one executemany; a failure is logged."""
        self._queue.put_nowait((_VerbRecord(verb), None))
        self._full_batch_ends_linger()

    def _full_batch_ends_linger(self) -> None:
        if self._queue.qsize() >= self.max_batch:
            self._awaited.set()

    async def flush(self) -> None:
        await self.submit(lambda s: None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            self._take_queued(batch)
            if self.linger > 0 and len(batch) < self.max_batch and all(fut is None for _, fut in batch):
                self._awaited.clear()
                timer = loop.call_later(self.linger, self._awaited.set)
                await self._awaited.wait()
                timer.cancel()
                self._take_queued(batch)
            # Writes kept from an outage go first, in the same transaction: they happened before this batch's
            # (a client's answered read before its next request's intent), and the timeline's order is theirs.
            kept, self._failed = list(self._failed), deque()
            t0 = loop.time()
            results = await loop.run_in_executor(self._thread, self._commit, kept + [op for op, _ in batch])
            self.batches += 1
            self.ops += len(batch)
            self.healthy = any(ok for ok, _ in results)
            if self.on_commit:
                self.on_commit(len(kept) + len(batch), loop.time() - t0, self.healthy)
            self._settle_kept(kept, results[:len(kept)])
            for (op, fut), (ok, value) in zip(batch, results[len(kept):]):
                if fut is None:
                    if not ok:
                        self._keep_failed(op, value)
                elif not fut.done():
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(value)

    def _keep_failed(self, op: Callable[[Session], Any], error: BaseException) -> None:
        if len(self._failed) >= self.max_failed_kept:
            self.unawaited_failures += 1
            log.error("a batched timeline write failed and %d are kept for later already: given up (%s)",
                      len(self._failed), error)
            return
        if not self._failed:
            log.error("a batched timeline write failed (%s): kept, to be written once the timeline can be", error)
        if isinstance(op, _VerbRecord) and op.verb.time is None:
            op.verb.time = utcnow()   # about when it happened, not when it is written at last
        self._failed.append(op)

    def _settle_kept(self, kept: list[Callable[[Session], Any]], results: list[tuple[bool, Any]]) -> None:
        """After a commit that carried the writes kept from an outage: while nothing could be written they are
        kept again (before any failed now: the order stays theirs); once the timeline works, those written
        are done, and one that still fails on its own is given up (one bad write must not hold the others
        back for ever)."""
        if not kept:
            return
        if not self.healthy:
            self._failed.extend(kept)
            return
        lost = [value for ok, value in results if not ok]
        self.unawaited_failures += len(lost)
        log.warning("wrote %d batched timeline writes kept from when the timeline could not be written%s",
                    len(kept) - len(lost), f"; {len(lost)} failed again and are given up ({lost[0]})" if lost else "")

    def _take_queued(self, batch: list[tuple[Callable[[Session], Any], asyncio.Future | None]]) -> None:
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    def _commit(self, ops: list[Callable[[Session], Any]]) -> list[tuple[bool, Any]]:
        try:
            # A timeline known to be failing is probed, not waited for: with another process holding SQLite's
            # lock, every request would otherwise wait out the whole lock timeout before its 503.
            with self.timeline.session(None if self.healthy else PROBE_LOCK_WAIT_MS) as s, s.begin():
                results: list[tuple[bool, Any]] = []
                records: list[NewVerb] = []
                for op in ops:
                    if isinstance(op, _VerbRecord):
                        records.append(op.verb)
                        continue
                    if records:
                        Timeline.insert_verbs(s, records)
                        results += [(True, None)] * len(records)
                        records = []
                    results.append((True, op(s)))
                if records:
                    Timeline.insert_verbs(s, records)
                    results += [(True, None)] * len(records)
                return results
        except OperationalError as exc:
            # The database cannot be written now (locked, full, read-only, gone): so it is for every op, and
            # trying them one by one would only wait out the lock timeout once per op.
            return [(False, _unavailable(exc))] * len(ops)
        except Exception as exc:  # noqa: BLE001 - one bad write: fall back to one transaction per operation
            if len(ops) == 1:
                return [(False, _unavailable(exc))]
            log.warning("group commit of %d writes failed (%s); retrying one by one", len(ops), _short(exc))
        return [self._commit([op])[0] for op in ops]


class _VerbRecord:
    """A queued `record_nowait` (callable like any other op, for the one-by-one fallback)."""
    __slots__ = ("verb",)

    def __init__(self, verb: NewVerb) -> None:
        self.verb = verb

    def __call__(self, s: Session) -> None:
        Timeline.insert_verbs(s, [self.verb])


def _unavailable(exc: BaseException) -> TimelineUnavailable:
    if isinstance(exc, TimelineUnavailable):
        return exc
    return TimelineUnavailable(_short(exc))
