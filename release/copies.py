"""Pre-embargo copies for liaison officers: when they go, issuing them to the
outbox exactly once, opening the documents they carry, and tracing a leak."""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from config.errors import InputError, NotFoundError
from release import audit, sealing, timerules
from release.context import Services, dek_key, describe_instant, document_key
from release.marking import COPY_ID, find_copy_id
from release.records import QUEUED, Copy, Document, OutboxMessage, Recipient, Release
from storage.db import affected, transaction

log = logging.getLogger(__name__)

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford: no I, L, O, U


def new_copy_id() -> str:
    chars = "".join(secrets.choice(_ALPHABET) for _ in range(12))
    return f"CPY-{chars[:4]}-{chars[4:8]}-{chars[8:]}"


def copy_message_id(release_id: str, copy_id: str, purpose: str = "copy") -> str:
    return f"<{release_id.removeprefix('rel_')}.{purpose}.{copy_id}@embargo.invalid>"


def resolve_copies_at(text: str | None, *, embargo: timerules.Embargo, now: datetime,
                      max_lead: timedelta | None,
                      cutoff: timedelta = timedelta(0)) -> datetime | None:
    """When the copies go. ``None`` (the text) means as soon as allowed: now,
    or ``max_lead`` before the embargo if that is later. A local time is read
    in the release's zone, with the same gap and fold rules as the embargo.

    A copy must *start* more than ``cutoff`` before the embargo, so that none
    can still be on its way at the instant. Returns None when the default
    time is already too close (no copies go). Raises InputError for an
    explicit time at or after that, or earlier than ``max_lead`` allows."""
    deadline = embargo.instant - cutoff
    if text is None:
        at = now if max_lead is None else max(now, embargo.instant - max_lead)
        if at >= deadline:
            return None
    else:
        match = re.fullmatch(r"\s*(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}(?::\d{2})?)\s*", text)
        if match:
            at = timerules.resolve(match.group(1), at=match.group(2), zone=embargo.zone,
                                   now=now).instant
        else:
            at = timerules.resolve(text, at=None, zone=embargo.zone, now=now).instant
    if at >= embargo.instant:
        raise InputError(f"copies at {describe_instant(at, embargo.zone)} would not be before "
                         f"the embargo ({embargo.describe()}); copies must go before it")
    if at >= deadline:
        raise InputError(f"copies at {describe_instant(at, embargo.zone)} would be too close to "
                         f"the embargo ({embargo.describe()}): they must start more than "
                         f"{timerules.format_delta(cutoff)} before it, so that none is still "
                         "on its way at the instant (copies.cutoff)")
    if max_lead is not None and embargo.instant - at > max_lead:
        raise InputError(f"copies at {describe_instant(at, embargo.zone)} would be more than "
                         f"{timerules.format_delta(max_lead)} before the embargo "
                         f"(copies.max_lead); the earliest allowed is "
                         f"{describe_instant(embargo.instant - max_lead, embargo.zone)}")
    return at


def documents_for(release: Release, recipient: Recipient) -> list[Document]:
    """The report(s) and the recipient's own organisation's letter(s)."""
    return [d for d in release.documents
            if d.kind == "report" or (d.organisation and d.organisation == recipient.organisation)]


def issue_copies(services: Services, release_id: str, *, actor: str) -> int:
    """Put one copy per officer in the outbox, once, if the copy time has
    come and the embargo has not. Returns how many were issued (0 when it is
    not yet time, already done, or too late)."""
    now = services.clock.now()
    with transaction(services.sessions) as session:
        release = session.get(Release, release_id)
        if (release is None or release.state != QUEUED or release.copies_at is None
                or release.copies_issued_at is not None or now < release.copies_at):
            return 0
        if now >= release.instant - services.copies_cutoff:
            audit.record(session, action="copies_skipped", actor=actor, at=now,
                         release_id=release_id,
                         details={"reason": "the embargo was too close when the copies were "
                                            "due to go"})
            release.copies_issued_at = now
            return 0
        won = affected(session.execute(
            update(Release).where(Release.id == release_id, Release.copies_issued_at.is_(None))
            .values(copies_issued_at=now, revision=Release.revision + 1)))
        if not won:
            return 0
        issued = 0
        for recipient in release.recipients:
            copy_id = new_copy_id()
            docs = documents_for(release, recipient)
            mid = copy_message_id(release_id, copy_id)
            session.add(Copy(id=copy_id, release_id=release_id, recipient_id=recipient.id,
                             document_ids=json.dumps([d.id for d in docs]), message_id=mid,
                             created_at=now))
            session.add(OutboxMessage(
                message_id=mid, release_id=release_id, recipient_id=recipient.id,
                purpose="copy", to_addr=recipient.email, created_at=now, not_before=now,
                not_after=release.instant - services.copies_cutoff, attempts=0,
                next_attempt_at=now))
            issued += 1
        audit.record(session, action="copies_issued", actor=actor, at=now,
                     release_id=release_id, details={"copies": issued})
    log.info("issued %d pre-embargo copies of %s", issued, release_id)
    return issued


