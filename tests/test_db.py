"""The database layer: a transaction per unit of work, and threads of one
process taking turns on SQLite's single writer."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from config.errors import StorageError
from storage.db import make_engine, read_transaction, session_factory, transaction


def test_threads_wait_their_turn_before_sqlite_not_inside_it(tmp_path: Path) -> None:
    """A second thread's transaction does not even begin while the first
    holds the writer: it waits on the process's lock (woken the moment the
    first commits), not in SQLite's busy handler (which sleeps in steps of up
    to 100 ms before it tries again)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    begun: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("BEGIN"):  # about to ask SQLite for the writer
            begun.append(threading.current_thread().name)

    sessions = session_factory(engine)
    with transaction(sessions) as session:
        session.execute(text("CREATE TABLE t (n INTEGER)"))
    with engine.connect(), engine.connect():
        pass  # two pooled connections, set up (PRAGMAs run) while nothing is locked
    begun.clear()
    holding = threading.Event()
    release = threading.Event()

    def first() -> None:
        with transaction(sessions) as session:
            session.execute(text("INSERT INTO t VALUES (1)"))
            holding.set()
            release.wait(10)

    def second() -> None:
        with transaction(sessions) as session:
            session.execute(text("INSERT INTO t VALUES (2)"))

    one = threading.Thread(target=first, name="first")
    two = threading.Thread(target=second, name="second")
    one.start()
    assert holding.wait(10)
    two.start()
    two.join(0.3)
    assert two.is_alive() and begun == ["first"]
    release.set()
    one.join(10)
    two.join(10)
    assert begun == ["first", "second"]
    with transaction(sessions) as session:
        assert session.execute(text("SELECT n FROM t ORDER BY n")).scalars().all() == [1, 2]
    engine.dispose()


def test_an_error_rolls_back_and_releases_the_writer(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        session.execute(text("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
    with pytest.raises(StorageError, match="UNIQUE"), transaction(sessions) as session:
        session.execute(text("INSERT INTO t VALUES (1)"))
        session.execute(text("INSERT INTO t VALUES (1)"))
    done = threading.Event()

    def other() -> None:
        with transaction(sessions) as session:
            session.execute(text("INSERT INTO t VALUES (2)"))
        done.set()

    threading.Thread(target=other).start()
    assert done.wait(10)  # the failed transaction let go of the writer
    with transaction(sessions) as session:
        assert session.execute(text("SELECT n FROM t")).scalars().all() == [2]
    engine.dispose()


def test_a_read_transaction_neither_waits_for_nor_blocks_the_writer(tmp_path: Path) -> None:
    """While a writer holds SQLite's lock (and the process's), a read
    transaction begins, sees the last committed state and ends at once; a
    writer that starts while a read is open is not held up by it."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        session.execute(text("CREATE TABLE t (n INTEGER)"))
        session.execute(text("INSERT INTO t VALUES (1)"))
    holding = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with transaction(sessions) as session:
            session.execute(text("INSERT INTO t VALUES (2)"))
            holding.set()
            release.wait(10)

    seen: list[list[int]] = []

    def reader() -> None:
        with read_transaction(sessions) as session:
            seen.append(session.execute(text("SELECT n FROM t ORDER BY n")).scalars().all())

    one = threading.Thread(target=writer)
    one.start()
    assert holding.wait(10)
    two = threading.Thread(target=reader)
    two.start()
    two.join(5)
    assert not two.is_alive(), "the read waited for the writer"
    assert seen == [[1]]  # the committed state, not the writer's uncommitted row
    release.set()
    one.join(10)
    with read_transaction(sessions) as session:  # a read left open does not hold up a write
        session.execute(text("SELECT n FROM t")).all()
        done = threading.Event()
        threading.Thread(target=lambda: (writer_commit(sessions), done.set())).start()
        assert done.wait(5), "a write waited for an open read"
    engine.dispose()


def writer_commit(sessions: Any) -> None:
    with transaction(sessions) as session:
        session.execute(text("INSERT INTO t VALUES (3)"))


_LOCK_PROBE = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
probe = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
kind, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
print(pid if kind != fcntl.F_UNLCK else 0)
"""


def test_a_second_engine_keeps_the_first_ones_sqlite_locks(tmp_path: Path) -> None:
    """make_engine on a database this process already has open must not
    open and close the file: closing any descriptor of it drops every POSIX
    lock the process holds on it, its live SQLite connections' too, and
    another process then takes itself for the last one and removes the WAL
    under them (seen: "database disk image is malformed" in bench/scale.py,
    which queues through one engine while building others)."""
    import os
    import subprocess
    import sys

    path = tmp_path / "db.sqlite"
    first = make_engine(f"sqlite:///{path}")
    with transaction(session_factory(first)) as session:
        session.execute(text("CREATE TABLE t (n INTEGER)"))

    def holder() -> int:
        done = subprocess.run([sys.executable, "-c", _LOCK_PROBE, str(path)],
                              capture_output=True, text=True, timeout=30, check=True)
        return int(done.stdout)

    with first.connect() as connection:
        connection.execute(text("SELECT n FROM t")).all()
        assert holder() == os.getpid()  # the open connection's shared lock
        second = make_engine(f"sqlite:///{path}")
        assert holder() == os.getpid(), "building a second engine dropped the first's locks"
    second.dispose()
    first.dispose()
