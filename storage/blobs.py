"""Content-addressed blob store: bodies by SHA-256, zlib-compressed, stored once.

A BlobWriter takes a body chunk by chunk, hashing and compressing to a temporary file as it goes, so a
large body never sits in memory; `finish()` fsyncs and renames it to its digest's place. Small bodies wait
in memory instead, so content that is already stored costs no disk write at all.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from storage.durable import fsync_dir

CHUNK = 256 * 1024
SPILL = 256 * 1024  # a body larger than this goes to a temp file as it arrives
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
REMEMBERED = 1 << 16  # digests known to be stored, kept in memory so a repeated body costs no stat
_DIGEST = re.compile(r"[0-9a-f]{64}")


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
        self._root = str(root)
        # Blobs are never deleted by undo-proxy, so a digest once seen stored stays stored.
        self._stored: dict[str, int] = {}  # digest -> stored (compressed) size

    def path_of(self, digest: str) -> Path:
        return Path(self._location(digest))

    def _location(self, digest: str) -> str:
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"not a SHA-256 digest: {digest!r}")
        return f"{self._root}/{digest[:2]}/{digest[2:]}"

    def exists(self, digest: str) -> bool:
        return self.stored_size(digest) is not None

    def stored_size(self, digest: str) -> int | None:
        """The blob's size on disk, or None when it is not stored."""
        size = self._stored.get(digest)
        if size is None:
            try:
                size = os.stat(self._location(digest)).st_size
            except FileNotFoundError:
                return None
            self._remember(digest, size)
        return size

    def _remember(self, digest: str, stored_size: int) -> None:
        if len(self._stored) >= REMEMBERED:
            self._stored.clear()
        self._stored[digest] = stored_size

    def writer(self, limit: int | None = None) -> "BlobWriter":
        """limit: keep hashing past this many bytes but stop storing (the blob is then not kept)."""
        return BlobWriter(self, limit)

    def put(self, data: bytes) -> BlobRef:
        w = self.writer()
        w.write(data)
        return w.finish()

    def open(self, digest: str) -> BinaryIO:
        return open(self._location(digest), "rb")

    def chunks(self, digest: str, size: int = CHUNK) -> Iterator[bytes]:
        """The original bytes, decompressed, in pieces of about `size`."""
        decomp = zlib.decompressobj()
        with self.open(digest) as f:
            while block := f.read(size):
                # Bounded output: a highly compressible blob must not expand in memory all at once.
                while True:
                    out = decomp.decompress(block, size)
                    if out:
                        yield out
                    block = decomp.unconsumed_tail
                    if not block and len(out) < size:
                        break
            tail = decomp.flush()
            if tail:
                yield tail

    def read(self, digest: str) -> bytes:
        with self.open(digest) as f:
            if os.fstat(f.fileno()).st_size <= SPILL:  # small: one read, one decompress
                return zlib.decompress(f.read())
        return b"".join(self.chunks(digest))


class BlobWriter:
    """Small bodies (up to SPILL bytes) stay in memory until `finish()`: content already in the store then
    costs one stat, no temporary file, no compression and no fsync. Larger ones spill to a temp file."""

    def __init__(self, store: BlobStore, limit: int | None) -> None:
        self.store = store
        self.limit = limit
        self.hasher = hashlib.sha256()
        self.size = 0
        self.stored = 0
        self.overflow = False
        self._mem: list[bytes] | None = []  # the raw body while it is small
        self._comp: Any = None
        self._tmp: Path | None = None
        self._file: BinaryIO | None = None
        self.failure: OSError | None = None  # the store failed (write_if_possible): hashed, not stored

    def write_if_possible(self, data: bytes) -> None:
        """write(), but for a body that goes on whether or not it can be kept (an answer): a store that fails
        (disk full, out of file descriptors) only stops the storing; the digest stays the whole body's."""
        try:
            self.write(data)
        except OSError as exc:   # write() hashed the data before the store failed
            self.stop_storing(exc)

    def finish_if_possible(self) -> BlobRef:
        """finish(), or the digest alone when the store fails (see write_if_possible)."""
        try:
            return self.finish()
        except OSError as exc:
            self.stop_storing(exc)
            return self.finish()

    def stop_storing(self, failure: OSError) -> None:
        self.failure = failure
        self.overflow = True
        self.discard()

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
        if self._mem is not None:
            self._mem.append(bytes(data))
            if self.size > SPILL:
                self._spill()
            return
        self._compress(data)

    def _spill(self) -> None:
        """Start the temp file and move what is in memory into it."""
        pending, self._mem = self._mem or [], None
        self._comp = zlib.compressobj(level=1)
        fd, name = tempfile.mkstemp(dir=self.store.tmp, prefix="w-")
        self._tmp = Path(name)
        self._file = os.fdopen(fd, "wb")
        for piece in pending:
            self._compress(piece)

    def _compress(self, data: bytes) -> None:
        out = self._comp.compress(data)
        if out:
            self._file.write(out)
            self.stored += len(out)

    @property
    def digest(self) -> str:
        return self.hasher.hexdigest()

    def known(self) -> BlobRef | None:
        """The finished blob's reference if a small body's content is already stored (one stat: cheap
        enough for the event loop), else None and `finish()` has the work to do."""
        if self._mem is None or self.overflow:
            return None
        digest = self.digest
        stored_size = self.store.stored_size(digest)
        if stored_size is None:
            return None
        self._mem = None
        return BlobRef(digest, self.size, stored_size, False)

    def finish(self) -> BlobRef:
        """Make the blob durable under its digest. Raises OSError (e.g. ENOSPC) without leaving debris."""
        digest = self.digest
        if self.overflow:
            return BlobRef(digest, self.size, 0, False)
        final = self.store.path_of(digest)
        try:
            if self._mem is not None:
                known = self.store.stored_size(digest)
                if known is None:
                    self._spill()
                else:
                    self._mem = None
                    return BlobRef(digest, self.size, known, False)
            tail = self._comp.flush()
            self._file.write(tail)
            self.stored += len(tail)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if final.exists():
                self._tmp.unlink()
                self._tmp = None
                self.store._remember(digest, self.stored)
                return BlobRef(digest, self.size, self.stored, False)
            final.parent.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self._tmp, 0o600)
            os.replace(self._tmp, final)
            self._tmp = None
            fsync_dir(final.parent)
            self.store._remember(digest, self.stored)
            return BlobRef(digest, self.size, self.stored, True)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        self._mem = None
        self._comp = None   # the compressor's window and buffers
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
