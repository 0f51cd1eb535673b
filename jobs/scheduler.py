"""The long-running scheduler (``embargo run``) on APScheduler 3.

The database is the source of truth: the scheduler derives one date job per
instant from it at start (every release due then: a burst is one job, one
claim, one wait) and re-reads it every ``poll_seconds``, so a queue, cancel or
reschedule made by another process reaches it within one poll. A job wakes
early enough to stage the bytes due at its instant (``lead`` plus those bytes
at ``staging_rate``) and the publisher waits, reading the clock, for the
instant itself. The outbox is delivered beside it, by
:class:`jobs.delivery.DeliveryLoop`, which a publication or an issue of
copies wakes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, or_, select

from jobs.delivery import DeliveryLoop
from jobs.outage import DatabaseWatch, report
from jobs.relay import OutboxRelay
from release.context import Services
from release.copies import issue_copies
from release.publishing import Outcome, Publisher, PublishStatus
from release.records import PUBLISHING, QUEUED, Document, Release
from storage.db import read_transaction

log = logging.getLogger(__name__)


class EmbargoScheduler:
    def __init__(self, services: Services, publisher: Publisher, relay: OutboxRelay | None, *,
                 poll_seconds: float = 0.5, workers: int = 16,
                 lead: timedelta = timedelta(seconds=0.5),
                 on_outcome: Callable[[Outcome], None] | None = None,
                 guard: Callable[[], bool] = lambda: True,
                 horizon: timedelta = timedelta(hours=1),
                 watch: DatabaseWatch | None = None,
                 staging_rate: float = 50 * 2**20) -> None:
        self.watch = watch
        self.guard = guard
        self.horizon = horizon
        self.s = services
        self.publisher = publisher
        self.relay = relay
        self.poll_seconds = poll_seconds
        self.lead = lead
        self.staging_rate = staging_rate  # bytes per second assumed for staging
        self.on_outcome = on_outcome
        self.stop_event = publisher.stop
        self.sessions = services.sessions
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(workers)},
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
            timezone=UTC,
        )
        self._lock = threading.Lock()
        self._known: dict[str, tuple[int, datetime]] = {}
        self._copies: dict[str, datetime] = {}
        self._running: set[str] = set()
        self._due: dict[str, datetime] = {}  # publish timers not yet run: when each is due
        self._kicked: set[str] = set()  # overdue ones started by the poll itself
        self._jobs: dict[datetime, str] = {}  # run time -> the job id of its group
        self._waits: dict[datetime, timedelta] = {}  # run time -> how far ahead it wakes
        self._runs = 0
        self._fingerprint: tuple[int, int] | None = None
        self._refresh_at = datetime.min.replace(tzinfo=UTC)  # when to look past the horizon
        self._active = 0  # queued or publishing, due within the horizon or not
        self.delivery = (DeliveryLoop(relay, stop=self.stop_event, guard=guard,
                                      poll_seconds=poll_seconds, watch=watch)
                         if relay is not None else None)
        if self.delivery is not None:  # the notices of a publication go as it commits
            publisher.notices = self.delivery
        self._threads: list[threading.Thread] = []
        self.scheduler.add_listener(self._skipped, EVENT_JOB_MAX_INSTANCES)

    # -- life cycle ------------------------------------------------------------
    def start(self) -> int:
        """Schedule every active release and start the workers. Returns how
        many releases were scheduled."""
        self.scheduler.start()
        count = self.sync(force=True)
        poller = threading.Thread(target=self._poll_loop, name="embargo-poll", daemon=True)
        self._threads.append(poller)
        if self.delivery is not None:
            self._threads.append(self.delivery.thread())
        for thread in self._threads:
            thread.start()
        log.info("scheduler started: %d releases scheduled", count)
        return count

    def shutdown(self) -> None:
        """Stop taking work; a publication in progress is finished, one still
        waiting for its instant gives its claim back."""
        self.stop_event.set()
        self.kick_relay()
        self.scheduler.shutdown(wait=True)
        for thread in self._threads:
            thread.join(timeout=10)
        log.info("scheduler stopped")

    def kick_relay(self) -> None:
        if self.delivery is not None:
            self.delivery.wake()

    # -- syncing with the database ---------------------------------------------
    def _poll_loop(self) -> None:
        while not self.stop_event.wait(self.poll_seconds):
            try:
                self.sync()
            except Exception as exc:
                report(self.watch, exc, doing="reading the releases", logger=log)
            else:
                if self.watch is not None:
                    self.watch.ok()

    def lead_for(self, size: int) -> timedelta:
        """How early the job for an instant wakes when ``size`` bytes are due
        then: ``lead`` (the floor), plus the time to stage them at
        ``staging_rate``; never more than half the horizon."""
        longest = max(self.lead, self.horizon / 2)
        staging = size / self.staging_rate
        if staging >= longest.total_seconds():
            return longest
        return min(self.lead + timedelta(seconds=staging), longest)

    def sync(self, *, force: bool = False) -> int:
        """Bring the jobs in line with the database; return how many releases
        are active (queued or publishing). Cheap when nothing has changed:
        one aggregate query, in a read transaction (it never waits for, nor
        holds up, a publication's commits).

        Only releases due within ``horizon`` get a timer; the rest are looked
        at again every half horizon, so the work at start and at each change
        grows with the releases due soon, not with everything queued."""
        now = self.s.clock.now()
        with read_transaction(self.sessions) as session:
            fingerprint = session.execute(select(
                func.count(), func.coalesce(func.sum(Release.revision), 0),
                func.count().filter(Release.state.in_((QUEUED, PUBLISHING))))).one()
            fp = (int(fingerprint[0]), int(fingerprint[1]))
            if not force and fp == self._fingerprint and now < self._refresh_at:
                self._start_overdue(now)
                with self._lock:
                    return self._active
            within = now + self.horizon
            size = (select(func.coalesce(func.sum(Document.size), 0))
                    .where(Document.release_id == Release.id).scalar_subquery())
            rows = session.execute(
                select(Release.id, Release.state, Release.instant, Release.revision,
                       Release.lease_expires_at, Release.copies_at, Release.copies_issued_at,
                       size)
                .where(or_(Release.state == PUBLISHING,
                           (Release.state == QUEUED) & or_(
                               Release.instant <= within + max(self.lead, self.horizon / 2),
                               Release.copies_at <= within)))).all()
        self._refresh_at = now + self.horizon / 2
        fresh: tuple[int, int] | None = fp
        active_count = int(fingerprint[2])
        if not self.guard():
            rows = []  # a node that may not publish schedules nothing,
            fresh = None  # and looks again at the next poll
            active_count = 0
        bytes_at: dict[datetime, int] = {}
        for _, state, instant, _, _, _, _, nbytes in rows:
            if state == QUEUED:
                bytes_at[instant] = bytes_at.get(instant, 0) + int(nbytes or 0)
        with self._lock:
            active: set[str] = set()
            copies_due: set[str] = set()
            timed: set[str] = set()  # timers set just now, from the clock as it is
            for release_id, state, instant, revision, lease, copies_at, issued, _ in rows:
                active.add(release_id)
                if state == QUEUED and copies_at is not None and issued is None:
                    copies_due.add(release_id)
                    if self._copies.get(release_id) != copies_at:
                        self._copies[release_id] = copies_at
                        self.scheduler.add_job(self._issue_copies, "date", run_date=copies_at,
                                               id=f"copies:{release_id}", args=[release_id],
                                               replace_existing=True,
                                               name=f"copies {release_id}")
                if release_id in self._running:
                    continue
                if state == QUEUED:
                    lead = self.lead_for(bytes_at.get(instant, 0))
                    run_at = instant - lead
                    if run_at > within:
                        active.discard(release_id)  # here for its copies only
                        continue
                    if lease is not None and lease > run_at:  # another's claim, or a backoff
                        run_at = lease
                        lead = max(instant - run_at, timedelta(0))
                else:  # publishing: resume when the current claim lapses
                    run_at = max(lease or now, instant)
                    lead = timedelta(0)
                key = (revision, run_at)
                if self._known.get(release_id) == key:
                    continue
                self._known[release_id] = key
                self._due[release_id] = run_at
                self._waits[run_at] = max(self._waits.get(run_at, lead), lead)
                self._kicked.discard(release_id)
                timed.add(release_id)
            for done in set(self._copies) - copies_due:
                del self._copies[done]
                try:
                    self.scheduler.remove_job(f"copies:{done}")
                except JobLookupError:
                    pass
            for gone in set(self._known) - active:
                del self._known[gone]
                self._due.pop(gone, None)
            wanted = set(self._due.values())
            for run_at in [r for r in self._jobs if r not in wanted]:
                job_id = self._jobs.pop(run_at)
                self._waits.pop(run_at, None)
                try:
                    self.scheduler.remove_job(job_id)
                except JobLookupError:
                    pass
            for run_at in {self._due[r] for r in timed}:
                self._add_group(run_at, run_at)
            self._fingerprint = fresh
            self._active = active_count
        self._start_overdue(now, skip=timed)
        return active_count

    def _add_group(self, run_at: datetime, run_date: datetime | None) -> None:
        """(Re)arm the one job of the releases due at ``run_at``; ``run_date``
        None runs it now. Called with the lock held."""
        job_id = self._jobs.get(run_at)
        if job_id is None:
            self._runs += 1
            job_id = self._jobs[run_at] = f"publish:{run_at.isoformat()}#{self._runs}"
        self.scheduler.add_job(self._publish_due, "date", run_date=run_date, id=job_id,
                               args=[run_at], replace_existing=True,
                               name=f"publish due {run_at.isoformat()}")

    def _start_overdue(self, now: datetime, *, skip: set[str] | None = None) -> None:
        """Start at once every publication whose time has come by our clock,
        whatever APScheduler's timers think: after a forward step of the wall
        clock (NTP, a resumed VM) a timer still sleeps for the old interval.
        A release is then late by at most one poll."""
        with self._lock:
            late = [release_id for release_id, run_at in self._due.items()
                    if run_at <= now and release_id not in self._running
                    and release_id not in self._kicked and release_id not in (skip or ())]
            for release_id in late:
                self._kicked.add(release_id)
                log.info("publication of %s is due by the clock but its timer has not "
                         "fired (a clock step?): starting it now", release_id)
            for run_at in {self._due[r] for r in late}:
                self._add_group(run_at, None)

    def _skipped(self, event: JobSubmissionEvent) -> None:
        """APScheduler dropped a run because the job's previous run had not
        returned yet: a sync re-added the job in the moment between a run
        forgetting its releases and returning. Forget them again, so the next
        sync schedules them once more; never leave a release unscheduled."""
        kind, _, what = event.job_id.partition(":")
        log.info("%s job %s overlapped its previous run; rescheduling it", kind, what)
        with self._lock:
            if kind == "publish":
                run_at = next((r for r, j in self._jobs.items() if j == event.job_id), None)
                for release_id in [r for r, d in self._due.items() if d == run_at]:
                    self._known.pop(release_id, None)
                    self._due.pop(release_id, None)
                if run_at is not None:
                    self._jobs.pop(run_at, None)
            else:
                self._copies.pop(what, None)
            self._fingerprint = None

    # -- jobs ------------------------------------------------------------------
    def doing(self) -> str:
        """What this node is working on, for ``embargo nodes``."""
        with self._lock:
            running = sorted(self._running)
            waiting = self._active
        if running:
            return "publishing " + ", ".join(running)
        return f"waiting for {waiting} release{'s' if waiting != 1 else ''}"

    def timer_of(self, release_id: str) -> datetime | None:
        """When the job that will publish ``release_id`` runs, if it has one."""
        with self._lock:
            run_at = self._due.get(release_id)
            return run_at if run_at is not None and run_at in self._jobs else None

    def timers(self) -> set[str]:
        """The releases this node holds a publish timer for, or is publishing
        (for the metrics' unscheduled figure)."""
        with self._lock:
            return set(self._known) | self._running

    def _publish_due(self, run_at: datetime) -> None:
        """The job of one instant: every release due then, published
        together (one claim, one wait, one finish)."""
        with self._lock:
            ids = sorted(r for r, due in self._due.items()
                         if due == run_at and r not in self._running)
            wait = self._waits.pop(run_at, self.lead)
            self._jobs.pop(run_at, None)
        if not ids:
            return
        if not self.guard():
            log.warning("not publishing %s: this node's clock is not trusted", ", ".join(ids))
            with self._lock:
                for release_id in ids:
                    self._known.pop(release_id, None)
                    self._due.pop(release_id, None)
                self._fingerprint = None
            return
        with self._lock:
            ids = [r for r in ids if r not in self._running]
            for release_id in ids:
                self._running.add(release_id)
                self._due.pop(release_id, None)
                self._kicked.discard(release_id)
        if self.delivery is not None:  # their notices built, the mail connections opened, now
            for release_id in ids:
                self.delivery.prepare(release_id)
        try:
            outcomes = self.publisher.publish_many(ids, wait_up_to=wait + timedelta(seconds=1))
        except Exception as exc:
            report(self.watch, exc, doing=f"publishing {', '.join(ids)}", logger=log)
            outcomes = [Outcome(status=PublishStatus.RETRY, release_id=r) for r in ids]
        finally:
            with self._lock:
                for release_id in ids:
                    self._running.discard(release_id)
                    self._known.pop(release_id, None)  # the next sync re-reads it
                self._fingerprint = None
        if any(o.status in (PublishStatus.PUBLISHED, PublishStatus.FAILED) for o in outcomes):
            self.kick_relay()
        if self.on_outcome is not None:
            for outcome in outcomes:
                self.on_outcome(outcome)

    def _issue_copies(self, release_id: str) -> None:
        if not self.guard():
            return
        try:
            if issue_copies(self.s, release_id, actor=self.publisher.claimant):
                self.kick_relay()
        except Exception as exc:
            report(self.watch, exc, doing=f"issuing the copies of {release_id}", logger=log)
        with self._lock:
            self._copies.pop(release_id, None)  # the next sync re-reads it
            self._fingerprint = None
