"""The content-addressed blob store (storage/blobs.py) on real filesystems."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import stat
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from storage.blobs import EMPTY_DIGEST, BlobStore


def stored_files(store: BlobStore) -> list[Path]:
    """Every blob file (not the temp dir's contents)."""
    return sorted(p for p in store.root.rglob("*") if p.is_file() and store.tmp not in p.parents)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def test_store_dirs_are_private(store: BlobStore) -> None:
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.tmp.stat().st_mode) == 0o700
    ref = store.put(b"secret mail")
    path = store.path_of(ref.digest)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_content_addressed_by_sha256_of_the_original_bytes(store: BlobStore) -> None:
    body = b"hello, world\n" * 100
    ref = store.put(body)
    assert ref.digest == hashlib.sha256(body).hexdigest()
    assert ref.size == len(body)
    assert ref.new is True
    assert store.exists(ref.digest)
    assert store.path_of(ref.digest) == store.root / ref.digest[:2] / ref.digest[2:]
    # What is on disk is not the original bytes (it is compressed), but reads give them back.
    assert store.path_of(ref.digest).read_bytes() != body
    assert store.read(ref.digest) == body


def test_stored_once(store: BlobStore) -> None:
    body = os.urandom(10_000)
    first = store.put(body)
    second = store.put(body)
    assert (first.new, second.new) == (True, False)
    assert first.digest == second.digest and second.size == len(body)
    assert stored_files(store) == [store.path_of(first.digest)]
    assert list(store.tmp.iterdir()) == []
    other = store.put(body + b"!")
    assert other.new and other.digest != first.digest
    assert len(stored_files(store)) == 2


def test_a_stored_body_is_known_to_this_store_and_to_a_new_one(store: BlobStore) -> None:
    body = os.urandom(5_000)
    ref = store.put(body)
    for reader in (store, BlobStore(store.root)):  # remembered, and found on disk by a fresh instance
        writer = reader.writer()
        writer.write(body)
        known = writer.known()
        assert known is not None and (known.digest, known.new) == (ref.digest, False)
        assert known.stored_size == store.path_of(ref.digest).stat().st_size == ref.stored_size
        assert reader.exists(ref.digest) and reader.read(ref.digest) == body
    unknown = store.writer()
    unknown.write(body + b"?")
    assert unknown.known() is None  # not stored: finish() has the work to do
    assert unknown.finish().new is True


