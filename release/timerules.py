"""Embargo time rules: from what a person types to one exact UTC instant.

An embargo is stored three ways at once (see :class:`Embargo`): the UTC
instant, the IANA zone, and the local wall time the user meant. :func:`resolve`
is the only way in from user input, and it refuses anything that does not name
exactly one instant in the future:

* a local time in a spring-forward gap (it does not exist) or an autumn fold
  (it happens twice) is refused with a message naming both candidate instants;
* a weekday that does not match the date is refused;
* a naive datetime is never taken to be "probably local": a timestamp must
  carry its UTC offset, and ``now`` must be aware;
* an instant not after ``now`` is refused.

Nothing here reads the clock: ``now`` is always a parameter. Day and month
names come from the tables below, never from the locale.
"""

from __future__ import annotations

import calendar
import difflib
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from config.errors import InputError
from config.settings import parse_duration as settings_parse_duration

__all__ = ["Embargo", "format_delta", "parse_duration", "resolve", "wall_of"]

_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)

_WEEKDAY_WORDS: dict[str, int] = {
    **{name.lower(): number for number, name in enumerate(_WEEKDAYS)},
    **{name[:3].lower(): number for number, name in enumerate(_WEEKDAYS)},
    "tues": 1, "thur": 3, "thurs": 3,
}
_MONTH_WORDS: dict[str, int] = {
    **{name.lower(): number for number, name in enumerate(_MONTHS, start=1)},
    **{name[:3].lower(): number for number, name in enumerate(_MONTHS, start=1)},
    "sept": 9,
}

# Zone files that exist under TZPATH but stand for "whatever this machine is".
_NOT_ZONES = frozenset({"localtime", "posixrules"})

_ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})", re.ASCII)
_ISO_TIMESTAMP = re.compile(r"(\d{4})-(\d{2})-(\d{2})[T ](.+)", re.IGNORECASE | re.ASCII)
_WORDY_DATE = re.compile(
    r"(?:([a-z]+),?\s+)?(\d{1,2})\s+([a-z]+)\s+(\d{4})", re.IGNORECASE | re.ASCII
)
_TIME_OF_DAY = re.compile(r"(\d{2}):(\d{2})(?::(\d{2}))?", re.ASCII)

_DATE_FORMS = "2014-09-04, Thursday 4 September 2014, or 2014-09-04T00:01+01:00"


@dataclass(frozen=True, kw_only=True)
class Embargo:
    """One embargo instant, as stored and as shown.

    ``instant`` is aware, in UTC, whole seconds (an instant with offset zero in
    another tzinfo is normalised to ``datetime.UTC``); ``zone`` is an IANA name;
    ``wall`` is the local time in ``zone`` as the user meant it,
    ``YYYY-MM-DDTHH:MM`` or ``YYYY-MM-DDTHH:MM:SS`` when the seconds are not
    zero. Construction raises :class:`InputError` if the three disagree.
    """

    instant: datetime
    zone: str
    wall: str

    def __post_init__(self) -> None:
        instant = self.instant
        if not isinstance(instant, datetime):
            raise InputError(f"embargo instant must be a datetime, got {instant!r}")
        offset = instant.utcoffset()
        if offset is None:
            raise InputError(f"embargo instant {instant.isoformat()} is naive; it must be in UTC")
        if offset:
            raise InputError(
                f"embargo instant {instant.isoformat()} is not in UTC (offset {offset})"
            )
        if instant.microsecond:
            raise InputError(
                f"embargo instant {instant.isoformat()} has a fraction of a second; "
                "embargoes are whole seconds"
            )
        if instant.tzinfo is not UTC:
            object.__setattr__(self, "instant", instant.replace(tzinfo=UTC))
        expected = wall_of(self.local)
        if self.wall != expected:
            raise InputError(
                f"embargo wall time {self.wall!r} does not match "
                f"{_clock(self.instant)} UTC on {self.instant.date().isoformat()} "
                f"in {self.zone}, which is {expected}"
            )

    @property
    def local(self) -> datetime:
        """The instant as an aware datetime in the embargo's zone."""
        return self.instant.astimezone(_load_zone(self.zone))

    def describe(self) -> str:
        """``00:01 BST Thu 4 Sep 2014 (23:01 UTC Wed 3 Sep)``."""
        return _describe(self.local, long=False)

    def describe_long(self) -> str:
        """``00:01 BST Thursday 4 September 2014 (23:01 UTC Wednesday 3 September)``."""
        return _describe(self.local, long=True)

    def headline(self) -> str:
        """``00:01 BST THURSDAY 4 SEPTEMBER 2014``, for "EMBARGOED UNTIL ..." lines."""
        local = self.local
        return f"{_clock(local)} {_abbreviation(local)} {_day(local, long=True)}".upper()


