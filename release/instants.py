"""Instants as people read them: a release's embargo, and any other
instant shown both ways like it."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

from release import timerules


class Embargoed(Protocol):
    """A release as a record or as a view: its instant, zone and wall time."""

    @property
    def instant(self) -> datetime: ...
    @property
    def zone(self) -> str: ...
    @property
    def wall(self) -> str: ...


def embargo_of(release: Embargoed) -> timerules.Embargo:
    return timerules.Embargo(instant=release.instant, zone=release.zone, wall=release.wall)


def describe_instant(instant: datetime, zone: str) -> str:
    """Any instant shown both ways, like an embargo."""
    whole = instant.replace(microsecond=0)
    return timerules.Embargo(instant=whole, zone=zone,
                             wall=timerules.wall_of(whole.astimezone(ZoneInfo(zone)))).describe()
