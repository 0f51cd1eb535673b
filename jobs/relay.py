"""The outbox relay: claims due notices, composes and hands each to the mail
transport, records delivery, and backs off while the mail server is down."""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import case, or_, select, update

from config.errors import DeliveryError, SealError
from config.retry import NOTICE_DELIVERY
from jobs.mail import MailTransport
from release import audit
from release.context import Services
from release.copies import DocumentOpener
from release.notices import Attachment, compose
from release.records import Copy, OutboxMessage, Purpose, Recipient, Release, table_of
from storage.db import transaction

log = logging.getLogger(__name__)

CLAIM = timedelta(seconds=60)
_OUTBOX = table_of(OutboxMessage)
_COPIES = table_of(Copy)
TOO_LATE = "the embargo lifted before this copy could be delivered; it was not sent"


class OutboxRelay:
    def __init__(self, services: Services, transport: MailTransport, *, sender: str,
                 worker: str, max_attempts: int = 20, batch: int = 200,
                 opener: DocumentOpener | None = None, workers: int = 1,
                 make_transport: Callable[[], MailTransport] | None = None) -> None:
        """``transport`` serves the first worker; with ``workers`` > 1,
        ``make_transport`` gives each further worker its own (a transport is
        used by one thread at a time)."""
        if workers > 1 and make_transport is None:
            raise ValueError("several workers need make_transport: one transport each")
        self.opener = opener
        self.s = services
        self.transport = transport
        self.workers = workers
        self.make_transport = make_transport
        self.sender = sender
        self.worker = worker
        self.max_attempts = max_attempts
        self.batch = batch
        self.sessions = services.sessions

    def run_once(self) -> int:
        """Deliver every notice that is due now. Returns how many were
        delivered. Rows are claimed with a token first, so two relays never
        send the same row at the same time."""
        now = self.s.clock.now()
        token = f"{self.worker}:{secrets.token_hex(4)}"
        with transaction(self.sessions) as session:
            session.execute(update(OutboxMessage).where(
                OutboxMessage.delivered_at.is_(None), OutboxMessage.given_up_at.is_(None),
                OutboxMessage.not_after.is_not(None), OutboxMessage.not_after <= now)
                .values(given_up_at=now, last_error=TOO_LATE))
            due = select(OutboxMessage.id).where(
                OutboxMessage.delivered_at.is_(None), OutboxMessage.given_up_at.is_(None),
                OutboxMessage.not_before <= now, OutboxMessage.next_attempt_at <= now,
                or_(OutboxMessage.claim_expires_at.is_(None),
                    OutboxMessage.claim_expires_at < now),
            ).order_by(  # notices of publication before (slow, attachment-laden) copies
                case((OutboxMessage.purpose == Purpose.COPY, 1), else_=0), OutboxMessage.id,
            ).limit(self.batch)
            ids = list(session.scalars(due))
            if not ids:
                return 0
            session.execute(update(OutboxMessage).where(
                OutboxMessage.id.in_(ids),
                or_(OutboxMessage.claim_expires_at.is_(None),
                    OutboxMessage.claim_expires_at < now))
                .values(claimed_by=token, claim_expires_at=now + CLAIM))
        with transaction(self.sessions) as session:
            rows = list(session.scalars(select(OutboxMessage).where(
                OutboxMessage.claimed_by == token).order_by(
                case((OutboxMessage.purpose == Purpose.COPY, 1), else_=0), OutboxMessage.id)))
            releases = {r.id: r for r in session.scalars(select(Release).where(
                Release.id.in_({row.release_id for row in rows})))}
            for release in releases.values():
                release.documents  # noqa: B018 - load before the session closes
                release.recipients  # noqa: B018
            recipients = {r.id: r for r in session.scalars(select(Recipient).where(
                Recipient.id.in_({row.recipient_id for row in rows if row.recipient_id})))}
        return self._deliver_all(rows, releases, recipients)

    def _deliver_all(self, rows: list[OutboxMessage], releases: dict[str, Release],
                     recipients: dict[str, Recipient]) -> int:
        """Deliver ``rows`` in their order, over up to ``workers`` connections
        at once: a mail server's round trips then overlap with composing the
        next message."""
        pending = deque(rows)
        lock = threading.Lock()
        delivered = 0
        errors: list[BaseException] = []

        def work(transport: MailTransport) -> None:
            nonlocal delivered
            try:
                while not errors:
                    with lock:
                        if not pending:
                            return
                        row = pending.popleft()
                    done = self._deliver(row, releases[row.release_id],
                                         recipients.get(row.recipient_id or ""), transport)
                    with lock:
                        delivered += done
            except BaseException as exc:  # re-raised by run_once, after the join
                errors.append(exc)
            finally:
                transport.close()

        extra: list[MailTransport] = []
        if self.make_transport is not None:
            extra = [self.make_transport() for _ in range(min(self.workers, len(rows)) - 1)]
        threads = [threading.Thread(target=work, args=(t,), name=f"embargo-relay-{i + 1}",
                                    daemon=True) for i, t in enumerate(extra)]
        for thread in threads:
            thread.start()
        work(self.transport)
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return delivered

    def _attachments(self, row: OutboxMessage, release: Release) -> list[Attachment]:
        if row.purpose != Purpose.COPY:
            return []
        if self.opener is None:
            raise DeliveryError("this relay cannot open documents (no private key)")
        with transaction(self.sessions) as session:
            copy = session.scalars(select(Copy).where(Copy.message_id == row.message_id)).one()
            wanted = json.loads(copy.document_ids)
        documents = {d.id: d for d in release.documents}
        return [Attachment(document=documents[d], data=self.opener.read(release.id,
                                                                        documents[d]),
                           copy_id=copy.id) for d in wanted]

    def _deliver(self, row: OutboxMessage, release: Release, recipient: Recipient | None,
                 transport: MailTransport) -> int:
        if row.not_after is not None and self.s.clock.now() >= row.not_after:
            self._give_up(row, TOO_LATE)  # before the costly part: opening, stamping
            return 0
        try:
            message = compose(row, release, recipient, sender=self.sender,
                              attachments=self._attachments(row, release))
            if row.not_after is not None and self.s.clock.now() >= row.not_after:
                self._give_up(row, TOO_LATE)
                return 0
            where = transport.send(message)
        except SealError as exc:
            self._give_up(row, str(exc))
            return 0
        except DeliveryError as exc:
            now = self.s.clock.now()
            attempts = row.attempts + 1
            give_up = attempts >= self.max_attempts
            wait = NOTICE_DELIVERY.delay(attempts)
            with transaction(self.sessions) as session:
                session.execute(update(OutboxMessage).where(OutboxMessage.id == row.id).values(
                    attempts=attempts, last_error=str(exc), claimed_by=None,
                    claim_expires_at=None, next_attempt_at=now + wait,
                    given_up_at=now if give_up else None))
            if give_up:
                log.error("gave up on notice %s to %s after %d attempts: %s",
                          row.message_id, row.to_addr, attempts, exc)
            else:
                log.warning("notice %s to %s not delivered (attempt %d), retrying in %s: %s",
                            row.message_id, row.to_addr, attempts, wait, exc)
            return 0
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            # Plain statements on the connection: this runs once per notice,
            # right after the instant, and the ORM's bookkeeping is not free.
            connection = session.connection()
            connection.execute(update(_OUTBOX).where(_OUTBOX.c.id == row.id).values(
                attempts=row.attempts + 1, delivered_at=now, delivered_to=where,
                last_error=None, claim_expires_at=None))
            details = {"to": row.to_addr, "purpose": row.purpose,
                       "message_id": row.message_id, "via": where}
            if row.purpose == Purpose.COPY:
                connection.execute(update(_COPIES).where(_COPIES.c.message_id == row.message_id)
                                   .values(sent_at=now))
                details["copy_id"] = str(message["X-Embargo-Copy-Id"])
            audit.record(session,
                         action="copy_sent" if row.purpose == Purpose.COPY else "notice_sent",
                         actor=self.worker, at=now, release_id=row.release_id, details=details)
        log.info("notice %s delivered to %s via %s", row.purpose, row.to_addr, where)
        return 1

    def _give_up(self, row: OutboxMessage, reason: str) -> None:
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            session.execute(update(OutboxMessage).where(OutboxMessage.id == row.id).values(
                given_up_at=now, last_error=reason, claim_expires_at=None))
            audit.record(session, action="notice_failed", actor=self.worker, at=now,
                         release_id=row.release_id,
                         details={"to": row.to_addr, "purpose": row.purpose, "reason": reason})
        log.error("notice %s to %s given up: %s", row.message_id, row.to_addr, reason)

    def next_due(self) -> float | None:
        """Seconds until the next undelivered notice is due, if any."""
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            nxt = session.scalars(select(OutboxMessage.next_attempt_at).where(
                OutboxMessage.delivered_at.is_(None), OutboxMessage.given_up_at.is_(None))
                .order_by(OutboxMessage.next_attempt_at).limit(1)).first()
        return None if nxt is None else max(0.0, (nxt - now).total_seconds())