def resolve(
    publish_on: str,
    *,
    at: str | None,
    zone: str,
    now: datetime,
    default_at: str = "00:01",
) -> Embargo:
    """Turn what the user typed into an :class:`Embargo` strictly after ``now``.

    ``publish_on`` is an ISO date (``2014-09-04``), a date in words
    (``Thursday 4 September 2014``, ``Thu, 4 Sep 2014``, ``4 September 2014``;
    any case; a weekday, if given, must match), or an ISO timestamp with a UTC
    offset or ``Z`` (then ``at`` must be None). ``at`` is ``HH:MM`` or
    ``HH:MM:SS`` on the 24-hour clock in ``zone``; None means ``default_at``.

    Raises :class:`InputError` for anything unreadable, an unknown zone, a local
    time that does not exist or happens twice, and an instant not after
    ``now``. Raises :class:`ValueError` if ``now`` is naive (a programming
    error, not bad input).
    """
    if now.utcoffset() is None:
        raise ValueError(f"now must be an aware datetime, got naive {now.isoformat()}")
    tz = _load_zone(zone)
    text = " ".join(publish_on.split())

    try:
        timestamp = _ISO_TIMESTAMP.fullmatch(text)
        if timestamp is not None:
            if at is not None:
                raise InputError(
                    f"{publish_on!r} already has a time of day; give no separate time of "
                    f"day ({at!r}), or give the date alone"
                )
            instant = _parse_timestamp(text, timestamp)
            local = instant.astimezone(tz)
        else:
            day = _parse_date(text)
            time_of_day = _parse_at(default_at if at is None else at)
            local = _localise(datetime.combine(day, time_of_day), tz, zone)
            instant = local.astimezone(UTC)
    except OverflowError:
        raise InputError(f"{publish_on!r} is too far from the present to use") from None

    embargo = Embargo(instant=instant, zone=zone, wall=wall_of(local))
    if instant <= now:
        then = embargo.describe()
        current = _describe(now.astimezone(tz), long=False, exact=True)
        relation = "is not in the future" if instant == now else "is in the past"
        raise InputError(f"embargo {then} {relation}: now is {current}")
    return embargo


def parse_duration(text: str) -> timedelta:
    """Read a duration such as ``24h``, ``90m``, ``30s``, ``1d`` or ``1h30m``
    (the settings' parser, with the user-facing error). Raises InputError."""
    try:
        return settings_parse_duration(text)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def format_delta(delta: timedelta) -> str:
    """``2d 03:04:05``, ``03:04:05``, or ``-00:00:01`` when negative.

    Fractions of a second are dropped (towards zero); the sign still shows, so
    half a second late is ``-00:00:00``.
    """
    sign = "-" if delta < timedelta(0) else ""
    seconds = abs(delta) // timedelta(seconds=1)
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3_600)
    minutes, seconds = divmod(seconds, 60)
    clock = f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    return f"{sign}{days}d {clock}" if days else f"{sign}{clock}"


# Parsing


def _load_zone(name: str) -> ZoneInfo:
    if name not in _NOT_ZONES:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    hint = ""
    if name:
        known = available_timezones() - _NOT_ZONES
        same = [key for key in known if key.lower() == name.lower()]
        close = same or difflib.get_close_matches(name, known, n=1)
        if close:
            hint = f"; did you mean {close[0]!r}?"
    raise InputError(f"unknown time zone {name!r}: give an IANA name such as 'Europe/London'{hint}")


