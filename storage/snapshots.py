"""Snapshot backends: btrfs (read-only subvolume snapshots, constant time) and copy (reflink-aware `cp -a`).

Naming follows snapper/btrbk: a snapshot's id is its UTC time, `20261203T162000Z`, with `-2`, `-3`, ...
when several fall in the same second; it is also its directory name under the store.

A rewind never leaves a half-done state: the live volume is first set aside whole (kept as the
cycle's pre-rewind snapshot) and only then is the target put in its place; if that fails, the
original volume is moved back.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path

from storage.durable import create_empty

TAKING = ".taking-"   # the marker of a snapshot being taken, before the timeline records it
SNAPSHOT_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z(-[0-9]{1,6})?$")


class SnapshotError(Exception):
    """A snapshot operation failed; the message is meant for the operator."""


def valid_id(sid: str) -> bool:
    return isinstance(sid, str) and SNAPSHOT_ID.fullmatch(sid) is not None  # "$" alone lets "ID\n" through


def new_id(taken: set[str], now: datetime | None = None) -> str:
    base = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


async def run(*argv: str, timeout: float = 600) -> str:
    """Run a command without blocking the event loop; SnapshotError with its first stderr line."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise SnapshotError(f"{argv[0]} is not installed") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise SnapshotError(f"{' '.join(argv[:3])} timed out after {timeout:.0f}s") from None
    if proc.returncode != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "ERROR" in ln), lines[-1] if lines else f"exit {proc.returncode}")
        raise SnapshotError(f"{' '.join(argv[:3])} failed: {reason.strip()}")
    return out.decode(errors="replace")


def _rename(src: Path, dst: Path, what: str) -> None:
    try:
        os.rename(src, dst)
    except OSError as exc:
        raise SnapshotError(f"cannot move {what} {src} to {dst}: {exc.strerror}") from exc


class SnapshotBackend(ABC):
    name: str

    def __init__(self, volume: Path, store: Path) -> None:
        self.volume = volume
        self.store = store

    def path_of(self, sid: str) -> Path:
        if not valid_id(sid):
            raise SnapshotError(f"{sid!r} is not a snapshot id")
        return self.store / sid

    def exists(self, sid: str) -> bool:
        return self.path_of(sid).exists()

    async def check(self) -> None:
        if not self.volume.is_dir():
            raise SnapshotError(f"the volume {self.volume} does not exist")
        self.store.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def take(self, sid: str) -> Path:
        """Snapshot the volume as `sid`. A durable marker says the snapshot is this store's owner's doing
        until `recorded(sid)`: after a crash in between, `unrecorded()` names it, and only such a snapshot
        is ever removed for being unknown (a store may hold another timeline's snapshots)."""
        await asyncio.to_thread(create_empty, self._marker(sid))
        try:
            return await self._take(sid)
        except BaseException:
            if not self.path_of(sid).exists():
                self._marker(sid).unlink(missing_ok=True)
            raise

    async def recorded(self, sid: str) -> None:
        """The timeline holds the snapshot now: the marker goes."""
        await asyncio.to_thread(self._marker(sid).unlink, True)

    def unrecorded(self) -> list[str]:
        """Snapshots begun by `take` and never followed by `recorded` (the daemon stopped in between)."""
        if not self.store.is_dir():
            return []
        return sorted(p.name[len(TAKING):] for p in self.store.glob(f"{TAKING}*") if valid_id(p.name[len(TAKING):]))

    def _marker(self, sid: str) -> Path:
        return self.store / f"{TAKING}{self.path_of(sid).name}"

    @abstractmethod
    async def _take(self, sid: str) -> Path: ...

    @abstractmethod
    async def delete(self, sid: str) -> None: ...

    @abstractmethod
    async def _clone_writable(self, src: Path, dst: Path) -> None: ...

    @abstractmethod
    async def _discard(self, path: Path) -> None: ...

    async def _set_readonly(self, path: Path, readonly: bool) -> None:
        return None

    async def rewind(self, target: str, pre_rewind: str) -> None:
        """The volume becomes a writable copy of `target`; the old volume is kept as `pre_rewind`."""
        source = self.path_of(target)
        if not source.exists():
            raise SnapshotError(f"snapshot {target} is missing from {self.store}")
        aside = self.path_of(pre_rewind)
        _rename(self.volume, aside, "the volume")
        try:
            await self._clone_writable(source, self.volume)
            await self._set_readonly(aside, True)
        except BaseException:
            if self.volume.exists():
                # Out of the way first (a rename always works), then discarded if the tools still work.
                failed = self.store / f".failed-{pre_rewind}"
                _rename(self.volume, failed, "the half-made volume")
                try:
                    await self._discard(failed)
                except SnapshotError:
                    pass  # left in the store, hidden; the volume itself comes back below
            _rename(aside, self.volume, "the volume back")
            raise

    async def restore(self, pre_rewind: str) -> None:
        """Cancel: the pre-rewind volume comes back exactly; the rewound one is discarded."""
        kept = self.path_of(pre_rewind)
        if not kept.exists():
            if self.volume.exists():
                return  # the rewind never set the volume aside: nothing to undo
            raise SnapshotError(f"the pre-rewind state {kept} is missing")
        trash = self.store / f".discard-{pre_rewind}"
        await self._set_readonly(kept, False)  # before anything moves: if this fails, nothing has changed
        if self.volume.exists():
            _rename(self.volume, trash, "the rewound volume")
        try:
            _rename(kept, self.volume, "the pre-rewind state")
        except BaseException:
            if trash.exists() and not self.volume.exists():
                _rename(trash, self.volume, "the rewound volume back")
            raise
        if trash.exists():
            try:
                await self._discard(trash)
            except SnapshotError:
                pass  # the pre-rewind state is back; the discarded volume stays hidden in the store


