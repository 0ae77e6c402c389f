"""Snapshot backends (storage/snapshots.py) on a real loop-mounted btrfs and on a plain directory:
take, delete, rewind (the old volume kept aside) and restore (it comes back exactly), clean failures,
backend selection and snapshot ids."""
from __future__ import annotations

import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.backends import file_tree

from storage.snapshots import (BtrfsBackend, CopyBackend, SnapshotBackend, SnapshotError, make_backend, new_id,
                               valid_id)

T0 = datetime(2026, 12, 3, 16, 20, 0, tzinfo=timezone.utc)


# --------------------------------------------------------------------------- helpers


def populate(volume: Path) -> None:
    (volume / "docs").mkdir()
    (volume / "docs" / "a.txt").write_bytes(b"alpha\n")
    (volume / "docs" / "b.bin").write_bytes(os.urandom(70_000))
    (volume / "page.html").write_text("<h1>home</h1>\n")


def subvolume_uuid(path: Path) -> str:
    out = subprocess.run(["btrfs", "subvolume", "show", str(path)], capture_output=True, text=True, check=True).stdout
    return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.strip().startswith("UUID:"))


def is_readonly(path: Path) -> bool:
    out = subprocess.run(["btrfs", "property", "get", "-ts", str(path), "ro"], capture_output=True, text=True,
                         check=True).stdout
    return out.strip() == "ro=true"


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


# --------------------------------------------------------------------------- btrfs
async def test_btrfs_take_is_read_only_and_delete_removes_it(btrfs_mount):
    populate(btrfs_mount.volume)
    backend = await make_backend("btrfs", btrfs_mount.volume, btrfs_mount.store)
    sid = new_id(set(), T0)
    path = await backend.take(sid)
    assert path == btrfs_mount.store / sid
    assert file_tree(path) == file_tree(btrfs_mount.volume)
    assert is_readonly(path)
    with pytest.raises(OSError):
        (path / "page.html").write_text("vandalized")
    with pytest.raises(OSError):
        (path / "new.txt").write_text("x")
    # the live volume stays writable and independent of the snapshot
    (btrfs_mount.volume / "page.html").write_text("changed")
    assert (path / "page.html").read_text() == "<h1>home</h1>\n"

    await backend.delete(sid)
    assert not path.exists()
    listing = subprocess.run(["btrfs", "subvolume", "list", str(btrfs_mount.mount)], capture_output=True,
                             text=True, check=True).stdout
    assert sid not in listing
    await backend.delete(sid)  # deleting what is gone is a no-op


async def test_btrfs_rewind_keeps_the_old_volume_and_restore_brings_it_back_exactly(btrfs_mount):
    vol = btrfs_mount.volume
    populate(vol)
    backend = await make_backend("btrfs", vol, btrfs_mount.store)
    snap = new_id(set(), T0)
    await backend.take(snap)
    await backend.recorded(snap)
    at_snapshot = file_tree(vol)

    # history goes on after the snapshot
    (vol / "docs" / "a.txt").write_bytes(b"alpha, edited\n")
    (vol / "docs" / "c.txt").write_bytes(b"gamma\n")
    (vol / "page.html").unlink()
    before = file_tree(vol)
    uuid_before = subvolume_uuid(vol)
    c_identity = identity(vol / "docs" / "c.txt")

    pre = new_id({snap}, T0)
    await backend.rewind(snap, pre)
    assert file_tree(vol) == at_snapshot
    assert not is_readonly(vol)
    (vol / "written-while-rewound.txt").write_text("replayed")  # the rewound volume is writable
    # the pre-rewind volume is kept, read-only, as it was
    kept = backend.path_of(pre)
    assert file_tree(kept) == before
    assert is_readonly(kept)
    assert subvolume_uuid(kept) == uuid_before

    await backend.restore(pre)
    assert file_tree(vol) == before
    assert subvolume_uuid(vol) == uuid_before  # the very same subvolume, not a copy
    assert identity(vol / "docs" / "c.txt") == c_identity
    assert not is_readonly(vol)
    assert not kept.exists()
    assert sorted(p.name for p in btrfs_mount.store.iterdir()) == [snap]  # no leftovers of the discarded one
    (vol / "after-restore.txt").write_text("writable again")


async def test_btrfs_rewind_to_a_missing_snapshot_changes_nothing(btrfs_mount):
    vol = btrfs_mount.volume
    populate(vol)
    backend = await make_backend("btrfs", vol, btrfs_mount.store)
    before, uuid_before = file_tree(vol), subvolume_uuid(vol)
    with pytest.raises(SnapshotError, match="missing"):
        await backend.rewind(new_id(set(), T0), new_id(set(), T0.replace(minute=21)))
    assert file_tree(vol) == before
    assert subvolume_uuid(vol) == uuid_before
    assert list(btrfs_mount.store.iterdir()) == []


async def test_btrfs_rewind_that_fails_midway_moves_the_volume_back(btrfs_mount):
    vol = btrfs_mount.volume
    populate(vol)
    backend = await make_backend("btrfs", vol, btrfs_mount.store)
    # a "snapshot" that is a plain directory: btrfs cannot snapshot it, after the volume was set aside
    bogus = new_id(set(), T0)
    (btrfs_mount.store / bogus).mkdir()
    before, uuid_before = file_tree(vol), subvolume_uuid(vol)
    pre = new_id({bogus}, T0)
    with pytest.raises(SnapshotError):
        await backend.rewind(bogus, pre)
    assert file_tree(vol) == before
    assert subvolume_uuid(vol) == uuid_before
    assert not is_readonly(vol)
    assert not backend.path_of(pre).exists()