def _parse_date(text: str) -> date:
    iso = _ISO_DATE.fullmatch(text)
    if iso is not None:
        return _make_date(*(int(part) for part in iso.groups()), text=text)

    wordy = _WORDY_DATE.fullmatch(text)
    if wordy is None:
        raise InputError(f"{text!r} is not a date: give it like {_DATE_FORMS}")
    weekday_word, day_text, month_word, year_text = wordy.groups()
    month: int | None = _MONTH_WORDS.get(month_word.lower())
    if month is None:
        raise InputError(f"{month_word!r} is not a month (in {text!r})")
    weekday: int | None = None
    if weekday_word is not None:
        weekday = _WEEKDAY_WORDS.get(weekday_word.lower())
        if weekday is None:
            raise InputError(f"{weekday_word!r} is not a day of the week (in {text!r})")
    result = _make_date(int(year_text), month, int(day_text), text=text)
    if weekday is not None and weekday != result.weekday():
        raise InputError(
            f"{result.day} {_MONTHS[month - 1]} {result.year} is a "
            f"{_WEEKDAYS[result.weekday()]}, not a {_WEEKDAYS[weekday]}"
        )
    return result


def _make_date(year: int, month: int, day: int, *, text: str) -> date:
    if not 1 <= year <= 9999:
        raise InputError(f"{text!r} is not a real date: year {year} is out of range")
    if not 1 <= month <= 12:
        raise InputError(f"{text!r} is not a real date: there is no month {month}")
    days_in_month = calendar.monthrange(year, month)[1]
    if not 1 <= day <= days_in_month:
        raise InputError(
            f"{text!r} is not a real date: {_MONTHS[month - 1]} {year} "
            f"has {days_in_month} days"
        )
    return date(year, month, day)


def _parse_timestamp(text: str, match: re.Match[str]) -> datetime:
    year, month, day = (int(part) for part in match.groups()[:3])
    _make_date(year, month, day, text=text)
    try:
        stamp = datetime.fromisoformat(text.upper())
    except ValueError:
        raise InputError(
            f"{text!r} is not a timestamp: give it like 2014-09-04T00:01+01:00 "
            "or 2014-09-03T23:01Z"
        ) from None
    if stamp.utcoffset() is None:
        raise InputError(
            f"{text!r} has no UTC offset: add one (such as +01:00, or Z for UTC), "
            f"or give the date and the time of day separately: {stamp.date().isoformat()} "
            f"at {_clock(stamp)}"
        )
    if stamp.microsecond:
        raise InputError(f"{text!r} has a fraction of a second; embargoes are whole seconds")
    return stamp.astimezone(UTC)


def _parse_at(text: str) -> time:
    match = _TIME_OF_DAY.fullmatch(text.strip())
    if match is not None:
        hour, minute, second = (int(part or 0) for part in match.groups())
        if hour <= 23 and minute <= 59 and second <= 59:
            return time(hour, minute, second)
    raise InputError(
        f"{text!r} is not a time of day: use the 24-hour clock, HH:MM or HH:MM:SS (e.g. 00:01)"
    )


# Gaps and folds


def _localise(wall: datetime, tz: ZoneInfo, zone: str) -> datetime:
    """Attach ``tz`` to a naive wall time that must name exactly one instant."""
    first = wall.replace(tzinfo=tz, fold=0)
    second = wall.replace(tzinfo=tz, fold=1)
    first_utc, second_utc = first.astimezone(UTC), second.astimezone(UTC)
    if first_utc == second_utc:
        return first

    round_trips = [
        candidate.astimezone(tz).replace(tzinfo=None) == wall
        for candidate in (first_utc, second_utc)
    ]
    start, end = _shifted_hour(first, second, tz)
    span = f"{_clock(start)}-{_clock(end)}"
    when = f"{_clock(wall)} on {_day(wall, long=True)}"
    if not any(round_trips):
        raise InputError(
            f"{when} does not exist in {zone} (the clocks go forward from "
            f"{_clock(start)} to {_clock(end)}); it would be "
            f"{_candidate(first, wall)} or {_candidate(second, wall)}; "
            f"choose a time outside {span}"
        )
    if all(round_trips):
        raise InputError(
            f"{when} happens twice in {zone} (the clocks go back from "
            f"{_clock(end)} to {_clock(start)}): {_candidate(first, wall, parens=True)} and "
            f"{_candidate(second, wall, parens=True)}; choose a time outside {span}, "
            f"or give a timestamp with its offset: {_offset_stamp(first)} or "
            f"{_offset_stamp(second)}"
        )
    raise InputError(f"{when} is ambiguous in {zone}; give a timestamp with a UTC offset")