class BtrfsBackend(SnapshotBackend):
    name = "btrfs"

    async def check(self) -> None:
        await super().check()
        if not await is_subvolume(self.volume):
            raise SnapshotError(f"the volume {self.volume} is not a btrfs subvolume "
                                f"(create it with `btrfs subvolume create`, or use backend = \"copy\")")

    async def _take(self, sid: str) -> Path:
        dst = self.path_of(sid)
        await run("btrfs", "subvolume", "snapshot", "-r", str(self.volume), str(dst))
        return dst

    async def delete(self, sid: str) -> None:
        path = self.path_of(sid)
        if path.exists():
            await self._set_readonly(path, False)
            await run("btrfs", "subvolume", "delete", str(path))

    async def _clone_writable(self, src: Path, dst: Path) -> None:
        await run("btrfs", "subvolume", "snapshot", str(src), str(dst))

    async def _discard(self, path: Path) -> None:
        await self._set_readonly(path, False)
        await run("btrfs", "subvolume", "delete", str(path))

    async def _set_readonly(self, path: Path, readonly: bool) -> None:
        await run("btrfs", "property", "set", "-ts", str(path), "ro", "true" if readonly else "false")


class CopyBackend(SnapshotBackend):
    """For filesystems without btrfs: `cp -a --reflink=auto` (instant on XFS/btrfs reflinks, a full copy
    elsewhere)."""
    name = "copy"

    async def _take(self, sid: str) -> Path:
        dst = self.path_of(sid)
        tmp = self.store / f".partial-{sid}"
        if tmp.exists():
            await self._discard(tmp)
        try:
            await run("cp", "-a", "--reflink=auto", str(self.volume), str(tmp))
            _rename(tmp, dst, "the new snapshot")
        except BaseException:
            await self._discard(tmp)
            raise
        return dst

    async def delete(self, sid: str) -> None:
        await self._discard(self.path_of(sid))

    async def _clone_writable(self, src: Path, dst: Path) -> None:
        await run("cp", "-a", "--reflink=auto", str(src), str(dst))

    async def _discard(self, path: Path) -> None:
        if path.exists():
            await asyncio.to_thread(shutil.rmtree, path)


async def is_subvolume(path: Path) -> bool:
    try:
        await run("btrfs", "subvolume", "show", str(path), timeout=30)
        return True
    except SnapshotError:
        return False


async def make_backend(kind: str, volume: Path, store: Path) -> SnapshotBackend:
    if kind == "auto":
        kind = "btrfs" if shutil.which("btrfs") and await is_subvolume(volume) else "copy"
    backend: SnapshotBackend = BtrfsBackend(volume, store) if kind == "btrfs" else CopyBackend(volume, store)
    await backend.check()
    return backend