async def test_btrfs_check_refuses_a_volume_that_is_not_a_subvolume(btrfs_mount):
    plain = btrfs_mount.mount / "plain"
    plain.mkdir()
    with pytest.raises(SnapshotError, match=r"not a btrfs subvolume.*btrfs subvolume create"):
        await BtrfsBackend(plain, btrfs_mount.store).check()
    with pytest.raises(SnapshotError, match="not a btrfs subvolume"):
        await make_backend("btrfs", plain, btrfs_mount.store)
    with pytest.raises(SnapshotError, match="does not exist"):
        await BtrfsBackend(btrfs_mount.mount / "nope", btrfs_mount.store).check()


async def test_auto_picks_btrfs_for_a_subvolume_and_copy_for_a_plain_dir(btrfs_mount, tmp_path):
    assert isinstance(await make_backend("auto", btrfs_mount.volume, btrfs_mount.store), BtrfsBackend)
    plain_on_btrfs = btrfs_mount.mount / "plain"
    plain_on_btrfs.mkdir()
    assert isinstance(await make_backend("auto", plain_on_btrfs, btrfs_mount.store), CopyBackend)
    (tmp_path / "vol").mkdir()
    backend = await make_backend("auto", tmp_path / "vol", tmp_path / "store")
    assert isinstance(backend, CopyBackend)
    assert (tmp_path / "store").is_dir()  # check() creates the store


# --------------------------------------------------------------------------- copy
async def test_copy_backend_cycle_on_a_plain_dir(tmp_path):
    vol, store = tmp_path / "vol", tmp_path / "store"
    vol.mkdir()
    populate(vol)
    backend = await make_backend("copy", vol, store)
    snap = new_id(set(), T0)
    await backend.take(snap)
    await backend.recorded(snap)
    at_snapshot = file_tree(vol)
    assert file_tree(store / snap) == at_snapshot
    assert identity(store / snap / "page.html")[1] == identity(vol / "page.html")[1]  # cp -a keeps mtimes

    (vol / "docs" / "a.txt").write_bytes(b"edited")
    (vol / "page.html").unlink()
    before = file_tree(vol)
    a_identity = identity(vol / "docs" / "a.txt")

    pre = new_id({snap}, T0)
    await backend.rewind(snap, pre)
    assert file_tree(vol) == at_snapshot
    assert file_tree(backend.path_of(pre)) == before
    (vol / "new.txt").write_text("replayed")

    await backend.restore(pre)
    assert file_tree(vol) == before
    assert identity(vol / "docs" / "a.txt") == a_identity  # moved back, not copied
    assert sorted(p.name for p in store.iterdir()) == [snap]

    with pytest.raises(SnapshotError, match="missing"):
        await backend.rewind(new_id(set(), T0.replace(hour=1)), new_id(set(), T0.replace(hour=2)))
    assert file_tree(vol) == before

    await backend.delete(snap)
    assert list(store.iterdir()) == []


async def test_a_snapshot_is_marked_unrecorded_from_before_it_is_taken_until_it_is_recorded(tmp_path):
    vol, store = tmp_path / "vol", tmp_path / "store"
    vol.mkdir()
    populate(vol)
    backend = await make_backend("copy", vol, store)
    a, b = new_id(set(), T0), new_id(set(), T0.replace(hour=1))
    await backend.take(a)
    await backend.take(b)
    assert backend.unrecorded() == sorted([a, b])
    await backend.recorded(a)
    assert backend.unrecorded() == [b]
    vol.rename(tmp_path / "elsewhere")   # cp has nothing to copy: the take fails
    with pytest.raises(SnapshotError):
        await backend.take(new_id(set(), T0.replace(hour=2)))
    assert backend.unrecorded() == [b], "a snapshot that failed leaves no marker"


# --------------------------------------------------------------------------- ids
async def test_new_id_is_distinct_within_one_second(tmp_path):
    first = new_id(set(), T0)
    second = new_id({first}, T0)
    third = new_id({first, second}, T0.replace(microsecond=999_999))
    assert first == "20261203T162000Z"
    assert len({first, second, third}) == 3
    assert all(valid_id(s) for s in (first, second, third))
    # two real snapshots taken in the same second live side by side
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "f").write_text("1")
    backend = await make_backend("copy", vol, tmp_path / "store")
    now = datetime.now(timezone.utc)
    a = new_id(set(), now)
    await backend.take(a)
    (vol / "f").write_text("2")
    b = new_id({a}, now)
    await backend.take(b)
    assert a != b
    assert (backend.path_of(a) / "f").read_text() == "1"
    assert (backend.path_of(b) / "f").read_text() == "2"


@pytest.mark.parametrize("bad", ["../20261203T162000Z", "20261203T162000Z/..", "a/b", "/etc", "..", ".", "",
                                 "20261203T162000Z\0", "x\0y", "20261203T162000Z\n", "20261203T162000Z/../../vol",
                                 ".discard-20261203T162000Z", "20261203T162000Z-2/x"])
def test_path_of_rejects_ids_that_are_not_snapshot_ids(tmp_path, bad):
    backend: SnapshotBackend = CopyBackend(tmp_path / "vol", tmp_path / "store")
    with pytest.raises(SnapshotError, match="not a snapshot id"):
        backend.path_of(bad)


def test_path_of_accepts_real_ids(tmp_path):
    backend = CopyBackend(tmp_path / "vol", tmp_path / "store")
    assert backend.path_of("20261203T162000Z") == tmp_path / "store" / "20261203T162000Z"
    assert backend.path_of("20261203T162000Z-12") == tmp_path / "store" / "20261203T162000Z-12"