def _shifted_hour(first: datetime, second: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The local span that is skipped (gap) or repeated (fold) around ``first``.

    ``first`` carries the offset before the change and ``second`` the offset
    after; the change happens between their UTC instants. Returns naive local
    (start, end), start < end.
    """
    before, after = first.utcoffset(), second.utcoffset()
    assert before is not None and after is not None
    low, high = sorted((first.astimezone(UTC), second.astimezone(UTC)))
    # Invariant: at `low` the old offset holds, at `high` the new one.
    lo, hi = 0, int((high - low).total_seconds())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (low + timedelta(seconds=mid)).astimezone(tz).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    change = (low + timedelta(seconds=hi)).replace(tzinfo=None)
    edges = sorted((change + before, change + after))
    return edges[0], edges[1]


def _candidate(local: datetime, wall: datetime, *, parens: bool = False) -> str:
    utc = local.astimezone(UTC)
    utc_text = f"{_clock(utc)} UTC"
    if utc.date() != wall.date():
        utc_text += f" {_day(utc, long=False, year=utc.year != wall.year)}"
    named = f"{_clock(wall)} {_abbreviation(local)}"
    return f"{named} ({utc_text})" if parens else f"{named} = {utc_text}"


def _offset_stamp(local: datetime) -> str:
    return f"{wall_of(local)}{_offset(local)}"


# Formatting (no strftime: names must not depend on the locale)


def _describe(local: datetime, *, long: bool, exact: bool = False) -> str:
    utc = local.astimezone(UTC)
    return (
        f"{_clock(local, exact=exact)} {_abbreviation(local)} {_day(local, long=long)} "
        f"({_clock(utc, exact=exact)} UTC {_day(utc, long=long, year=utc.year != local.year)})"
    )


def _clock(moment: datetime | time, *, exact: bool = False) -> str:
    """``HH:MM``, ``HH:MM:SS`` when the seconds are not zero; with ``exact``,
    always the seconds and any fraction."""
    text = f"{moment.hour:02d}:{moment.minute:02d}"
    if moment.second or exact:
        text += f":{moment.second:02d}"
    if exact and moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text


def _day(moment: date, *, long: bool, year: bool = True) -> str:
    """``Thu 4 Sep 2014`` or ``Thursday 4 September 2014``; ``year=False`` drops the year."""
    weekday = _WEEKDAYS[moment.weekday()]
    month = _MONTHS[moment.month - 1]
    if not long:
        weekday, month = weekday[:3], month[:3]
    text = f"{weekday} {moment.day} {month}"
    return f"{text} {moment.year}" if year else text


def wall_of(local: datetime) -> str:
    return f"{local.date().isoformat()}T{_clock(local)}"


def _abbreviation(local: datetime) -> str:
    return local.tzname() or f"UTC{_offset(local)}"


def _offset(moment: datetime) -> str:
    """``+01:00``, ``-04:00``; ``+00:01:15`` for an offset with seconds."""
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError(f"{moment.isoformat()} is naive")
    sign = "-" if offset < timedelta(0) else "+"
    seconds = abs(offset) // timedelta(seconds=1)
    text = f"{sign}{seconds // 3600:02d}:{seconds // 60 % 60:02d}"
    return f"{text}:{seconds % 60:02d}" if seconds % 60 else text
