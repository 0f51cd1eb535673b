"""Publication at the embargo instant, in two phases.

In the lead window before the instant the claimant opens the data key and
decrypts every document completely into private staging (a folder of mode
0700, outside the public tree), checking every tag and SHA-256, and makes
ready everything else that does not have to wait: each file's public mode,
its URL, the manifest but for its time, the rows of the finish. Only when
all are verified, and the reference clock (the database server's) says the
instant has come, does anything become public, and then publication is a
commit: each staged file is linked into place (create-only; a create-only
PUT on S3), each folder fsynced once, then the manifest, then one
transaction marks the release published and fills the outbox, its notices
claimed for the node's relay and handed to it as it commits (the relay waits
for the commit, then only sends: :class:`NoticeTaker`). Releases due
at one instant are claimed, waited for and finished together
(:meth:`Publisher.publish_many`), each with its own outcome.

A release claimed while queued stays ``queued`` (claimed, under a lease)
while it is staged, so that a cancel or a reschedule still wins; it becomes
``publishing`` ``freeze_before`` the instant, and from then on nothing but
this publisher (or, if it dies, the next claimant) touches it.

Storage and database faults are retried with capped backoff, for as long as
they last, and alerted; a fault that no retry can mend (a tampered document,
other bytes already at a public key) fails the release with a report of what
is public and what is not. Every step is idempotent: a publisher that dies
part-way is resumed by whoever claims the release next, and nothing is
written twice."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import bindparam, func, or_, select, update

from config.errors import EmbargoError, NotFoundError, SealError, StorageError
from config.retry import PUBLICATION
from release import audit, sealing, timerules
from release.alerts import Alert, raise_alert
from release.clock import ClockReading, measure_clock
from release.context import Services
from release.instants import describe_instant
from release.notices import release_inputs
from release.records import (
    FAILED,
    PUBLISHED,
    PUBLISHING,
    QUEUED,
    Document,
    OutboxMessage,
    Purpose,
    Recipient,
    Release,
    table_of,
)
from release.vault_keys import dek_key, document_key
from storage.base import ObjectExistsError, PublicBatch, write_private
from storage.db import affected, read_only, read_transaction, server_time, transaction

log = logging.getLogger(__name__)


_RELEASES = table_of(Release)
_RECIPIENTS = table_of(Recipient)
_OUTBOX = table_of(OutboxMessage)
_DOCUMENTS = table_of(Document)
_CLAIMED = (_RELEASES.c.id, _RELEASES.c.state, _RELEASES.c.slug, _RELEASES.c.title,
            _RELEASES.c.owner, _RELEASES.c.instant, _RELEASES.c.zone, _RELEASES.c.wall,
            _RELEASES.c.attempts)
_DOCUMENT_PUBLISHED = (update(_DOCUMENTS).where(_DOCUMENTS.c.id == bindparam("document"))
                       .values(published_at=bindparam("at"), public_url=bindparam("url")))


class TooEarlyError(EmbargoError):
    """Raised if, against every check, a write was about to happen before the
    embargo instant. Never caught and ignored."""


class PublishStatus(StrEnum):
    """How one call of :meth:`Publisher.publish` ended."""

    PUBLISHED = "published"
    NOT_YET = "not_yet"  # before the instant, or stopping: the job runs again
    NOT_OURS = "not_ours"  # another node holds the claim
    INACTIVE = "inactive"  # not queued or publishing (cancelled, published, gone)
    RETRY = "retry"  # this attempt failed; retried after a backoff
    FAILED = "failed"  # given up: state failed, owner told


class UnverifiableError(EmbargoError):
    """A document that does not decrypt or does not match its SHA-256: no
    retry mends it, and nothing of its release is made public."""


class PublicConflictError(StorageError):
    """Other bytes are already at a public key: never overwritten, a person
    has to look."""


PERMANENT = (UnverifiableError, PublicConflictError)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    status: PublishStatus
    release_id: str
    lateness_ms: float | None = None
    detail: str | None = None


class Commit:
    """Whether a transaction committed, for another thread to wait for."""

    def __init__(self) -> None:
        self._settled = threading.Event()
        self._committed = False

    def settle(self, committed: bool) -> None:
        self._committed = committed
        self._settled.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once it committed; False if it did not (or not within
        ``timeout`` seconds)."""
        return self._settled.wait(timeout) and self._committed


@dataclass(frozen=True, kw_only=True)
class HandedNotices:
    """The notices of publication one finish created, already claimed for
    ``token`` until ``until`` (by the publisher's clock), as inserted: what
    their sender needs to send them at once, without a claim or a read.
    ``inputs``, ``people`` and ``lateness_ms`` are what the releases were
    published with (``release.notices.release_inputs`` per release id; each
    recipient's name and organisation; how late each became public), for
    the notices built ahead to be checked against. They are handed over
    while the transaction that inserts them is committing: nothing may be
    read, written or sent for them before ``committed`` says it did."""

    token: str
    until: datetime
    rows: tuple[OutboxMessage, ...]
    inputs: dict[str, tuple[object, ...]]
    people: dict[str, tuple[str, str | None]]
    lateness_ms: dict[str, float]
    committed: Commit = field(default_factory=Commit)


class NoticeTaker(Protocol):
    """Who sends the notices a finish creates, when it can take them as
    they are committed (the scheduler node's relay). The rows are inserted
    claimed for :meth:`token`, for ``lease``; a taker that dies, or fails to
    take them, leaves the claims to lapse, and any relay sends them then."""

    @property
    def lease(self) -> timedelta: ...

    def token(self) -> str | None:
        """A claim token for the next finish's notices; None to leave them
        unclaimed, for any relay (e.g. while this node's clock is not
        trusted)."""

    def most(self) -> int | None:
        """How many of them to claim for it (the first, in order; an owner's
        summary only with all of its release's other notices); None for all.
        The rest are left unclaimed, for any relay."""

    def take(self, notices: HandedNotices) -> None:
        """The notices, as the finish commits (``notices.committed``).
        Returns at once."""


@dataclass(frozen=True, kw_only=True)
class _NoticeClaim:
    """For one finish: the first ``most`` of its notices (all if None)
    inserted claimed for ``taker``'s ``token`` until ``until``."""

    taker: NoticeTaker
    token: str
    until: datetime
    most: int | None


