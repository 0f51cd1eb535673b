"""Pre-embargo copies for liaison officers: issuing them to the outbox
exactly once, and opening the documents they carry. When they may go is
:mod:`release.copy_timing`; telling their holders of a change,
:mod:`release.copy_holders`; whose copy a leak is, :mod:`release.tracing`."""

from __future__ import annotations

import json
import logging

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import update

from release import audit, sealing
from release.context import Services
from release.copy_ids import new_copy_id
from release.records import QUEUED, Copy, Document, OutboxMessage, Purpose, Recipient, Release
from release.vault_keys import dek_key, document_key
from storage.db import affected, transaction

log = logging.getLogger(__name__)

def copy_message_id(release_id: str, copy_id: str, purpose: str = Purpose.COPY) -> str:
    return f"<{release_id.removeprefix('rel_')}.{purpose}.{copy_id}@embargo.invalid>"


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
                purpose=Purpose.COPY, to_addr=recipient.email, created_at=now, not_before=now,
                not_after=release.instant - services.copies_cutoff, attempts=0,
                next_attempt_at=now))
            issued += 1
        audit.record(session, action="copies_issued", actor=actor, at=now,
                     release_id=release_id, details={"copies": issued})
    log.info("issued %d pre-embargo copies of %s", issued, release_id)
    return issued


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


