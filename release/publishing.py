"""Publication at the embargo instant, in two phases.

In the lead window before the instant the claimant opens the data key and
decrypts every document completely into private staging (mode 0600, outside
the public tree), checking every tag and SHA-256. Only when all are verified,
and the reference clock (the database server's) says the instant has come,
does anything become public: each staged file is moved into place (a rename
on a folder, a create-only PUT on S3), then the manifest, then one
transaction marks the release published and fills the outbox.

Storage and database faults are retried with capped backoff, for as long as
they last, and alerted; a fault that no retry can mend (a tampered document,
other bytes already at a public key) fails the release with a report of what
is public and what is not. Every step is idempotent: a publisher that dies
part-way is resumed by whoever claims the release next, and nothing is
written twice."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session

from config.errors import EmbargoError, NotFoundError, SealError, StorageError
from config.retry import PUBLICATION
from release import audit, sealing, timerules
from release.alerts import Alert, raise_alert
from release.clock import ClockReading, measure_clock
from release.context import Services
from release.instants import describe_instant
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
from storage.base import ObjectExistsError, write_private
from storage.db import affected, server_time, transaction

log = logging.getLogger(__name__)


_RELEASES = table_of(Release)
_RECIPIENTS = table_of(Recipient)
_OUTBOX = table_of(OutboxMessage)
_DOCUMENTS = table_of(Document)
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
    started_at: datetime | None
    attempts: int
    documents: tuple[_Doc, ...]

    def key(self, doc: _Doc) -> str:
        return f"{self.slug}/{doc.filename}"


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
    used to turn local times into reference-clock times."""

    def __init__(self, services: Services, private_key: X25519PrivateKey, *, claimant: str,
                 lease: timedelta = timedelta(seconds=30),
                 stop: threading.Event | None = None, workers: int = 1,
                 clock_reading: Callable[[], ClockReading | None] | None = None,
                 trusted_skew: timedelta = timedelta(milliseconds=500)) -> None:
        self.workers = max(1, workers)
        self.s = services
        self.key = private_key
        self.claimant = claimant
        self.lease = lease
        self.stop = stop or threading.Event()
        self.sessions = services.sessions
        self.clock_reading = clock_reading
        self.trusted_skew = trusted_skew

    def publish(self, release_id: str, *, wait_up_to: timedelta = timedelta(0)) -> Outcome:
        """Publish ``release_id`` if its instant has come.

        If the instant is more than ``wait_up_to`` away, nothing happens
        (``not_yet``): the caller reschedules. Within it, the release is
        claimed, every document staged and verified, and the publisher waits
        for the instant by the reference clock. ``not_ours`` means another
        publisher holds the claim."""
        now = self.s.clock.now()
        with transaction(self.sessions) as session:  # read and claim: one transaction
            release = session.get(Release, release_id)
            if release is None or release.state not in (QUEUED, PUBLISHING):
                return Outcome(status=PublishStatus.INACTIVE, release_id=release_id)
            if release.instant - now > wait_up_to:
                return Outcome(status=PublishStatus.NOT_YET, release_id=release_id)
            if not self._claim(session, release_id, now):
                return Outcome(status=PublishStatus.NOT_OURS, release_id=release_id)
            plan = _plan_of(session, release)
        with _LeaseKeeper(self, release_id) as keeper:
            try:
                with self.s.public.staging.folder(release_id) as folder:
                    staged = self._stage(plan, folder, keeper)
                    reading = self._wait_for_instant(plan.instant)
                    if reading is None:
                        keeper.close()
                        self._unclaim(release_id)
                        return Outcome(status=PublishStatus.NOT_YET, release_id=release_id,
                                       detail="stopping")
                    return self._go_public(plan, staged, keeper, reading)
            except Exception as exc:
                keeper.close()
                return self._failed(plan, exc)

    # -- claim ---------------------------------------------------------------
    def _claim(self, session: Session, release_id: str, now: datetime) -> bool:
        """The compare-and-set: exactly one publisher gets the release."""
        claimed = affected(session.connection().execute(
            update(_RELEASES)
            .where(_RELEASES.c.id == release_id,
                   or_(_RELEASES.c.state == QUEUED,
                       (_RELEASES.c.state == PUBLISHING)
                       & or_(_RELEASES.c.lease_expires_at.is_(None),
                             _RELEASES.c.lease_expires_at < now)))
            .values(state=PUBLISHING, claimant=self.claimant,
                    lease_expires_at=now + self.lease, revision=_RELEASES.c.revision + 1,
                    attempts=_RELEASES.c.attempts + 1)
        ))
        return bool(claimed)

    def _renew(self, release_id: str) -> None:
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            held = affected(session.execute(
                update(Release)
                .where(Release.id == release_id, Release.state == PUBLISHING,
                       Release.claimant == self.claimant)
                .values(lease_expires_at=now + self.lease)
            ))
        if not held:
            raise StorageError(f"lost the claim on {release_id} to another publisher")

    def _unclaim(self, release_id: str) -> None:
        """Give back a claim taken before the instant, when nothing was
        published yet (stopping, or a clock that stepped back)."""
        with transaction(self.sessions) as session:
            session.execute(
                update(Release).where(Release.id == release_id, Release.state == PUBLISHING,
                                      Release.claimant == self.claimant,
                                      Release.started_at.is_(None))
                .values(state=QUEUED, claimant=None, lease_expires_at=None,
                        revision=Release.revision + 1, attempts=Release.attempts - 1))

    # -- phase one: stage and verify, before the instant ---------------------------
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
        for doc in plan.documents:
            keeper.check()
            path = folder / doc.id
            try:
                with self.s.vault.reader(document_key(release_id, doc.id)) as sealed, \
                        write_private(path) as out:
                    opened = sealing.open_stream(dek, doc.id, sealed, out)
                    out.flush()
                    os.fsync(out.fileno())  # durable once renamed into place
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
        log.info("release %s: %d documents staged and verified", release_id, len(staged))
        return staged

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
        uncertainty, then the reference clock itself asked. Returns the
        clock reading used, or None if told to stop first."""
        reading = self._reading()
        if reading is None or not self.s.clock.sleep_until(reading.safe_local(instant),
                                                           self.stop):
            return None
        while True:
            with self.s.engine.connect() as connection:
                server = server_time(connection)
            if server >= instant:
                return reading
            gap = (instant - server).total_seconds()
            log.warning("the database server's clock is %.1f ms before the embargo although "
                        "ours is past it: waiting for it", gap * 1000)
            if self.stop.wait(min(max(gap, 0.0005), 1.0)):
                return None

    def _reference_now(self, reading: ClockReading) -> datetime:
        return reading.reference(self.s.clock.now(), trusted=self.trusted_skew)

    def _check_time(self, instant: datetime, reading: ClockReading) -> None:
        now = self.s.clock.now()
        if now < reading.safe_local(instant):
            raise TooEarlyError(f"refusing to publish {now.isoformat()} (by this node's clock, "
                                f"{reading.skew_ms:+.1f} ms off the reference) before the "
                                f"embargo {instant.isoformat()}")

    # -- phase two: make public ------------------------------------------------------
    def _go_public(self, plan: _Plan, staged: dict[str, Path], keeper: _LeaseKeeper,
                   reading: ClockReading) -> Outcome:
        release_id, instant = plan.release_id, plan.instant
        self._check_time(instant, reading)
        started = self._reference_now(reading)
        with transaction(self.sessions) as session:
            first = affected(session.connection().execute(
                update(_RELEASES).where(_RELEASES.c.id == release_id,
                                        _RELEASES.c.claimant == self.claimant,
                                        _RELEASES.c.started_at.is_(None))
                .values(started_at=started)))
            audit.record(session, action="publication_started" if first
                         else "publication_resumed", actor=self.claimant, at=started,
                         release_id=release_id,
                         details={"lateness_ms": _ms(started - instant),
                                  "attempt": plan.attempts})
        documents = plan.documents
        if self.workers == 1 or len(documents) < 2:
            for doc in documents:
                self._publish_one(keeper, plan, doc, staged[doc.id])
        else:  # several at once: on S3 each put waits mostly on the network
            with ThreadPoolExecutor(self.workers, thread_name_prefix="publish") as pool:
                futures = [pool.submit(self._publish_one, keeper, plan, doc, staged[doc.id])
                           for doc in documents]
                for future in as_completed(futures):
                    if not future.cancelled() and future.exception() is not None:
                        for other in futures:
                            other.cancel()
                for future in futures:  # the first failure, in document order
                    if not future.cancelled():
                        future.result()
        keeper.check()
        self.s.public.flush()
        published_at = self._reference_now(reading)  # the last document is public
        published_at = self._write_manifest(plan, published_at)
        self.s.public.flush()
        keeper.close()
        return self._finish(plan, published_at)

    def _publish_one(self, keeper: _LeaseKeeper, plan: _Plan, doc: _Doc, staged: Path) -> None:
        keeper.check()
        self._publish_document(plan, doc, staged)

    def _publish_document(self, plan: _Plan, doc: _Doc, staged: Path) -> None:
        key = plan.key(doc)
        public = self.s.public
        try:
            stored = public.publish_file(key, staged, content_type=doc.content_type,
                                         size=doc.size, sha256=doc.sha256)
        except ObjectExistsError:  # an earlier attempt got this far, or someone else did
            stored = public.stat(key)
        if stored.sha256 != doc.sha256 or stored.size != doc.size:
            raise PublicConflictError(
                f"{public.url(key)} holds other content than {doc.filename} ({stored.size} "
                f"bytes, sha256 {stored.sha256[:12]}…; expected {doc.size} bytes, "
                f"{doc.sha256[:12]}…); refusing to overwrite it")
        log.info("published %s", public.url(key))

    def _write_manifest(self, plan: _Plan, published_at: datetime) -> datetime:
        """Write the manifest, last; returns when the release became public
        (an earlier attempt's, if its manifest is there already)."""
        embargo = timerules.Embargo(instant=plan.instant, zone=plan.zone, wall=plan.wall)
        listing = [{"name": d.filename, "kind": d.kind, "organisation": d.organisation,
                    "size": d.size, "sha256": d.sha256, "content_type": d.content_type,
                    "url": self.s.public.url(plan.key(d))} for d in plan.documents]
        body = {
            "title": plan.title,
            "embargo": {"local": embargo.local.isoformat(), "zone": embargo.zone,
                        "utc": embargo.instant.isoformat().replace("+00:00", "Z"),
                        "text": embargo.describe_long()},
            "published_at": _iso(published_at),
            "lateness_ms": _ms(published_at - plan.instant),
            "clock": "reference (the database server's)",
            "documents": listing,
        }
        data = (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode()
        key = f"{plan.slug}/manifest.json"
        try:
            with self.s.public.writer(key, content_type="application/json") as out:
                out.write(data)
        except ObjectExistsError:
            with self.s.public.reader(key) as existing:
                try:
                    found = json.loads(existing.read())
                    same = (found["documents"] == listing and found["title"] == plan.title)
                    earlier = datetime.fromisoformat(found["published_at"])
                except (ValueError, KeyError, TypeError):
                    same = False
            if not same:
                raise PublicConflictError(f"{self.s.public.url(key)} exists with other "
                                          "content; refusing to overwrite it") from None
            return earlier
        return published_at

    def _finish(self, plan: _Plan, published_at: datetime) -> Outcome:
        """Mark the release published, stamp its documents and fill the
        outbox, in one transaction. Plain statements on the connection, from
        the records loaded in the claim: this is on the path of every release
        at the instant, and the ORM's loading and bookkeeping were most of
        its cost."""
        release_id = plan.release_id
        lateness_ms = _ms(published_at - plan.instant)
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            connection = session.connection()
            done = affected(connection.execute(
                update(_RELEASES).where(_RELEASES.c.id == release_id,
                                        _RELEASES.c.state == PUBLISHING,
                                        _RELEASES.c.claimant == self.claimant)
                .values(state=PUBLISHED, published_at=published_at, lateness_ms=lateness_ms,
                        lease_expires_at=None, reason=None, failing_since=None,
                        revision=_RELEASES.c.revision + 1)))
            if not done:
                raise StorageError(f"lost the claim on {release_id} before finishing")
            # Every document was verified (its stored SHA-256 checked); the store itself
            # is the checkpoint a resumed publisher relies on.
            connection.execute(_DOCUMENT_PUBLISHED, [
                {"document": d.id, "at": published_at, "url": self.s.public.url(plan.key(d))}
                for d in plan.documents])
            targets: list[tuple[str | None, str, str]] = [
                (rid, email, Purpose.PUBLISHED) for rid, email in connection.execute(
                    select(_RECIPIENTS.c.id, _RECIPIENTS.c.email)
                    .where(_RECIPIENTS.c.release_id == release_id)
                    .order_by(_RECIPIENTS.c.position))]
            if plan.owner:
                targets.append((None, plan.owner, Purpose.OWNER_SUMMARY))
            if targets:
                connection.execute(_OUTBOX.insert(), [
                    {"message_id": message_id(release_id, purpose, recipient_id),
                     "release_id": release_id, "recipient_id": recipient_id,
                     "purpose": purpose, "to_addr": address, "created_at": now,
                     "not_before": now, "attempts": 0, "next_attempt_at": now}
                    for recipient_id, address, purpose in targets])
            audit.record(session, action="release_published", actor=self.claimant, at=now,
                         release_id=release_id,
                         details={"lateness_ms": lateness_ms, "documents": len(plan.documents),
                                  "notices": len(targets),
                                  "published_at": _iso(published_at)})
        log.info("release %s published, %.1f ms late", release_id, lateness_ms)
        return Outcome(status=PublishStatus.PUBLISHED, release_id=release_id,
                       lateness_ms=lateness_ms)

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
            self._unclaim(release_id)
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
            row = connection.execute(select(_RELEASES.c.claimant, _RELEASES.c.failing_since)
                                     .where(_RELEASES.c.id == release_id)).one_or_none()
            if row is None or row.claimant != self.claimant:
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


def _plan_of(session: Session, release: Release) -> _Plan:
    rows = session.execute(
        select(_DOCUMENTS.c.id, _DOCUMENTS.c.filename, _DOCUMENTS.c.kind,
               _DOCUMENTS.c.organisation, _DOCUMENTS.c.size, _DOCUMENTS.c.sha256,
               _DOCUMENTS.c.content_type)
        .where(_DOCUMENTS.c.release_id == release.id).order_by(_DOCUMENTS.c.position)).all()
    return _Plan(release_id=release.id, slug=release.slug, title=release.title,
                 owner=release.owner, instant=release.instant, zone=release.zone,
                 wall=release.wall, started_at=release.started_at,
                 attempts=release.attempts + 1,
                 documents=tuple(_Doc(id=r.id, filename=r.filename, kind=r.kind,
                                      organisation=r.organisation, size=r.size,
                                      sha256=r.sha256, content_type=r.content_type)
                                 for r in rows))


class _LeaseKeeper:
    """Renews a publisher's claim every third of the lease while it works,
    so a long publication keeps it and a dead publisher loses it quickly."""

    def __init__(self, publisher: Publisher, release_id: str) -> None:
        self.publisher = publisher
        self.release_id = release_id
        self.lost: Exception | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"lease-{release_id}")

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        every = self.publisher.lease.total_seconds() / 3
        while not self._done.wait(every):
            try:
                self.publisher._renew(self.release_id)
            except Exception as exc:  # reported to the publishing thread by check()
                self.lost = exc
                return

    def check(self) -> None:
        """Raise if the claim was lost (another node may be publishing)."""
        if self.lost is not None:
            raise StorageError(f"lost the claim on {self.release_id}: {self.lost}")


def _ms(delta: timedelta) -> float:
    return round(delta.total_seconds() * 1000, 3)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