@pytest.mark.parametrize("size", [1, 256 * 1024, 256 * 1024 + 1, 3 * 1024 * 1024])
def test_read_gives_the_bytes_back_around_the_in_memory_limit(store: BlobStore, size: int) -> None:
    body = random.Random(size).randbytes(size // 2) + b"x" * (size - size // 2)
    assert store.read(store.put(body).digest) == body


def test_compressible_body_is_stored_compressed(store: BlobStore) -> None:
    body = (b"Subject: quarterly report\r\nThe numbers are fine.\r\n" * 25_000)[: 1 << 20]
    assert len(body) == 1 << 20
    ref = store.put(body)
    on_disk = store.path_of(ref.digest).stat().st_size
    assert ref.stored_size == on_disk
    assert on_disk < len(body) // 20, f"1 MiB of text stored as {on_disk} bytes"
    assert store.read(ref.digest) == body


@pytest.mark.parametrize("size", [0, 1, 1000, 256 * 1024 - 1, 256 * 1024 + 1, 3 * 1024 * 1024 + 7])
def test_round_trip_random_binary(store: BlobStore, size: int) -> None:
    body = random.Random(size).randbytes(size)
    ref = store.put(body)
    assert ref.digest == hashlib.sha256(body).hexdigest() and ref.size == size
    assert store.read(ref.digest) == body
    assert b"".join(store.chunks(ref.digest, size=4096)) == body
    with store.open(ref.digest) as f:
        assert f.read() == store.path_of(ref.digest).read_bytes()


def test_empty_body(store: BlobStore) -> None:
    ref = store.put(b"")
    assert ref.digest == EMPTY_DIGEST == hashlib.sha256(b"").hexdigest()
    assert ref.size == 0 and ref.new
    assert store.read(EMPTY_DIGEST) == b""
    assert list(store.chunks(EMPTY_DIGEST)) == []
    assert store.put(b"").new is False


def test_written_in_pieces_equals_written_at_once(store: BlobStore) -> None:
    body = random.Random(7).randbytes(500_000)
    w = store.writer()
    for i in range(0, len(body), 777):
        w.write(body[i:i + 777])
    w.write(b"")
    ref = w.finish()
    assert ref.new and ref.digest == hashlib.sha256(body).hexdigest()
    assert store.put(body).new is False
    assert store.read(ref.digest) == body


def test_streaming_200_mb_keeps_memory_low(store: BlobStore) -> None:
    chunk_size = 1 << 20
    chunks = 200
    # Random 16 KiB patterns repeat within zlib's window: realistic compression, and fast.
    block = random.Random(1).randbytes(16 * 1024) * (chunk_size // (16 * 1024))
    expected = hashlib.sha256()
    tracemalloc.start()
    try:
        w = store.writer()
        for i in range(chunks):
            # Each chunk differs (so nothing dedups away) yet costs nothing to make.
            piece = i.to_bytes(4, "big") + block[4:]
            expected.update(piece)
            w.write(piece)
        ref = w.finish()
        _, peak_write = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        back = hashlib.sha256()
        total = 0
        for piece in store.chunks(ref.digest):
            back.update(piece)
            total += len(piece)
        _, peak_read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ref.size == chunks * chunk_size
    assert ref.digest == expected.hexdigest()
    assert total == ref.size and back.hexdigest() == ref.digest
    # 200 MiB went through; the writer and reader never held more than a few chunks at once.
    assert peak_write < 16 << 20, f"writing peaked at {peak_write / 2**20:.1f} MiB"
    assert peak_read < 16 << 20, f"reading peaked at {peak_read / 2**20:.1f} MiB"


def test_reading_a_highly_compressible_blob_comes_in_bounded_pieces(store: BlobStore) -> None:
    body = bytes(32 << 20)  # 32 MiB of zeros: a few dozen KiB on disk
    ref = store.put(body)
    assert ref.stored_size < 1 << 20
    sizes = [len(piece) for piece in store.chunks(ref.digest, size=64 * 1024)]
    assert sum(sizes) == len(body)
    assert max(sizes) <= 64 * 1024


def test_writer_over_its_limit_keeps_hashing_but_stores_nothing(store: BlobStore) -> None:
    body = random.Random(3).randbytes(100_000)
    w = store.writer(limit=10_000)
    for i in range(0, len(body), 4096):
        w.write(body[i:i + 4096])
    assert w.overflow
    ref = w.finish()
    assert ref.digest == hashlib.sha256(body).hexdigest()
    assert ref.size == len(body)
    assert ref.stored_size == 0 and ref.new is False
    assert not store.exists(ref.digest)
    assert stored_files(store) == []
    assert list(store.tmp.iterdir()) == []


def test_writer_within_its_limit_stores(store: BlobStore) -> None:
    w = store.writer(limit=100)
    w.write(b"x" * 100)
    ref = w.finish()
    assert not w.overflow and ref.new and store.read(ref.digest) == b"x" * 100


def test_discard_leaves_nothing(store: BlobStore) -> None:
    w = store.writer()
    w.write(b"abandoned upload" * 1000)
    w.discard()
    assert list(store.tmp.iterdir()) == []
    assert stored_files(store) == []


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 1 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(directory: Path) -> None:
    """Write until the filesystem is full."""
    with open(directory / "filler", "wb", buffering=0) as f:
        while True:
            try:
                f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return


def test_failing_finish_leaves_no_temp_files(tiny_fs: Path) -> None:
    store = BlobStore(tiny_fs / "blobs")
    fill(tiny_fs)
    body = random.Random(5).randbytes(4096)  # small: it sits in buffers until finish() flushes it
    w = store.writer()
    w.write(body)
    with pytest.raises(OSError) as exc:
        w.finish()
    assert exc.value.errno == errno.ENOSPC
    assert list(store.tmp.iterdir()) == []
    assert not store.exists(hashlib.sha256(body).hexdigest())
    assert stored_files(store) == []

    # With room again the same body is stored normally.
    (tiny_fs / "filler").unlink()
    ref = store.put(body)
    assert ref.new and store.read(ref.digest) == body
    assert list(store.tmp.iterdir()) == []


def test_failing_write_then_discard_leaves_no_temp_files(tiny_fs: Path) -> None:
    store = BlobStore(tiny_fs / "blobs")
    body = random.Random(6).randbytes(2 << 20)  # incompressible, twice the filesystem
    w = store.writer()
    with pytest.raises(OSError) as exc:
        for i in range(0, len(body), 65536):
            w.write(body[i:i + 65536])
        w.finish()
    assert exc.value.errno == errno.ENOSPC
    w.discard()  # what every caller does when a write fails
    assert list(store.tmp.iterdir()) == []
    assert stored_files(store) == []


@pytest.mark.parametrize("digest", [
    "", "abc", "0" * 63, "0" * 65, "A" * 64, "g" * 64, "../" + "0" * 61, "0" * 62 + "/x",
    EMPTY_DIGEST.upper(), " " + EMPTY_DIGEST[1:],
])
def test_invalid_digests_are_rejected(store: BlobStore, digest: str) -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        store.path_of(digest)
    with pytest.raises(ValueError):
        store.exists(digest)
    with pytest.raises(ValueError):
        store.read(digest)


def test_missing_blob(store: BlobStore) -> None:
    digest = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(digest)
    with pytest.raises(FileNotFoundError):
        store.read(digest)
