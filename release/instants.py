"""Instants as people read them: a release's embargo, and any other
instant shown both ways like it."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from release import timerules
from release.records import Release


def embargo_of(release: Release) -> timerules.Embargo:
    return timerules.Embargo(instant=release.instant, zone=release.zone, wall=release.wall)


def describe_instant(instant: datetime, zone: str) -> str:
    """Any instant shown both ways, like an embargo."""
    whole = instant.replace(microsecond=0)
    return timerules.Embargo(instant=whole, zone=zone,
                             wall=timerules.wall_of(whole.astimezone(ZoneInfo(zone)))).describe()
