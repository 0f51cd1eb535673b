"""The thread that keeps the outbox moving on a scheduler node: it runs the
relay at once when woken (a release published, copies issued), otherwise
when the next notice is due, and at least every few polls."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from jobs.outage import DatabaseWatch, report
from jobs.relay import OutboxRelay

log = logging.getLogger(__name__)


class DeliveryLoop:
    def __init__(self, relay: OutboxRelay, *, stop: threading.Event,
                 guard: Callable[[], bool], poll_seconds: float,
                 watch: DatabaseWatch | None = None) -> None:
        self.watch = watch
        relay.watch = watch  # its claim renewer meets the same outages
        self.relay = relay
        self.stop = stop
        self.guard = guard
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()

    def wake(self) -> None:
        """Run the relay now rather than at its next turn."""
        self._wake.set()

    def thread(self) -> threading.Thread:
        return threading.Thread(target=self._run, name="embargo-relay", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.guard():  # a wrong clock could deliver a copy too late
                self._wake.wait(self.poll_seconds)
                continue
            try:
                self.relay.run_once()
                wait = self.relay.next_due()
            except Exception as exc:
                report(self.watch, exc, doing="delivering notices", logger=log)
                wait = self.poll_seconds
            self._wake.wait(self.poll_seconds if wait is None
                            else min(max(wait, 0.01), self.poll_seconds * 4))
            self._wake.clear()
