"""Timeline tables. The schema is created and changed only through the Alembic migrations."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


class VerbRow(Base):
    __tablename__ = "verbs"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    protocol: Mapped[str] = mapped_column(String(16))
    frontend: Mapped[str] = mapped_column(String(64))
    verb: Mapped[str] = mapped_column(String(64))
    targets: Mapped[list] = mapped_column(JSON)
    mutates: Mapped[bool]
    status: Mapped[str] = mapped_column(String(16))
    origin: Mapped[str] = mapped_column(String(16))
    cycle: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"))
    original_seq: Mapped[int | None] = mapped_column(BigInteger)
    summary: Mapped[str] = mapped_column(Text)
    request: Mapped[dict] = mapped_column(JSON)
    output: Mapped[dict | None] = mapped_column(JSON)
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_verbs_status", "status"),
        Index("ix_verbs_cycle", "cycle"),
        Index("ix_verbs_verb", "verb"),
    )


class BlobRow(Base):
    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    stored_size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SnapshotRow(Base):
    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    after_seq: Mapped[int] = mapped_column(BigInteger)
    label: Mapped[str | None] = mapped_column(Text)
    backend: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))  # periodic | manual | pre-rewind | commit
    # False once a committed cycle rewrote the history this snapshot belongs to: no longer a rewind point.
    valid: Mapped[bool]
    duration_ms: Mapped[float] = mapped_column(Float)
    pause_ms: Mapped[float] = mapped_column(Float)
    deleted: Mapped[bool]


class CycleRow(Base):
    __tablename__ = "cycles"

    id: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    state: Mapped[str] = mapped_column(String(16))
    snapshot: Mapped[str] = mapped_column(String(64))
    pre_rewind_snapshot: Mapped[str | None] = mapped_column(String(64))
    rewind_to_seq: Mapped[int] = mapped_column(BigInteger)
    base_seq: Mapped[int] = mapped_column(BigInteger)  # after_seq of the snapshot it rewound to
    end_seq: Mapped[int] = mapped_column(BigInteger)
    skipped: Mapped[list] = mapped_column(JSON)
    notes: Mapped[list] = mapped_column(JSON)
    replayed: Mapped[int] = mapped_column(Integer)
    to_replay: Mapped[int] = mapped_column(Integer)
    opened: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    closed: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)


class InconsistencyRow(Base):
    __tablename__ = "inconsistencies"

    id: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    cycle: Mapped[int] = mapped_column(ForeignKey("cycles.id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    replay_seq: Mapped[int | None] = mapped_column(BigInteger)
    verb: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text)
    compensation: Mapped[str] = mapped_column(String(16))
    compensation_detail: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_inconsistencies_cycle", "cycle"),)
