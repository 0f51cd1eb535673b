"""The outbox relay: claims due notices row by row, composes and hands each to
the mail transport, records delivery, and backs off while the mail server is
down.

Exactly once, as far as it can be kept: each worker claims one row at a time
(so a relay holds at most ``workers`` rows), a thread renews the claims while
the messages are on their way, a worker checks that it still holds its claim
right before it hands the message over, and a delivery is recorded only by
an update that still names the claimant. A claim lapses ``lease`` after its
last renewal, and at once when the node that holds it has stopped
heartbeating for longer than ``lease``. What remains is one window per
worker: a relay that dies after the mail server took a message and before it
recorded that, leaves the row to be sent again by the relay that takes over.

Failures are told apart. A 5xx reply about the message or a refused recipient
is permanent: the notice is ``failed`` after one attempt. So is a message that
cannot be built (a record that cannot be composed, a PDF that cannot be
stamped): the error's class and words are recorded against that notice alone.
A 4xx reply or a connection failure is temporary: retried with backoff until
``give_up_after`` has passed. Either way the release's owner and ``alerts.to``
are told, except about an alert (an alert about an alert that cannot be
delivered would never end)."""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from email.errors import MessageError
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, or_, select, true, update
from sqlalchemy.orm import Session, aliased

from config.errors import DeliveryError, DeliveryRefused, SealError
from config.retry import NOTICE_DELIVERY
from jobs.mail import MailTransport
from jobs.outage import DatabaseWatch, report
from release import audit
from release.alerts import ALERT, Alert, raise_alert
from release.context import Services
from release.copies import DocumentOpener
from release.notices import Attachment, Delivery, compose
from release.records import Copy, Node, OutboxMessage, Purpose, Recipient, Release, table_of
from storage.db import affected, server_time, transaction

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=3)
_OUTBOX = table_of(OutboxMessage)
_COPIES = table_of(Copy)
TOO_LATE = "the embargo lifted before this copy could be delivered; it was not sent"
SUMMARY = Purpose.OWNER_SUMMARY


def _waiting_summary() -> ColumnElement[bool]:
    """An owner's summary whose release still has notices on their way: it
    says what happened, so it goes once they are all delivered or failed."""
    other = aliased(OutboxMessage)
    return and_(OutboxMessage.purpose == SUMMARY, exists().where(
        other.release_id == OutboxMessage.release_id, other.purpose == Purpose.PUBLISHED,
        other.delivered_at.is_(None), other.given_up_at.is_(None)))


