"""When pre-embargo copies may go: before the embargo, at least
``copies.cutoff`` before it, and no earlier than ``copies.max_lead``."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from config.errors import InputError
from release import timerules
from release.instants import describe_instant


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
