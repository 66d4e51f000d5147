"""The service's database: SQLAlchemy 2.x Core, SQLite by default, PostgreSQL by URL.

Schema versions are applied in order by ``migrate(engine)`` and recorded in ``ipshield_schema``
(one row per applied version). A new version is one more entry in ``MIGRATIONS``: never edit an
applied one. Every command that opens the database migrates it first, so an old file is upgraded
in place.

Tables (current version):
- ``api_keys``: one row per key: public ``key_id`` (lookup), ``key_hash`` (SHA-256 hex of the whole
  raw key; the raw key is never stored), ``customer``, limits (``rate``, ``burst``, ``quota``),
  ``used`` (embeddings served), ``created_at``, ``revoked_at``, ``last_used_at`` (epoch seconds).
  Version 3 adds ``tat`` (the rate limiter's theoretical arrival time, GCRA: one atomic
  conditional UPDATE per request, so the rate holds across server processes) and ``admin`` (1 for
  an owner key that may open the owner's page).
- ``usage``: the audit log, one row per key per time window (``window_start``, width
  ``window_s``): ``requests``, ``images``, ``texts`` (written in the same transaction that charges
  ``api_keys.used``, so their sums equal ``used``), ``rejected`` (401/429 after the key was known),
  ``auth_failures`` (wrong secrets presented for the key's id), ``unique_inputs`` (distinct input
  hashes in the window). ``sketch`` is no longer written (version 3 clears it: the moments it held
  could give back the clean embedding of a window with one request).
- ``usage_sketch``: the extraction monitor's statistics, one row per key, window and server
  process: ``n`` embeddings (at least ``SKETCH_MIN``) and two scalars of their spread
  (``spread``, ``eff_rank``); nothing from which an embedding can be recovered.
- ``suspect_checks``: the suspect monitor's verdicts (``ipshield monitor``): the suspect's name,
  when, the scheme, the verdict, the p-values, the queries spent, the identified customer.
"""

from __future__ import annotations

import contextlib
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
    if version >= 3:
        cols.append(Column("tat", Float, nullable=True))
        cols.append(Column("admin", Integer, nullable=False, default=0, server_default="0"))
    return cols