class OutboxRelay:
    def __init__(self, services: Services, transport: MailTransport, *, sender: str,
                 worker: str, give_up_after: timedelta = timedelta(hours=24),
                 lease: timedelta = LEASE, opener: DocumentOpener | None = None,
                 workers: int = 1,
                 make_transport: Callable[[], MailTransport] | None = None,
                 stop: threading.Event | None = None) -> None:
        """``transport`` serves the first worker; with ``workers`` > 1,
        ``make_transport`` gives each further worker its own (a transport is
        used by one thread at a time). ``worker`` names the node: its claims
        are void once that node's heartbeat is older than ``lease`` or it has
        stopped. Once ``stop`` is set a run takes no new notice and finishes
        those on their way, so the node can say it stopped without leaving a
        message in flight to be sent again."""
        if workers > 1 and make_transport is None:
            raise ValueError("several workers need make_transport: one transport each")
        self.opener = opener
        self.s = services
        self.transport = transport
        self.workers = workers
        self.make_transport = make_transport
        self.sender = sender
        self.worker = worker
        self.give_up_after = give_up_after
        self.lease = lease
        self.stop = stop or threading.Event()
        self.sessions = services.sessions
        self.watch: DatabaseWatch | None = None  # set by the node it runs in

    # -- claims ---------------------------------------------------------------

    def _due(self, now: datetime) -> ColumnElement[bool]:
        return and_(OutboxMessage.delivered_at.is_(None), OutboxMessage.given_up_at.is_(None),
                    OutboxMessage.not_before <= now, OutboxMessage.next_attempt_at <= now,
                    ~_waiting_summary())

    def _free(self, now: datetime, dead: list[str]) -> ColumnElement[bool]:
        """Unclaimed, or the claim lapsed, or its node stopped heartbeating."""
        return or_(OutboxMessage.claim_expires_at.is_(None),
                   OutboxMessage.claim_expires_at < now,
                   *[OutboxMessage.claimed_by.startswith(f"{name}#", autoescape=True)
                     for name in dead])

    def _dead_nodes(self, session: Session) -> list[str]:
        """Nodes (other than this one) whose heartbeat is older than the
        lease by the database server's clock, or that have stopped; within
        the last hour (an older one's claims have lapsed by themselves).
        Read afresh for each claim: a node silent for a moment and heard
        from again is alive, and so are the claims it makes after."""
        now = server_time(session.connection())
        return [name for name in session.scalars(select(Node.name).where(
            Node.name != self.worker, Node.heartbeat_at >= now - timedelta(hours=1),
            or_(Node.stopped_at.is_not(None), Node.heartbeat_at < now - self.lease)))]

    def _claim(self, token: str, skip: set[int]) -> OutboxMessage | None:
        """Claim one due row for ``token``, notices before copies; None when
        nothing is left that nobody holds."""
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            free = self._free(now, self._dead_nodes(session))
            candidates = list(session.scalars(select(OutboxMessage.id).where(
                self._due(now), free, OutboxMessage.id.notin_(skip) if skip else true(),
            ).order_by(  # notices of publication before (slow, attachment-laden) copies
                case((OutboxMessage.purpose == Purpose.COPY, 1), else_=0), OutboxMessage.id,
            ).limit(self.workers)))
            for row_id in candidates:
                won = affected(session.execute(update(OutboxMessage).where(
                    OutboxMessage.id == row_id, OutboxMessage.delivered_at.is_(None),
                    OutboxMessage.given_up_at.is_(None), free)
                    .values(claimed_by=token, claim_expires_at=now + self.lease)))
                if won:
                    row = session.scalars(select(OutboxMessage).where(
                        OutboxMessage.id == row_id)).one()
                    session.expunge(row)
                    return row
        return None

    def _renew(self, token: str) -> None:
        with transaction(self.sessions) as session:
            session.execute(update(OutboxMessage).where(
                OutboxMessage.claimed_by == token, OutboxMessage.claim_expires_at.is_not(None),
                OutboxMessage.delivered_at.is_(None), OutboxMessage.given_up_at.is_(None))
                .values(claim_expires_at=self.s.clock.now() + self.lease))

    def _still_mine(self, row: OutboxMessage, token: str) -> bool:
        """Renew this row's claim right before the hand-over; False when it
        was lost (lapsed and taken, or delivered by another relay). A claim
        that lapsed and that nobody took is still ours: taking it would have
        named the taker, and this update and a taker's exclude each other."""
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            return affected(session.execute(update(OutboxMessage).where(
                OutboxMessage.id == row.id, OutboxMessage.claimed_by == token,
                OutboxMessage.delivered_at.is_(None), OutboxMessage.given_up_at.is_(None))
                .values(claim_expires_at=now + self.lease))) == 1

    def _mine(self, row: OutboxMessage, token: str) -> ColumnElement[bool]:
        return and_(_OUTBOX.c.id == row.id, _OUTBOX.c.claimed_by == token,
                    _OUTBOX.c.delivered_at.is_(None), _OUTBOX.c.given_up_at.is_(None))

    # -- the run --------------------------------------------------------------

    def run_once(self) -> int:
        """Deliver every notice that is due now and that no live relay
        holds. Returns how many were delivered."""
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            late = list(session.scalars(select(OutboxMessage).where(
                OutboxMessage.delivered_at.is_(None), OutboxMessage.given_up_at.is_(None),
                OutboxMessage.not_after.is_not(None), OutboxMessage.not_after <= now,
                self._free(now, []))))
            for row in late:
                row.given_up_at, row.last_error, row.claim_expires_at = now, TOO_LATE, None
                audit.record(session, action="notice_given_up", actor=self.worker, at=now,
                             release_id=row.release_id,
                             details={"to": row.to_addr, "purpose": row.purpose,
                                      "message_id": row.message_id, "reason": TOO_LATE})
        return _Run(self, f"{self.worker}#{secrets.token_hex(4)}").go()

    def next_due(self) -> float | None:
        """Seconds until the next undelivered notice is due or a claim on
        one lapses, if any."""
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            pending = and_(OutboxMessage.delivered_at.is_(None),
                           OutboxMessage.given_up_at.is_(None), ~_waiting_summary())
            free = or_(OutboxMessage.claim_expires_at.is_(None),
                       OutboxMessage.claim_expires_at < now)
            nxt = session.scalars(select(OutboxMessage.next_attempt_at).where(pending, free)
                                  .order_by(OutboxMessage.next_attempt_at).limit(1)).first()
            lapse = session.scalars(select(OutboxMessage.claim_expires_at).where(
                pending, ~free).order_by(OutboxMessage.claim_expires_at).limit(1)).first()
        times = [t for t in (nxt, lapse) if t is not None]
        return None if not times else max(0.0, (min(times) - now).total_seconds())

    # -- one notice -----------------------------------------------------------

    def _attachments(self, row: OutboxMessage, release: Release,
                     dek: Callable[[], bytes]) -> list[Attachment]:
        if row.purpose != Purpose.COPY:
            return []
        if self.opener is None:
            raise DeliveryError("this relay cannot open documents (no private key)")
        with transaction(self.sessions) as session:
            copy = session.scalars(select(Copy).where(Copy.message_id == row.message_id)).one()
            wanted = json.loads(copy.document_ids)
        documents = {d.id: d for d in release.documents}
        key = dek()
        return [Attachment(document=documents[d],
                           data=self.opener.read(release.id, documents[d], dek=key),
                           copy_id=copy.id) for d in wanted]

    def _summary(self, release: Release) -> list[Delivery]:
        with transaction(self.sessions) as session:
            rows = session.execute(select(
                OutboxMessage.recipient_id, OutboxMessage.to_addr, OutboxMessage.delivered_at,
                OutboxMessage.last_error).where(OutboxMessage.release_id == release.id,
                                                OutboxMessage.purpose == Purpose.PUBLISHED)
                .order_by(OutboxMessage.id)).all()
        names = {r.id: r.name for r in release.recipients}
        return [Delivery(name=names.get(rid or "", addr), address=addr,
                         delivered=at is not None, error=None if at else error)
                for rid, addr, at, error in rows]

    def _deliver(self, row: OutboxMessage, token: str, release: Release,
                 recipient: Recipient | None, transport: MailTransport,
                 dek: Callable[[], bytes]) -> int:
        if row.not_after is not None and self.s.clock.now() >= row.not_after:
            self._give_up(row, token, TOO_LATE)  # before the costly part: opening, stamping
            return 0
        try:
            message = compose(row, release, recipient, sender=self.sender,
                              attachments=self._attachments(row, release, dek),
                              summary=self._summary(release) if row.purpose == SUMMARY
                              else None, unstampable=self.s.copies_unstampable)
        except (SealError, DeliveryError) as exc:
            self._fail(row, token, str(exc), release)
            return 0
        except Exception as exc:  # a record that cannot be composed: this notice alone
            log.exception("cannot build notice %s to %s", row.message_id, row.to_addr)
            self._fail(row, token, f"the message could not be built: "
                                   f"{type(exc).__name__}: {exc}", release)
            return 0
        if row.not_after is not None and self.s.clock.now() >= row.not_after:
            self._give_up(row, token, TOO_LATE)
            return 0
        if not self._still_mine(row, token):
            log.warning("notice %s to %s: claim lost before sending; left to its new holder",
                        row.message_id, row.to_addr)
            return 0
        try:
            where = transport.send(message)
        except DeliveryRefused as exc:
            self._fail(row, token, str(exc), release)
            return 0
        except DeliveryError as exc:
            self._retry(row, token, str(exc), release)
            return 0
        except MessageError as exc:  # cannot be flattened: it never will be
            self._fail(row, token, f"the message could not be built: "
                                   f"{type(exc).__name__}: {exc}", release)
            return 0
        except Exception as exc:
            log.exception("sending notice %s to %s failed unexpectedly", row.message_id,
                          row.to_addr)
            self._retry(row, token, f"{type(exc).__name__}: {exc}", release)
            return 0
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            # Plain statements on the connection: this runs once per notice,
            # right after the instant, and the ORM's bookkeeping is not free.
            connection = session.connection()
            recorded = affected(connection.execute(update(_OUTBOX).where(
                self._mine(row, token)).values(
                attempts=row.attempts + 1, delivered_at=now, delivered_to=where,
                last_error=None, claim_expires_at=None)))
            if not recorded:  # given up while on its way (a cancellation): it went
                recorded = affected(connection.execute(update(_OUTBOX).where(
                    _OUTBOX.c.id == row.id, _OUTBOX.c.claimed_by == token,
                    _OUTBOX.c.delivered_at.is_(None)).values(
                    attempts=row.attempts + 1, delivered_at=now, delivered_to=where,
                    claim_expires_at=None)))
            details: dict[str, Any] = {"to": row.to_addr, "purpose": row.purpose,
                                       "message_id": row.message_id, "via": where}
            if not recorded:
                # Taken over by another relay while on its way; the mail server has
                # it all the same: say so.
                log.error("notice %s to %s was handed to %s after its claim was lost; "
                          "it may arrive twice", row.message_id, row.to_addr, where)
                details["claim_lost"] = True
            if row.purpose == Purpose.COPY:
                connection.execute(update(_COPIES).where(
                    _COPIES.c.message_id == row.message_id, _COPIES.c.sent_at.is_(None))
                    .values(sent_at=now))
                details["copy_id"] = str(message["X-Embargo-Copy-Id"])
            audit.record(session,
                         action="copy_sent" if row.purpose == Purpose.COPY else "notice_sent",
                         actor=self.worker, at=now, release_id=row.release_id, details=details)
        if not recorded:
            return 0
        log.info("notice %s delivered to %s via %s", row.purpose, row.to_addr, where)
        return 1

    def _alert(self, session: Any, row: OutboxMessage, release: Release | None,
               alert: Alert, now: datetime) -> None:
        if row.purpose == ALERT:  # never an alert about an alert: it could not end
            log.error("alert %s to %s not delivered: %s", row.message_id, row.to_addr,
                      row.last_error)
            return
        alert = dataclasses.replace(alert, subject=" ".join(alert.subject.split()))
        raise_alert(session, alert, release_id=row.release_id,
                    owner=release.owner if release is not None else None,
                    alerts_to=self.s.alerts_to, now=now, actor=self.worker)

    def _fail(self, row: OutboxMessage, token: str, reason: str,
              release: Release | None) -> None:
        """A permanent failure: no retry; audited, alerted, shown."""
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            if not affected(session.execute(update(_OUTBOX).where(self._mine(row, token)).values(
                    attempts=row.attempts + 1, last_error=reason, given_up_at=now,
                    failed_at=now, claim_expires_at=None))):
                return
            audit.record(session, action="notice_failed", actor=self.worker, at=now,
                         release_id=row.release_id,
                         details={"to": row.to_addr, "purpose": row.purpose,
                                  "message_id": row.message_id, "reason": reason})
            row.last_error = reason
            self._alert(session, row, release, Alert(
                # one alert per failure: a notice resent and refused again is told again
                kind="notice_failed", key=f"{row.message_id} #{row.attempts + 1}",
                subject=f"Notice to {row.to_addr} failed ({row.purpose})",
                lines=[f"The {row.purpose} notice to {row.to_addr} could not be delivered "
                       "and will not be retried:", "", f"  {reason}", "",
                       f"Fix the cause, then `embargo resend {row.id}` (or `embargo resend "
                       f"{row.id} --to ADDRESS`) sends it again."]), now)
        log.error("notice %s to %s failed: %s", row.message_id, row.to_addr, reason)

    def _retry(self, row: OutboxMessage, token: str, reason: str,
               release: Release | None) -> None:
        """A temporary failure: retried with backoff until give_up_after has
        passed since the first try (a notice first tried long after it was
        due, like an owner's summary that waited for the others, gets its
        retries too: ``not_before`` moves to that first try)."""
        now = self.s.clock.now()
        attempts = row.attempts + 1
        since = row.not_before if row.attempts else now
        give_up = now - since >= self.give_up_after
        wait = NOTICE_DELIVERY.delay(attempts)
        with transaction(self.sessions) as session:
            if not affected(session.execute(update(_OUTBOX).where(self._mine(row, token)).values(
                    attempts=attempts, last_error=reason, claim_expires_at=None,
                    next_attempt_at=now + wait, not_before=since,
                    given_up_at=now if give_up else None))):
                return
            row.last_error = reason
            if give_up:
                audit.record(session, action="notice_given_up", actor=self.worker, at=now,
                             release_id=row.release_id,
                             details={"to": row.to_addr, "purpose": row.purpose,
                                      "message_id": row.message_id, "attempts": attempts,
                                      "reason": reason})
                self._alert(session, row, release, Alert(
                    kind="notice_given_up", key=f"{row.message_id} #{attempts}",
                    subject=f"Notice to {row.to_addr} given up ({row.purpose})",
                    lines=[f"The {row.purpose} notice to {row.to_addr} was tried {attempts} "
                           f"times since {since.isoformat()} and is given up:", "",
                           f"  {reason}", "",
                           f"`embargo resend {row.id}` sends it again."]), now)
            elif attempts == 1 and not row.attempts:
                self._alert(session, row, release, Alert(
                    kind="notice_delayed", key=row.not_before.isoformat(),
                    subject=f"Notices of a release are not getting through ({row.to_addr})",
                    lines=[f"The {row.purpose} notice to {row.to_addr} could not be handed "
                           "to the mail server; Embargo keeps trying:", "", f"  {reason}"]),
                    now)
        if give_up:
            log.error("gave up on notice %s to %s after %d attempts: %s",
                      row.message_id, row.to_addr, attempts, reason)
        else:
            log.warning("notice %s to %s not delivered (attempt %d), retrying in %s: %s",
                        row.message_id, row.to_addr, attempts, wait, reason)

    def _give_up(self, row: OutboxMessage, token: str, reason: str) -> None:
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            if not affected(session.execute(update(_OUTBOX).where(self._mine(row, token)).values(
                    given_up_at=now, last_error=reason, claim_expires_at=None))):
                return
            audit.record(session, action="notice_given_up", actor=self.worker, at=now,
                         release_id=row.release_id,
                         details={"to": row.to_addr, "purpose": row.purpose,
                                  "message_id": row.message_id, "reason": reason})
        log.error("notice %s to %s given up: %s", row.message_id, row.to_addr, reason)