def notify_copy_holders(session: Session, release: Release, *, purpose: str,
                        now: datetime, cutoff: timedelta) -> int:
    """After a reschedule or cancellation: one notice to every officer who
    had a copy (or has one on its way), under an id unique to this change.
    Copies not yet delivered are stopped or re-timed."""
    copies = list(session.scalars(select(Copy).where(Copy.release_id == release.id)))
    pending = list(session.scalars(select(OutboxMessage).where(
        OutboxMessage.release_id == release.id, OutboxMessage.purpose == "copy",
        OutboxMessage.delivered_at.is_(None), OutboxMessage.given_up_at.is_(None))))
    for row in pending:
        if purpose == "withdrawn":
            row.given_up_at = now
            row.last_error = "the release was cancelled before this copy was delivered"
        else:
            row.not_after = release.instant - cutoff
    told = 0
    waiting = {row.recipient_id for row in pending}
    for copy in copies:
        if copy.recipient_id in waiting and purpose == "withdrawn":
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


class DocumentOpener:
    """Decrypts documents for copies; only the publishing side can build one."""

    def __init__(self, services: Services, private_key: X25519PrivateKey) -> None:
        self.s = services
        self.key = private_key

    def dek(self, release_id: str) -> bytes:
        """The release's data key, opened (to read several documents with it)."""
        return sealing.open_dek(self.s.vault.get_bytes(dek_key(release_id)), self.key,
                                release_id)

    def read(self, release_id: str, document: Document, *, dek: bytes | None = None) -> bytes:
        dek = self.dek(release_id) if dek is None else dek
        return sealing.open_bytes(dek, document.id,
                                  self.s.vault.get_bytes(document_key(release_id, document.id)))


@dataclass(frozen=True, kw_only=True)
class Trace:
    copy_id: str
    release_id: str
    title: str
    name: str
    email: str
    organisation: str | None
    issued_at: datetime
    sent_at: datetime | None


def trace(services: Services, what: str, data: bytes | None = None) -> Trace:
    """Who received the copy ``what`` (a copy id), or the copy whose bytes
    are ``data``. Raises NotFoundError when nothing matches."""
    copy_id = what.strip().upper() if data is None else find_copy_id(data)
    if copy_id is None or not COPY_ID.fullmatch(copy_id):
        raise NotFoundError(f"{what} carries no copy id (only PDFs are stamped; for other "
                            "files look for the copy id in the message that carried them)"
                            if data is not None else f"{what!r} is not a copy id "
                            "(CPY-XXXX-XXXX-XXXX) or a file")
    with transaction(services.sessions) as session:
        copy = session.get(Copy, copy_id)
        if copy is None:
            raise NotFoundError(f"no copy {copy_id} was issued from this database")
        recipient = session.get(Recipient, copy.recipient_id)
        release = session.get(Release, copy.release_id)
        assert recipient is not None and release is not None
        return Trace(copy_id=copy.id, release_id=release.id, title=release.title,
                     name=recipient.name, email=recipient.email,
                     organisation=recipient.organisation, issued_at=copy.created_at,
                     sent_at=copy.sent_at)


def access_list(services: Services, release_id: str) -> list[dict[str, object]]:
    """Who received pre-embargo copies, of what, and when."""
    with transaction(services.sessions) as session:
        rows: list[dict[str, object]] = []
        for copy in session.scalars(select(Copy).where(Copy.release_id == release_id)
                                    .order_by(Copy.created_at, Copy.id)):
            recipient = session.get(Recipient, copy.recipient_id)
            assert recipient is not None
            names = [session.get(Document, d) for d in json.loads(copy.document_ids)]
            rows.append({"copy_id": copy.id, "name": recipient.name, "email": recipient.email,
                         "organisation": recipient.organisation,
                         "documents": [d.filename for d in names if d is not None],
                         "issued_at": copy.created_at, "sent_at": copy.sent_at})
        return rows
