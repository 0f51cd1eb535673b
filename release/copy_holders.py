"""Telling the officers who hold a pre-embargo copy that the release was
rescheduled or withdrawn, once per change, and stopping or re-timing copies
still on their way."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from release.copies import copy_message_id
from release.records import Copy, OutboxMessage, Purpose, Recipient, Release


def notify_copy_holders(session: Session, release: Release, *, purpose: Purpose,
                        now: datetime, cutoff: timedelta) -> int:
    """After a reschedule or cancellation: one notice to every officer who
    had a copy (or has one on its way), under an id unique to this change.
    Copies not yet delivered are stopped or re-timed."""
    copies = list(session.scalars(select(Copy).where(Copy.release_id == release.id)))
    pending = list(session.scalars(select(OutboxMessage).where(
        OutboxMessage.release_id == release.id, OutboxMessage.purpose == Purpose.COPY,
        OutboxMessage.delivered_at.is_(None), OutboxMessage.given_up_at.is_(None))))
    for row in pending:
        if purpose == Purpose.WITHDRAWN:
            row.given_up_at = now
            row.last_error = "the release was cancelled before this copy was delivered"
        else:
            row.not_after = release.instant - cutoff
    told = 0
    # A copy under a claim may be on its way to the mail server right now:
    # its officer may hold it, so is told too. Only one nobody holds never went.
    waiting = {row.recipient_id for row in pending if row.claim_expires_at is None}
    for copy in copies:
        if copy.recipient_id in waiting and purpose == Purpose.WITHDRAWN:
            continue  # never received it; nothing to withdraw
        recipient = session.get(Recipient, copy.recipient_id)
        assert recipient is not None
        session.add(OutboxMessage(
            message_id=copy_message_id(release.id, copy.id, f"{purpose}{release.revision}"),
            release_id=release.id, recipient_id=recipient.id, purpose=purpose,
            to_addr=recipient.email, created_at=now, not_before=now, attempts=0,
            next_attempt_at=now))
        told += 1
    return told
