"""Database records of the domain: releases, documents, recipients, the
outbox of notices, and the audit chain."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every database
    (SQLite has no time zones). A naive datetime is refused."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given where UTC is required")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


def table_of(model: type[Base]) -> Table:
    """A model's table, for plain SQL statements on the hot paths (the
    publish finish, the relay's delivery record, the audit append), where
    the ORM's bookkeeping costs more than the statements."""
    return cast(Table, model.__table__)


class ReleaseState(StrEnum):
    """Where a release is in its life: a draft being built in the console,
    awaiting approval once submitted (no timer, no copies until approved),
    then queued, publishing, published; or cancelled, or failed (retryable)."""

    DRAFT = "draft"
    AWAITING_APPROVAL = "awaiting_approval"
    QUEUED = "queued"
    PUBLISHING = "publishing"
    PUBLISHED = "published"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Purpose(StrEnum):
    """Why an outbox notice is sent; each has its own words in
    :func:`release.notices.compose`."""

    PUBLISHED = "published"  # to an officer: the embargo lifted, with the links
    COPY = "copy"  # to an officer: the pre-embargo copy, documents attached
    WITHDRAWN = "withdrawn"  # to a copy holder: the release was cancelled
    RESCHEDULED = "rescheduled"  # to a copy holder: the embargo moved
    OWNER_SUMMARY = "owner_summary"  # to the owner: published, how late, where
    OWNER_FAILURE = "owner_failure"  # to the owner: publication failed
    ALERT = "alert"  # to the owner and alerts.to: a release at risk (release/alerts.py)


class EnumText(TypeDecorator[StrEnum]):
    """A StrEnum stored as its text. A stored value outside the enum is an
    error when read, never passed on as a bare string."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[StrEnum], length: int) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> StrEnum | None:
        return None if value is None else self.enum(value)


# The states by name, for the modules that compare them.
DRAFT = ReleaseState.DRAFT
AWAITING_APPROVAL = ReleaseState.AWAITING_APPROVAL
QUEUED = ReleaseState.QUEUED
PUBLISHING = ReleaseState.PUBLISHING
PUBLISHED = ReleaseState.PUBLISHED
CANCELLED = ReleaseState.CANCELLED
FAILED = ReleaseState.FAILED


class Release(Base):
    __tablename__ = "releases"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    slug: Mapped[str] = mapped_column(String(120), unique=True)
    title: Mapped[str] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(320))
    state: Mapped[ReleaseState] = mapped_column(EnumText(ReleaseState, 32), index=True)
    instant: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    zone: Mapped[str] = mapped_column(String(64))
    wall: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(120))
    # Bumped on every change the scheduler must notice (queue, reschedule,
    # cancel, state change); the scheduler compares it with what it knows.
    revision: Mapped[int] = mapped_column(Integer, default=1)
    claimant: Mapped[str | None] = mapped_column(String(120))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lateness_ms: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Pre-embargo copies: when they go (always before ``instant``), and when
    # they were issued to the outbox (once).
    copies_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    copies_issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The second pair of eyes: who submitted it, who approved it, the last
    # send-back comment, and the reason the submitter gave when they approved
    # it themselves (shown as a flag until someone else has reviewed it).
    submitted_by: Mapped[str | None] = mapped_column(String(200))
    approved_by: Mapped[str | None] = mapped_column(String(200))
    review_comment: Mapped[str | None] = mapped_column(Text)
    forced_reason: Mapped[str | None] = mapped_column(Text)

    documents: Mapped[list[Document]] = relationship(
        back_populates="release", order_by="Document.position", cascade="all, delete-orphan"
    )
    recipients: Mapped[list[Recipient]] = relationship(
        back_populates="release", order_by="Recipient.position", cascade="all, delete-orphan"
    )


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("release_id", "filename"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # "report" or "letter"
    organisation: Mapped[str | None] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    # Checkpoint of publication: set once the public copy is verified.
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    public_url: Mapped[str | None] = mapped_column(Text)

    release: Mapped[Release] = relationship(back_populates="documents")


class Recipient(Base):
    __tablename__ = "recipients"
    __table_args__ = (UniqueConstraint("release_id", "email"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320))
    organisation: Mapped[str | None] = mapped_column(String(200))

    release: Mapped[Release] = relationship(back_populates="recipients")


class OutboxMessage(Base):
    """One notice to deliver. ``message_id`` is stable per (release,
    recipient, purpose): the relay may retry, the mail server sees one id."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(200), unique=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), index=True)
    recipient_id: Mapped[str | None] = mapped_column(ForeignKey("recipients.id"))
    purpose: Mapped[Purpose] = mapped_column(EnumText(Purpose, 32))
    to_addr: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # A notice that must not go at or after this instant (a pre-embargo copy
    # must never arrive once the embargo has lifted).
    not_after: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(120))
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    delivered_to: Mapped[str | None] = mapped_column(Text)
    # Set when the notice will not be delivered without a resend; with
    # ``failed_at`` too when that was a permanent failure (refused recipient,
    # a message that cannot be built), not a temporary one given up.
    given_up_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    # The message's own facts, as JSON, where it is not rebuilt from the
    # release's records (an alert: {"subject": ..., "lines": [...]}).
    details: Mapped[str | None] = mapped_column(Text)


class Copy(Base):
    """One officer's pre-embargo copy of a release: the report and their
    organisation's letter, marked with ``id`` so a leak can be traced."""

    __tablename__ = "copies"
    __table_args__ = (UniqueConstraint("release_id", "recipient_id"),)

    id: Mapped[str] = mapped_column(String(20), primary_key=True)  # CPY-XXXX-XXXX-XXXX
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), index=True)
    recipient_id: Mapped[str] = mapped_column(ForeignKey("recipients.id"))
    document_ids: Mapped[str] = mapped_column(Text)  # JSON list, in attachment order
    message_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """One link of the tamper-evident chain: ``hash`` covers the event's
    fields and the previous event's hash."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(40))
    release_id: Mapped[str | None] = mapped_column(String(40), index=True)
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """A single row that every append locks first, so that appends from
    several processes form one chain, not a fork."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class Node(Base):
    """One ``embargo run`` process: its heartbeat, its clock's measured skew
    against the database server, and what it is doing."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(120), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)
    skew_ms: Mapped[float | None] = mapped_column(Float)
    clock_ok: Mapped[bool] = mapped_column(default=True)
    doing: Mapped[str | None] = mapped_column(Text)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Rehearsal(Base):
    """One pre-flight rehearsal of a release: when, for which lead before the
    instant (None: asked for by hand), and each check's result as JSON
    (``[{"name": ..., "ok": ..., "detail": ...}]``)."""

    __tablename__ = "rehearsals"
    __table_args__ = (UniqueConstraint("release_id", "lead_seconds", "instant",
                                       name="uq_rehearsals_release_lead_instant"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), index=True)
    instant: Mapped[datetime] = mapped_column(UTCDateTime)
    lead_seconds: Mapped[int | None] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(200))
    ready: Mapped[bool] = mapped_column()
    checks: Mapped[str] = mapped_column(Text)
