"""Records into views: the one place that turns ORM rows into the frozen
views of :mod:`release.views`, inside the session that loaded them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from release import timerules
from release.instants import describe_instant, embargo_of
from release.records import (
    PUBLISHING,
    QUEUED,
    AuditEvent,
    Copy,
    Document,
    Node,
    OutboxMessage,
    Recipient,
    Release,
)
from release.views import (
    AccessEntry,
    DocumentView,
    EventView,
    Moment,
    NodeStatus,
    NoticeState,
    NoticeView,
    RecipientView,
    RehearsalView,
    ReleaseDetail,
    ReleaseSummary,
)


def moment(instant: datetime | None, zone: str) -> Moment | None:
    if instant is None:
        return None
    return Moment(utc=instant, shown=describe_instant(instant, zone))


def moment_at(instant: datetime, zone: str) -> Moment:
    return Moment(utc=instant, shown=describe_instant(instant, zone))


def document_view(document: Document, zone: str) -> DocumentView:
    return DocumentView(id=document.id, kind=document.kind, organisation=document.organisation,
                        filename=document.filename, content_type=document.content_type,
                        size=document.size, sha256=document.sha256,
                        published_at=moment(document.published_at, zone),
                        public_url=document.public_url)


def time_left(release: Release, now: datetime) -> str | None:
    """What `list` and `show` say about the time to the instant: the time
    left, or once it has passed "retrying since HH:MM (n attempts)" (local
    time of the first attempt) or "due since HH:MM"; None when inactive."""
    if release.state not in (QUEUED, PUBLISHING):
        return None
    if now <= release.instant:
        return timerules.format_delta(release.instant - now)
    zone = ZoneInfo(release.zone)
    if release.attempts:
        since = (release.started_at or release.instant).astimezone(zone)
        return (f"retrying since {since:%H:%M} ({release.attempts} attempt"
                f"{'s' if release.attempts != 1 else ''})")
    return f"due since {release.instant.astimezone(zone):%H:%M}"


def _summary_fields(release: Release, now: datetime) -> dict[str, object]:
    zone = release.zone
    return dict(
        id=release.id, slug=release.slug, title=release.title, state=release.state,
        owner=release.owner, instant=release.instant, zone=zone, wall=release.wall,
        embargo=embargo_of(release).describe(),
        time_left=time_left(release, now),
        published_at=moment(release.published_at, zone), lateness_ms=release.lateness_ms,
        reason=release.reason, copies_at=moment(release.copies_at, zone),
        documents=tuple(document_view(d, zone) for d in release.documents),
        recipient_count=len(release.recipients), forced_reason=release.forced_reason)


def summary(release: Release, now: datetime) -> ReleaseSummary:
    """``release`` with its documents and recipients loaded."""
    return ReleaseSummary(**_summary_fields(release, now))  # type: ignore[arg-type]


def access_entries(copies: Iterable[Copy], recipients: Mapping[str, Recipient],
                   documents: Mapping[str, Document], zone: str) -> tuple[AccessEntry, ...]:
    entries = []
    for copy in copies:
        recipient = recipients[copy.recipient_id]
        entries.append(AccessEntry(
            copy_id=copy.id, name=recipient.name, email=recipient.email,
            organisation=recipient.organisation,
            documents=tuple(documents[d].filename for d in json.loads(copy.document_ids)
                            if d in documents),
            issued_at=moment_at(copy.created_at, zone), sent_at=moment(copy.sent_at, zone)))
    return tuple(entries)


def notice_state(row: OutboxMessage) -> NoticeState:
    """delivered; failed (refused for good, or the message could not be
    built); given up (retried until mail.give_up_after, or too late for a
    copy); or pending (waiting, or being retried: see its last error)."""
    if row.delivered_at is not None:
        return NoticeState.DELIVERED
    if row.failed_at is not None:
        return NoticeState.FAILED
    return NoticeState.GIVEN_UP if row.given_up_at is not None else NoticeState.PENDING


def notice_view(row: OutboxMessage, zone: str) -> NoticeView:
    return NoticeView(number=row.id, to=row.to_addr, purpose=row.purpose,
                      message_id=row.message_id, state=notice_state(row),
                      delivered_at=moment(row.delivered_at, zone), via=row.delivered_to,
                      attempts=row.attempts, given_up_at=moment(row.given_up_at, zone),
                      failed_at=moment(row.failed_at, zone), last_error=row.last_error)


def detail(release: Release, now: datetime, *, copies: Iterable[Copy],
           notices: Iterable[OutboxMessage], events: Iterable[AuditEvent],
           public_now: Mapping[str, str] | None = None,
           rehearsal: RehearsalView | None = None) -> ReleaseDetail:
    """``public_now``: {document id: public address} of documents found in
    the public location although not recorded as published (a partial
    publication of a failed or cancelled release)."""
    zone = release.zone
    fields = _summary_fields(release, now)
    if public_now:
        fields["documents"] = tuple(
            replace(d, public_url=d.public_url or public_now.get(d.id))
            for d in fields["documents"])  # type: ignore[attr-defined]
    return ReleaseDetail(
        **fields,  # type: ignore[arg-type]
        started_at=moment(release.started_at, zone),
        created_by=release.created_by, submitted_by=release.submitted_by,
        approved_by=release.approved_by, review_comment=release.review_comment,
        rehearsal=rehearsal,
        recipients=tuple(RecipientView(id=r.id, name=r.name, email=r.email,
                                       organisation=r.organisation)
                         for r in release.recipients),
        access_list=access_entries(copies, {r.id: r for r in release.recipients},
                                   {d.id: d for d in release.documents}, zone),
        notices=tuple(notice_view(m, zone) for m in notices),
        events=tuple(EventView(seq=e.seq, at=e.at, action=e.action, actor=e.actor,
                               details=json.loads(e.details)) for e in events))


LIVE = timedelta(seconds=10)  # a node silent for longer is shown as gone


def node_status(node: Node, server_now: datetime) -> NodeStatus:
    """``node`` as seen at ``server_now``, the database server's clock."""
    silent = server_now - node.heartbeat_at
    state = ("stopped" if node.stopped_at else "live" if silent <= LIVE else "silent (dead?)")
    return NodeStatus(name=node.name, state=state, started_at=node.started_at,
                      heartbeat_at=node.heartbeat_at,
                      heartbeat_s_ago=round(silent.total_seconds(), 1), skew_ms=node.skew_ms,
                      clock_ok=node.clock_ok, doing=node.doing)
