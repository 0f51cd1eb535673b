"""The one place the wall clock is read. Everything time-dependent takes a
``Clock`` (or an explicit ``now``) so tests can move time."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta


class Clock:
    """The system clock, in aware UTC. ``offset`` shifts it: only for
    rehearsing a node with a wrong clock (the skew check must catch it)."""

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        self.offset = offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def sleep_until(self, instant: datetime, stop: threading.Event | None = None) -> bool:
        """Wait until ``now() >= instant``, re-reading the clock (never
        trusting a timer to wake on time). Sleeps coarsely while far away and
        finely near the instant. Returns False if ``stop`` was set first."""
        while True:
            remaining = (instant - self.now()).total_seconds()
            if remaining <= 0:
                return True
            if stop is not None and stop.is_set():
                return False
            if remaining > 0.02:
                pause = min(remaining - 0.01, 0.2)
            else:
                pause = min(remaining, 0.0005)
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)
