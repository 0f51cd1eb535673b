"""Whose copy a leaked file (or copy id) is, and who had pre-embargo access
to a release: read-only questions about the copies issued."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from config.errors import NotFoundError
from release.copy_ids import COPY_ID, find_copy_id
from release.presenting import access_entries, moment, moment_at
from release.records import Copy, Recipient, Release
from release.views import AccessEntry, TraceResult


def copy_id_in(what: str, data: bytes | None) -> str:
    """The copy id ``what`` names, or the one stamped in ``data`` (a file's
    bytes). Raises NotFoundError when there is none."""
    copy_id = what.strip().upper() if data is None else find_copy_id(data)
    if copy_id is None or not COPY_ID.fullmatch(copy_id):
        raise NotFoundError(f"{what} carries no copy id (only PDFs are stamped; for other "
                            "files look for the copy id in the message that carried them)"
                            if data is not None else f"{what!r} is not a copy id "
                            "(CPY-XXXX-XXXX-XXXX) or a file")
    return copy_id


def trace(session: Session, copy_id: str) -> TraceResult:
    """Who received the copy ``copy_id``. Raises NotFoundError when no such
    copy was issued."""
    copy = session.get(Copy, copy_id)
    if copy is None:
        raise NotFoundError(f"no copy {copy_id} was issued from this database")
    recipient = session.get(Recipient, copy.recipient_id)
    release = session.get(Release, copy.release_id)
    assert recipient is not None and release is not None
    issued = moment_at(copy.created_at, release.zone)
    return TraceResult(copy_id=copy.id, release_id=release.id, title=release.title,
                       name=recipient.name, email=recipient.email,
                       organisation=recipient.organisation, issued_at=issued,
                       sent_at=moment(copy.sent_at, release.zone))


def copies_of(session: Session, release_id: str) -> list[Copy]:
    return list(session.scalars(select(Copy).where(Copy.release_id == release_id)
                                .order_by(Copy.created_at, Copy.id)))


def access_list(session: Session, release: Release) -> tuple[AccessEntry, ...]:
    """Who received pre-embargo copies of ``release`` (documents and
    recipients loaded), of what, and when: one query for the copies."""
    return access_entries(copies_of(session, release.id),
                          {r.id: r for r in release.recipients},
                          {d.id: d for d in release.documents}, release.zone)


__all__ = ["access_list", "copies_of", "copy_id_in", "trace"]
