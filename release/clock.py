"""The one place the wall clock is read. Everything time-dependent takes a
``Clock`` (or an explicit ``now``) so tests can move time."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from storage.db import read_only, server_time

_REALTIME_COARSE = 5  # Linux's CLOCK_REALTIME_COARSE (the time module has no name for it)


class Clock:
    """The system clock, in aware UTC. ``offset`` shifts it: only for
    rehearsing a node with a wrong clock (the skew check must catch it)."""

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        self.offset = offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def stamp_now(self) -> datetime:
        """The time the kernel puts on a file changed now. Linux stamps files
        from its coarse clock, which lags :meth:`now` by up to one scheduler
        tick (4 ms at HZ=250), so a file linked in just after an instant can
        carry a time just before it. A clock whose ``now`` is not the
        system's (a test's) has no file clock of its own: its ``now``."""
        if type(self).now is not Clock.now:
            return self.now()
        try:
            coarse = time.clock_gettime(_REALTIME_COARSE)
        except OSError:  # not Linux: files are stamped from the clock itself
            return self.now()
        return datetime.fromtimestamp(coarse, UTC) + self.offset

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


@dataclass(frozen=True, kw_only=True)
class ClockReading:
    """This node's clock against the reference clock (the database
    server's): ``skew`` is ours minus theirs (positive: ours is ahead), known
    to within ``uncertainty`` (half the best round trip of the measurement)."""

    skew: timedelta
    uncertainty: timedelta

    def __post_init__(self) -> None:
        if self.uncertainty < timedelta(0):
            raise ValueError("a measurement's uncertainty is never negative")

    @property
    def skew_ms(self) -> float:
        return round(self.skew.total_seconds() * 1000, 3)

    def safe_local(self, instant: datetime) -> datetime:
        """The local time from which the true time is surely at or past
        ``instant``: the true skew lies within ``skew ± uncertainty``, so ours
        must read ``instant + skew + uncertainty``; never earlier than the
        instant itself (a clock behind the reference's waits for its own)."""
        return instant + max(timedelta(0), self.skew + self.uncertainty)

    def reference(self, local: datetime, *, trusted: timedelta) -> datetime:
        """The reference clock's time when ours reads ``local``, if the skew
        is within ``trusted`` (a node further off is refused publishing; a
        rehearsal with a fake clock keeps its own time)."""
        return local - self.skew if abs(self.skew) <= trusted else local


def measure_clock(engine: Engine, clock: Clock, *, tries: int = 3) -> ClockReading:
    """Measure ``clock`` against the database server's, from the midpoint of
    each round trip; keeps the best of ``tries`` so a slow round trip does not
    look like skew. Raises StorageError (or a DBAPIError) if the database
    cannot be reached."""
    best: tuple[timedelta, float] | None = None
    for _ in range(max(1, tries)):
        with read_only(engine).connect() as connection:  # on SQLite: not the writer lock
            start_real = time.perf_counter()
            before = clock.now()
            server = server_time(connection)
            after = clock.now()
            trip = time.perf_counter() - start_real
        skew = before + (after - before) / 2 - server
        if best is None or trip < best[1]:
            best = (skew, trip)
    assert best is not None
    return ClockReading(skew=best[0], uncertainty=timedelta(seconds=best[1] / 2))
