"""Releases at risk, told to a person through release/alerts.py while there is
still time to act: a release overdue, and a node whose clock is skewed (told
once per upcoming release it puts at risk). Each alert is raised once per
occurrence; a fault that lasts is told again every ``alerts.repeat``."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select

from release.alerts import Alert, raise_alert
from release.context import Services
from release.instants import describe_instant, embargo_of
from release.records import PUBLISHING, QUEUED, Release
from storage.db import transaction

log = logging.getLogger(__name__)


def _repetition(since: timedelta, repeat: timedelta) -> int:
    return max(0, int(since / repeat)) if repeat > timedelta(0) else 0


def overdue(services: Services, *, now: datetime, after: timedelta) -> list[Release]:
    """Releases not published although their instant passed ``after`` ago."""
    with transaction(services.sessions) as session:
        return list(session.scalars(select(Release).where(
            Release.state.in_((QUEUED, PUBLISHING)), Release.instant <= now - after)
            .order_by(Release.instant)))


def alert_overdue(services: Services, *, now: datetime, after: timedelta, actor: str) -> int:
    """Raise an ``overdue`` alert for each overdue release (again every
    ``alerts.repeat`` while it lasts). Returns how many messages were added."""
    added = 0
    for release in overdue(services, now=now, after=after):
        late = now - release.instant
        which = _repetition(late - after, services.alerts_repeat)
        alert = Alert(
            kind="overdue",
            subject=f"OVERDUE: {release.title} was due {embargo_of(release).describe()}",
            lines=[f"{release.title} ({release.id}) was due to publish "
                   f"{embargo_of(release).describe_long()}.",
                   f"It is {release.state}, {int(late.total_seconds())} s after the instant "
                   f"({describe_instant(now, release.zone)}).",
                   f"Last problem: {release.reason}" if release.reason else
                   "No node has reported a problem: check that a scheduler node is running "
                   "(`embargo nodes`).",
                   "It publishes as soon as a node can; `embargo show "
                   f"{release.id}` shows where it stands."],
            key=f"{release.instant.isoformat()}#{which}")
        with transaction(services.sessions) as session:
            added += raise_alert(session, alert, release_id=release.id, owner=release.owner,
                                 alerts_to=services.alerts_to, now=now, actor=actor)
    return added


def alert_skew(services: Services, *, node: str, skew_ms: float | None, now: datetime,
               within: timedelta, actor: str) -> int:
    """This node's clock is skewed: tell, for each release due within
    ``within``, that one node will not publish it (again every
    ``alerts.repeat`` while it lasts)."""
    with transaction(services.sessions) as session:
        releases = list(session.scalars(select(Release).where(
            Release.state == QUEUED, Release.instant > now, Release.instant <= now + within)))
    added = 0
    which = int(now.timestamp() // max(services.alerts_repeat.total_seconds(), 1))
    off = "unknown" if skew_ms is None else f"{skew_ms:+.0f} ms"
    for release in releases:
        alert = Alert(
            kind="clock_skewed",
            subject=f"Clock skewed on node {node}: {release.title} at risk",
            lines=[f"Node {node}'s clock is {off} off the database server's; it refuses to "
                   "publish until it is corrected.",
                   f"{release.title} ({release.id}) is due {embargo_of(release).describe()}; "
                   "another node must publish it (`embargo nodes`)."],
            key=f"skew:{node}#{which}")
        with transaction(services.sessions) as session:
            added += raise_alert(session, alert, release_id=release.id, owner=release.owner,
                                 alerts_to=services.alerts_to, now=now, actor=actor)
    return added
