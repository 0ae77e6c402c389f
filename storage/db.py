"""Engines and schema upgrades for the timeline database (SQLite in WAL mode, or PostgreSQL)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from typing import TYPE_CHECKING

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

import migrations

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

# Alembic is imported where it is used: every CLI call would otherwise pay for it.
MIGRATIONS_DIR = Path(migrations.__file__).parent


class TimelineUnavailable(Exception):
    """The timeline database cannot be read or written."""


def normalize_url(url: str) -> str:
    """Plain postgresql:// URLs use psycopg 3, the driver undo-proxy ships with."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(url: str) -> bool:
    return make_url(normalize_url(url)).get_backend_name() == "sqlite"


def _prepare_sqlite_file(url: str) -> None:
    """Timeline files hold users' mail and documents: directory 0700, files 0600."""
    database = make_url(url).database
    if not database or database == ":memory:":
        return
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


def json_text(value: object) -> str:
    """The timeline's JSON columns, written by orjson (a replay reads and writes tens of thousands of
    records); what orjson refuses (integers beyond 64 bits, say) is written by the standard library."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value)


def json_value(text: str | bytes) -> object:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # NaN and the like, which the standard library writes and reads
        return json.loads(text)


LOCK_WAIT_MS = 30_000  # how long an SQLite write waits for another process's lock before the timeline fails


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    codec = {"json_serializer": json_text, "json_deserializer": json_value}
    if is_sqlite(url):
        _prepare_sqlite_file(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **codec)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            # Let SQLAlchemy issue BEGIN itself so transactions are explicit and immediate.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={LOCK_WAIT_MS}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:  # noqa: ANN001
            # How long to wait for another writer's lock: a transaction may ask for less (a probe of a timeline
            # known to be failing); pooled connections keep the setting, so every transaction sets its own.
            wait_ms = conn.get_execution_options().get("lock_wait_ms", LOCK_WAIT_MS)
            conn.exec_driver_sql(f"PRAGMA busy_timeout={int(wait_ms)}")
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, **codec)


def alembic_config(url: str) -> "AlembicConfig":
    from alembic.config import Config as AlembicConfig
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str) -> str:
    """Bring the schema to the newest revision; returns that revision."""
    from alembic import command
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return head_revision(url)
    finally:
        engine.dispose()


def head_revision(url: str) -> str:
    from alembic.script import ScriptDirectory
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