@dataclass(frozen=True, kw_only=True)
class _Doc:
    id: str
    filename: str
    kind: str
    organisation: str | None
    size: int
    sha256: str
    content_type: str


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """What publication needs of a release, read once, in the claim."""

    release_id: str
    slug: str
    title: str
    owner: str | None
    instant: datetime
    zone: str
    wall: str
    attempts: int
    # Claimed while queued: staged under a claim that a cancel or a reschedule
    # still overrules, until it is made ``publishing`` just before the instant.
    fresh: bool
    documents: tuple[_Doc, ...]
    # (id, address, name, organisation), in the release's order
    recipients: tuple[tuple[str, str, str, str | None], ...]

    def key(self, doc: _Doc) -> str:
        return f"{self.slug}/{doc.filename}"


@dataclass(eq=False)
class _Job:
    """One release of a publication run, and what was made ready for it
    before the instant."""

    plan: _Plan
    folder: Path
    staged: dict[str, Path] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)  # document id -> public URL
    manifest: _Manifest | None = None
    # Its notices of publication, built before the instant but for their times and
    # ids (filled in by the finish): handed to their sender as committed.
    notices: list[OutboxMessage] = field(default_factory=list)
    inputs: tuple[object, ...] = ()  # release.notices.release_inputs, as it will be published
    published_at: datetime | None = None  # when its last document became public
    error: Exception | None = None
    found: int = 0  # documents an earlier attempt had made public already
    # Its staging folder, removed when the run ends or as soon as the release is let
    # go (cancelled or moved away while it waited: its plaintext goes at once).
    cleanup: ExitStack = field(default_factory=ExitStack)
    dropped: bool = False  # let go before the instant; its outcome is recorded

    @property
    def release_id(self) -> str:
        return self.plan.release_id


@dataclass(frozen=True, kw_only=True)
class _Manifest:
    """A release's manifest, built before the instant but for the moment it
    became public (filled in at the instant)."""

    key: str
    title: str
    listing: list[dict[str, object]]
    template: str  # the JSON text, with ``token`` where the time goes
    token: str

    def render(self, published_at: datetime, instant: datetime) -> bytes:
        timing = (f'"published_at": {json.dumps(_iso(published_at))},\n'
                  f'  "lateness_ms": {json.dumps(_ms(published_at - instant))}')
        return self.template.replace(self.token, timing).encode()