def _usage_columns(version: int = 1) -> list:
    cols = [
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
    if version >= 3:
        cols.append(Column("auth_failures", BigInteger, nullable=False, default=0, server_default="0"))
    return cols


def _sketch_columns() -> list:
    return [
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key_id", String(32), nullable=False, index=True),
        Column("window_start", BigInteger, nullable=False),
        Column("writer", String(32), nullable=False),
        Column("n", BigInteger, nullable=False),
        Column("spread", Float, nullable=False),
        Column("eff_rank", Float, nullable=False),
        UniqueConstraint("key_id", "window_start", "writer", name="uq_sketch_key_window_writer"),
    ]


def _check_columns() -> list:
    return [
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("suspect", String(200), nullable=False, index=True),
        Column("checked_at", Float, nullable=False, index=True),
        Column("scheme", String(64), nullable=False),
        Column("verdict", String(32), nullable=False),
        Column("p_trigger", Float, nullable=True),
        Column("p_distribution", Float, nullable=True),
        Column("queries", BigInteger, nullable=False, default=0),
        Column("customer", String(200), nullable=True),
        Column("detail", String(2000), nullable=True),
    ]


api_keys = Table("api_keys", metadata, *_key_columns(3))
usage = Table("usage", metadata, *_usage_columns(3))
usage_sketch = Table("usage_sketch", metadata, *_sketch_columns())
suspect_checks = Table("suspect_checks", metadata, *_check_columns())


def _v1(conn: Connection) -> None:
    # the tables as version 1 created them (no last_used_at)
    v1 = MetaData()
    Table("api_keys", v1, *_key_columns(1))
    Table("usage", v1, *_usage_columns())
    v1.create_all(conn)


def _v2(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE api_keys ADD COLUMN last_used_at DOUBLE PRECISION"))


def _v3(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE api_keys ADD COLUMN tat DOUBLE PRECISION"))
    conn.execute(text("ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0"))
    conn.execute(text("ALTER TABLE usage ADD COLUMN auth_failures BIGINT NOT NULL DEFAULT 0"))
    conn.execute(text("UPDATE usage SET sketch = NULL"))  # the old moments could give back embeddings
    v3 = MetaData()
    Table("usage_sketch", v3, *_sketch_columns())
    Table("suspect_checks", v3, *_check_columns())
    v3.create_all(conn)


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "api_keys and usage tables", _v1),
    (2, "api_keys.last_used_at", _v2),
    (3, "rate limiter state, admin keys, auth failures, usage_sketch, suspect_checks; old sketches cleared", _v3),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def sqlite_path(url: str) -> str | None:
    """The file of a ``sqlite:///FILE`` URL; None for in-memory SQLite, ``file:`` URIs (SQLite
    opens those itself, with their own mode) and other databases."""
    if not url.startswith("sqlite"):
        return None
    try:
        from sqlalchemy.engine import make_url

        name = make_url(url).database or ""
    except Exception:
        return None
    if name in ("", ":memory:") or name.startswith("file:"):
        return None
    return name


def private_file(path: str) -> None:
    """Create ``path`` owner-only (0600) whatever the umask, or tighten an existing file we own.
    SQLite creates its -wal and -shm files with the database file's permissions."""
    import os

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:  # not ours: leave it
        pass
    finally:
        os.close(fd)


def make_engine(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///path.db``, ``sqlite://`` in memory, ``postgresql+psycopg://...``)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    kwargs: dict = {"future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if url in ("sqlite://", "sqlite:///:memory:"):
            kwargs["poolclass"] = StaticPool
    else:
        kwargs["pool_pre_ping"] = True
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
                cur.execute("PRAGMA busy_timeout=30000")
            finally:
                cur.close()

    return engine


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table("ipshield_schema"):
        return 0
    v = conn.execute(select(schema_table.c.version).order_by(schema_table.c.version.desc()).limit(1)).scalar()
    return int(v or 0)


_PG_LOCK = 0x1B5_4E1D  # the advisory lock id under which ipshield migrates a PostgreSQL database


@contextlib.contextmanager
def _exclusive(engine: Engine):
    """One transaction that holds the database's migration lock: PostgreSQL's advisory lock, or
    SQLite's write lock taken at BEGIN IMMEDIATE. Processes starting together wait their turn
    instead of racing to create the same tables."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")
    else:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
            yield conn


def migrate(engine: Engine) -> int:
    """Apply every missing schema version, all under the migration lock (safe when several server
    processes start at once on a fresh database); returns the version."""
    try:
        with engine.connect() as conn:  # up to date: no lock (and a read-only database still opens)
            v = current_version(conn)
        if v >= SCHEMA_VERSION:
            if v > SCHEMA_VERSION:
                raise IPShieldError(f"the database has schema version {v}, newer than this ipshield ({SCHEMA_VERSION})", "upgrade ipshield")
            return v
        with _exclusive(engine) as conn:
            if not inspect(conn).has_table("ipshield_schema"):
                schema_table.create(conn)
            for version, description, fn in MIGRATIONS:
                if current_version(conn) >= version:
                    continue
                fn(conn)
                conn.execute(schema_table.insert().values(version=version, description=description, applied_at=time.time()))
            v = current_version(conn)
    except IPShieldError:
        raise
    except Exception as exc:
        raise IPShieldError(f"cannot open or migrate the database ({type(exc).__name__})",
                            "check the --db URL, that the database server is running, and that this user may write the "
                            "database (a SQLite file and its folder must be writable)") from None
    if v > SCHEMA_VERSION:
        raise IPShieldError(f"the database has schema version {v}, newer than this ipshield ({SCHEMA_VERSION})", "upgrade ipshield")
    return v


def open_db(url: str, create: bool = True) -> Engine:
    """An engine on a migrated database. A SQLite file is created owner-only (0600) when missing,
    unless ``create`` is False (then a missing file is an error: `serve` must not start on an empty
    database where every key would be refused)."""
    import os

    path = sqlite_path(url)
    if path is not None:
        if not os.path.exists(path):
            if not create:
                raise IPShieldError(f"the database {path} does not exist",
                                    f"create it with a first key: `ipshield keys create --db {url} --customer NAME`, "
                                    "or pass --create-db to start on an empty database")
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise IPShieldError(f"the folder of the database {path} does not exist", "create the folder or fix the --db URL")
        try:
            private_file(path)
        except PermissionError:
            if not os.path.exists(path):
                raise IPShieldError(f"cannot create the database {path}: permission denied",
                                    "choose a --db path in a folder you may write") from None
        except OSError as exc:
            raise IPShieldError(f"cannot open the database {path}: {exc.strerror}", "check the --db path and the disk") from None
    engine = make_engine(url)
    migrate(engine)
    return engine
