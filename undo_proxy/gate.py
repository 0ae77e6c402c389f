"""The gate between verbs and the upstream: the mode check, per-target ordering of mutating verbs, and
the quiesce barrier that puts snapshots and rewinds exactly at verb boundaries."""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable


class Refused(Exception):
    """Live traffic is refused while an undo cycle is open."""


class Gate:
    def __init__(self) -> None:
        self._mode = "live"           # "live" | "rewound" | "replaying" | "review"
        self.epoch = 0                # +1 at every mode change: caches of server-chosen ids key on it
        self._inflight = 0
        self._held = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()
        self._target_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._quiesce_lock = asyncio.Lock()
        self.mutations_since_snapshot = 0
        self.last_pause_ms = 0.0
        self.on_mutation: Callable[[], None] | None = None  # the every_verbs scheduler listens here

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value != self._mode:
            self.epoch += 1
        self._mode = value

    @property
    def refusing(self) -> bool:
        return self.mode != "live"

    @asynccontextmanager
    async def mutation(self, targets: list[str]) -> AsyncIterator[None]:
        """Hold a place for a live mutating verb: waits while a snapshot is being taken, refuses during a
        cycle, and keeps verbs on the same target in the order they were recorded."""
        while self._held:
            await self._open.wait()
        if self.refusing:
            raise Refused()
        self._inflight += 1
        self._idle.clear()
        locks = [self._target_locks[t] for t in sorted(set(targets))]
        acquired: list[asyncio.Lock] = []
        try:
            for lock in locks:
                await lock.acquire()
                acquired.append(lock)
            yield
            self.mutations_since_snapshot += 1
            if self.on_mutation:
                self.on_mutation()
        finally:
            for lock in reversed(acquired):
                lock.release()
            for t in targets:
                lock = self._target_locks.get(t)
                if lock is not None and not lock.locked() and not lock._waiters:  # type: ignore[attr-defined]
                    self._target_locks.pop(t, None)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    @asynccontextmanager
    async def quiesced(self) -> AsyncIterator[None]:
        """Drain in-flight mutating verbs, hold new ones, run the body, resume. Records the pause."""
        async with self._quiesce_lock:
            t0 = time.perf_counter()
            self._held = True
            self._open.clear()
            try:
                await self._idle.wait()
                yield
            finally:
                self._held = False
                self._open.set()
                self.last_pause_ms = (time.perf_counter() - t0) * 1000
