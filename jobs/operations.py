"""The operations loop of a node (``embargo run``): the automatic rehearsals
at ``rehearsal.before``, the overdue alerts, and the clock-skew alerts, in a
thread of its own so a slow check never delays a publication. Each pass takes
``now`` as a parameter (:meth:`Operations.run_once`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from jobs.outage import DatabaseWatch
from release.context import Services
from release.rehearsal import Rehearser
from release.risks import alert_overdue, alert_skew

log = logging.getLogger(__name__)

SKEW_WITHIN = timedelta(hours=24)  # releases this close are told of a skewed node


class Operations:
    def __init__(self, services: Services, rehearser: Rehearser, *, node: str,
                 leads: Sequence[timedelta], overdue_after: timedelta,
                 clock_ok: Callable[[], bool] = lambda: True,
                 skew_ms: Callable[[], float | None] = lambda: None,
                 every: float = 1.0, watch: DatabaseWatch | None = None) -> None:
        self.watch = watch  # database outages are the node's to tell, once
        self.s = services
        self.rehearser = rehearser
        self.node = node
        self.leads = tuple(leads)
        self.overdue_after = overdue_after
        self.clock_ok = clock_ok
        self.skew_ms = skew_ms
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: dict[str, str] = {}

    def run_once(self, now: datetime) -> None:
        """One pass; each part is tried even when another fails."""
        for name, part in (("rehearsals", self._rehearse), ("overdue alerts", self._overdue),
                           ("clock alerts", self._skew)):
            if self._stop.is_set():
                return
            try:
                part(now)
                self._failing.pop(name, None)
            except Exception as exc:
                if self.watch is not None and self.watch.failed(exc, doing=name):
                    continue
                if self._failing.get(name) == str(exc):  # said already: not every second
                    log.debug("%s still failing: %s", name, exc)
                else:
                    self._failing[name] = str(exc)
                    log.exception("%s failed; will try again", name)

    def _rehearse(self, now: datetime) -> None:
        self.rehearser.run_due(now=now, leads=self.leads, stop=self._stop.is_set)

    def _overdue(self, now: datetime) -> None:
        alert_overdue(self.s, now=now, after=self.overdue_after, actor=self.node)

    def _skew(self, now: datetime) -> None:
        if not self.clock_ok():
            alert_skew(self.s, node=self.node, skew_ms=self.skew_ms(), now=now,
                       within=SKEW_WITHIN, actor=self.node)

    def start(self) -> None:
        """Raise the overdue alerts at once (a node started after an outage
        tells of what went overdue before it publishes it), then loop."""
        try:
            self._overdue(self.s.clock.now())
        except Exception:
            log.exception("overdue alerts failed; will try again")
        self._thread = threading.Thread(target=self._loop, name="embargo-operations",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once(self.s.clock.now())
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
