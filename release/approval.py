"""The second pair of eyes: a submitted release waits in ``awaiting_approval``
(no timer, no copies) until a different person approves it.

The submitter may approve their own release only by giving a typed reason;
that is audited as ``release_force_approved`` and flagged on the release
(``forced_reason``) until someone else has reviewed it."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from config.errors import InputError, StateError
from release import audit
from release.context import Services
from release.records import AWAITING_APPROVAL, DRAFT, QUEUED, Release
from storage.db import affected, transaction


def _current(services: Services, release_id: str) -> Release:
    from release.service import ReleaseService  # the one lookup, prefixes included

    return ReleaseService(services, actor="lookup").get(release_id)


def approve(services: Services, release_id: str, *, actor: str,
            force_reason: str | None = None) -> Release:
    """Approve a release awaiting approval: it becomes queued and gets its
    timer. The submitter can only force-approve, with ``force_reason``.

    :raises InputError: the submitter approves without a reason
    :raises StateError: the release is not awaiting approval, or its instant has passed
    """
    release = _current(services, release_id)
    now = services.clock.now()
    reason = (force_reason or "").strip()
    forced = release.submitted_by == actor
    if forced and not reason:
        raise InputError(f"you submitted release {release.id}: another approver must approve "
                         "it, or force-approve it with a typed reason")
    if not forced and reason:
        raise InputError("a force-approval reason is only for approving your own submission")
    if release.state == AWAITING_APPROVAL and release.instant <= now:
        raise StateError(f"release {release.id} was still awaiting approval at its instant; "
                         "it will not be published: reschedule it first")
    with transaction(services.sessions) as session:
        changed = affected(session.execute(
            update(Release).where(Release.id == release.id, Release.state == AWAITING_APPROVAL,
                                  Release.instant > now)
            .values(state=QUEUED, approved_by=actor, forced_reason=reason or None,
                    review_comment=None, revision=Release.revision + 1)))
        if not changed:
            raise StateError(f"release {release.id} is {_state(session, release.id)}; only a "
                             "release awaiting approval can be approved")
        audit.record(session, action="release_force_approved" if forced else "release_approved",
                     actor=actor, at=now, release_id=release.id,
                     details={"reason": reason} if forced else {})
    return _current(services, release.id)


def send_back(services: Services, release_id: str, *, actor: str, comment: str) -> Release:
    """Return a release awaiting approval to its editor as a draft, with a comment.

    :raises InputError: no comment
    :raises StateError: the release is not awaiting approval
    """
    if not comment.strip():
        raise InputError("sending a release back needs a comment for its editor")
    release = _current(services, release_id)
    now = services.clock.now()
    with transaction(services.sessions) as session:
        changed = affected(session.execute(
            update(Release).where(Release.id == release.id, Release.state == AWAITING_APPROVAL)
            .values(state=DRAFT, review_comment=comment.strip(),
                    revision=Release.revision + 1)))
        if not changed:
            raise StateError(f"release {release.id} is {_state(session, release.id)}; only a "
                             "release awaiting approval can be sent back")
        audit.record(session, action="release_sent_back", actor=actor, at=now,
                     release_id=release.id, details={"comment": comment.strip()})
    return _current(services, release.id)


def review_forced(services: Services, release_id: str, *, actor: str) -> Release:
    """Someone other than the submitter confirms a force-approval; the flag goes.

    :raises InputError: the submitter reviews their own force-approval
    :raises StateError: the release carries no force-approval flag
    """
    release = _current(services, release_id)
    if release.forced_reason is None:
        raise StateError(f"release {release.id} was not force-approved")
    if release.submitted_by == actor:
        raise InputError("someone other than the submitter must review a force-approval")
    now = services.clock.now()
    with transaction(services.sessions) as session:
        changed = affected(session.execute(
            update(Release).where(Release.id == release.id, Release.forced_reason.is_not(None))
            .values(forced_reason=None)))
        if not changed:
            raise StateError(f"release {release.id} was already reviewed")
        audit.record(session, action="force_approval_reviewed", actor=actor, at=now,
                     release_id=release.id, details={"reason": release.forced_reason})
    return _current(services, release.id)


def _state(session: Session, release_id: str) -> str:
    current = session.get(Release, release_id)
    return current.state if current else "gone"
