"""Scheduler nodes: each ``embargo run`` records a heartbeat and measures its
clock against the database server's. A node whose clock is off by more than
``max_skew`` refuses to publish (and to send copies); the others carry on."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import update

from config.errors import StorageError
from jobs.outage import DatabaseWatch, report
from release.clock import ClockReading, measure_clock
from release.context import Services
from release.records import Node
from storage.db import server_time as server_time  # re-exported: jobs.nodes.server_time
from storage.db import transaction

log = logging.getLogger(__name__)

class NodeMonitor:
    """Heartbeat and clock check of one node, in a thread of its own."""

    def __init__(self, services: Services, name: str, *, max_skew: timedelta,
                 skew_every: float = 60.0, heartbeat_every: float = 1.0,
                 doing: Callable[[], str] | None = None,
                 watch: DatabaseWatch | None = None) -> None:
        self.watch = watch
        self.s = services
        self.name = name
        self.max_skew = max_skew
        self.skew_every = skew_every
        self.heartbeat_every = heartbeat_every
        self.doing = doing or (lambda: "")
        self.skew_ms: float | None = None
        self.reading: ClockReading | None = None  # None until measured: no publishing
        self._ok = False  # until measured, a node does not publish
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def clock_ok(self) -> bool:
        return self._ok

    def measure(self) -> float:
        """Skew of our clock against the server's in ms (positive: ours is
        ahead), from the midpoint of the round trip; keeps the best of three
        tries so a slow round trip does not look like skew."""
        reading = measure_clock(self.s.engine, self.s.clock)
        self.reading = reading
        self.skew_ms = reading.skew_ms
        ok = abs(self.skew_ms) <= self.max_skew.total_seconds() * 1000
        if ok != self._ok or not ok:
            if ok:
                log.info("clock within %.1f ms of the database server: publishing allowed",
                         self.skew_ms)
            else:
                log.error("clock is %.1f ms off the database server's (limit %.0f ms): this "
                          "node will not publish until it is corrected", self.skew_ms,
                          self.max_skew.total_seconds() * 1000)
        self._ok = ok
        return self.skew_ms

    def start(self) -> None:
        self.measure()
        with transaction(self.s.sessions) as session:
            now = server_time(session.connection())
            node = session.get(Node, self.name)
            if node is None:
                session.add(Node(name=self.name, started_at=now, heartbeat_at=now,
                                 skew_ms=self.skew_ms, clock_ok=self._ok, doing="starting"))
            else:
                node.started_at, node.heartbeat_at, node.stopped_at = now, now, None
                node.skew_ms, node.clock_ok = self.skew_ms, self._ok
        self._thread = threading.Thread(target=self._loop, name="embargo-node", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_check = time.monotonic() + self.skew_every
        while not self._stop.wait(self.heartbeat_every):
            try:
                if time.monotonic() >= next_check:
                    self.measure()
                    next_check = time.monotonic() + self.skew_every
                self.beat()
            except Exception as exc:
                report(self.watch, exc, doing="the node's heartbeat", logger=log)

    def beat(self) -> None:
        """Record that this node is alive, in the database server's time (so
        a node with a wrong clock does not look dead or immortal)."""
        with transaction(self.s.sessions) as session:
            session.execute(update(Node).where(Node.name == self.name).values(
                heartbeat_at=server_time(session.connection()), skew_ms=self.skew_ms,
                clock_ok=self._ok,
                doing=(self.doing() or "idle") if self._ok else "refusing: clock skew"))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with transaction(self.s.sessions) as session:
                session.execute(update(Node).where(Node.name == self.name).values(
                    stopped_at=server_time(session.connection()), doing="stopped"))
        except StorageError as exc:  # the database is down or gone: the lease says it
            log.warning("could not record that node %s stopped: %s", self.name, exc)
