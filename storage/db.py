"""Database engine and sessions. The engine is built once from a URL and
passed in; nothing here is global."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from weakref import WeakKeyDictionary

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, CursorResult, Result, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from config.errors import ConfigError, StorageError
from config.settings import mask_url

# SQLite has one writer at a time, and a connection that finds the database
# locked sleeps in growing steps (1, 2, 5, 10 … 100 ms) before it tries again.
# Threads of one process therefore take turns on this lock instead: the next
# transaction starts the moment the previous one commits. (Other processes
# still meet the busy handler.)
_WRITERS: WeakKeyDictionary[Engine, threading.RLock] = WeakKeyDictionary()
# The execution option that makes SQLite's BEGIN a plain (deferred) one: a
# reader neither takes the writer lock nor waits for it.
_READ_ONLY = "embargo_read_only"


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``.

    SQLite gets a folder, WAL, a busy timeout and ``BEGIN IMMEDIATE``
    transactions, so that writers from several processes queue for the lock
    instead of failing half-way. Raises ConfigError for a URL that cannot be
    used."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"database URL {mask_url(url)!r} is not a valid SQLAlchemy URL"
                          ) from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_file(Path(parsed.database))
        engine = create_engine(parsed, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            reading = connection.get_execution_options().get(_READ_ONLY, False)
            connection.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

        _WRITERS[engine] = threading.RLock()
        return engine
    try:
        return create_engine(parsed, pool_pre_ping=True)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"database URL {mask_url(url)!r} needs the driver {exc.name!r}: "
                          "pip install it") from None


def new_sqlite_file(url: str) -> bool:
    """Whether ``url`` names an SQLite file that does not exist yet (its
    first use creates it, schema and all)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return False
    return (parsed.get_backend_name() == "sqlite" and bool(parsed.database)
            and parsed.database != ":memory:" and not Path(str(parsed.database)).exists())


def _private_file(path: Path) -> None:
    """Create the SQLite file mode 0600 (its folder 0700 when we make it), or
    tighten an existing one: it holds titles, officers and the audit trail.
    SQLite gives its -wal and -shm files the database file's mode."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        try:
            # Only ever open a file that is not there yet: closing a descriptor of the
            # database drops every POSIX lock this process holds on it, those of its live
            # SQLite connections too, and another process that then thinks itself the
            # last one checkpoints and removes the WAL under them (a corrupt database).
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError as exc:
        raise ConfigError(f"database file {path} cannot be created: {exc.strerror}") from None


def affected(result: Result[Any]) -> int:
    """Rows changed by an UPDATE or DELETE: how a compare-and-set knows it won."""
    return cast(CursorResult[Any], result).rowcount


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: committed when the block ends, rolled back when it
    raises. Database outages become StorageError."""
    bind = factory.kw.get("bind")
    writer = _WRITERS.get(bind) if isinstance(bind, Engine) else None
    session = factory()
    try:
        with writer if writer is not None else nullcontext(), session.begin():
            yield session
    except DBAPIError as exc:
        raise StorageError(f"database error: {mask_url(str(exc.orig))}") from exc
    finally:
        session.close()


def read_only(engine: Engine) -> Engine:
    """``engine`` for connections that only read (on SQLite: a plain BEGIN,
    without the writer lock), e.g. to ask the server's clock."""
    return engine.execution_options(**{_READ_ONLY: True}) if engine in _WRITERS else engine


@contextmanager
def read_transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A unit of work that only reads, without the writer lock that
    :func:`transaction` takes on SQLite (a plain deferred BEGIN, and not the
    in-process writer lock), so a reader never queues behind a publication's
    commits nor holds one up. On SQLite its reads see one snapshot; on
    PostgreSQL it is an ordinary READ COMMITTED transaction, each statement
    seeing what was committed when it began: no caller decides anything
    from two reads that must agree. Writing in it is a
    mistake (SQLite would have to upgrade the lock and may refuse with
    "database is locked"). Database outages become StorageError."""
    bind = factory.kw.get("bind")
    session = factory(bind=read_only(bind)) if isinstance(bind, Engine) else factory()
    try:
        with session.begin():
            yield session
    except DBAPIError as exc:
        raise StorageError(f"database error: {mask_url(str(exc.orig))}") from exc
    finally:
        session.close()


def server_time(connection: Connection) -> datetime:
    """The database server's clock (the reference clock), read now (not at
    transaction start)."""
    if connection.dialect.name == "postgresql":
        value = connection.execute(text("SELECT clock_timestamp()")).scalar_one()
    elif connection.dialect.name == "sqlite":
        raw = connection.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        value = datetime.fromisoformat(raw).replace(tzinfo=UTC)
    else:
        value = connection.execute(text("SELECT CURRENT_TIMESTAMP")).scalar_one()
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
