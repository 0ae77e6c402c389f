"""The undo manager: snapshots at verb boundaries, retention, and the cycle
live -> rewound -> replaying -> review -> committed | cancelled, stored in the timeline so it survives
a restart."""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from storage.blobs import BlobStore
from storage.db import TimelineUnavailable
from storage.models import VerbRow
from storage.snapshots import SnapshotBackend, SnapshotError, new_id, valid_id
from storage.timeline import GroupCommitter, NewVerb, Timeline, iso, mode_of
from undo_proxy import metrics
from undo_proxy.config import Config
from undo_proxy.gate import Gate
from verbs.base import Finding, RecordedVerb, ReplayContext, ReplayResult

log = logging.getLogger("undo_proxy.manager")
REPLAY_CONCURRENCY = 32


class OperationError(Exception):
    """An operator request that cannot be carried out; `status` is the HTTP status of the admin API."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Frontend:
    """What replay and compensation need of a configured front-end."""
    name: str
    pack: Any
    upstream: Any
    settings: Any


def recorded(row: VerbRow) -> RecordedVerb:
    return RecordedVerb(seq=row.seq, verb=row.verb, protocol=row.protocol, frontend=row.frontend,
                        targets=list(row.targets), mutates=bool(row.mutates), status=row.status,
                        origin=row.origin, cycle=row.cycle, original_seq=row.original_seq,
                        summary=row.summary, request=row.request, output=row.output, time=iso(row.time))


def parse_time(text: str) -> datetime | None:
    """An ISO-8601 time (UTC unless it says otherwise), or None."""
    if any(ord(c) < 32 for c in text):  # fromisoformat would stop at a NUL and accept what came before
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


class UndoManager:
    def __init__(self, cfg: Config, timeline: Timeline, committer: GroupCommitter, gate: Gate,
                 blobs: BlobStore, backend: SnapshotBackend | None, frontends: dict[str, Frontend]) -> None:
        self.cfg, self.timeline, self.committer, self.gate = cfg, timeline, committer, gate
        self.blobs, self.backend, self.frontends = blobs, backend, frontends
        self._op_lock = asyncio.Lock()       # one cycle or snapshot operation at a time
        self._replay_task: asyncio.Task | None = None
        self._snapshot_due = asyncio.Event()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # live progress (admin UI)

    async def db(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except TimelineUnavailable as exc:
            raise OperationError(503, f"the timeline database is unavailable: {exc}") from None

    # --- start-up ------------------------------------------------------------------------------
    async def recover(self) -> None:
        """After a crash: pending verbs lost their outcome; an interrupted rewind or cancel is undone."""
        lost = await self.db(self.timeline.mark_pending_unknown)
        if lost:
            log.warning("%d verbs were in flight when the daemon stopped: marked unknown", lost)
        cycle = await self.db(self.timeline.open_cycle)
        if cycle and cycle["state"] in ("rewinding", "cancelling"):
            log.warning("cycle %d was interrupted while %s: bringing the pre-rewind state back",
                        cycle["id"], cycle["state"])
            self.gate.mode = "rewound"
            await self._restore(cycle, error=f"interrupted while {cycle['state']}")
            cycle = None
        self.gate.mode = mode_of(cycle)
        metrics.MODE.set(0 if cycle is None else 1)
        await self._remove_orphans()

    async def _remove_orphans(self) -> None:
        """A crash between taking a snapshot and recording it leaves one the timeline does not know: it is
        no rewind point (its after_seq is unknown), so it goes. Only snapshots this daemon began (their
        marker says so) are removed: any other unknown one in the store may be another timeline's (a moved
        state dir, a second instance, a restored backup) and is left alone. Anything a cycle names is kept."""
        if self.backend is None or not self.backend.store.is_dir():
            return
        known = {s["id"] for s in await self.db(self.timeline.snapshots, True)}
        known |= {sid for c in await self.db(self.timeline.cycles)
                  for sid in (c["snapshot"], c["pre_rewind_snapshot"]) if sid}
        for sid in self.backend.unrecorded():
            if sid not in known and self.backend.exists(sid):
                try:
                    await self.backend.delete(sid)
                    log.warning("removed snapshot %s: taken, but never recorded (the daemon stopped)", sid)
                except SnapshotError as exc:
                    log.error("could not remove the unrecorded snapshot %s: %s", sid, exc)
                    continue
            await self.backend.recorded(sid)
        strangers = [p.name for p in sorted(self.backend.store.iterdir()) if valid_id(p.name) and p.name not in known]
        if strangers:
            log.warning("the snapshot store %s holds %d snapshots this timeline does not know (%s): left alone",
                        self.backend.store, len(strangers), _some(strangers))
        missing = [s["id"] for s in await self.db(self.timeline.snapshots)
                   if s["valid"] and not self.backend.exists(s["id"])]
        if missing:
            log.warning("%d snapshots on the timeline are missing from the store %s (%s): a rewind to them "
                        "will fail", len(missing), self.backend.store, _some(missing))

    def _need_backend(self) -> SnapshotBackend:
        if self.backend is None:
            raise OperationError(409, "no snapshot volume is configured ([snapshots] volume and store)")
        return self.backend

    # --- snapshots -----------------------------------------------------------------------------
    async def _new_snapshot_id(self) -> str:
        taken = {s["id"] for s in await self.db(self.timeline.snapshots, True)}
        sid = new_id(taken)
        while self._need_backend().exists(sid):
            taken.add(sid)
            sid = new_id(taken)
        return sid

    async def take_snapshot(self, label: str | None = None, kind: str = "manual") -> dict[str, Any]:
        backend = self._need_backend()
        if label is not None and (len(label) > 200 or any(ord(c) < 32 for c in label)):
            raise OperationError(400, "a label is at most 200 printable characters")
        async with self._op_lock:
            if self.gate.refusing:
                raise OperationError(409, "an undo cycle is open: snapshots are taken after commit or cancel")
            return await self._snapshot_locked(backend, label, kind)

    async def _snapshot_locked(self, backend: SnapshotBackend, label: str | None, kind: str) -> dict[str, Any]:
        sid = await self._new_snapshot_id()
        async with self.gate.quiesced():
            await self.committer.flush()
            await self._settle()
            after_seq = await self.db(self.timeline.last_seq)
            t0 = time.perf_counter()
            try:
                path = await backend.take(sid)
            except SnapshotError as exc:
                metrics.SNAPSHOT_FAILURES.labels("take").inc()
                log.error("snapshot %s failed: %s", sid, exc)
                raise OperationError(500, str(exc)) from None
            duration = time.perf_counter() - t0
            self.gate.mutations_since_snapshot = 0
        pause = self.gate.last_pause_ms
        metrics.SNAPSHOTS.labels(backend.name).inc()
        metrics.SNAPSHOT_SECONDS.observe(duration)
        metrics.GATE_PAUSE_SECONDS.observe(pause / 1000)
        await self.db(self.timeline.add_snapshot, dict(
            id=sid, time=datetime.now(timezone.utc), after_seq=after_seq, label=label, backend=backend.name,
            path=str(path), kind=kind, valid=True, duration_ms=duration * 1000, pause_ms=pause, deleted=False))
        await backend.recorded(sid)
        log.info("snapshot %s after verb %d (%s, %.1f ms, traffic held %.1f ms)", sid, after_seq, kind,
                 duration * 1000, pause)
        await self._prune()
        return await self.db(self.timeline.snapshot, sid)

    async def _settle(self) -> None:
        """[service] settle: wait until the backend has finished what it acknowledged (a mail queue
        delivered), so the snapshot holds every verb up to its after_seq."""
        command = self.cfg.service.settle
        if not command:
            return
        deadline = time.monotonic() + self.cfg.service.settle_timeout
        while True:
            proc = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL)
            if await proc.wait() == 0:
                return
            if time.monotonic() > deadline:
                metrics.SNAPSHOT_FAILURES.labels("settle").inc()
                raise OperationError(500, f"[service] settle = {command!r} did not succeed within "
                                          f"{self.cfg.service.settle_timeout:.0f}s; no snapshot taken")
            await asyncio.sleep(0.2)

    def _protected(self, cycle: dict[str, Any] | None) -> set[str]:
        return {cycle["snapshot"], cycle["pre_rewind_snapshot"]} if cycle else set()

    async def delete_snapshot(self, name: str) -> None:
        backend = self._need_backend()
        async with self._op_lock:
            snap = await self._snapshot_named(name)   # exactly as given: no id with a stray newline deletes one
            if snap is None:
                raise OperationError(404, f"no snapshot has the id or label {name!r}")
            sid = snap["id"]
            if sid in self._protected(await self.db(self.timeline.open_cycle)):
                raise OperationError(409, f"snapshot {sid} belongs to the open undo cycle")
            try:
                await backend.delete(sid)
            except SnapshotError as exc:
                metrics.SNAPSHOT_FAILURES.labels("delete").inc()
                raise OperationError(500, str(exc)) from None
            await self.db(lambda: self.timeline.set_snapshot(sid, deleted=True))
            log.info("deleted snapshot %s", sid)

    async def _prune(self) -> None:
        """Keep the newest `keep` snapshots; never one an open cycle needs; one failure stops nothing."""
        keep = self.cfg.snapshots.keep
        if keep <= 0 or self.backend is None:
            return
        snaps = await self.db(self.timeline.snapshots)
        protected = self._protected(await self.db(self.timeline.open_cycle))
        for snap in snaps[:-keep] if len(snaps) > keep else []:
            if snap["id"] in protected:
                continue
            try:
                await self.backend.delete(snap["id"])
                await self.db(lambda sid=snap["id"]: self.timeline.set_snapshot(sid, deleted=True))
                log.info("retention: deleted snapshot %s", snap["id"])
            except (SnapshotError, OperationError) as exc:
                metrics.SNAPSHOT_FAILURES.labels("prune").inc()
                log.error("retention: could not delete snapshot %s: %s", snap["id"], exc)

    async def scheduler(self) -> None:
        """Periodic snapshots (`every`) and snapshots after `every_verbs` mutating verbs."""
        every, every_verbs = self.cfg.snapshots.every, self.cfg.snapshots.every_verbs
        if self.backend is None or (every <= 0 and every_verbs <= 0):
            return
        while True:
            try:
                await asyncio.wait_for(self._snapshot_due.wait(), timeout=every if every > 0 else None)
            except asyncio.TimeoutError:
                pass
            self._snapshot_due.clear()
            if self.gate.refusing or self.gate.mutations_since_snapshot == 0:
                continue
            try:
                await self.take_snapshot(None, "periodic")
            except OperationError as exc:
                log.error("periodic snapshot failed: %s", exc.message)

    def note_mutation(self) -> None:
        n = self.cfg.snapshots.every_verbs
        if n > 0 and self.gate.mutations_since_snapshot >= n:
            self._snapshot_due.set()

    # --- the cycle -----------------------------------------------------------------------------
    async def _snapshot_named(self, name: str) -> dict[str, Any] | None:
        """The snapshot with this id or this label (None: the name is neither); 404 for an unknown id, 400 for
        a label that several snapshots carry."""
        labelled = [s for s in await self.db(self.timeline.snapshots) if s["label"] == name and s["kind"] != "pre-rewind"]
        if len(labelled) > 1:
            raise OperationError(400, f"{len(labelled)} snapshots are labelled {name!r}: name one by its id")
        if labelled:
            return labelled[0]
        if not valid_id(name):
            return None
        snap = await self.db(self.timeline.snapshot, name)
        if snap is None:
            raise OperationError(404, f"no snapshot {name}")
        return snap

    async def _resolve_target(self, to: str) -> tuple[dict[str, Any], int]:
        to = to.strip()
        snap = await self._snapshot_named(to)
        if snap is not None:
            if not snap["valid"]:
                raise OperationError(409, f"snapshot {snap['id']} belongs to a history that a committed cycle "
                                          f"replaced")
            return snap, snap["after_seq"]
        where = f"verb {to[1:]}"
        if to.startswith("@"):
            if not to[1:].isdigit():
                raise OperationError(400, f"{to!r}: @SEQ needs a verb number, e.g. @42")
            seq = int(to[1:])
        else:
            when = parse_time(to)
            if when is None:  # a name that exists nowhere: the operation fails (exit 1), as `show 999` does
                raise OperationError(404, f"no snapshot has the id or label {to!r}, and it is not @SEQ or an "
                                          f"ISO-8601 time")
            seq = await self.db(self.timeline.last_seq_at, when)
            where = to
        last = await self.db(self.timeline.last_seq)
        if seq > last:
            raise OperationError(404, f"verb {seq} does not exist yet (the last is {last})")
        snap = await self.db(self.timeline.rewind_base, seq)
        if snap is None:
            raise OperationError(409, f"no snapshot was taken at or before {where}")
        return snap, seq

    async def _service(self, which: str) -> None:
        command = getattr(self.cfg.service, which)
        if not command:
            return
        proc = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            last = (out.decode(errors="replace").strip().splitlines() or [""])[-1]
            raise OperationError(500, f"[service] {which} = {command!r} failed with exit {proc.returncode}: {last}")

    async def rewind(self, to: str) -> dict[str, Any]:
        backend = self._need_backend()
        async with self._op_lock:
            if await self.db(self.timeline.open_cycle):
                raise OperationError(409, "an undo cycle is already open: commit or cancel it first")
            snap, seq = await self._resolve_target(to)
            if not backend.exists(snap["id"]):   # before a cycle exists: nothing to undo, nothing on record
                raise OperationError(409, f"snapshot {snap['id']} is missing from {backend.store}: it cannot be "
                                          f"rewound to (nothing changed)")
            pre_id = await self._new_snapshot_id()
            async with self.gate.quiesced():
                self.gate.mode = "rewound"
                metrics.MODE.set(1)
                try:
                    await self.committer.flush()
                    end_seq = await self.db(self.timeline.last_seq)
                    cid = await self.db(lambda: self.timeline.create_cycle(
                        state="rewinding", snapshot=snap["id"], pre_rewind_snapshot=pre_id, rewind_to_seq=seq,
                        base_seq=snap["after_seq"], end_seq=end_seq))
                except BaseException:
                    self.gate.mode = "live"
                    metrics.MODE.set(0)
                    raise
                try:
                    await self._service("stop")
                    await backend.rewind(snap["id"], pre_id)
                    await self.db(self.timeline.add_snapshot, dict(
                        id=pre_id, time=datetime.now(timezone.utc), after_seq=end_seq,
                        label=f"pre-rewind of cycle {cid}", backend=backend.name,
                        path=str(backend.path_of(pre_id)), kind="pre-rewind", valid=False, duration_ms=0.0,
                        pause_ms=0.0, deleted=False))
                    await self._service("start")
                except (OperationError, SnapshotError, TimelineUnavailable) as exc:
                    message = exc.message if isinstance(exc, OperationError) else str(exc)
                    metrics.SNAPSHOT_FAILURES.labels("rewind").inc()
                    log.error("cycle %d: rewind failed, bringing the volume back: %s", cid, message)
                    cycle = await self.db(self.timeline.cycle, cid)
                    await self._restore(cycle, error=f"rewind failed: {message}")
                    self.gate.mode = "live"
                    metrics.MODE.set(0)
                    raise OperationError(500, f"rewind failed, nothing changed: {message}") from None
            log.info("cycle %d: rewound to snapshot %s (after verb %d)", cid, snap["id"], snap["after_seq"])
        if seq > snap["after_seq"]:
            # "@SEQ": the state right after SEQ is the snapshot plus the verbs up to SEQ.
            verbs = await self.db(self.timeline.effective_verbs, snap["after_seq"], seq)
            await self._replay_verbs(cid, verbs, check=False)
        await self.db(lambda: self.timeline.update_cycle(cid, state="rewound"))
        return await self.cycle_or_404(cid)

    async def _restore(self, cycle: dict[str, Any], error: str | None = None) -> None:
        """Bring the pre-rewind state back and close the cycle as cancelled."""
        cid = cycle["id"]
        await self.db(lambda: self.timeline.update_cycle(cid, state="cancelling"))
        backend = self._need_backend()
        await self._service("stop")
        try:
            await backend.restore(cycle["pre_rewind_snapshot"])
        except SnapshotError as exc:
            metrics.SNAPSHOT_FAILURES.labels("restore").inc()
            log.error("cycle %d: cannot bring the pre-rewind state back (the cycle stays open): %s", cid, exc)
            failure = f"cancel failed: {exc}"
            await self.db(lambda: self.timeline.update_cycle(cid, error=failure))
            raise OperationError(500, f"cancel failed: {exc}; the cycle stays open, retry `cancel`") from None
        await self._service("start")
        if cycle["pre_rewind_snapshot"]:
            await self.db(lambda: self.timeline.set_snapshot(cycle["pre_rewind_snapshot"], deleted=True))
        await self.db(lambda: self.timeline.update_cycle(cid, state="cancelled", closed=datetime.now(timezone.utc),
                                                         error=error))
        await self.db(self.timeline.void_compensations, cid)

    async def cycle_or_404(self, cid: int) -> dict[str, Any]:
        cycle = await self.db(self.timeline.cycle, cid)
        if cycle is None:
            raise OperationError(404, f"no cycle {cid}")
        return cycle

    async def _open_cycle(self, *states: str) -> dict[str, Any]:
        cycle = await self.db(self.timeline.open_cycle)
        if cycle is None:
            raise OperationError(409, "no undo cycle is open (start one with `rewind`)")
        if states and cycle["state"] not in states:
            raise OperationError(409, f"cycle {cycle['id']} is {cycle['state']}; this needs it "
                                      f"{' or '.join(states)}")
        return cycle

    async def repair(self, note: str) -> dict[str, Any]:
        if not note.strip():
            raise OperationError(400, "the repair note is empty")
        cycle = await self._open_cycle()
        await self.db(self.timeline.add_note, cycle["id"], note)
        log.info("cycle %d: repair noted: %r", cycle["id"], note.strip()[:500])
        return await self.cycle_or_404(cycle["id"])

    async def replay(self, skip: list[int]) -> dict[str, Any]:
        async with self._op_lock:
            cycle = await self._open_cycle("rewound", "replaying")
            cid = cycle["id"]
            if cycle["state"] == "replaying" and self._replay_task and not self._replay_task.done():
                raise OperationError(409, f"cycle {cid} is replaying already")
            verbs = await self.db(self.timeline.effective_verbs, cycle["rewind_to_seq"], cycle["end_seq"])
            candidates = {v.seq for v in verbs}
            bad = [s for s in skip if s not in candidates]
            if bad:
                raise OperationError(400, f"cannot skip {', '.join(map(str, bad))}: not among the verbs after the "
                                          f"rewind point ({cycle['rewind_to_seq']}) in this cycle")
            skipped = sorted(set(skip) | set(cycle["skipped"]))
            done = await self.db(self.timeline.replayed_originals, cid) & candidates  # not the @SEQ prefix
            todo = [v for v in verbs if v.seq not in skipped and v.seq not in done]
            await self.db(lambda: self.timeline.update_cycle(
                cid, state="replaying", skipped=skipped, to_replay=len(verbs) - len(skipped), replayed=len(done)))
            self.gate.mode = "replaying"
            log.info("cycle %d: replaying %d verbs%s%s", cid, len(todo),
                     f", skipping {', '.join(map(str, skipped))}" if skipped else "",
                     f" ({len(done)} replayed before)" if done else "")
            self._replay_task = asyncio.create_task(self._replay_then_review(cid, todo, len(done)))
        await asyncio.shield(self._replay_task)
        return await self.cycle_or_404(cid)

    async def _replay_then_review(self, cid: int, todo: list[VerbRow], already: int) -> None:
        # The loaded verbs and everything else alive now outlive the replay: frozen, the garbage collector
        # does not walk them again at every full collection (a tenth of a long replay's time otherwise).
        gc.freeze()
        try:
            await self._replay_verbs(cid, todo, check=True, already=already)
        except Exception as exc:
            log.exception("cycle %d: replay stopped", cid)
            failure = f"replay stopped: {exc}"
            await self.db(lambda: self.timeline.update_cycle(cid, error=failure))
            raise OperationError(500, f"replay stopped: {exc}; run `replay` again to resume, or `cancel`") from None
        finally:
            gc.unfreeze()
        await self.db(lambda: self.timeline.update_cycle(cid, state="review", error=None))
        self.gate.mode = "review"
        metrics.REPLAY_PROGRESS.set(1)
        cycle = await self.cycle_or_404(cid)
        log.info("cycle %d: replayed %d verbs, %d inconsistencies; in review (commit or cancel)", cid,
                 cycle["replayed"], cycle["inconsistencies"])

    async def _replay_verbs(self, cid: int, verbs: list[VerbRow], check: bool, already: int = 0) -> None:
        """Re-execute verbs in recorded order; verbs whose targets are disjoint run concurrently."""
        names: dict[str, dict[str, str]] = {}
        running: list[tuple[list[str], asyncio.Task]] = []
        progress = {"done": already, "last_saved": time.monotonic()}
        total = already + len(verbs)

        # Finished verbs are not kept: a replay of tens of thousands would otherwise hold every task
        # (and what it references) until the end, and the garbage collector would walk them again and again.
        errors: list[tuple[int, BaseException]] = []

        async def one(position: int, row: VerbRow, waits: list[asyncio.Task]) -> None:
            if waits:
                await asyncio.gather(*waits, return_exceptions=True)
            try:
                await self._replay_one(cid, row, names.setdefault(row.frontend, {}), check)
            except Exception as exc:  # noqa: BLE001 - reported once every verb is done, first failure first
                errors.append((position, exc))
                return
            progress["done"] += 1
            now = time.monotonic()
            if now - progress["last_saved"] > 0.5:  # progress is saved, shown and exported twice a second
                progress["last_saved"] = now
                metrics.REPLAY_PROGRESS.set(progress["done"] / total if total else 1)
                await self.db(lambda n=progress["done"]: self.timeline.update_cycle(cid, replayed=n))
                self._notify({"cycle": cid, "replayed": progress["done"], "total": total})

        failures_before = self.committer.unawaited_failures
        try:
            for position, row in enumerate(verbs):
                fe = self.frontends.get(row.frontend)
                running = [r for r in running if not r[1].done()]
                while len(running) >= REPLAY_CONCURRENCY:
                    await asyncio.wait([r[1] for r in running], return_when=asyncio.FIRST_COMPLETED)
                    running = [r for r in running if not r[1].done()]
                conflicts = fe.pack.conflicts if fe else (lambda a, b: True)
                targets = list(row.targets)
                waits = [t for other, t in running if conflicts(other, targets)]
                running.append((targets, asyncio.create_task(one(position, row, waits))))
            await asyncio.gather(*(t for _, t in running))
        except asyncio.CancelledError:
            for _, task in running:
                task.cancel()
            raise
        await self.committer.flush()
        if self.committer.unawaited_failures != failures_before:
            raise OperationError(503, "some replayed verbs could not be recorded (the timeline failed)")
        await self.db(lambda: self.timeline.update_cycle(cid, replayed=progress["done"]))
        self._notify({"cycle": cid, "replayed": progress["done"], "total": total})
        if errors:
            raise min(errors, key=lambda e: e[0])[1]

    async def _replay_one(self, cid: int, row: VerbRow, names: dict[str, str], check: bool) -> None:
        original = recorded(row)
        fe = self.frontends.get(row.frontend)
        if fe is None:
            result = ReplayResult("failed", {"error": f"front-end {row.frontend!r} is not configured"},
                                  f"{row.summary} (front-end gone)", row.request)
        else:
            result = await fe.pack.replay(original, ReplayContext(fe.upstream, self.blobs, names))
            metrics.REPLAYED.labels(row.protocol).inc()
        finding = self._check(fe, original, result) if check else None
        verb = NewVerb(protocol=row.protocol, frontend=row.frontend, verb=row.verb,
                       targets=result.targets or original.targets, mutates=original.mutates, summary=result.summary,
                       request=result.request, status=result.status, origin="replay", cycle=cid,
                       original_seq=row.seq, output=result.output)
        # Recorded after the exchange and not awaited: a resumed replay re-executes every verb without a
        # committed replay record, so an intent written first would add nothing but a commit per verb. The
        # next verb on the same targets waits for this one's exchange, and _replay_verbs flushes (and
        # checks) all records before the cycle moves on.
        if finding is None:
            self.committer.record_nowait(verb)
            return
        metrics.INCONSISTENCIES.labels(finding.kind).inc()

        def record(s: Any) -> None:
            rseq = Timeline.insert_verb(s, verb)
            Timeline.insert_inconsistency(s, cycle=cid, seq=row.seq, replay_seq=rseq, verb=row.verb,
                                          kind=finding.kind, detail=finding.detail, compensation="pending")
        self.committer.submit_nowait(record)

    @staticmethod
    def _check(fe: Frontend | None, original: RecordedVerb, result: ReplayResult) -> Finding | None:
        if fe is None or result.status != "committed":
            why = result.output.get("error", "no answer")
            return Finding("now-fails", f"{original.summary.split(' -> ')[0]}: replay could not reach the "
                                        f"service: {why}")
        return fe.pack.check(original, result.output)

    def _notify(self, event: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001
                log.exception("progress listener failed")

    async def commit(self) -> dict[str, Any]:
        async with self._op_lock:
            cycle = await self._open_cycle("review")
            cid = cycle["id"]

            await self.committer.write(lambda s: Timeline.commit_cycle(s, cycle))
            self.gate.mode = "live"
            metrics.MODE.set(0)
            log.info("cycle %d committed; live traffic resumes", cid)
            try:
                await self._snapshot_locked(self._need_backend(), f"after cycle {cid}", "commit")
            except OperationError as exc:
                log.error("snapshot after commit failed: %s", exc.message)
        return await self.cycle_or_404(cid)

    async def cancel(self) -> dict[str, Any]:
        async with self._op_lock:
            if self._replay_task and not self._replay_task.done():
                self._replay_task.cancel()
                try:
                    await self._replay_task
                except (asyncio.CancelledError, OperationError):
                    pass
            cycle = await self._open_cycle()
            await self._restore(cycle)
            self.gate.mode = "live"
            metrics.MODE.set(0)
            log.info("cycle %d cancelled; the pre-rewind state is back", cycle["id"])
        return await self.cycle_or_404(cycle["id"])

    # --- compensation --------------------------------------------------------------------------
    async def compensate(self, ids: list[int] | None, all_pending: bool) -> list[dict[str, Any]]:
        if ids:
            items = await self.db(lambda: self.timeline.inconsistencies(ids=ids))
            missing = set(ids) - {i["id"] for i in items}
            if missing:
                raise OperationError(404, f"no inconsistency {', '.join(map(str, sorted(missing)))}")
            for item in items:
                state = (await self.cycle_or_404(item["cycle"]))["state"]
                if state not in ("review", "committed"):
                    raise OperationError(409, f"inconsistency {item['id']} belongs to cycle {item['cycle']}, which "
                                              f"is {state}: only findings of a cycle in review or committed are "
                                              f"compensated")
        elif all_pending:
            items = await self.db(lambda: self.timeline.inconsistencies(pending_only=True))
        else:
            raise OperationError(400, "name inconsistency ids, or --all")
        rows = await self.db(self.timeline.verb_rows, [i["seq"] for i in items])
        out = []
        for item in items:
            if item["compensation"] in ("done", "acknowledged"):
                out.append(item)
                continue
            row = rows.get(item["seq"])
            fe = self.frontends.get(row.frontend) if row else None
            if fe is None:
                state, detail = "failed", "its front-end is no longer configured"
            else:
                result = await fe.pack.compensate(item, recorded(row), fe)
                state, detail = result.state, result.detail
            metrics.COMPENSATIONS.labels(state).inc()
            await self.db(self.timeline.set_compensation, item["id"], state, detail)
            log.info("inconsistency %d (cycle %d, verb %d): compensation %s: %s", item["id"], item["cycle"],
                     item["seq"], state, detail)
            out.append(dict(item, compensation=state, compensation_detail=detail))
        return out

    async def status(self) -> dict[str, Any]:
        return await self.db(self.timeline.status)

