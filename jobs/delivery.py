"""The thread that keeps the outbox moving on a scheduler node: it runs the
relay at once when woken (a release published, copies issued), otherwise
when the next notice is due, and at least every few polls. Told that a
publication is coming, a second thread builds its notices and opens the
connections to the mail server ahead of the instant, and keeps them alive
until they are used or dropped. The notices a publication creates are
inserted claimed for this relay and handed to it as they are committed
(``release.publishing.NoticeTaker``): it sends them before anything else."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta

from jobs.outage import DatabaseWatch, report
from jobs.relay import OutboxRelay
from release.publishing import HandedNotices

log = logging.getLogger(__name__)

# How often the preparing thread looks after the connections it holds.
_TEND_SECONDS = 0.5


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
        self._lock = threading.Lock()
        self._coming: deque[tuple[str, datetime | None]] = deque()
        self._preparer: threading.Thread | None = None
        self._prepare_wake = threading.Event()
        self._handed: deque[HandedNotices] = deque()

    # -- release.publishing.NoticeTaker ------------------------------------------
    @property
    def lease(self) -> timedelta:
        return self.relay.lease

    def token(self) -> str | None:
        """None (the notices left to any relay's claim) while this node
        cannot send them at once: stopping, its clock not trusted, or its
        relay busy sending other notices (a run that found nothing to send
        ends at once: the handed run follows it)."""
        if self.stop.is_set() or not self.guard():
            return None  # left unclaimed: any relay with a clock it trusts sends them
        with self._lock:
            if self._handed:
                return None
        if self.relay.sending():
            return None
        return self.relay.hand_token()

    def most(self) -> int | None:
        return self.relay.hand_most()

    def take(self, notices: HandedNotices) -> None:
        """The notices a publication is committing, claimed for this relay:
        sent next (once committed), before the relay's own claims."""
        with self._lock:
            self._handed.append(notices)
        self._wake.set()

    def wake(self) -> None:
        """Run the relay now rather than at its next turn."""
        self._wake.set()

    def prepare(self, release_id: str, instant: datetime | None = None) -> None:
        """A publication of ``release_id`` (at ``instant``, if known) is
        coming: build its "published" notices and open the connections now,
        in the background (:meth:`OutboxRelay.prepare`); returns at once.
        Nothing is sent before the release is published."""
        with self._lock:
            self._coming.append((release_id, instant))
            if self._preparer is None:
                self._preparer = threading.Thread(target=self._prepare_loop,
                                                  name="embargo-relay-prepare", daemon=True)
                self._preparer.start()
        self._prepare_wake.set()

    def thread(self) -> threading.Thread:
        return threading.Thread(target=self._run, name="embargo-relay", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.guard():  # a wrong clock could deliver a copy too late
                self._wake.wait(self.poll_seconds)
                continue
            try:
                while True:
                    with self._lock:
                        handed = self._handed.popleft() if self._handed else None
                    if handed is None:
                        break
                    self.relay.run_handed(handed)
                self.relay.run_once()
                wait = self.relay.next_due()
            except Exception as exc:
                report(self.watch, exc, doing="delivering notices", logger=log)
                wait = self.poll_seconds
            self._wake.wait(self.poll_seconds if wait is None
                            else min(max(wait, 0.01), self.poll_seconds * 4))
            self._wake.clear()

    def _prepare_loop(self) -> None:
        """Prepare each release as it is announced, then tend what is held
        (keep-alive, expiry) until nothing is; then end (the next
        announcement starts another)."""
        while True:
            with self._lock:
                coming = self._coming.popleft() if self._coming else None
                ending = coming is None and self.stop.is_set()
                if ending:
                    self._preparer = None
            if ending:  # (not under the lock: closing connections takes a while)
                self.relay.drop_prepared()
                break
            if coming is not None:
                try:
                    self.relay.prepare(*coming)
                except Exception as exc:  # only slower: the relay composes at the instant
                    report(self.watch, exc, doing=f"preparing the notices of {coming[0]}",
                           logger=log)
                continue
            try:
                held = self.relay.keep_alive()
            except Exception as exc:
                report(self.watch, exc, doing="keeping mail connections open", logger=log)
                held = True
            with self._lock:
                if not held and not self._coming:
                    self._preparer = None
                    break
            self._prepare_wake.wait(_TEND_SECONDS)
            self._prepare_wake.clear()
