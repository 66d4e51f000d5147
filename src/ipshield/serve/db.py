"""The service's database: SQLAlchemy 2.x Core, SQLite by default, PostgreSQL by URL.

Schema versions are applied in order by ``migrate(engine)`` and recorded in ``ipshield_schema``
(one row per applied version). A new version is one more entry in ``MIGRATIONS``: never edit an
applied one. Every command that opens the database migrates it first, so an old file is upgraded
in place.

Tables (current version):
- ``api_keys``: one row per key: public ``key_id`` (lookup), ``key_hash`` (SHA-256 hex of the whole
  raw key; the raw key is never stored), ``customer``, limits (``rate``, ``burst``, ``quota``),
  ``used`` (embeddings served), ``created_at``, ``revoked_at``, ``last_used_at`` (epoch seconds).
- ``usage``: the audit log, one row per key per time window (``window_start``, width
  ``window_s``): ``requests``, ``images``, ``texts``, ``rejected`` (401/429 after the key was known),
  ``unique_inputs`` (distinct input hashes in the window) and ``sketch`` (moments of a fixed random
  projection of the clean embeddings, for the extraction monitor).
"""

from __future__ import annotations

import time
from typing import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from ipshield.errors import IPShieldError

metadata = MetaData()

schema_table = Table(
    "ipshield_schema",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String(200), nullable=False),
    Column("applied_at", Float, nullable=False),
)

def _key_columns(version: int) -> list:
    cols = [
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key_id", String(32), nullable=False, unique=True, index=True),
        Column("key_hash", String(64), nullable=False),
        Column("customer", String(200), nullable=False, index=True),
        Column("rate", Float, nullable=True),
        Column("burst", Float, nullable=True),
        Column("quota", BigInteger, nullable=True),
        Column("used", BigInteger, nullable=False, default=0),
        Column("created_at", Float, nullable=False),
        Column("revoked_at", Float, nullable=True),
    ]
    if version >= 2:
        cols.append(Column("last_used_at", Float, nullable=True))
    return cols


def _usage_columns() -> list:
    return [
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key_id", String(32), nullable=False, index=True),
        Column("window_start", BigInteger, nullable=False),
        Column("window_s", Integer, nullable=False),
        Column("requests", BigInteger, nullable=False, default=0),
        Column("images", BigInteger, nullable=False, default=0),
        Column("texts", BigInteger, nullable=False, default=0),
        Column("rejected", BigInteger, nullable=False, default=0),
        Column("unique_inputs", BigInteger, nullable=False, default=0),
        Column("sketch", LargeBinary, nullable=True),
        UniqueConstraint("key_id", "window_start", name="uq_usage_key_window"),
    ]


api_keys = Table("api_keys", metadata, *_key_columns(2))
usage = Table("usage", metadata, *_usage_columns())


def _v1(conn: Connection) -> None:
    # the tables as version 1 created them (no last_used_at)
    v1 = MetaData()
    Table("api_keys", v1, *_key_columns(1))
    Table("usage", v1, *_usage_columns())
    v1.create_all(conn)


def _v2(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE api_keys ADD COLUMN last_used_at DOUBLE PRECISION"))


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "api_keys and usage tables", _v1),
    (2, "api_keys.last_used_at", _v2),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def make_engine(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///path.db``, ``sqlite://`` in memory, ``postgresql+psycopg://...``)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    kwargs: dict = {"future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if url in ("sqlite://", "sqlite:///:memory:"):
            kwargs["poolclass"] = StaticPool
    try:
        engine = create_engine(url, **kwargs)
    except Exception as exc:  # bad URL, missing driver
        raise IPShieldError(f"cannot use database URL: {type(exc).__name__}", "use sqlite:///FILE.db or postgresql+psycopg://USER@HOST/DB (pip install 'psycopg[binary]')") from None
    if url.startswith("sqlite"):
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL: readers do not block the writer
            cur = dbapi_conn.cursor()
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            finally:
                cur.close()

    return engine


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table("ipshield_schema"):
        return 0
    v = conn.execute(select(schema_table.c.version).order_by(schema_table.c.version.desc()).limit(1)).scalar()
    return int(v or 0)


def migrate(engine: Engine) -> int:
    """Apply every missing schema version (each in its own transaction); returns the version."""
    try:
        with engine.begin() as conn:
            if not inspect(conn).has_table("ipshield_schema"):
                schema_table.create(conn)
        for version, description, fn in MIGRATIONS:
            with engine.begin() as conn:
                if current_version(conn) >= version:
                    continue
                fn(conn)
                conn.execute(schema_table.insert().values(version=version, description=description, applied_at=time.time()))
        with engine.connect() as conn:
            v = current_version(conn)
    except IPShieldError:
        raise
    except Exception as exc:
        raise IPShieldError(f"cannot open or migrate the database ({type(exc).__name__})", "check the --db URL, that the server is running and that you may create tables") from None
    if v > SCHEMA_VERSION:
        raise IPShieldError(f"the database has schema version {v}, newer than this ipshield ({SCHEMA_VERSION})", "upgrade ipshield")
    return v


def open_db(url: str) -> Engine:
    engine = make_engine(url)
    migrate(engine)
    return engine
