"""Publication at the embargo instant: claim, wait for the exact instant,
decrypt each document into the public target, verify it, write the manifest,
then mark the release published and fill the outbox in one transaction.

Every step is idempotent and checkpointed: a publisher that dies part-way is
resumed by whoever claims the release next, and nothing is written twice."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session

from config.errors import EmbargoError, SealError, StorageError
from config.retry import PUBLICATION
from release import audit, sealing
from release.context import Services
from release.instants import embargo_of
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
from storage.base import ObjectExistsError
from storage.db import affected, transaction

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 10

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


@dataclass(frozen=True, kw_only=True)
class Outcome:
    status: PublishStatus
    release_id: str
    lateness_ms: float | None = None
    detail: str | None = None


def message_id(release_id: str, purpose: str, recipient_id: str | None) -> str:
    """Stable per (release, purpose, recipient), and short enough that the
    header is never folded."""
    who = recipient_id.removeprefix("rcp_") if recipient_id else "owner"
    return f"<{release_id.removeprefix('rel_')}.{purpose}.{who}@embargo.invalid>"


class Publisher:
    """Publishes releases. One per process; ``claimant`` names it in leases."""

    def __init__(self, services: Services, private_key: X25519PrivateKey, *, claimant: str,
                 lease: timedelta = timedelta(seconds=30),
                 stop: threading.Event | None = None, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self.s = services
        self.key = private_key
        self.claimant = claimant
        self.lease = lease
        self.stop = stop or threading.Event()
        self.sessions = services.sessions

    def publish(self, release_id: str, *, wait_up_to: timedelta = timedelta(0)) -> Outcome:
        """Publish ``release_id`` if its instant has come.

        If the instant is more than ``wait_up_to`` away, nothing happens
        (``not_yet``): the caller reschedules. Within it, the release is
        claimed and the publisher waits, re-reading the clock, for the exact
        instant. ``not_ours`` means another publisher holds the claim."""
        clock = self.s.clock
        now = clock.now()
        with transaction(self.sessions) as session:  # read and claim: one transaction
            release = session.get(Release, release_id)
            if release is None or release.state not in (QUEUED, PUBLISHING):
                return Outcome(status=PublishStatus.INACTIVE, release_id=release_id)
            instant = release.instant
            if instant - now > wait_up_to:
                return Outcome(status=PublishStatus.NOT_YET, release_id=release_id)
            if not self._claim(session, release_id, now):
                return Outcome(status=PublishStatus.NOT_OURS, release_id=release_id)
        with _LeaseKeeper(self, release_id) as keeper:
            if not clock.sleep_until(instant, self.stop):
                keeper.close()
                self._unclaim(release_id)
                return Outcome(status=PublishStatus.NOT_YET, release_id=release_id,
                               detail="stopping")
            try:
                return self._publish_claimed(release_id, keeper)
            except Exception as exc:
                keeper.close()
                return self._failed(release_id, exc)

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

    # -- publish -------------------------------------------------------------
    def _check_time(self, instant: datetime) -> datetime:
        now = self.s.clock.now()
        if now < instant:
            raise TooEarlyError(f"refusing to publish {now.isoformat()} before the embargo "
                                f"{instant.isoformat()}")
        return now

    def _publish_claimed(self, release_id: str, keeper: _LeaseKeeper) -> Outcome:
        with transaction(self.sessions) as session:
            release = session.get(Release, release_id)
            assert release is not None
            instant = release.instant
            now = self._check_time(instant)
            if release.started_at is None:
                release.started_at = now
            started = release.started_at
            slug = release.slug
            documents = list(session.scalars(
                select(Document).where(Document.release_id == release_id)
                .order_by(Document.position)))
            audit.record(session, action="publication_started" if release.started_at == now
                         else "publication_resumed", actor=self.claimant, at=now,
                         release_id=release_id,
                         details={"lateness_ms": _ms(now - instant),
                                  "attempt": release.attempts})
        lateness_ms = _ms(started - instant)
        dek = sealing.open_dek(self.s.vault.get_bytes(dek_key(release_id)), self.key, release_id)
        # Every document, every attempt: one written by an earlier attempt is
        # found by the create-only write and checked by its verification (stat).
        if self.workers == 1 or len(documents) < 2:
            for document in documents:
                self._publish_one(keeper, release_id, slug, instant, dek, document)
        else:  # several at once: on S3 each put waits mostly on the network
            with ThreadPoolExecutor(self.workers, thread_name_prefix="publish") as pool:
                futures = [pool.submit(self._publish_one, keeper, release_id, slug, instant,
                                       dek, document) for document in documents]
                for future in as_completed(futures):
                    if not future.cancelled() and future.exception() is not None:
                        for other in futures:
                            other.cancel()
                for future in futures:  # the first failure, in document order
                    if not future.cancelled():
                        future.result()
        keeper.check()
        self._write_manifest(release, documents, started, lateness_ms)
        self.s.public.flush()
        keeper.close()
        return self._finish(release, documents, lateness_ms)

    def _publish_one(self, keeper: _LeaseKeeper, release_id: str, slug: str,
                     instant: datetime, dek: bytes, document: Document) -> None:
        keeper.check()
        self._publish_document(release_id, slug, instant, dek, document)

    def _publish_document(self, release_id: str, slug: str, instant: datetime, dek: bytes,
                          document: Document) -> None:
        key = f"{slug}/{document.filename}"
        public = self.s.public
        try:
            with self.s.vault.reader(document_key(release_id, document.id)) as sealed:
                self._check_time(instant)
                with public.writer(key, content_type=document.content_type) as out:
                    opened = sealing.open_stream(dek, document.id, sealed, out)
                    if opened.sha256 != document.sha256 or opened.size != document.size:
                        raise SealError()
        except ObjectExistsError:
            pass  # an earlier attempt got this far; the verification below decides
        stored = public.stat(key)
        if stored.sha256 != document.sha256 or stored.size != document.size:
            raise StorageError(f"{public.url(key)} holds other content than {document.filename}"
                               f" ({stored.size} bytes, sha256 {stored.sha256[:12]}…; expected "
                               f"{document.size} bytes, {document.sha256[:12]}…); refusing to "
                               "overwrite it")
        log.info("published %s", public.url(key))

    def _write_manifest(self, release: Release, documents: list[Document], started: datetime,
                        lateness_ms: float) -> None:
        """From the records loaded when publication started (no second read)."""
        embargo = embargo_of(release)
        slug = release.slug
        body = {
            "title": release.title,
            "embargo": {"local": embargo.local.isoformat(), "zone": embargo.zone,
                        "utc": embargo.instant.isoformat().replace("+00:00", "Z"),
                        "text": embargo.describe_long()},
            "published_at": started.isoformat().replace("+00:00", "Z"),
            "lateness_ms": lateness_ms,
            "documents": [{"name": d.filename, "kind": d.kind,
                           "organisation": d.organisation, "size": d.size,
                           "sha256": d.sha256, "content_type": d.content_type,
                           "url": self.s.public.url(f"{slug}/{d.filename}")}
                          for d in documents],
        }
        data = (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode()
        key = f"{slug}/manifest.json"
        try:
            with self.s.public.writer(key, content_type="application/json") as out:
                out.write(data)
        except ObjectExistsError:
            with self.s.public.reader(key) as existing:
                if existing.read() != data:
                    raise StorageError(f"{self.s.public.url(key)} exists with other "
                                       "content; refusing to overwrite it") from None

    def _finish(self, release: Release, documents: list[Document],
                lateness_ms: float) -> Outcome:
        """Mark the release published, stamp its documents and fill the
        outbox, in one transaction. Plain statements on the connection, from
        the records loaded when publication started: this is on the path of
        every release at the instant, and the ORM's loading and bookkeeping
        were most of its cost."""
        release_id = release.id
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            connection = session.connection()
            done = affected(connection.execute(
                update(_RELEASES).where(_RELEASES.c.id == release_id,
                                        _RELEASES.c.state == PUBLISHING,
                                        _RELEASES.c.claimant == self.claimant)
                .values(state=PUBLISHED, published_at=now, lateness_ms=lateness_ms,
                        lease_expires_at=None, revision=_RELEASES.c.revision + 1)))
            if not done:
                raise StorageError(f"lost the claim on {release_id} before finishing")
            # Every document was verified (its stored SHA-256 checked); the store itself
            # is the checkpoint a resumed publisher relies on.
            connection.execute(_DOCUMENT_PUBLISHED, [
                {"document": d.id, "at": now,
                 "url": self.s.public.url(f"{release.slug}/{d.filename}")} for d in documents])
            targets: list[tuple[str | None, str, str]] = [
                (rid, email, Purpose.PUBLISHED) for rid, email in connection.execute(
                    select(_RECIPIENTS.c.id, _RECIPIENTS.c.email)
                    .where(_RECIPIENTS.c.release_id == release_id)
                    .order_by(_RECIPIENTS.c.position))]
            if release.owner:
                targets.append((None, release.owner, Purpose.OWNER_SUMMARY))
            if targets:
                connection.execute(_OUTBOX.insert(), [
                    {"message_id": message_id(release_id, purpose, recipient_id),
                     "release_id": release_id, "recipient_id": recipient_id,
                     "purpose": purpose, "to_addr": address, "created_at": now,
                     "not_before": now, "attempts": 0, "next_attempt_at": now}
                    for recipient_id, address, purpose in targets])
            audit.record(session, action="release_published", actor=self.claimant, at=now,
                         release_id=release_id,
                         details={"lateness_ms": lateness_ms, "documents": len(documents),
                                  "notices": len(targets)})
        log.info("release %s published, %.1f ms late", release_id, lateness_ms)
        return Outcome(status=PublishStatus.PUBLISHED, release_id=release_id,
                       lateness_ms=lateness_ms)

    def _failed(self, release_id: str, exc: Exception) -> Outcome:
        if isinstance(exc, TooEarlyError):
            log.error("%s", exc)
            self._unclaim(release_id)
            return Outcome(status=PublishStatus.NOT_YET, release_id=release_id, detail=str(exc))
        now = self.s.clock.now()
        reason = str(exc) if isinstance(exc, EmbargoError) else f"{type(exc).__name__}: {exc}"
        permanent = isinstance(exc, SealError)
        with transaction(self.sessions) as session:
            release = session.get(Release, release_id)
            if release is None or release.claimant != self.claimant:
                return Outcome(status=PublishStatus.NOT_OURS, release_id=release_id, detail=reason)
            give_up = permanent or release.attempts >= MAX_ATTEMPTS
            backoff = PUBLICATION.delay(release.attempts)
            if give_up:
                release.state = FAILED
                release.lease_expires_at = None
                if release.owner:
                    session.add(OutboxMessage(
                        message_id=message_id(release_id, f"failed{release.attempts}", None),
                        release_id=release_id, recipient_id=None, purpose=Purpose.OWNER_FAILURE,
                        to_addr=release.owner, created_at=now, not_before=now, attempts=0,
                        next_attempt_at=now))
            else:
                release.lease_expires_at = now + backoff  # retried when this passes
            release.reason = reason
            release.revision += 1
            audit.record(session, action="publication_failed", actor=self.claimant, at=now,
                         release_id=release_id,
                         details={"reason": reason, "attempt": release.attempts,
                                  "final": give_up})
        if give_up:
            log.error("release %s failed: %s", release_id, reason)
            return Outcome(status=PublishStatus.FAILED, release_id=release_id, detail=reason)
        log.warning("release %s: attempt failed, retrying in %s: %s", release_id, backoff,
                    reason)
        return Outcome(status=PublishStatus.RETRY, release_id=release_id, detail=reason)


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
