"""Content-addressed blob store: bodies by SHA-256, zlib-compressed, stored once.

A BlobWriter takes a body chunk by chunk, hashing and compressing to a temporary file as it goes, so a
large body never sits in memory; `finish()` fsyncs and renames it to its digest's place.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

CHUNK = 256 * 1024
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class BlobRef:
    digest: str
    size: int
    stored_size: int
    new: bool  # False when the content was already stored


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        for d in (root, self.tmp):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)

    def path_of(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a SHA-256 digest: {digest!r}")
        return self.root / digest[:2] / digest[2:]

    def exists(self, digest: str) -> bool:
        return self.path_of(digest).exists()

    def writer(self, limit: int | None = None) -> "BlobWriter":
        """limit: keep hashing past this many bytes but stop storing (the blob is then not kept)."""
        return BlobWriter(self, limit)

    def put(self, data: bytes) -> BlobRef:
        w = self.writer()
        w.write(data)
        return w.finish()

    def open(self, digest: str) -> BinaryIO:
        return open(self.path_of(digest), "rb")

    def chunks(self, digest: str, size: int = CHUNK) -> Iterator[bytes]:
        """The original bytes, decompressed, in pieces of about `size`."""
        decomp = zlib.decompressobj()
        with self.open(digest) as f:
            while block := f.read(size):
                out = decomp.decompress(block)
                if out:
                    yield out
            tail = decomp.flush()
            if tail:
                yield tail

    def read(self, digest: str) -> bytes:
        return b"".join(self.chunks(digest))


class BlobWriter:
    def __init__(self, store: BlobStore, limit: int | None) -> None:
        self.store = store
        self.limit = limit
        self.hasher = hashlib.sha256()
        self.size = 0
        self.stored = 0
        self.overflow = False
        self._comp = zlib.compressobj(level=1)
        fd, name = tempfile.mkstemp(dir=store.tmp, prefix="w-")
        self._tmp = Path(name)
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.hasher.update(data)
        self.size += len(data)
        if self.overflow:
            return
        if self.limit is not None and self.size > self.limit:
            self.overflow = True
            self.discard()
            return
        out = self._comp.compress(data)
        if out:
            self._file.write(out)
            self.stored += len(out)

    @property
    def digest(self) -> str:
        return self.hasher.hexdigest()

    def finish(self) -> BlobRef:
        """Make the blob durable under its digest. Raises OSError (e.g. ENOSPC) without leaving debris."""
        digest = self.digest
        if self.overflow:
            return BlobRef(digest, self.size, 0, False)
        try:
            tail = self._comp.flush()
            self._file.write(tail)
            self.stored += len(tail)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            final = self.store.path_of(digest)
            if final.exists():
                self._tmp.unlink()
                return BlobRef(digest, self.size, self.stored, False)
            final.parent.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self._tmp, 0o600)
            os.replace(self._tmp, final)
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            return BlobRef(digest, self.size, self.stored, True)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        self._tmp.unlink(missing_ok=True)