class _CollectorPause:
    """Python's cyclic garbage collector off while in a block (from the last
    wait for an instant until its finish has committed: a fraction of a
    second), and back as it was once the last of overlapping blocks ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._was_enabled = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._was_enabled:
                    gc.enable()


_collector_paused = _CollectorPause()


def message_id(release_id: str, purpose: str, recipient_id: str | None) -> str:
    """Stable per (release, purpose, recipient), and short enough that the
    header is never folded."""
    who = recipient_id.removeprefix("rcp_") if recipient_id else "owner"
    return f"<{release_id.removeprefix('rel_')}.{purpose}.{who}@embargo.invalid>"


class Publisher:
    """Publishes releases. One per process; ``claimant`` names it in leases.

    ``clock_reading`` gives this node's latest clock measurement (its node
    monitor's); None until one was made, and then the publisher waits for
    it. Without one the publisher measures the clock itself, once per
    publication. ``trusted_skew`` (the node's skew limit) bounds the skew
    used to turn local times into reference-clock times. ``freeze_before``:
    how long before the instant a release claimed while queued becomes
    ``publishing`` (until then a cancel or a reschedule still wins);
    ``watch_every``: how often, while it waits for that, the publisher
    looks whether one was cancelled or moved (it lets a cancelled one go,
    its plaintext removed, at once; one moved to another instant within the
    run's window is published then, earlier or later, and one moved beyond
    it is given back)."""

    def __init__(self, services: Services, private_key: X25519PrivateKey, *, claimant: str,
                 lease: timedelta = timedelta(seconds=30),
                 stop: threading.Event | None = None, workers: int = 1,
                 clock_reading: Callable[[], ClockReading | None] | None = None,
                 trusted_skew: timedelta = timedelta(milliseconds=500),
                 freeze_before: timedelta = timedelta(milliseconds=200),
                 watch_every: timedelta = timedelta(milliseconds=200)) -> None:
        self.workers = max(1, workers)
        self.s = services
        self.key = private_key
        self.claimant = claimant
        self.lease = lease
        self.stop = stop or threading.Event()
        self.sessions = services.sessions
        self.clock_reading = clock_reading
        self.trusted_skew = trusted_skew
        self.freeze_before = freeze_before
        self.watch_every = watch_every
        self._pool_lock = threading.Lock()
        self._pools: dict[str, ThreadPoolExecutor] = {}
        # Who sends the notices as the finish commits them (the scheduler sets its
        # relay); without one they wait for any relay's next claim.
        self.notices: NoticeTaker | None = None

    def publish(self, release_id: str, *, wait_up_to: timedelta = timedelta(0)) -> Outcome:
        """Publish ``release_id`` if its instant has come.

        If the instant is more than ``wait_up_to`` away, nothing happens
        (``not_yet``): the caller reschedules. Within it, the release is
        claimed, every document staged and verified, and the publisher waits
        for the instant by the reference clock. ``not_ours`` means another
        publisher holds the claim."""
        return self.publish_many([release_id], wait_up_to=wait_up_to)[0]

    def publish_many(self, release_ids: Sequence[str], *,
                     wait_up_to: timedelta = timedelta(0)) -> list[Outcome]:
        """Publish several releases as :meth:`publish` does one, returning
        an outcome for each, in order. They are claimed in one statement and
        staged together; those due at one instant are waited for once, made
        public together and finished in one transaction. Each keeps its own
        outcome: one that fails (a tampered document, a lost claim) does not
        hold up or fail the others."""
        ids = list(dict.fromkeys(release_ids))
        outcomes: dict[str, Outcome] = {}
        claimed_at = time.monotonic()  # the leases taken hold at least this long
        plans = self._claim(ids, self.s.clock.now(), wait_up_to, outcomes)
        if plans:
            with _LeaseKeeper(self, [p.release_id for p in plans], claimed_at) as keeper, \
                    ExitStack() as folders:
                pending = self._stage_all(plans, keeper, folders, outcomes)
                while pending:  # the earliest instant first; a release moved meanwhile
                    instant = min(job.plan.instant for job in pending)  # is grouped again
                    group = [job for job in pending if job.plan.instant == instant]
                    rest = [job for job in pending if job.plan.instant != instant]
                    back = self._publish_at(instant, group, rest, keeper, outcomes,
                                            wait_up_to)
                    pending = [job for job in rest + back if not job.dropped]
        return [outcomes[release_id] for release_id in release_ids]

    # -- claim ---------------------------------------------------------------
    def _claim(self, ids: list[str], now: datetime, wait_up_to: timedelta,
               outcomes: dict[str, Outcome]) -> list[_Plan]:
        """The compare-and-set, for every release at once: exactly one
        publisher gets each. A queued release stays queued (see ``fresh``);
        one left ``publishing`` by a publisher whose lease lapsed is resumed.
        Loads what publication needs in the same transaction."""
        with transaction(self.sessions) as session:
            connection = session.connection()
            claimed = connection.execute(
                update(_RELEASES)
                .where(_RELEASES.c.id.in_(ids),
                       _RELEASES.c.state.in_((QUEUED, PUBLISHING)),
                       _RELEASES.c.instant <= now + wait_up_to,
                       or_(_RELEASES.c.lease_expires_at.is_(None),
                           _RELEASES.c.lease_expires_at < now))
                .values(claimant=self.claimant, lease_expires_at=now + self.lease,
                        revision=_RELEASES.c.revision + 1, attempts=_RELEASES.c.attempts + 1)
                .returning(*_CLAIMED)).all()
            rows = {row.id: row for row in claimed}
            missing = [release_id for release_id in ids if release_id not in rows]
            found = {r.id: r for r in connection.execute(
                select(_RELEASES.c.id, _RELEASES.c.state, _RELEASES.c.instant)
                .where(_RELEASES.c.id.in_(missing)))} if missing else {}
            documents: dict[str, list[_Doc]] = {release_id: [] for release_id in rows}
            recipients: dict[str, list[tuple[str, str, str, str | None]]] = {
                release_id: [] for release_id in rows}
            if rows:
                for r in connection.execute(
                        select(_DOCUMENTS.c.release_id, _DOCUMENTS.c.id, _DOCUMENTS.c.filename,
                               _DOCUMENTS.c.kind, _DOCUMENTS.c.organisation, _DOCUMENTS.c.size,
                               _DOCUMENTS.c.sha256, _DOCUMENTS.c.content_type)
                        .where(_DOCUMENTS.c.release_id.in_(list(rows)))
                        .order_by(_DOCUMENTS.c.release_id, _DOCUMENTS.c.position)):
                    documents[r.release_id].append(_Doc(
                        id=r.id, filename=r.filename, kind=r.kind, organisation=r.organisation,
                        size=r.size, sha256=r.sha256, content_type=r.content_type))
                for p in connection.execute(
                        select(_RECIPIENTS.c.release_id, _RECIPIENTS.c.id, _RECIPIENTS.c.email,
                               _RECIPIENTS.c.name, _RECIPIENTS.c.organisation)
                        .where(_RECIPIENTS.c.release_id.in_(list(rows)))
                        .order_by(_RECIPIENTS.c.release_id, _RECIPIENTS.c.position)):
                    recipients[p.release_id].append((p.id, p.email, p.name, p.organisation))
        for release_id in missing:
            row = found.get(release_id)
            if row is None or row.state not in (QUEUED, PUBLISHING):
                status = PublishStatus.INACTIVE
            elif row.instant - now > wait_up_to:
                status = PublishStatus.NOT_YET
            else:
                status = PublishStatus.NOT_OURS
            outcomes[release_id] = Outcome(status=status, release_id=release_id)
        return [_Plan(release_id=r.id, slug=r.slug, title=r.title, owner=r.owner,
                      instant=r.instant, zone=r.zone, wall=r.wall,
                      attempts=r.attempts, fresh=r.state == QUEUED,
                      documents=tuple(documents[r.id]), recipients=tuple(recipients[r.id]))
                for r in (rows[release_id] for release_id in ids if release_id in rows)]

    def _renew(self, release_ids: Collection[str]) -> set[str]:
        """Extend the lease on ``release_ids``; returns those still ours."""
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            return set(session.connection().execute(
                update(_RELEASES)
                .where(_RELEASES.c.id.in_(list(release_ids)),
                       _RELEASES.c.state.in_((QUEUED, PUBLISHING)),
                       _RELEASES.c.claimant == self.claimant)
                .values(lease_expires_at=now + self.lease)
                .returning(_RELEASES.c.id)).scalars())

    def _freeze(self, instant: datetime, jobs: list[_Job], keeper: _LeaseKeeper,
                outcomes: dict[str, Outcome], window: timedelta
                ) -> tuple[list[_Job], list[_Job]]:
        """Just before the instant, make the fresh releases of ``jobs``
        ``publishing`` (from then on cancel and reschedule refuse them), if
        they are still queued, still ours and still due at ``instant``.
        Returns the jobs that go on, and those moved meanwhile to another
        instant within ``window`` (published then); the others are let go."""
        fresh = [job for job in jobs if job.plan.fresh]
        if not fresh:
            return jobs, []
        try:
            with transaction(self.sessions) as session:
                moved = set(session.connection().execute(
                    update(_RELEASES)
                    .where(_RELEASES.c.id.in_([job.release_id for job in fresh]),
                           _RELEASES.c.state == QUEUED,
                           _RELEASES.c.claimant == self.claimant,
                           _RELEASES.c.instant == instant)
                    .values(state=PUBLISHING, revision=_RELEASES.c.revision + 1)
                    .returning(_RELEASES.c.id)).scalars())
        except StorageError as exc:
            for job in fresh:
                outcomes[job.release_id] = self._failed(job.plan, exc)
            return [job for job in jobs if not job.plan.fresh], []
        changed = [job for job in fresh if job.release_id not in moved]
        if changed:
            self._look(changed, keeper, outcomes, window)
        return ([job for job in jobs if not job.plan.fresh or job.release_id in moved],
                [job for job in changed if not job.dropped])

    def _look(self, jobs: list[_Job], keeper: _LeaseKeeper, outcomes: dict[str, Outcome],
              window: timedelta) -> bool:
        """Whether any of the fresh ``jobs`` was changed since it was
        claimed (cancelled, moved, or its claim taken); each changed one is
        let go (its outcome recorded, its plaintext removed) or, if it was
        moved to an instant within ``window`` of now and is still queued and
        ours, given its new instant (its manifest made again)."""
        try:
            with read_transaction(self.sessions) as session:
                rows = {row.id: row for row in session.connection().execute(
                    select(_RELEASES.c.id, _RELEASES.c.state, _RELEASES.c.claimant,
                           _RELEASES.c.instant, _RELEASES.c.zone, _RELEASES.c.wall)
                    .where(_RELEASES.c.id.in_([job.release_id for job in jobs])))}
        except StorageError as exc:  # the freeze, or the next look, will tell
            log.warning("could not look whether the releases waiting changed: %s", exc)
            return False
        now = self.s.clock.now()
        changed = False
        for job in jobs:
            row = rows.get(job.release_id)
            ours = row is not None and row.state == QUEUED and row.claimant == self.claimant
            if row is not None and ours and row.instant == job.plan.instant:
                continue
            changed = True
            if row is not None and ours and row.instant <= now + window:
                log.info("release %s was moved from %s to %s while it was staged: publishing "
                         "it then", job.release_id, _iso(job.plan.instant), _iso(row.instant))
                job.plan = replace(job.plan, instant=row.instant, zone=row.zone, wall=row.wall)
                self._prepare_manifest(job)
                continue
            state = row.state if row is not None else None
            log.info("release %s changed while it was staged (now %s): not publishing it "
                     "at %s", job.release_id, state or "gone", _iso(job.plan.instant))
            job.dropped = True
            keeper.done([job.release_id])
            self._give_back([job.plan])
            status = (PublishStatus.NOT_YET if state == QUEUED
                      else PublishStatus.NOT_OURS if state == PUBLISHING
                      else PublishStatus.INACTIVE)
            outcomes[job.release_id] = Outcome(status=status, release_id=job.release_id,
                                               detail="changed before the instant")
            job.cleanup.close()
        return changed

    def _give_back(self, plans: Sequence[_Plan]) -> None:
        """Give back claims taken before the instant, when nothing was
        published by them (stopping, a clock that stepped back, a release
        changed meanwhile): a fresh one goes back to the queue; a resumed one
        keeps its state and only loses its claimant."""
        fresh = [p.release_id for p in plans if p.fresh]
        resumed = [p.release_id for p in plans if not p.fresh]
        with transaction(self.sessions) as session:
            connection = session.connection()
            if fresh:
                connection.execute(
                    update(_RELEASES)
                    .where(_RELEASES.c.id.in_(fresh), _RELEASES.c.claimant == self.claimant,
                           _RELEASES.c.state.in_((QUEUED, PUBLISHING)),
                           _RELEASES.c.started_at.is_(None))
                    .values(state=QUEUED, claimant=None, lease_expires_at=None,
                            revision=_RELEASES.c.revision + 1,
                            attempts=_RELEASES.c.attempts - 1))
            if resumed:
                connection.execute(
                    update(_RELEASES)
                    .where(_RELEASES.c.id.in_(resumed), _RELEASES.c.claimant == self.claimant,
                           _RELEASES.c.state == PUBLISHING)
                    .values(claimant=None, lease_expires_at=None,
                            revision=_RELEASES.c.revision + 1,
                            attempts=_RELEASES.c.attempts - 1))

    # -- phase one: stage and verify, before the instant ---------------------------
    def _stage_all(self, plans: list[_Plan], keeper: _LeaseKeeper, folders: ExitStack,
                   outcomes: dict[str, Outcome]) -> list[_Job]:
        """Stage every release (several at once when there are several);
        those that fail are recorded as failed and left out."""
        jobs: list[_Job] = []
        for plan in plans:
            cleanup = ExitStack()
            try:
                folder = cleanup.enter_context(self.s.public.staging.folder(plan.release_id))
            except Exception as exc:
                keeper.done([plan.release_id])
                outcomes[plan.release_id] = self._failed(plan, exc)
                continue
            folders.callback(cleanup.close)
            jobs.append(_Job(plan=plan, folder=folder, cleanup=cleanup))
        if len(jobs) > 1 and self.workers > 1:
            list(self._pool("stage").map(lambda job: self._stage_job(job, keeper), jobs))
        else:
            for job in jobs:
                self._stage_job(job, keeper)
        for job in jobs:
            if job.error is not None:
                keeper.done([job.release_id])
                outcomes[job.release_id] = self._failed(job.plan, job.error)
        return [job for job in jobs if job.error is None]

    def _stage_job(self, job: _Job, keeper: _LeaseKeeper) -> None:
        try:
            job.staged = self._stage(job.plan, job.folder, keeper)
            self._prepare(job)
        except Exception as exc:
            job.error = exc

    def _stage(self, plan: _Plan, folder: Path, keeper: _LeaseKeeper) -> dict[str, Path]:
        """Decrypt every document into ``folder`` (files of mode 0600) and
        check each against its recorded size and SHA-256. Raises
        UnverifiableError naming the first document that does not verify."""
        release_id = plan.release_id
        try:
            sealed_dek = self.s.vault.get_bytes(dek_key(release_id))
        except NotFoundError:
            raise StorageError(f"the data key of {release_id} is missing from the vault "
                               "(restore it from a backup)") from None
        try:
            dek = sealing.open_dek(sealed_dek, self.key, release_id)
        except SealError as exc:
            raise UnverifiableError(f"the data key of {release_id}: {exc}") from None
        staged: dict[str, Path] = {}
        began = time.perf_counter()
        for doc in plan.documents:
            keeper.check(release_id)
            path = folder / doc.id
            try:
                with self.s.vault.reader(document_key(release_id, doc.id)) as sealed, \
                        write_private(path) as out:
                    opened = sealing.open_stream(dek, doc.id, sealed, out)
                    out.flush()
                    os.fsync(out.fileno())  # durable once linked into place
            except SealError as exc:
                raise UnverifiableError(f"{doc.filename}: {exc}") from None
            except NotFoundError:
                raise StorageError(f"{doc.filename}: its sealed copy is missing from the vault "
                                   "(restore it from a backup)") from None
            if opened.sha256 != doc.sha256 or opened.size != doc.size:
                raise UnverifiableError(f"{doc.filename}: decrypts to other content than was "
                                        f"queued ({opened.size} bytes, sha256 "
                                        f"{opened.sha256[:12]}…; expected {doc.size} bytes, "
                                        f"{doc.sha256[:12]}…)")
            staged[doc.id] = path
        took = time.perf_counter() - began
        size = sum(doc.size for doc in plan.documents)
        log.info("release %s: %d documents (%.1f MiB) staged and verified in %.0f ms "
                 "(%.0f MiB/s)", release_id, len(staged), size / 2**20, took * 1000,
                 size / 2**20 / took if took > 0 else 0.0)
        return staged

    def _prepare(self, job: _Job) -> None:
        """Everything else that does not have to wait for the instant: each
        document made ready for its public place (a folder's public mode,
        inside the private staging folder), its URL, and the manifest but
        for its time."""
        plan, public = job.plan, self.s.public
        for doc in plan.documents:
            key = plan.key(doc)
            public.prepare_file(key, job.staged[doc.id], content_type=doc.content_type,
                                size=doc.size, sha256=doc.sha256)
            job.urls[doc.id] = public.url(key)
        self._prepare_manifest(job)
        targets: list[tuple[str | None, str, str]] = [
            (rid, email, Purpose.PUBLISHED) for rid, email, _, _ in plan.recipients]
        if plan.owner:
            targets.append((None, plan.owner, Purpose.OWNER_SUMMARY))
        job.notices = [OutboxMessage(message_id=message_id(plan.release_id, purpose, rid),
                                     release_id=plan.release_id, recipient_id=rid,
                                     purpose=purpose, to_addr=address, attempts=0)
                       for rid, address, purpose in targets]

    def _prepare_manifest(self, job: _Job) -> None:
        """The manifest of ``job``, but for its time; and what its notices
        will be built from (both name its instant)."""
        plan = job.plan
        job.inputs = release_inputs(
            plan.release_id, plan.title, plan.instant, plan.zone, plan.wall,
            [(d.kind, d.filename, d.organisation, job.urls[d.id]) for d in plan.documents])
        embargo = timerules.Embargo(instant=plan.instant, zone=plan.zone, wall=plan.wall)
        listing: list[dict[str, object]] = [
            {"name": d.filename, "kind": d.kind, "organisation": d.organisation,
             "size": d.size, "sha256": d.sha256, "content_type": d.content_type,
             "url": job.urls[d.id]} for d in plan.documents]
        token = f"@@{secrets.token_hex(16)}@@"
        body = {
            "title": plan.title,
            "embargo": {"local": embargo.local.isoformat(), "zone": embargo.zone,
                        "utc": embargo.instant.isoformat().replace("+00:00", "Z"),
                        "text": embargo.describe_long()},
            token: None,
            "clock": "reference (the database server's)",
            "documents": listing,
        }
        template = json.dumps(body, indent=2, ensure_ascii=False) + "\n"
        job.manifest = _Manifest(key=f"{plan.slug}/manifest.json", title=plan.title,
                                 listing=listing, token=f'"{token}": null',
                                 template=template)

    # -- the instant -------------------------------------------------------------
    def _reading(self) -> ClockReading | None:
        """This node's clock against the reference clock; waits for a first
        measurement. None if told to stop first."""
        if self.clock_reading is None:
            return measure_clock(self.s.engine, self.s.clock)
        warned = False
        while (reading := self.clock_reading()) is None:
            if not warned:
                log.warning("waiting for this node's clock to be measured before publishing")
                warned = True
            if self.stop.wait(0.05):
                return None
        return reading

    def _wait_for_instant(self, instant: datetime) -> ClockReading | None:
        """Wait until the true time is surely at or past ``instant``: the
        local clock past the instant plus this node's skew and its
        uncertainty, then the reference clock itself asked, then the clock
        this node stamps files with (:meth:`Clock.stamp_now`). Returns the
        clock reading used, or None if told to stop first."""
        reading = self._reading()
        if reading is None or not self.s.clock.sleep_until(reading.safe_local(instant),
                                                           self.stop):
            return None
        while True:
            with read_only(self.s.engine).connect() as connection:  # no writer lock
                server = server_time(connection)
            if server >= instant:
                break
            gap = (instant - server).total_seconds()
            log.warning("the database server's clock is %.1f ms before the embargo although "
                        "ours is past it: waiting for it", gap * 1000)
            if self.stop.wait(min(max(gap, 0.0005), 1.0)):
                return None
        # And this node's file clock: no public file may carry a time before the
        # instant, though the kernel stamps files from a clock up to a tick behind.
        while self.s.clock.stamp_now() < instant:
            if self.stop.wait(0.0005):
                return None
        return reading

    def _reference_now(self, reading: ClockReading) -> datetime:
        return reading.reference(self.s.clock.now(), trusted=self.trusted_skew)

    def _check_time(self, instant: datetime, reading: ClockReading) -> None:
        now = self.s.clock.now()
        if now < reading.safe_local(instant):
            raise TooEarlyError(f"refusing to publish {now.isoformat()} (by this node's clock, "
                                f"{reading.skew_ms:+.1f} ms off the reference) before the "
                                f"embargo {instant.isoformat()}")

    def _publish_at(self, instant: datetime, jobs: list[_Job], later: list[_Job],
                    keeper: _LeaseKeeper, outcomes: dict[str, Outcome],
                    window: timedelta) -> list[_Job]:
        """Wait for ``instant`` (once, for every release due then), then make
        them public and finish them. While waiting for the freeze, the fresh
        releases of ``jobs`` and ``later`` (due after it) are watched: if one
        changed, the jobs still to publish are returned, to be grouped by
        instant again (nothing is published then)."""
        if any(job.plan.fresh for job in jobs):
            waited = self._wait_watching(instant - self.freeze_before, jobs + later, keeper,
                                         outcomes, window)
            if waited is None:
                self._let_go(jobs, keeper, outcomes, "stopping")
                return []
            if not waited:
                return [job for job in jobs if not job.dropped]
            jobs, again = self._freeze(instant, jobs, keeper, outcomes, window)
            keeper.done([r for r in outcomes])
            if not jobs:
                return again
        else:
            again = []
        with _collector_paused():  # no collection pause from the last wait to the commit
            reading = self._wait_for_instant(instant)
            if reading is None:
                self._let_go(jobs, keeper, outcomes, "stopping")
                return again
            try:
                self._check_time(instant, reading)
            except TooEarlyError as exc:
                log.error("%s", exc)
                self._let_go(jobs, keeper, outcomes, str(exc))
                return again
            self._go_public(jobs, keeper, reading, outcomes)
        return again

    def _wait_watching(self, until: datetime, jobs: list[_Job], keeper: _LeaseKeeper,
                       outcomes: dict[str, Outcome], window: timedelta) -> bool | None:
        """Wait until ``until`` by the clock, looking every ``watch_every``
        whether a fresh one of ``jobs`` was changed (see :meth:`_look`).
        True when the time has come; False as soon as one changed; None if
        told to stop first."""
        fresh = [job for job in jobs if job.plan.fresh and not job.dropped]
        every = self.watch_every.total_seconds()
        look_at = time.monotonic() + every
        while True:
            remaining = (until - self.s.clock.now()).total_seconds()
            if remaining <= 0:
                return True
            if self.stop.is_set():
                return None
            if fresh and time.monotonic() >= look_at:
                if self._look(fresh, keeper, outcomes, window):
                    return False
                look_at = time.monotonic() + every
            self.stop.wait(min(remaining, every / 4, 0.05))

    def _let_go(self, jobs: list[_Job], keeper: _LeaseKeeper, outcomes: dict[str, Outcome],
                detail: str) -> None:
        keeper.done([job.release_id for job in jobs])
        self._give_back([job.plan for job in jobs])
        for job in jobs:
            outcomes[job.release_id] = Outcome(status=PublishStatus.NOT_YET,
                                               release_id=job.release_id, detail=detail)

    # -- phase two: make public ------------------------------------------------------
    def _go_public(self, jobs: list[_Job], keeper: _LeaseKeeper, reading: ClockReading,
                   outcomes: dict[str, Outcome]) -> None:
        """Link (or put) every staged document in place, then the manifests,
        then one transaction for all. That publication started is recorded
        beside it, not before it: a publisher that dies first leaves its
        releases ``publishing``, and the next claimant resumes them."""
        started = self._reference_now(reading)
        recorder: Future[None] | None = None
        with self.s.public.batch() as batch:
            try:
                self._publish_documents(batch, jobs, keeper, reading)
                # Every attempt that reached the instant counts, a failing one too.
                recorder = self._pool("record", 1).submit(self._record_started, jobs, started)
                public = [job for job in jobs if job.error is None]
                batch.flush()
                for job in public:
                    try:
                        assert job.published_at is not None
                        job.published_at = self._write_manifest(batch, job, job.published_at)
                    except Exception as exc:
                        job.error = exc
                batch.flush()
            except Exception as exc:  # the batch itself failed (its folders' fsync)
                for job in jobs:
                    job.error = job.error or exc
            finally:
                if recorder is not None:
                    try:
                        recorder.result()
                    except Exception as exc:  # the finish records it, or fails the same way
                        log.warning("could not record that publication started: %s", exc)
        keeper.done([job.release_id for job in jobs])
        for job in jobs:
            if job.error is not None:
                outcomes[job.release_id] = self._failed(job.plan, job.error)
        done = [job for job in jobs if job.error is None]
        if not done:
            return
        try:
            outcomes.update(self._finish(done, started))
        except Exception as exc:
            if len(done) == 1:
                outcomes[done[0].release_id] = self._failed(done[0].plan, exc)
                return
            log.warning("finishing %d releases together failed (%s): finishing each alone",
                        len(done), exc)
            for job in done:
                try:
                    outcomes.update(self._finish([job], started))
                except Exception as one:
                    outcomes[job.release_id] = self._failed(job.plan, one)

    def _publish_documents(self, batch: PublicBatch, jobs: list[_Job], keeper: _LeaseKeeper,
                           reading: ClockReading) -> None:
        """Every document of ``jobs``, in order; on a store where it helps,
        several at once. A failure fails its own release only."""
        total = sum(len(job.plan.documents) for job in jobs)
        if not self.s.public.parallel_writes or self.workers == 1 or total < 2:
            for job in jobs:
                try:
                    keeper.check(job.release_id)
                    for doc in job.plan.documents:
                        job.found += self._publish_document(batch, job.plan, doc,
                                                            job.staged[doc.id])
                    job.published_at = self._reference_now(reading)
                except Exception as exc:
                    job.error = exc
            return
        pool = self._pool("publish")
        left: dict[_Job, int] = {job: len(job.plan.documents) for job in jobs}
        futures: dict[Future[None], _Job] = {}
        for job in jobs:
            for doc in job.plan.documents:
                futures[pool.submit(self._publish_one, keeper, batch, job, doc)] = job
            if not job.plan.documents:
                job.published_at = self._reference_now(reading)
        for future in as_completed(futures):
            job = futures[future]
            if future.cancelled():
                continue
            error = future.exception()
            if error is not None:
                if job.error is None:
                    job.error = error if isinstance(error, Exception) else Exception(error)
                    for other, owner in futures.items():
                        if owner is job:
                            other.cancel()
                continue
            left[job] -= 1
            if left[job] == 0:
                job.published_at = self._reference_now(reading)

    def _publish_one(self, keeper: _LeaseKeeper, batch: PublicBatch, job: _Job,
                     doc: _Doc) -> None:
        if job.error is not None:
            return
        keeper.check(job.release_id)
        if self._publish_document(batch, job.plan, doc, job.staged[doc.id]):
            with self._pool_lock:
                job.found += 1

    def _publish_document(self, batch: PublicBatch, plan: _Plan, doc: _Doc,
                          staged: Path) -> int:
        """Make one document public; returns 1 if an earlier attempt had
        already (the same bytes), else 0."""
        key = plan.key(doc)
        found = 0
        try:
            stored = batch.publish_file(key, staged, content_type=doc.content_type,
                                        size=doc.size, sha256=doc.sha256)
        except ObjectExistsError:  # an earlier attempt got this far, or someone else did
            stored = self.s.public.stat(key)
            found = 1
        if stored.sha256 != doc.sha256 or stored.size != doc.size:
            raise PublicConflictError(
                f"{self.s.public.url(key)} holds other content than {doc.filename} "
                f"({stored.size} bytes, sha256 {stored.sha256[:12]}…; expected {doc.size} "
                f"bytes, {doc.sha256[:12]}…); refusing to overwrite it")
        return found

    def _record_started(self, jobs: list[_Job], started: datetime) -> None:
        """That publication started (or resumed), in one transaction for
        every release of the instant."""
        with transaction(self.sessions) as session:
            first = set(session.connection().execute(
                update(_RELEASES)
                .where(_RELEASES.c.id.in_([job.release_id for job in jobs]),
                       _RELEASES.c.claimant == self.claimant,
                       _RELEASES.c.started_at.is_(None))
                .values(started_at=started).returning(_RELEASES.c.id)).scalars())
            for job in jobs:
                # An attempt that died before recording its start still left documents
                # public: this one resumes it.
                resumed = job.release_id not in first or job.found > 0
                details: dict[str, object] = {"lateness_ms": _ms(started - job.plan.instant),
                                              "attempt": job.plan.attempts}
                if job.found:
                    details["found_public"] = job.found
                audit.record(session, action="publication_resumed" if resumed
                             else "publication_started", actor=self.claimant, at=started,
                             release_id=job.release_id, details=details)

    def _write_manifest(self, batch: PublicBatch, job: _Job, published_at: datetime) -> datetime:
        """Write the manifest, last; returns when the release became public
        (an earlier attempt's, if its manifest is there already)."""
        manifest = job.manifest
        assert manifest is not None
        data = manifest.render(published_at, job.plan.instant)
        path = job.folder / "manifest.json"
        with write_private(path) as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        digest = hashlib.sha256(data).hexdigest()
        public = self.s.public  # a folder's batch gives the file its public mode itself
        try:
            batch.publish_file(manifest.key, path, content_type="application/json",
                               size=len(data), sha256=digest)
        except ObjectExistsError:
            with public.reader(manifest.key) as existing:
                try:
                    found = json.loads(existing.read())
                    same = (found["documents"] == manifest.listing
                            and found["title"] == manifest.title)
                    earlier = datetime.fromisoformat(found["published_at"])
                except (ValueError, KeyError, TypeError):
                    same = False
            if not same:
                raise PublicConflictError(f"{public.url(manifest.key)} exists with other "
                                          "content; refusing to overwrite it") from None
            return earlier
        return published_at

    def _finish(self, jobs: list[_Job], started: datetime) -> dict[str, Outcome]:
        """Mark the releases published, stamp their documents and fill the
        outbox, in one transaction for all. Plain statements on the
        connection, from what was loaded in the claim and made ready before
        the instant: this is on the path of every release at the instant.
        A release whose claim was lost meanwhile is left out (and reported).
        The notices are inserted claimed for :attr:`notices`' token and handed
        to it as the transaction commits, with the commit to wait for
        (:class:`HandedNotices`)."""
        now = self.s.clock.now()
        outcomes: dict[str, Outcome] = {}
        lost: list[_Job] = []
        claim: _NoticeClaim | None = None
        taker = self.notices
        try:  # the documents are public: the notices must not fail the finish
            token = taker.token() if taker is not None else None
            if taker is not None and token is not None:
                claim = _NoticeClaim(taker=taker, token=token, until=now + taker.lease,
                                     most=taker.most())
        except Exception:
            log.exception("the notices' sender could not take them; left to any relay")
        commit = Commit()  # what the notices' sender waits for
        try:
            self._finish_transaction(jobs, started, now, claim, commit, outcomes, lost)
        except BaseException:
            commit.settle(False)
            raise
        commit.settle(True)
        for job in jobs:
            if job.release_id in outcomes:
                log.info("release %s published (%d documents), %.1f ms late", job.release_id,
                         len(job.plan.documents), outcomes[job.release_id].lateness_ms)
        for job in lost:
            outcomes[job.release_id] = self._failed(
                job.plan, StorageError(f"lost the claim on {job.release_id} before finishing"))
        return outcomes

    def _finish_transaction(self, jobs: list[_Job], started: datetime, now: datetime,
                            claim: _NoticeClaim | None, commit: Commit,
                            outcomes: dict[str, Outcome], lost: list[_Job]) -> None:
        """The finish's transaction (see :meth:`_finish`): the notices are
        inserted (as ``claim`` says, if any), and those claimed handed over
        before it commits, with ``commit`` to wait for."""
        with transaction(self.sessions) as session:
            connection = session.connection()
            done: list[tuple[_Job, datetime, float]] = []
            for job in jobs:
                assert job.published_at is not None
                lateness_ms = _ms(job.published_at - job.plan.instant)
                if affected(connection.execute(
                        update(_RELEASES).where(_RELEASES.c.id == job.release_id,
                                                _RELEASES.c.state == PUBLISHING,
                                                _RELEASES.c.claimant == self.claimant)
                        .values(state=PUBLISHED, published_at=job.published_at,
                                lateness_ms=lateness_ms, lease_expires_at=None, reason=None,
                                failing_since=None,
                                started_at=func.coalesce(_RELEASES.c.started_at, started),
                                revision=_RELEASES.c.revision + 1))):
                    done.append((job, job.published_at, lateness_ms))
                else:
                    lost.append(job)
            # Every document was verified (its stored SHA-256 checked); the store itself
            # is the checkpoint a resumed publisher relies on.
            stamps = [{"document": d.id, "at": published_at, "url": job.urls[d.id]}
                      for job, published_at, _ in done for d in job.plan.documents]
            if stamps:
                connection.execute(_DOCUMENT_PUBLISHED, stamps)
            built = [row for job, _, _ in done for row in job.notices]
            taken = [] if claim is None else built[:claim.most] if claim.most is not None \
                else built
            notices = [{"message_id": row.message_id, "release_id": row.release_id,
                        "recipient_id": row.recipient_id, "purpose": row.purpose,
                        "to_addr": row.to_addr, "created_at": now, "not_before": now,
                        "attempts": 0, "next_attempt_at": now,
                        "claimed_by": claim.token if claim and i < len(taken) else None,
                        "claim_expires_at": claim.until if claim and i < len(taken) else None}
                       for i, row in enumerate(built)]
            if taken and claim is not None:  # the ids, for the rows built ahead
                ids = {mid: row_id for mid, row_id in connection.execute(
                    _OUTBOX.insert().returning(_OUTBOX.c.message_id, _OUTBOX.c.id), notices)}
                for row in taken:
                    row.id, row.claimed_by = ids[row.message_id], claim.token
                    row.claim_expires_at = claim.until
                    row.created_at = row.not_before = row.next_attempt_at = now
                handed = HandedNotices(
                    token=claim.token, until=claim.until, rows=tuple(taken), committed=commit,
                    inputs={job.release_id: job.inputs for job, _, _ in done},
                    people={rid: (name, organisation) for job, _, _ in done
                            for rid, _, name, organisation in job.plan.recipients},
                    lateness_ms={job.release_id: lateness for job, _, lateness in done})
                self._hand_over(claim.taker, handed)  # its sender waits for the commit
            elif notices:
                connection.execute(_OUTBOX.insert(), notices)
            for job, published_at, lateness_ms in done:
                audit.record(session, action="release_published", actor=self.claimant, at=now,
                             release_id=job.release_id,
                             details={"lateness_ms": lateness_ms,
                                      "documents": len(job.plan.documents),
                                      "notices": len(job.notices),
                                      "published_at": _iso(published_at)})
                outcomes[job.release_id] = Outcome(status=PublishStatus.PUBLISHED,
                                                   release_id=job.release_id,
                                                   lateness_ms=lateness_ms)

    @staticmethod
    def _hand_over(taker: NoticeTaker, notices: HandedNotices) -> None:
        """Hand the notices being committed to their sender; should it fail,
        the claims lapse and any relay sends them then."""
        try:
            taker.take(notices)
        except Exception:
            log.exception("could not hand %d notices to their sender; they go once their "
                          "claims lapse", len(notices.rows))

    def _pool(self, purpose: str, size: int | None = None) -> ThreadPoolExecutor:
        """This publisher's threads for ``purpose``, started once and kept."""
        with self._pool_lock:
            pool = self._pools.get(purpose)
            if pool is None:
                pool = self._pools[purpose] = ThreadPoolExecutor(
                    size or self.workers, thread_name_prefix=f"{purpose}-{self.claimant}")
            return pool

    # -- faults ------------------------------------------------------------------------
    def public_report(self, plan: _Plan) -> tuple[list[str], list[str]]:
        """The documents of ``plan`` that are public now, and those that are not."""
        public: list[str] = []
        hidden: list[str] = []
        for doc in plan.documents:
            try:
                (public if self.s.public.exists(plan.key(doc)) else hidden).append(doc.filename)
            except Exception:  # the store itself is failing: say we do not know
                hidden.append(f"{doc.filename} (unknown: the public location did not answer)")
        return public, hidden

    def _failed(self, plan: _Plan, exc: Exception) -> Outcome:
        release_id = plan.release_id
        if isinstance(exc, TooEarlyError):
            log.error("%s", exc)
            self._give_back([plan])
            return Outcome(status=PublishStatus.NOT_YET, release_id=release_id, detail=str(exc))
        now = self.s.clock.now()
        reason = str(exc) if isinstance(exc, EmbargoError) else f"{type(exc).__name__}: {exc}"
        permanent = isinstance(exc, PERMANENT)
        public, hidden = self.public_report(plan)
        try:
            return self._record_failure(plan, now, reason, permanent, public, hidden)
        except StorageError as db_exc:  # the database is failing too: the lease lapses
            log.warning("release %s: attempt failed (%s), and could not be recorded: %s",
                        release_id, reason, db_exc)
            return Outcome(status=PublishStatus.RETRY, release_id=release_id, detail=reason)


    def _record_failure(self, plan: _Plan, now: datetime, reason: str, permanent: bool,
                        public: list[str], hidden: list[str]) -> Outcome:
        release_id = plan.release_id
        with transaction(self.sessions) as session:
            connection = session.connection()
            row = connection.execute(select(_RELEASES.c.claimant, _RELEASES.c.failing_since,
                                            _RELEASES.c.state)
                                     .where(_RELEASES.c.id == release_id)).one_or_none()
            if row is None or row.state not in (QUEUED, PUBLISHING):  # cancelled meanwhile
                return Outcome(status=PublishStatus.INACTIVE, release_id=release_id,
                               detail=reason)
            if row.claimant != self.claimant:
                return Outcome(status=PublishStatus.NOT_OURS, release_id=release_id, detail=reason)
            since = row.failing_since or now
            delay = PUBLICATION.delay(plan.attempts)
            values: dict[str, object] = {"reason": reason, "failing_since": since,
                                         "revision": _RELEASES.c.revision + 1}
            if permanent:
                values.update(state=FAILED, lease_expires_at=None)
            else:
                values.update(lease_expires_at=now + delay)  # retried when this passes
            connection.execute(update(_RELEASES).where(_RELEASES.c.id == release_id,
                                                       _RELEASES.c.claimant == self.claimant)
                               .values(**values))
            repeat = self.s.alerts_repeat
            which = int((now - since) / repeat) if repeat > timedelta(0) else 0
            lines = [f"Release: {plan.title} ({release_id})",
                     f"Embargo: {describe_instant(plan.instant, plan.zone)}",
                     f"Problem: {reason}",
                     f"Public now ({len(public)} of {len(plan.documents)}): "
                     + (", ".join(public) or "nothing"),
                     "Not public: " + (", ".join(hidden) or "nothing")]
            if permanent:
                lines.append(f"No more attempts will be made: fix the cause, then run "
                             f"`embargo retry {release_id}` (or cancel it and "
                             f"`embargo unpublish {release_id}`).")
                alert = Alert(kind="publication_failed", key=f"{since.isoformat()}/final",
                              subject=f"FAILED: {plan.title} was not published", lines=lines)
            else:
                lines.append(f"Failing since {describe_instant(since, plan.zone)}; the next "
                             f"attempt is in {delay.total_seconds():.1f} s, and attempts go "
                             "on until it works.")
                alert = Alert(kind="publication_failing", key=f"{since.isoformat()}/{which}",
                              subject=f"AT RISK: {plan.title} is not published yet",
                              lines=lines)
            raise_alert(session, alert, release_id=release_id, owner=plan.owner,
                        alerts_to=self.s.alerts_to, now=now, actor=self.claimant)
            audit.record(session, action="publication_failed", actor=self.claimant, at=now,
                         release_id=release_id,
                         details={"reason": reason, "attempt": plan.attempts,
                                  "final": permanent, "public": public,
                                  "not_public": hidden})
        if permanent:
            log.error("release %s failed: %s", release_id, reason)
            return Outcome(status=PublishStatus.FAILED, release_id=release_id, detail=reason)
        log.warning("release %s: attempt failed, retrying in %s: %s", release_id, delay, reason)
        return Outcome(status=PublishStatus.RETRY, release_id=release_id, detail=reason)


class _LeaseKeeper:
    """Renews a publisher's claims every third of the lease while it works
    (one statement for all of them), so a long publication keeps them and a
    dead publisher loses them quickly. A renewal that fails (the database
    did not answer) is tried again soon; the claims are given up only when
    the last lease renewed may have lapsed (two thirds of it gone), since
    until then nobody else can have taken them."""

    def __init__(self, publisher: Publisher, release_ids: list[str],
                 renewed_at: float | None = None) -> None:
        self.publisher = publisher
        self._renewed_at = time.monotonic() if renewed_at is None else renewed_at
        self._ids = set(release_ids)
        self._lost: dict[str, str] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"lease-{release_ids[0]}")

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def done(self, release_ids: Iterable[str]) -> None:
        """Stop renewing these (finished, failed or given back)."""
        with self._lock:
            self._ids.difference_update(release_ids)

    def _run(self) -> None:
        lease = self.publisher.lease.total_seconds()
        every = pause = lease / 3
        while not self._done.wait(pause):
            pause = every
            with self._lock:
                ids = set(self._ids)
            if not ids:
                continue
            began = time.monotonic()
            try:
                held = self.publisher._renew(ids)
                why = "another publisher has it, or it was cancelled"
                self._renewed_at = began
            except Exception as exc:  # reported to the publishing threads by check()
                if began - self._renewed_at < lease - every:  # the lease still holds
                    log.warning("could not renew the claim on %s (%s): trying again",
                                ", ".join(sorted(ids)), exc)
                    pause = every / 4
                    continue
                held, why = set(), f"its lease could not be renewed: {exc}"
            with self._lock:
                for release_id in ids - held:
                    self._lost[release_id] = why
                self._ids &= held

    def check(self, release_id: str) -> None:
        """Raise if the claim on ``release_id`` was lost (another node may be
        publishing it)."""
        why = self._lost.get(release_id)
        if why is not None:
            raise StorageError(f"lost the claim on {release_id}: {why}")


def _ms(delta: timedelta) -> float:
    return round(delta.total_seconds() * 1000, 3)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