class _Run:
    """One run_once: up to ``workers`` threads, each claiming one row at a
    time, and one thread renewing the claims until they are done."""

    def __init__(self, relay: OutboxRelay, token: str) -> None:
        self.relay = relay
        self.token = token
        self.lock = threading.Lock()
        self.skip: set[int] = set()
        self.delivered = 0
        self.releases: dict[str, Release] = {}
        self.recipients: dict[str, Recipient] = {}
        self.deks: dict[str, bytes] = {}
        self.done = threading.Event()

    def _context(self, row: OutboxMessage) -> tuple[Release, Recipient | None]:
        """The row's release (its documents and recipients), read once per run."""
        with self.lock:
            release = self.releases.get(row.release_id)
        if release is None:
            with transaction(self.relay.sessions) as session:
                release = session.scalars(select(Release).where(
                    Release.id == row.release_id)).one()
                release.documents  # noqa: B018 - load before the session closes
                release.recipients  # noqa: B018
                session.expunge_all()
            with self.lock:
                release = self.releases.setdefault(row.release_id, release)
                for recipient in release.recipients:
                    self.recipients.setdefault(recipient.id, recipient)
        return release, self.recipients.get(row.recipient_id or "")

    def _dek(self, release_id: str) -> Callable[[], bytes]:
        """The release's data key, opened once per run however many copies
        carry its documents."""
        def get() -> bytes:
            with self.lock:
                if release_id not in self.deks:
                    assert self.relay.opener is not None
                    self.deks[release_id] = self.relay.opener.dek(release_id)
                return self.deks[release_id]
        return get

    def _next(self) -> OutboxMessage | None:
        if self.relay.stop.is_set():
            return None
        with self.lock:
            skip = set(self.skip)
        row = self.relay._claim(self.token, skip)
        if row is not None:
            with self.lock:
                self.skip.add(row.id)
        return row

    def _work(self, transport: MailTransport, first: OutboxMessage | None = None) -> None:
        relay = self.relay
        try:
            while True:
                row, first = first or self._next(), None
                if row is None:
                    return
                try:
                    release, recipient = self._context(row)
                    done = relay._deliver(row, self.token, release, recipient, transport,
                                          self._dek(release.id))
                except Exception as exc:  # contained: recorded, the others carry on
                    log.exception("notice %s to %s failed unexpectedly", row.message_id,
                                  row.to_addr)
                    relay._retry(row, self.token, f"{type(exc).__name__}: {exc}", None)
                    done = 0
                with self.lock:
                    self.delivered += done
        finally:
            transport.close()

    def _renewer(self) -> None:
        every = max(0.05, self.relay.lease.total_seconds() / 3)
        while not self.done.wait(every):
            try:
                self.relay._renew(self.token)
            except Exception as exc:
                report(self.relay.watch, exc, doing="renewing the relay's claims", logger=log)

    def go(self) -> int:
        relay = self.relay
        first = self._next()
        if first is None:
            return 0
        extra: list[MailTransport] = []
        if relay.make_transport is not None:
            extra = [relay.make_transport() for _ in range(relay.workers - 1)]
        threads = [threading.Thread(target=self._work, args=(t,), name=f"embargo-relay-{i + 1}",
                                    daemon=True) for i, t in enumerate(extra)]
        renewer = threading.Thread(target=self._renewer, name="embargo-relay-renew",
                                   daemon=True)
        renewer.start()
        for thread in threads:
            thread.start()
        try:
            self._work(relay.transport, first)
        finally:
            # Even when this worker failed, the others' claims are renewed
            # until their messages are handed over and recorded: a claim that
            # lapsed mid-send would be sent again by the next run.
            for thread in threads:
                thread.join()
            self.done.set()
            renewer.join()
        return self.delivered
