"""A node's view of its database through trouble.

Every loop of a node (the scheduler's poll, the relay, the heartbeat) meets
the same outage at the same time. Logged by each loop on each turn, a 22 s
PostgreSQL restart once wrote 14,337 lines; through one
:class:`DatabaseWatch` the node says it once when the outage starts, once a
minute while it lasts, and once when it ends.

A database whose Embargo schema has gone while the node runs (dropped and
created again empty, or pointed at the wrong database) is not an outage to
wait out, and not something to repair by creating the schema afresh: that
would forget every queued release. The node stops, with one line saying so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

# PostgreSQL's SQLSTATE for "relation does not exist"; SQLite says "no such table".
_UNDEFINED_TABLE = "42P01"


def database_error(exc: BaseException) -> DBAPIError | None:
    """The database error behind ``exc`` (itself, or what it was raised
    from, as ``storage.db.transaction`` turns one into StorageError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, DBAPIError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def schema_gone(error: DBAPIError) -> bool:
    """Whether the database answered but has no Embargo table."""
    orig = error.orig
    if getattr(orig, "sqlstate", None) == _UNDEFINED_TABLE:
        return True
    return "no such table" in str(orig)


def _first_line(error: DBAPIError) -> str:
    text = str(error.orig).strip() if error.orig is not None else ""
    return text.splitlines()[0] if text else type(error).__name__


class DatabaseWatch:
    """Shared by a node's loops. ``failed`` is called from a loop's
    ``except``: it returns True when the exception was the database's (then
    handled here: logged at most once a minute, or the node stopped when its
    schema has gone) and False for anything else, which the loop logs
    itself. ``ok`` is called after a turn that surely reached the database
    (the scheduler's poll: every turn queries it), never by a loop that may
    have contained the error itself."""

    def __init__(self, *, stop: threading.Event, every: float = 60.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.stop = stop
        self.every = every
        self.monotonic = monotonic
        self.fatal: str | None = None  # why the node stopped itself, if it did
        self._lock = threading.Lock()
        self._since: float | None = None
        self._last = 0.0
        self._failures = 0

    @property
    def down(self) -> bool:
        with self._lock:
            return self._since is not None

    def failed(self, exc: BaseException, *, doing: str) -> bool:
        error = database_error(exc)
        if error is None:
            return False
        if schema_gone(error):
            with self._lock:
                first = self.fatal is None
                if first:
                    self.fatal = ("the database has no Embargo schema any more (dropped, or "
                                  f"another database?): {_first_line(error)}; this node stops "
                                  "rather than create an empty one")
            if first:
                log.error("%s", self.fatal)
                self.stop.set()
            return True
        now = self.monotonic()
        with self._lock:
            self._failures += 1
            if self._since is None:
                self._since = self._last = now
                log.error("the database cannot be reached (%s): %s; carrying on, and "
                          "saying so once a minute while it lasts", doing, _first_line(error))
            elif now - self._last >= self.every:
                self._last = now
                log.error("the database is still unreachable, for %.0f s now (%d failed "
                          "tries): %s", now - self._since, self._failures, _first_line(error))
        return True

    def ok(self) -> None:
        with self._lock:
            if self._since is None:
                return
            lasted, tries = self.monotonic() - self._since, self._failures
            self._since, self._failures = None, 0
        log.warning("the database answers again, after %.1f s (%d failed tries)", lasted,
                    tries)


def report(watch: DatabaseWatch | None, exc: BaseException, *, doing: str,
           logger: logging.Logger) -> None:
    """What a loop's ``except`` does: a database error goes to the watch
    (once a minute), anything else is logged with its traceback."""
    if watch is None or not watch.failed(exc, doing=doing):
        logger.error("%s failed; will try again", doing, exc_info=exc)
