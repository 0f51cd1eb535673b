"""The second pair of eyes: a submitted release waits in ``awaiting_approval``
(no timer, no copies) until a different person approves it.

The submitter may approve their own release only by giving a typed reason;
that is audited as ``release_force_approved`` and flagged on the release
(``forced_reason``) until someone else has reviewed it."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from config.errors import InputError, StateError
from release import audit
from release import text as texts
from release.accounts import Role, User
from release.alerts import Alert, raise_alert
from release.context import Services
from release.instants import embargo_of
from release.records import AWAITING_APPROVAL, DRAFT, QUEUED, Release
from release.views import ReleaseDetail
from storage.db import affected, transaction


def _current(services: Services, release_id: str) -> ReleaseDetail:
    from release.service import ReleaseService  # the one lookup, prefixes included

    return ReleaseService(services, actor="lookup").get(release_id)


def approve(services: Services, release_id: str, *, actor: str,
            force_reason: str | None = None) -> ReleaseDetail:
    """Approve a release awaiting approval: it becomes queued and gets its
    timer. The submitter can only force-approve, with ``force_reason``.

    :raises InputError: the submitter approves without a reason
    :raises StateError: the release is not awaiting approval, or its instant has passed
    """
    release = _current(services, release_id)
    now = services.clock.now()
    reason = texts.optional_text(force_reason, field="force-approval reason",
                                 max_len=texts.REASON_MAX)
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
            .values(state=QUEUED, approved_by=actor, forced_reason=reason,
                    review_comment=None, revision=Release.revision + 1)))
        if not changed:
            raise StateError(f"release {release.id} is {_state(session, release.id)}; only a "
                             "release awaiting approval can be approved")
        audit.record(session, action="release_force_approved" if forced else "release_approved",
                     actor=actor, at=now, release_id=release.id,
                     details={"reason": reason} if forced else {})
    return _current(services, release.id)


def send_back(services: Services, release_id: str, *, actor: str, comment: str) -> ReleaseDetail:
    """Return a release awaiting approval to its editor as a draft, with a comment.

    :raises InputError: no comment
    :raises StateError: the release is not awaiting approval
    """
    comment = texts.clean_text(comment, field="send-back comment", max_len=texts.REASON_MAX,
                               required=False)
    if not comment:
        raise InputError("sending a release back needs a comment for its editor")
    release = _current(services, release_id)
    now = services.clock.now()
    with transaction(services.sessions) as session:
        changed = affected(session.execute(
            update(Release).where(Release.id == release.id, Release.state == AWAITING_APPROVAL)
            .values(state=DRAFT, review_comment=comment,
                    revision=Release.revision + 1)))
        if not changed:
            raise StateError(f"release {release.id} is {_state(session, release.id)}; only a "
                             "release awaiting approval can be sent back")
        audit.record(session, action="release_sent_back", actor=actor, at=now,
                     release_id=release.id, details={"comment": comment})
    return _current(services, release.id)


def review_forced(services: Services, release_id: str, *, actor: str) -> ReleaseDetail:
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


def warn_unapproved(services: Services, *, now: datetime, warn_before: timedelta,
                    actor: str) -> int:
    """Tell the owner, every approver and ``alerts.to`` about each release
    still awaiting approval ``warn_before`` ahead of its instant, and again
    once its instant has come (it will not be published). Each is told once
    per release and occasion, however often this runs and on however many
    nodes. Returns how many messages were added."""
    added = 0
    with transaction(services.sessions) as session:
        waiting = list(session.scalars(select(Release).where(
            Release.state == AWAITING_APPROVAL, Release.instant <= now + warn_before)))
        if not waiting:
            return 0
        approvers = list(session.scalars(select(User.email).where(
            User.role == Role.APPROVER.value, User.disabled_at.is_(None)).order_by(User.name)))
        for release in waiting:
            when = embargo_of(release).describe_long()
            if release.instant <= now:
                alert = Alert(kind="not_approved", key="instant",
                              subject=f"NOT PUBLISHED: {release.title} was not approved",
                              lines=[f"{release.title} ({release.id}) was due {when}.",
                                     "It was still awaiting approval, so it has not been "
                                     "published. Approve it after rescheduling it, or cancel "
                                     "it."])
            else:
                alert = Alert(kind="not_approved", key="warn",
                              subject=f"Awaiting approval: {release.title}",
                              lines=[f"{release.title} ({release.id}) is due {when}.",
                                     "It is still awaiting approval: unless an approver "
                                     "approves it before then, it will not be published."])
            added += raise_alert(session, alert, release_id=release.id, owner=release.owner,
                                 alerts_to=[*approvers, *services.alerts_to], now=now,
                                 actor=actor)
    return added


def _state(session: Session, release_id: str) -> str:
    current = session.get(Release, release_id)
    return current.state if current else "gone"
