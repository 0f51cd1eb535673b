"""The outbox relay: claims due notices, hands each to the mail transport,
records the deliveries in batches, and backs off while the mail server is
down.

Exactly once, as far as it can be kept: a run's workers take their notices
from rows claimed in one statement, as many as they send in a tenth of a
second while the mail server is fast, and one at a time while it takes
longer than 50 ms a message (so that a slow server's notices
are spread over every relay, and a relay then holds at most ``workers``
rows; rows claimed and not yet taken go back when the server turns out
slow). A thread renews the claims while the messages are on their way; a
worker checks that it still holds a claim right before it hands the message
over, unless it took it so recently that no other relay can have taken it
since (a third of the lease short of its lapse, and of the moment this
node's heartbeat would be too old were it to stop); and a delivery is
recorded only by an update that still names the claimant. A claim lapses
``lease`` after its last renewal, and at once when the node that holds it
has stopped heartbeating for longer than ``lease``.

Deliveries are recorded in batches, off the workers' path: a recorder
thread records every worker's deliveries so far in one transaction once a
worker has ``record_batch`` unrecorded or ``RECORD_WAIT`` has passed since
the first of them began (in a run of handed notices, which claims nothing:
three quarters of a batch, or ``HANDED_RECORD_WAIT``; a worker that claims
records them in its claim's transaction), while the workers go on sending; a worker with
``record_batch`` unrecorded waits for them to be recorded before its next
message. What remains is one window per worker: a relay that dies after the
mail server took messages and before it recorded them leaves those rows to
be sent again, under the same Message-ID, by the relay that takes over: at
most ``record_batch`` messages a worker, and about ``RECORD_WAIT`` (plus a
transaction) of them; ``record_batch = 1`` keeps it to one always, at a
transaction a notice. An owner's summary sent before the others were
recorded is within that window too: sent again with them.

The "published" notices of a release about to be published can be built
before the instant (:meth:`OutboxRelay.prepare`, from the public addresses
its documents will have) with the connections to the mail server opened,
so that at the instant the relay only sends. Nothing is sent before its
outbox row exists, which is only once the release is published; a prepared
message is sent only when the published release and the row give the same
inputs it was built from (``release.notices.published_inputs``), and
composed afresh otherwise. Prepared connections that idle are checked with
``NOOP`` and closed when the publication does not come.

The notices a publication creates are handed over (:meth:`OutboxRelay.run_handed`):
the finish inserts them claimed for this relay (all of them once the server is
known to be quick, else one a worker) and passes the rows while it commits; the
workers wait for the commit, then send, with no claim statement. The owner's
summary, claimed with them, is held back until the run has finished with the
others, and built while the last are on their way: sent as built if they all
went as assumed, composed afresh otherwise, and put off (its claim given back)
while one of them is still to be retried.

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
import functools
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.errors import MessageError
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    case,
    exists,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import BindParameter

from config.errors import DeliveryError, DeliveryRefused, SealError
from config.retry import NOTICE_DELIVERY
from jobs.mail import MailTransport, Prepared, prepare_message
from jobs.outage import DatabaseWatch, report
from release import audit
from release.alerts import ALERT, Alert, raise_alert
from release.context import Services
from release.copies import DocumentOpener
from release.notices import (
    Attachment,
    Delivery,
    compose,
    published_inputs,
    recipient_inputs,
    release_inputs,
)
from release.publishing import HandedNotices, message_id
from release.records import (
    Copy,
    Document,
    Node,
    OutboxMessage,
    Purpose,
    Recipient,
    Release,
    ReleaseState,
    table_of,
)
from storage.db import affected, read_transaction, server_time, transaction

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=3)
# A worker records its deliveries once this long has passed since the first
# unrecorded one began (or after record_batch of them); in a run of handed
# notices HANDED_RECORD_WAIT (its records do not ride on claims, so fewer, larger).
RECORD_WAIT = timedelta(milliseconds=10)
HANDED_RECORD_WAIT = timedelta(milliseconds=25)
# How much work (in time, at the mail server's recent pace) a worker claims at once:
# one row at a time once a message takes more than half this (issue 12's slow servers,
# whose notices are spread over every relay).
_CLAIM_HOLD = 0.1
# Prepared notices and connections are kept this long past the instant, then dropped.
PREPARED_FOR = timedelta(seconds=60)
# An idle prepared connection is checked (NOOP) this often, and before use once
# it has idled this long.
KEEPALIVE_SECONDS = 10.0
IDLE_CHECK_SECONDS = 1.0
_OUTBOX = table_of(OutboxMessage)
_COPIES = table_of(Copy)
_DOCUMENTS = table_of(Document)
_RECIPIENTS = table_of(Recipient)
TOO_LATE = "the embargo lifted before this copy could be delivered; it was not sent"
SUMMARY = Purpose.OWNER_SUMMARY
_MINE = and_(_OUTBOX.c.id.in_(bindparam("ids", expanding=True)),
             _OUTBOX.c.claimed_by == bindparam("token"), _OUTBOX.c.delivered_at.is_(None))
_RECORD = (update(_OUTBOX).where(_OUTBOX.c.id == bindparam("row"))
           .values(attempts=_OUTBOX.c.attempts + 1, delivered_at=bindparam("at"),
                   delivered_to=bindparam("via"), last_error=None, claim_expires_at=None))
# Given up while on its way (a cancellation): it went all the same; the reason stays.
_RECORD_GIVEN_UP = (update(_OUTBOX).where(_OUTBOX.c.id == bindparam("row"))
                    .values(attempts=_OUTBOX.c.attempts + 1, delivered_at=bindparam("at"),
                            delivered_to=bindparam("via"), claim_expires_at=None))
_COPY_SENT = (update(_COPIES).where(_COPIES.c.message_id == bindparam("mid"),
                                    _COPIES.c.sent_at.is_(None))
              .values(sent_at=bindparam("at")))


def _waiting_summary() -> ColumnElement[bool]:
    """An owner's summary whose release still has notices on their way: it
    says what happened, so it goes once they are all delivered or failed."""
    other = aliased(OutboxMessage)
    return and_(OutboxMessage.purpose == SUMMARY, exists().where(
        other.release_id == OutboxMessage.release_id, other.purpose == Purpose.PUBLISHED,
        other.delivered_at.is_(None), other.given_up_at.is_(None)))


_NODES = table_of(Node)
_DEAD_NODES = select(_NODES.c.name).where(
    _NODES.c.name != bindparam("me"), _NODES.c.heartbeat_at >= bindparam("hour_ago"),
    or_(_NODES.c.stopped_at.is_not(None), _NODES.c.heartbeat_at < bindparam("lease_ago")))
_RELEASES = table_of(Release)
_RELEASE_FACTS = select(_RELEASES.c.id, _RELEASES.c.title, _RELEASES.c.instant, _RELEASES.c.zone,
                        _RELEASES.c.wall).where(_RELEASES.c.id == bindparam("release"))
_DOCUMENT_FACTS = select(_DOCUMENTS.c.kind, _DOCUMENTS.c.filename, _DOCUMENTS.c.organisation,
                         _DOCUMENTS.c.public_url).where(
    _DOCUMENTS.c.release_id == bindparam("release")).order_by(_DOCUMENTS.c.position)
_RECIPIENT_FACTS = select(_RECIPIENTS.c.id, _RECIPIENTS.c.name, _RECIPIENTS.c.organisation).where(
    _RECIPIENTS.c.release_id == bindparam("release"))
_NODE_BEAT = select(_NODES.c.heartbeat_at, _NODES.c.stopped_at).where(
    _NODES.c.name == bindparam("me"))
_HELD = select(_OUTBOX.c.id, _OUTBOX.c.given_up_at).where(_MINE).with_for_update()
_GIVE_BACK = update(_OUTBOX).where(_MINE).values(claim_expires_at=None)


def _due_at(now: Any) -> ColumnElement[bool]:
    return and_(OutboxMessage.delivered_at.is_(None), OutboxMessage.given_up_at.is_(None),
                OutboxMessage.not_before <= now, OutboxMessage.next_attempt_at <= now,
                ~_waiting_summary())


def _free_at(now: Any, dead: Sequence[Any]) -> ColumnElement[bool]:
    """Unclaimed, or the claim lapsed, or its node stopped heartbeating
    (``dead``: LIKE patterns of their claims)."""
    return or_(OutboxMessage.claim_expires_at.is_(None), OutboxMessage.claim_expires_at < now,
               *[OutboxMessage.claimed_by.like(pattern, escape="/") for pattern in dead])


@functools.cache
def _claim_statement(dead: int, notices_only: bool) -> Any:
    """UPDATE … RETURNING that claims up to ``:n`` due rows that are free at
    ``:now`` for ``:token`` until ``:until``, passing over the ids ``:skip``;
    with ``dead`` patterns ``:dead_0`` … of dead nodes' claims. Built once
    per shape: building and keying the statement cost more than running it."""
    now: BindParameter[datetime] = bindparam("now")
    candidates = (
        select(OutboxMessage.id).where(
            _due_at(now), _free_at(now, [bindparam(f"dead_{i}") for i in range(dead)]),
            OutboxMessage.id.notin_(bindparam("skip", expanding=True)),
            OutboxMessage.purpose != Purpose.COPY if notices_only else true())
        .order_by(  # notices of publication before (slow, attachment-laden) copies
            case((OutboxMessage.purpose == Purpose.COPY, 1), else_=0), OutboxMessage.id)
        .limit(bindparam("n"))
        # PostgreSQL: rows another relay is claiming are passed over, not waited for
        # (and re-checked once locked); SQLite has one writer at a time. A CTE, run
        # once: as a subquery of the UPDATE, PostgreSQL may run it again for each row,
        # skipping the rows it has just updated, and claim every row there is.
        .with_for_update(skip_locked=True, of=OutboxMessage)
        .cte("candidates").prefix_with("MATERIALIZED", dialect="postgresql"))
    return (update(_OUTBOX).where(_OUTBOX.c.id.in_(select(candidates.c.id)),
                                  _OUTBOX.c.delivered_at.is_(None),
                                  _OUTBOX.c.given_up_at.is_(None))
            .values(claimed_by=bindparam("token"), claim_expires_at=bindparam("until"))
            .returning(*_OUTBOX.c))


def _like_prefix(text: str) -> str:
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")


@dataclass(frozen=True, kw_only=True)
class _Sent:
    """A message the mail server took, to be recorded."""

    row: OutboxMessage
    at: datetime
    where: str
    copy_id: str | None = None


@dataclass(kw_only=True)
class _Ready:
    """The "published" notices of one release, built before its instant."""

    release: Release  # as read then, the public addresses as they will be
    inputs: tuple[object, ...]  # release.notices.published_inputs, as predicted
    messages: dict[str, tuple[tuple[object, ...], Prepared]]  # Message-ID -> (inputs, message)
    until: datetime
    used: set[str] = field(default_factory=set)


class OutboxRelay:
    def __init__(self, services: Services, transport: MailTransport, *, sender: str,
                 worker: str, give_up_after: timedelta = timedelta(hours=24),
                 lease: timedelta = LEASE, opener: DocumentOpener | None = None,
                 workers: int = 1,
                 make_transport: Callable[[], MailTransport] | None = None,
                 stop: threading.Event | None = None, record_batch: int = 8) -> None:
        """``transport`` serves the first worker; with ``workers`` > 1,
        ``make_transport`` gives each further worker its own (a transport is
        used by one thread at a time). ``worker`` names the node: its claims
        are void once that node's heartbeat is older than ``lease`` or it has
        stopped. Once ``stop`` is set a run takes no new notice and finishes
        those on their way, so the node can say it stopped without leaving a
        message in flight to be sent again. ``record_batch`` bounds the
        deliveries a worker records in one transaction, and so what a crash
        can send twice (``mail.record_batch``; 1 records each at once)."""
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
        self.record_batch = max(1, record_batch)
        self.stop = stop or threading.Event()
        self.sessions = services.sessions
        self.watch: DatabaseWatch | None = None  # set by the node it runs in
        self._lock = threading.Lock()
        self._pace: float | None = None  # seconds a notice took the mail server, lately
        self._ready: dict[str, _Ready] = {}
        self._idle: list[tuple[MailTransport, float]] = []  # open, with when last used
        # Until when (this relay's clock) the other relays will leave this node's
        # claims to it, were its heartbeat to stop now: read while preparing, for the
        # notices handed over at the instant (a later heartbeat only moves it on; a
        # node told to stop takes no notices, DeliveryLoop.token).
        self._trusted_until: datetime | None = None
        self._sending = 0  # runs holding rows now

    # -- claims ---------------------------------------------------------------

    def _nodes(self, session: Session) -> tuple[list[str], timedelta]:
        """Nodes (other than this one) whose heartbeat is older than the
        lease by the database server's clock, or that have stopped; within
        the last hour (an older one's claims have lapsed by themselves).
        Read afresh for each claim: a node silent for a moment and heard
        from again is alive, and so are the claims it makes after.

        And how long the other relays will still take this node's claims for
        its own: the lease less the age of its heartbeat (the whole lease
        when it has none: a relay outside a node), nothing once it stopped."""
        connection = session.connection()
        now = server_time(connection)
        dead = list(connection.execute(_DEAD_NODES, {
            "me": self.worker, "hour_ago": now - timedelta(hours=1),
            "lease_ago": now - self.lease}).scalars())
        mine = connection.execute(_NODE_BEAT, {"me": self.worker}).first()
        if mine is None:
            return dead, self.lease
        if mine.stopped_at is not None:
            return dead, timedelta(0)
        return dead, max(timedelta(0), self.lease - (now - mine.heartbeat_at))

    def claim_size(self) -> int:
        """How many rows a worker claims at once: one until the mail server
        has been seen to take notices quickly (a quick greeting says nothing
        of how long it takes over a message), then as many as it takes in
        ``_CLAIM_HOLD`` (at most ``record_batch``): one again once a message
        takes more than half that."""
        with self._lock:
            pace = self._pace
        if pace is None:
            return 1
        return max(1, min(self.record_batch, int(_CLAIM_HOLD / max(pace, 1e-6))))

    def seen_slow(self) -> bool:
        """Whether the mail server has been seen to take so long a message
        that rows are claimed one at a time."""
        with self._lock:
            known = self._pace is not None
        return known and self.claim_size() == 1

    def _learn(self, seconds: float) -> None:
        with self._lock:
            self._pace = seconds if self._pace is None else 0.7 * self._pace + 0.3 * seconds

    def _claim(self, token: str, skip: set[int], limit: int,
               sent: Sequence[_Sent] = (), release: Sequence[int] = ()
               ) -> tuple[int, list[OutboxMessage], datetime | None]:
        """In one transaction: record ``sent`` (see :meth:`_record`), give
        back the claims on ``release`` (taken and not sent), and claim up to
        ``limit`` due rows for ``token``, notices before copies, in one
        statement (copies one at a time: each is slow, and heavy). Returns
        how many of ``sent`` were recorded, the rows claimed, and until when
        (by this relay's clock) no other relay can take them: a third of the
        lease short of the earlier of their lapse and of the moment this
        node's heartbeat would be older than the lease, were it to stop."""
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            recorded = self._record(session, token, sent)
            if release:
                session.connection().execute(_GIVE_BACK, {"ids": list(release), "token": token})
            rows: list[OutboxMessage] = []
            safe: datetime | None = None
            if limit > 0:
                dead, trusted = self._nodes(session)
                rows = self._take(session, token, now, dead, skip, limit, notices_only=limit > 1)
                if not rows and limit > 1:
                    rows = self._take(session, token, now, dead, skip, 1, notices_only=False)
                safe = now + min(trusted, self.lease) - self.lease / 3
        self._delivered_log(sent)
        return recorded, rows, safe

    def _take(self, session: Session, token: str, now: datetime, dead: list[str],
              skip: set[int], limit: int, *, notices_only: bool) -> list[OutboxMessage]:
        params: dict[str, Any] = {"now": now, "skip": sorted(skip), "n": limit,
                                  "token": token, "until": now + self.lease}
        params.update({f"dead_{i}": f"{_like_prefix(name)}#%" for i, name in enumerate(dead)})
        taken = session.connection().execute(
            _claim_statement(len(dead), notices_only), params).all()
        rows = [OutboxMessage(**row._mapping) for row in taken]
        rows.sort(key=lambda r: (r.purpose == Purpose.COPY, r.id))
        return rows

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

    # -- records --------------------------------------------------------------

    def _record(self, session: Session, token: str, sent: Sequence[_Sent]) -> int:
        """Record a worker's batch of deliveries in the caller's transaction,
        each only while the row still names ``token`` (a row given up while
        on its way, by a cancellation, is recorded as sent all the same); a
        row taken over by another relay meanwhile is audited as such.
        Returns how many were this relay's to record."""
        if not sent:
            return 0
        connection = session.connection()
        held = dict(connection.execute(
            _HELD, {"ids": [s.row.id for s in sent], "token": token}).all())
        for statement, batch in (
                (_RECORD, [s for s in sent if s.row.id in held and held[s.row.id] is None]),
                (_RECORD_GIVEN_UP, [s for s in sent if held.get(s.row.id) is not None])):
            if batch:
                connection.execute(statement, [{"row": s.row.id, "at": s.at, "via": s.where}
                                               for s in batch])
        copies = [s for s in sent if s.row.purpose == Purpose.COPY and s.row.id in held]
        if copies:
            connection.execute(_COPY_SENT, [{"mid": s.row.message_id, "at": s.at}
                                            for s in copies])
        entries = []
        for s in sent:
            details: dict[str, Any] = {"to": s.row.to_addr, "purpose": s.row.purpose,
                                       "message_id": s.row.message_id, "via": s.where}
            if s.row.id not in held:
                # Taken over by another relay while on its way; the mail server has
                # it all the same: say so.
                log.error("notice %s to %s was handed to %s after its claim was lost; "
                          "it may arrive twice", s.row.message_id, s.row.to_addr, s.where)
                details["claim_lost"] = True
            if s.copy_id is not None:
                details["copy_id"] = s.copy_id
            entries.append(audit.Entry(
                action="copy_sent" if s.row.purpose == Purpose.COPY else "notice_sent",
                actor=self.worker, at=s.at, release_id=s.row.release_id, details=details))
        audit.record_many(session, entries)
        return len(held)

    def _delivered_log(self, sent: Sequence[_Sent]) -> None:
        if len(sent) == 1:
            log.info("notice %s delivered to %s via %s", sent[0].row.purpose,
                     sent[0].row.to_addr, sent[0].where)
        elif sent:
            log.info("%d notices delivered via %s: %s", len(sent), sent[0].where,
                     ", ".join(f"{s.row.purpose} to {s.row.to_addr}" for s in sent))

    # -- prepared notices -----------------------------------------------------

    def prepare(self, release_id: str, instant: datetime | None = None) -> int:
        """A publication of ``release_id`` is coming (at ``instant``, when the
        caller knows it): build its "published" notices now, from the public
        addresses its documents will have, and open ``workers`` connections
        to the mail server, so that at the instant the relay only sends.
        Nothing is sent here; the notices go once their outbox rows exist,
        i.e. once the release is published. Stops building at the instant
        (what is not built by then is composed when sent). Returns how many
        notices were built; 0 where the transport does not send prepared
        messages (the file outbox) or the release is not about to be
        published."""
        if not self.transport.prepares:
            return 0
        with read_transaction(self.sessions) as session:
            release = session.scalars(select(Release).where(Release.id == release_id)).first()
            if release is None or release.state not in (ReleaseState.QUEUED,
                                                        ReleaseState.PUBLISHING):
                return 0
            if instant is not None and release.instant != instant:
                return 0
            release.documents  # noqa: B018 - load before the session closes
            release.recipients  # noqa: B018
            session.expunge_all()
            self._note_trust(session)
        connecting = self._open_connections()
        try:
            for document in release.documents:  # detached: the addresses publication gives
                document.public_url = self.s.public.url(f"{release.slug}/{document.filename}")
            ready = _Ready(release=release, inputs=published_inputs(release), messages={},
                           until=release.instant + PREPARED_FOR)
            with self._lock:
                self._ready[release.id] = ready
            for recipient in release.recipients:
                if self.s.clock.now() >= release.instant:
                    break
                row = OutboxMessage(
                    message_id=message_id(release.id, Purpose.PUBLISHED, recipient.id),
                    release_id=release.id, recipient_id=recipient.id,
                    purpose=Purpose.PUBLISHED, to_addr=recipient.email,
                    created_at=release.instant)
                try:
                    prepared = prepare_message(compose(row, release, recipient,
                                                       sender=self.sender))
                except Exception:  # composed again when sent, and recorded then
                    log.warning("cannot prepare the notice to %s; it is composed when it goes",
                                recipient.email, exc_info=True)
                    continue
                if prepared is not None:
                    with self._lock:
                        ready.messages[row.message_id] = (
                            recipient_inputs(row, recipient.name, recipient.organisation,
                                             self.sender), prepared)
        finally:
            for thread in connecting:
                thread.join()
        log.info("prepared %d notices of %s and %d connections", len(ready.messages),
                 release.id, len(self._idle))
        return len(ready.messages)

    def _note_trust(self, session: Session) -> datetime:
        _, trusted = self._nodes(session)
        until = self.s.clock.now() + trusted
        with self._lock:
            self._trusted_until = until
        return until

    def sending(self) -> bool:
        """Whether a run of this relay holds notices to send now."""
        with self._lock:
            return self._sending > 0

    def hand_token(self) -> str:
        """A claim token for notices a publisher inserts claimed for this
        relay, to be given back with them (:meth:`run_handed`)."""
        return f"{self.worker}#{secrets.token_hex(4)}"

    def hand_most(self) -> int | None:
        """How many notices of a publication to take as they are committed:
        all (None) once the mail server has been seen to take notices
        quickly; otherwise one a worker, as a claim would (see
        :meth:`claim_size`), the rest left to any relay."""
        with self._lock:
            known = self._pace is not None
        return None if known and self.claim_size() > 1 else self.workers

    def run_handed(self, notices: HandedNotices) -> int:
        """Send the notices a publisher inserted claimed for this relay (its
        token from :meth:`hand_token`) and handed over as it committed them,
        once the commit is settled: no claim statement, and none of their
        records read when they were built ahead from what was published (the
        node's heartbeat is read when the one read while preparing is too
        old). The owner's summary goes as soon as the others have been handed
        to the mail server. Only these rows: others wait for :meth:`run_once`.
        A run that starts late (the relay was busy) checks each claim before
        its notice goes; one another relay took meanwhile is left to it.
        Returns how many were delivered."""
        if not notices.rows:
            return 0
        with self._lock:
            trusted = self._trusted_until
        if trusted is None or self.s.clock.now() >= trusted - self.lease / 3:
            try:
                with read_transaction(self.sessions) as session:
                    trusted = self._note_trust(session)
            except Exception as exc:  # each notice's claim is checked before it goes
                report(self.watch, exc, doing="reading this node's heartbeat", logger=log)
                trusted = None
        # Until then no other relay can have taken them; after it (a run that started
        # late) each claim is checked, and renewed, right before its notice goes.
        safe = min(notices.until, trusted) - self.lease / 3 if trusted is not None else None
        return _Run(self, notices.token, handed=notices, safe=safe).go()

    def _open_connections(self) -> list[threading.Thread]:
        """Open connections up to ``workers`` in the idle pool, each in a
        thread of its own (a TLS handshake and login take a while)."""
        if self.make_transport is None:
            return []
        with self._lock:
            wanted = self.workers - len(self._idle)
        threads = []
        for _ in range(max(0, wanted)):
            transport = self.make_transport()
            thread = threading.Thread(target=self._connect, args=(transport,),
                                      name="embargo-relay-connect", daemon=True)
            thread.start()
            threads.append(thread)
        return threads

    def _connect(self, transport: MailTransport) -> None:
        try:
            transport.connect()
        except DeliveryError as exc:
            log.warning("cannot open a connection ahead of the notices: %s", exc)
            return
        with self._lock:
            self._idle.append((transport, time.monotonic()))

    def ready_for(self, release_id: str) -> Release | None:
        """The release as prepared, if its notices were built ahead."""
        with self._lock:
            ready = self._ready.get(release_id)
            return ready.release if ready is not None else None

    def ready_as(self, release_id: str, inputs: tuple[object, ...]) -> Release | None:
        """The release as prepared, if its notices were built ahead from
        ``inputs`` (``release.notices.published_inputs``, as published)."""
        with self._lock:
            ready = self._ready.get(release_id)
            return ready.release if ready is not None and ready.inputs == inputs else None

    def prepared(self, row: OutboxMessage, inputs: tuple[object, ...], name: str | None,
                 organisation: str | None) -> Prepared | None:
        """The message built ahead for ``row``, when the release's and the
        row's inputs (``release.notices.published_inputs``, and its
        recipient's ``name`` and ``organisation``) are those it was built
        from."""
        with self._lock:
            ready = self._ready.get(row.release_id)
            if ready is None or ready.inputs != inputs:
                return None
            entry = ready.messages.get(row.message_id)
            if entry is None or entry[0] != recipient_inputs(row, name, organisation,
                                                             self.sender):
                return None
            ready.used.add(row.message_id)
            return entry[1]

    def keep_alive(self) -> bool:
        """Check the idle prepared connections (``NOOP`` after
        ``KEEPALIVE_SECONDS``), drop prepared notices once used or past
        their time, and close the connections when nothing is prepared any
        more. Returns whether anything is still held."""
        now = self.s.clock.now()
        with self._lock:
            for release_id, ready in list(self._ready.items()):
                if now >= ready.until or (ready.messages and ready.used >= ready.messages.keys()):
                    del self._ready[release_id]
            wanted = bool(self._ready)
            stale = [(t, at) for t, at in self._idle
                     if not wanted or time.monotonic() - at >= KEEPALIVE_SECONDS]
            self._idle = [(t, at) for t, at in self._idle if (t, at) not in stale]
        kept = []
        for transport, _ in stale:
            if wanted and transport.keep_alive():
                kept.append((transport, time.monotonic()))
            else:
                transport.close()
        with self._lock:
            self._idle.extend(kept)
            return bool(self._ready or self._idle)

    def drop_prepared(self) -> None:
        """Forget the prepared notices and close the idle connections."""
        with self._lock:
            self._ready.clear()
            idle, self._idle = self._idle, []
        for transport, _ in idle:
            transport.close()

    def _transports(self) -> list[tuple[MailTransport, bool, bool]]:
        """A transport for each worker of a run: the idle prepared ones first,
        then this relay's own, then new ones. Each with whether it may go
        back to the pool, and whether it idled long enough to be checked
        (NOOP, by its worker) before use."""
        with self._lock:
            pooled, self._idle = self._idle[:self.workers], self._idle[self.workers:]
        now = time.monotonic()
        chosen = [(transport, True, now - at >= IDLE_CHECK_SECONDS) for transport, at in pooled]
        if len(chosen) < self.workers:
            chosen.append((self.transport, False, False))
        while len(chosen) < self.workers:
            assert self.make_transport is not None
            chosen.append((self.make_transport(), True, False))
        return chosen

    def _put_back(self, transport: MailTransport, poolable: bool) -> None:
        """After a run: keep the connection open while notices are prepared
        (another publication is coming), else close it."""
        with self._lock:
            if poolable and self._ready and len(self._idle) < self.workers:
                self._idle.append((transport, time.monotonic()))
                return
        transport.close()

    # -- the run --------------------------------------------------------------

    def run_once(self) -> int:
        """Deliver every notice that is due now and that no live relay
        holds. Returns how many were delivered."""
        now = self.s.clock.now()
        overdue = and_(
            OutboxMessage.delivered_at.is_(None), OutboxMessage.given_up_at.is_(None),
            OutboxMessage.not_after.is_not(None), OutboxMessage.not_after <= now,
            _free_at(now, []))
        with read_transaction(self.sessions) as session:  # seldom any: no writer lock
            any_late = session.scalars(select(OutboxMessage.id).where(overdue).limit(1)).first()
        if any_late is not None:
            with transaction(self.sessions) as session:
                for row in session.scalars(select(OutboxMessage).where(overdue)).all():
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
        with read_transaction(self.sessions) as session:
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
        with read_transaction(self.sessions) as session:
            copy = session.scalars(select(Copy).where(Copy.message_id == row.message_id)).one()
            wanted = json.loads(copy.document_ids)
        documents = {d.id: d for d in release.documents}
        key = dek()
        return [Attachment(document=documents[d],
                           data=self.opener.read(release.id, documents[d], dek=key),
                           copy_id=copy.id) for d in wanted]

    def _summary(self, release: Release, handed_over: Collection[int] = ()
                 ) -> list[Delivery] | None:
        """What became of each "published" notice of ``release``, for its
        owner's summary: delivered as recorded, or as ``handed_over`` to the
        mail server by this run and not recorded yet; failed, or given up.
        None while one is still on its way (not yet tried, or to be retried):
        the summary waits for it."""
        with read_transaction(self.sessions) as session:
            rows = session.execute(select(
                OutboxMessage.id, OutboxMessage.recipient_id, OutboxMessage.to_addr,
                OutboxMessage.delivered_at, OutboxMessage.given_up_at,
                OutboxMessage.last_error).where(OutboxMessage.release_id == release.id,
                                                OutboxMessage.purpose == Purpose.PUBLISHED)
                .order_by(OutboxMessage.id)).all()
        names = {r.id: r.name for r in release.recipients}
        summary = []
        for row_id, rid, addr, at, given_up, error in rows:
            delivered = at is not None or row_id in handed_over
            if not delivered and given_up is None:
                return None
            summary.append(Delivery(name=names.get(rid or "", addr), address=addr,
                                    delivered=delivered, error=None if delivered else error))
        return summary

    def _deliver(self, row: OutboxMessage, token: str, release: Release,
                 recipient: Recipient | None, transport: MailTransport,
                 dek: Callable[[], bytes], *, prepared: Prepared | None = None,
                 confirmed: bool = False, summary: Sequence[Delivery] | None = None
                 ) -> _Sent | None:
        """Hand one claimed row to ``transport``: the message ``prepared``
        ahead when there is one, else composed now. ``confirmed``: the claim
        was taken or confirmed recently enough that it need not be checked
        again before the hand-over. ``summary``: for an owner's summary, what
        it says became of the others (:meth:`_summary`). Returns the
        delivery to record; failures are recorded here, at once."""
        if row.not_after is not None and self.s.clock.now() >= row.not_after:
            self._give_up(row, token, TOO_LATE)  # before the costly part: opening, stamping
            return None
        message = None
        if prepared is None:
            try:
                message = compose(row, release, recipient, sender=self.sender,
                                  attachments=self._attachments(row, release, dek),
                                  summary=summary,
                                  unstampable=self.s.copies_unstampable)
            except (SealError, DeliveryError) as exc:
                self._fail(row, token, str(exc), release)
                return None
            except Exception as exc:  # a record that cannot be composed: this notice alone
                log.exception("cannot build notice %s to %s", row.message_id, row.to_addr)
                self._fail(row, token, f"the message could not be built: "
                                       f"{type(exc).__name__}: {exc}", release)
                return None
            if row.not_after is not None and self.s.clock.now() >= row.not_after:
                self._give_up(row, token, TOO_LATE)
                return None
        if not confirmed and not self._still_mine(row, token):
            log.warning("notice %s to %s: claim lost before sending; left to its new holder",
                        row.message_id, row.to_addr)
            return None
        began = time.monotonic()
        try:
            if prepared is not None:
                where = transport.send_prepared(prepared, row.created_at)
            else:
                assert message is not None
                where = transport.send(message)
        except DeliveryRefused as exc:
            self._fail(row, token, str(exc), release)
            return None
        except DeliveryError as exc:
            self._retry(row, token, str(exc), release)
            return None
        except MessageError as exc:  # cannot be flattened: it never will be
            self._fail(row, token, f"the message could not be built: "
                                   f"{type(exc).__name__}: {exc}", release)
            return None
        except Exception as exc:
            log.exception("sending notice %s to %s failed unexpectedly", row.message_id,
                          row.to_addr)
            self._retry(row, token, f"{type(exc).__name__}: {exc}", release)
            return None
        if row.purpose != Purpose.COPY:
            self._learn(time.monotonic() - began)
        copy_id = (str(message["X-Embargo-Copy-Id"])
                   if message is not None and row.purpose == Purpose.COPY else None)
        return _Sent(row=row, at=self.s.clock.now(), where=where, copy_id=copy_id)

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
    """One run_once (or run_handed): up to ``workers`` threads sharing the
    rows claimed, each with its own unrecorded deliveries, and one thread
    renewing the claims until they are done. An owner's summary claimed
    beside its release's other notices is held back until this run has
    finished with them (it says what became of them)."""

    def __init__(self, relay: OutboxRelay, token: str, *,
                 handed: HandedNotices | None = None, safe: datetime | None = None) -> None:
        self.relay = relay
        self.token = token
        self.handed = handed
        self.handed_safe = safe
        # release id -> its "published" rows this run holds and has not finished with;
        # its owner's summary, held back until then
        self.open: dict[str, int] = {}
        self.parked: dict[str, OutboxMessage] = {}
        self.handed_over: set[int] = set()  # rows the mail server took in this run
        # A worker's deliveries are recorded once it has a batch unrecorded (with the
        # next claim, as a rule); in a run of handed notices, which claims nothing, once
        # it has three quarters of one, so that the transaction is done before the
        # worker has the whole batch and would have to wait for it.
        self._record_at = (max(1, relay.record_batch - relay.record_batch // 4)
                           if handed is not None else relay.record_batch)
        self.taking: dict[int, OutboxMessage] = {}  # taken by a worker, not finished with
        # release id -> its owner's summary built while the last of the others were on
        # their way, as if those (``going``) went: (going, what it says, the message);
        # being built: ``speculating``
        self.speculation: dict[str, tuple[frozenset[int], list[Delivery], Prepared] | None] = {}
        self.speculating: set[str] = set()
        self.lock = threading.Lock()
        self.skip: set[int] = set()
        self.delivered = 0
        self.releases: dict[str, Release] = {}
        self.recipients: dict[str, Recipient] = {}
        # release id -> its published_inputs and its recipients' (name, organisation),
        # as they are now: what a notice built ahead is checked against
        self.facts: dict[str, tuple[tuple[object, ...], dict[str, tuple[str, str | None]]]] = {}
        self.deks: dict[str, bytes] = {}
        self.loading = threading.Lock()
        self.claiming = threading.Lock()  # one worker claims for the run at a time
        self.queue: deque[OutboxMessage] = deque()  # claimed, not yet taken by a worker
        self.safe: dict[int, datetime] = {}  # row id -> until when it needs no re-check
        self.done = threading.Event()
        # Deliveries the mail server took: waiting to be recorded (worker, delivery,
        # when it began), how many of each worker's are not yet committed, and how
        # many are in a transaction now. Guarded by ``lock``; ``changed`` tells.
        self.changed = threading.Condition(self.lock)
        self.pending: list[tuple[int, _Sent, float]] = []
        self.sender_of: dict[int, int] = {}  # row id -> the worker that sent it
        self.outstanding: dict[int, int] = {}
        self.inflight = 0
        self.holding = 0  # workers waiting for their deliveries to be recorded
        self.finishing = False  # the workers are done: record what is left, then end
        self.broken = False  # a record failed: the workers take no more rows
        self.deciding = threading.Lock()
        # Whether the handed notices' transaction committed (False: none of them
        # exist), once a thread has waited for it.
        self.commit: bool | None = None

    def _context(self, row: OutboxMessage) -> tuple[Release, Recipient | None]:
        """The row's release (its documents and recipients), read once per run."""
        release = self._context_of(row.release_id)
        with self.lock:
            return release, self.recipients.get(row.recipient_id or "")

    def _context_of(self, release_id: str) -> Release:
        with self.lock:
            release = self.releases.get(release_id)
        if release is None:
            with self.loading:  # one worker reads it; the others wait for it
                with self.lock:
                    release = self.releases.get(release_id)
                if release is None:
                    release = self._load(release_id)
        return release

    def _load(self, release_id: str) -> Release:
        with read_transaction(self.relay.sessions) as session:
            release = session.scalars(select(Release).where(Release.id == release_id)).one()
            release.documents  # noqa: B018 - load before the session closes
            release.recipients  # noqa: B018
            session.expunge_all()
        with self.lock:
            for recipient in release.recipients:
                self.recipients.setdefault(recipient.id, recipient)
            self.releases[release_id] = release
        return release

    def _facts(self, release_id: str
               ) -> tuple[tuple[object, ...], dict[str, tuple[str, str | None]]]:
        """What the release's notices of publication are built from, as it
        is now, read once per run in three plain statements (the records
        themselves are loaded only for a notice composed here)."""
        with self.lock:
            facts = self.facts.get(release_id)
        if facts is not None:
            return facts
        with self.loading:
            with self.lock:
                facts = self.facts.get(release_id)
            if facts is not None:
                return facts
            with read_transaction(self.relay.sessions) as session:
                connection = session.connection()
                release = connection.execute(_RELEASE_FACTS, {"release": release_id}).one()
                documents = connection.execute(_DOCUMENT_FACTS, {"release": release_id}).all()
                people = connection.execute(_RECIPIENT_FACTS, {"release": release_id}).all()
            facts = (release_inputs(release.id, release.title, release.instant, release.zone,
                                    release.wall, [tuple(d) for d in documents]),
                     {p.id: (p.name, p.organisation) for p in people})
            with self.lock:
                self.facts[release_id] = facts
            return facts

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

    def _claim(self, limit: int, sent: Sequence[_Sent] = (),
               release: Sequence[int] = ()) -> list[OutboxMessage]:
        """Record ``sent``, give back ``release`` and claim up to ``limit``
        rows, in one transaction (no new rows once the relay is stopping)."""
        if self.relay.stop.is_set():
            limit = 0
        with self.lock:
            skip = set(self.skip)
        recorded, rows, safe = self.relay._claim(self.token, skip, limit, sent, release)
        with self.lock:
            if safe is not None:
                self.safe.update((r.id, safe) for r in rows)
            self.delivered += recorded
            self.skip.difference_update(release)  # not tried: any worker may take them again
            self.skip.update(r.id for r in rows)
        return rows

    def _send(self, row: OutboxMessage, transport: MailTransport) -> _Sent | None:
        relay = self.relay
        try:
            prepared = None
            ahead = relay.ready_for(row.release_id) if transport.prepares else None
            if row.purpose == Purpose.PUBLISHED and ahead is not None:
                inputs, people = self._facts(row.release_id)
                name, organisation = people.get(row.recipient_id or "", (None, None))
                prepared = relay.prepared(row, inputs, name, organisation)
            if prepared is not None:  # the records are not needed: it is built
                assert ahead is not None
                release, recipient = ahead, None
            else:
                release, recipient = self._context(row)
            summary = None
            if row.purpose == SUMMARY:
                with self.changed:
                    while row.release_id in self.speculating:  # being built: sooner than anew
                        self.changed.wait()
                    built = self.speculation.get(row.release_id)
                    handed_over = frozenset(self.handed_over)
                if built is not None and built[0] <= handed_over and transport.prepares:
                    # Built as if those on their way went, and every one of them did (the
                    # others were final when it was built, and this run holds the rest).
                    _, summary, prepared = built
                else:
                    summary = relay._summary(release, handed_over)
                    if summary is None:  # one is still on its way: it goes once all are done
                        log.info("owner's summary of %s put off: a notice of publication is "
                                 "still on its way", row.release_id)
                        self._record_now(0, [row.id])
                        return None
                    if built is not None and built[1] == summary and transport.prepares:
                        prepared = built[2]  # what it would say anyway
            # Claimed a moment ago: no other relay can have taken it yet, and checking
            # again would cost a transaction a notice.
            with self.lock:
                safe = self.safe.get(row.id)
            confirmed = safe is not None and relay.s.clock.now() < safe
            return relay._deliver(row, self.token, release, recipient, transport,
                                  self._dek(release.id), prepared=prepared,
                                  confirmed=confirmed, summary=summary)
        except Exception as exc:  # contained: recorded, the others carry on
            log.exception("notice %s to %s failed unexpectedly", row.message_id,
                          row.to_addr)
            relay._retry(row, self.token, f"{type(exc).__name__}: {exc}", None)
            return None

    # -- recording: off the workers' path -----------------------------------

    def _deliveries(self) -> list[_Sent]:
        """Every worker's deliveries not yet being recorded, now taken (under
        ``self.lock``): the caller records them in its next transaction."""
        taken = [sent for _, sent, _ in self.pending]
        self.pending.clear()
        self.inflight += len(taken)
        return taken

    def _recorded(self, sent: Sequence[_Sent], ok: bool) -> None:
        """``sent`` (taken by :meth:`_deliveries`) committed, or not (``ok``
        False: back to be recorded by the next transaction)."""
        with self.changed:
            self.inflight -= len(sent)
            if ok:
                for s in sent:
                    self.outstanding[self.sender_of.pop(s.row.id)] -= 1
            else:
                self.pending[:0] = [(self.sender_of[s.row.id], s, 0.0) for s in sent]
            self.changed.notify_all()

    def _record_now(self, limit: int = 0, release: Sequence[int] = ()
                    ) -> list[OutboxMessage]:
        """Record every worker's deliveries taken so far, give back
        ``release`` and claim up to ``limit`` rows, in one transaction."""
        with self.lock:
            sent = self._deliveries()
        try:
            rows = self._claim(limit, sent, release)
        except BaseException:
            self._recorded(sent, ok=False)
            raise
        self._recorded(sent, ok=True)
        return rows

    def _due_to_record(self, now: float) -> float | None:
        """(Under ``self.lock``) 0 when the deliveries waiting should be
        recorded now (a worker has ``record_batch`` unrecorded, or the first
        waiting began ``RECORD_WAIT`` ago), else seconds until the first
        will have waited that long; None when none are waiting. In a run of
        handed notices, not while an owner's summary is going (the last
        message of a publication, which the others wait for), unless a worker
        has a whole batch unrecorded."""
        if not self.pending:
            return None
        most = max(self.outstanding.values(), default=0)
        if self.handed is not None and not self.finishing and most < self.relay.record_batch \
                and any(r.purpose == SUMMARY for r in self.taking.values()):
            return HANDED_RECORD_WAIT.total_seconds()  # out of an owner's summary's way
        if (self.queue or self.holding or self.handed is not None) and most >= self._record_at:
            return 0.0  # (with the queue empty, the next claim records them)
        oldest = min(began for _, _, began in self.pending)
        wait = RECORD_WAIT if self.handed is None else HANDED_RECORD_WAIT
        return max(0.0, oldest + wait.total_seconds() - now)

    def _recorder(self) -> None:
        """Records the workers' deliveries, all of them in one transaction,
        while they go on sending: a worker waits only when it would
        otherwise hold more than ``record_batch`` unrecorded."""
        while True:
            with self.changed:
                while True:
                    wait = self._due_to_record(time.monotonic())
                    if wait == 0.0 or (self.finishing and wait is not None):
                        break
                    if self.finishing and wait is None:
                        return
                    self.changed.wait(wait)
            try:
                self._record_now()
            except Exception as exc:  # the workers stop; the last flush tries again
                report(self.relay.watch, exc, doing="recording delivered notices", logger=log)
                with self.changed:
                    self.broken = True
                    self.changed.notify_all()
                return

    def _enqueue(self, rows: Sequence[OutboxMessage]) -> None:
        """(Under ``self.lock``) ``rows`` into the shared queue, in order; an
        owner's summary held back while this run has others of its release
        to finish with."""
        for row in rows:
            if row.purpose == Purpose.PUBLISHED:
                self.open[row.release_id] = self.open.get(row.release_id, 0) + 1
            if row.purpose == SUMMARY and self.open.get(row.release_id, 0) > 0:
                self.parked[row.release_id] = row
            else:
                self.queue.append(row)

    def _pop(self) -> OutboxMessage | None:
        """(Under ``self.lock``) The next row of the queue, now taken."""
        if not self.queue:
            return None
        row = self.queue.popleft()
        self.taking[row.id] = row
        return row

    def _done_with(self, row: OutboxMessage) -> None:
        """(Under ``self.lock``) This run has finished with ``row`` (sent, failed,
        put off or given back): a summary held back for its release's last
        one goes next."""
        if self.taking.pop(row.id, None) is not None and row.purpose == SUMMARY:
            self.changed.notify_all()  # the recorder waits for it (_due_to_record)
        if row.purpose != Purpose.PUBLISHED:
            return
        left = self.open.get(row.release_id, 0) - 1
        self.open[row.release_id] = left
        if left <= 0 and row.release_id in self.parked:
            self.queue.appendleft(self.parked.pop(row.release_id))
            self.changed.notify_all()

    def _speculate(self) -> None:
        """Nothing is left to take but owners' summaries held back for the
        notices still on their way: build each now, as if those went, so that
        it goes the moment they have (when they all did; else it is composed
        then)."""
        with self.lock:
            todo = [row for release_id, row in self.parked.items()
                    if release_id not in self.speculation]
            for row in todo:
                self.speculation[row.release_id] = None
                self.speculating.add(row.release_id)
            going = frozenset(self.handed_over | {
                r.id for r in self.taking.values() if r.purpose == Purpose.PUBLISHED})
        for row in todo:
            built = None
            try:
                release = self._context_of(row.release_id)
                summary = self.relay._summary(release, going)
                if summary is not None:
                    prepared = prepare_message(compose(row, release, None,
                                                       sender=self.relay.sender,
                                                       summary=summary))
                    if prepared is not None:
                        built = (going, summary, prepared)
            except Exception:  # composed when it goes, and any error recorded then
                log.warning("could not build the owner's summary of %s ahead", row.release_id,
                            exc_info=True)
            with self.changed:
                self.speculation[row.release_id] = built
                self.speculating.discard(row.release_id)
                self.changed.notify_all()

    def _unqueue(self) -> list[int]:
        """(Under ``self.lock``) Empty the queue, for its rows to be given
        back; returns their ids."""
        rows = list(self.queue)
        self.queue.clear()
        for row in rows:
            self._done_with(row)
        back = [r.id for r in rows]
        back += [r.id for r in self.queue]  # summaries that were waiting for those
        self.queue.clear()
        return back

    def _hand_in(self, worker: int, sent: _Sent, began: float) -> None:
        """A worker's delivery, for the recorder (woken only when this
        changes what it waits for: the first waiting, or a batch due)."""
        with self.changed:
            self.handed_over.add(sent.row.id)
            self.pending.append((worker, sent, began))
            self.sender_of[sent.row.id] = worker
            self.outstanding[worker] = self.outstanding.get(worker, 0) + 1
            if len(self.pending) == 1 or self.outstanding[worker] >= self._record_at:
                self.changed.notify_all()

    def _hold(self, worker: int) -> None:
        """Before a worker's next message: wait while it holds
        ``record_batch`` unrecorded deliveries."""
        with self.changed:
            if self.outstanding.get(worker, 0) < self.relay.record_batch:
                return
            self.holding += 1
            self.changed.notify_all()
            try:
                while self.outstanding[worker] >= self.relay.record_batch and not self.broken:
                    self.changed.wait()
            finally:
                self.holding -= 1

    def _next(self, worker: int) -> OutboxMessage | None:
        """:meth:`_take_next`, once ``worker`` may send again (:meth:`_hold`)."""
        row = self._take_next()
        if row is not None:
            self._hold(worker)
        return row

    def _take_next(self) -> OutboxMessage | None:
        """The next row of this run's shared queue; when it is empty, claim
        more (one worker at a time; a run of handed notices claims nothing:
        it builds the held-back summaries then), recording the deliveries waiting in
        the same transaction: as many as the workers send in ``_CLAIM_HOLD``
        while the server is fast, one while it is slow. When none is due
        while deliveries are still being recorded, claim again once they
        are (the owner's summary is due once the others are recorded). None
        when nothing is left for this worker (or the relay is stopping)."""
        relay = self.relay
        while not relay.stop.is_set():
            with self.lock:
                if self.broken:
                    return None
                row = self._pop()
            if row is not None:
                return row
            if self.handed is not None:  # these rows only: nothing is claimed at the instant
                self._speculate()  # (a summary held back goes with the last of its others)
                return None
            with self.claiming:
                with self.lock:
                    row = self._pop()
                if row is not None:
                    return row
                size = relay.claim_size()
                rows = self._record_now(size * relay.workers if size > 1 else 1)
                with self.changed:
                    self._enqueue(rows)
                    self.changed.notify_all()
                    row = self._pop()
                    if row is not None:
                        return row
                    if not self.inflight:
                        return None
                    while self.inflight and not self.broken:  # another transaction's
                        self.changed.wait()
        return None

    def _work(self, transport: MailTransport, poolable: bool, check: bool = False) -> None:
        relay = self.relay
        if check:  # idle a while: a connection the server dropped is closed, reopened on send
            transport.keep_alive()
        me = threading.get_ident()
        try:
            if not self._committed():
                return
            while True:
                if relay.seen_slow():
                    # A server slower than expected: the rows not sent yet go back, for
                    # the other workers and relays to share (claimed again one by one).
                    with self.lock:
                        back = self._unqueue()
                    if back:
                        self._record_now(0, back)
                row = self._next(me)
                if row is None:
                    return
                start = time.monotonic()
                try:
                    sent = self._send(row, transport)
                    if sent is not None:
                        self._hand_in(me, sent, start)
                finally:
                    with self.changed:
                        self._done_with(row)
        finally:
            relay._put_back(transport, poolable)

    def _committed(self) -> bool:
        """For a run of handed notices: wait until their transaction has
        committed (before it, they may not exist); False if it did not. The
        first thread to know decides for the whole run (the others wait for
        it), so that no thread goes on while another gave up."""
        if self.handed is None:
            return True
        with self.deciding:
            if self.commit is None:
                self.commit = self.handed.committed.wait(self.relay.lease.total_seconds())
                if self.commit:
                    self._as_published()
            return self.commit

    def _as_published(self) -> None:
        """(Once committed) The releases whose notices were built ahead
        from what was published, their recipients too, stand in for their
        records: they need not be read again (for the owner's summary)."""
        assert self.handed is not None
        for release_id, inputs in self.handed.inputs.items():
            built = self.relay.ready_as(release_id, inputs)
            if built is not None and {r.id: (r.name, r.organisation)
                                      for r in built.recipients} == {
                    rid: self.handed.people.get(rid) for rid in
                    (r.recipient_id for r in self.handed.rows
                     if r.release_id == release_id and r.recipient_id)}:
                built.lateness_ms = self.handed.lateness_ms[release_id]
                with self.lock:
                    self.releases.setdefault(release_id, built)
                    for recipient in built.recipients:
                        self.recipients.setdefault(recipient.id, recipient)

    def _renewer(self, releases: Sequence[str] = ()) -> None:
        if not self._committed():
            return
        for release_id in releases:  # read ahead, beside the sending, for a notice
            try:  # composed later (the owner's summary), rather than after the others
                self._context_of(release_id)
            except Exception as exc:  # read again when needed
                report(self.relay.watch, exc, doing="reading a release's records", logger=log)
        every = max(0.05, self.relay.lease.total_seconds() / 3)
        while not self.done.wait(every):
            try:
                self.relay._renew(self.token)
            except Exception as exc:
                report(self.relay.watch, exc, doing="renewing the relay's claims", logger=log)

    def go(self) -> int:
        relay = self.relay
        if self.handed is not None:
            first = list(self.handed.rows)
            with self.lock:
                self.skip.update(r.id for r in first)
                if self.handed_safe is not None:
                    self.safe.update((r.id, self.handed_safe) for r in first)
                for release_id, inputs in self.handed.inputs.items():
                    self.facts[release_id] = (inputs, self.handed.people)
        else:
            first = self._claim(relay.workers * relay.claim_size())
        if not first:
            return 0
        with relay._lock:
            relay._sending += 1
        try:
            return self._go(first)
        finally:
            with relay._lock:
                relay._sending -= 1

    def _go(self, first: list[OutboxMessage]) -> int:
        relay = self.relay
        with self.lock:
            self._enqueue(first)
        transports = relay._transports()
        threads = [threading.Thread(target=self._work, args=chosen,
                                    name=f"embargo-relay-{i + 1}", daemon=True)
                   for i, chosen in enumerate(transports[1:])]
        # The releases whose notices were built ahead: the records are read beside
        # the sending, for the owner's summary, composed once the others are done.
        ahead = sorted({r.release_id for r in first if relay.ready_for(r.release_id)})
        renewer = threading.Thread(target=self._renewer, args=(ahead,),
                                   name="embargo-relay-renew", daemon=True)
        recorder = threading.Thread(target=self._recorder, name="embargo-relay-record",
                                    daemon=True)
        renewer.start()
        recorder.start()
        for thread in threads:
            thread.start()
        try:
            self._work(*transports[0])
        finally:
            # Even when this worker failed, the others' claims are renewed
            # until their messages are handed over and recorded: a claim that
            # lapsed mid-send would be sent again by the next run.
            for thread in threads:
                thread.join()
            with self.changed:
                self.finishing = True
                self.changed.notify_all()
            recorder.join()
            try:
                with self.lock:
                    left = self._unqueue() + [r.id for r in self.parked.values()]
                    self.parked.clear()
                    last = bool(self.pending)
                    aborted = self.commit is False
                # What went and is not recorded yet (a record failed), and what was
                # claimed and not sent (stopping, a worker failed): back.
                if (left or last) and not aborted:
                    self._record_now(0, left)
            except Exception as exc:  # the claims lapse; the next run sends them again
                report(relay.watch, exc, doing="recording delivered notices", logger=log)
            finally:
                self.done.set()
                renewer.join()
        return self.delivered
