"""Embargo time rules: parsing, gaps and folds, the past boundary, display."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from config.errors import InputError
from release.timerules import Embargo, format_delta, parse_duration, resolve

LONDON = "Europe/London"
SEED_NOW = datetime(2014, 9, 1, tzinfo=UTC)
SEED_INSTANT = datetime(2014, 9, 3, 23, 1, tzinfo=UTC)
NOW_2027 = datetime(2027, 1, 1, tzinfo=UTC)


def _error(publish_on: str, *, at: str | None = None, zone: str = LONDON,
           now: datetime = SEED_NOW) -> str:
    with pytest.raises(InputError) as caught:
        resolve(publish_on, at=at, zone=zone, now=now)
    message = str(caught.value)
    assert "\n" not in message
    return message


# The seed instant: 00:01 UK time on Thursday 4 September 2014


@pytest.mark.parametrize(
    "publish_on",
    [
        "2014-09-04",
        "Thursday 4 September 2014",
        "thu 4 sep 2014",
        "Thu, 4 Sep 2014",
        "THURSDAY, 4 SEPTEMBER 2014",
        "4 September 2014",
        "  Thursday   4 September 2014 ",
    ],
)
def test_seed_date_resolves_to_one_minute_past_midnight_bst(publish_on: str) -> None:
    embargo = resolve(publish_on, at=None, zone=LONDON, now=SEED_NOW)

    assert embargo.instant == SEED_INSTANT
    assert embargo.instant.tzinfo is UTC
    assert embargo.zone == LONDON
    assert embargo.wall == "2014-09-04T00:01"


@pytest.mark.parametrize(
    "publish_on", ["2014-09-03T23:01:00Z", "2014-09-04T00:01+01:00", "2014-09-04 00:01:00+01:00"]
)
def test_seed_timestamp_with_offset_gives_the_same_embargo(publish_on: str) -> None:
    by_date = resolve("2014-09-04", at=None, zone=LONDON, now=SEED_NOW)

    assert resolve(publish_on, at=None, zone=LONDON, now=SEED_NOW) == by_date


def test_seed_is_shown_in_both_zones() -> None:
    embargo = resolve("2014-09-04", at=None, zone=LONDON, now=SEED_NOW)

    assert embargo.describe() == "00:01 BST Thu 4 Sep 2014 (23:01 UTC Wed 3 Sep)"
    assert embargo.describe_long() == (
        "00:01 BST Thursday 4 September 2014 (23:01 UTC Wednesday 3 September)"
    )
    assert embargo.headline() == "00:01 BST THURSDAY 4 SEPTEMBER 2014"
    assert embargo.local == datetime(2014, 9, 4, 0, 1, tzinfo=ZoneInfo(LONDON))
    assert embargo.local.utcoffset() == timedelta(hours=1)


def test_explicit_at_and_default_at() -> None:
    at_nine = resolve("2014-09-04", at="09:30", zone=LONDON, now=SEED_NOW)
    default_noon = resolve("2014-09-04", at=None, zone=LONDON, now=SEED_NOW, default_at="12:00")

    assert at_nine.instant == datetime(2014, 9, 4, 8, 30, tzinfo=UTC)
    assert default_noon.instant == datetime(2014, 9, 4, 11, 0, tzinfo=UTC)
    assert default_noon.wall == "2014-09-04T12:00"


def test_timestamp_wall_is_the_instant_in_the_zone() -> None:
    embargo = resolve("2014-09-04T00:01Z", at=None, zone=LONDON, now=SEED_NOW)

    assert embargo.instant == datetime(2014, 9, 4, 0, 1, tzinfo=UTC)
    assert embargo.wall == "2014-09-04T01:01"


def test_seconds_show_everywhere_when_not_zero() -> None:
    embargo = resolve("2014-09-04", at="00:01:30", zone=LONDON, now=SEED_NOW)

    assert embargo.instant == datetime(2014, 9, 3, 23, 1, 30, tzinfo=UTC)
    assert embargo.wall == "2014-09-04T00:01:30"
    assert embargo.describe() == "00:01:30 BST Thu 4 Sep 2014 (23:01:30 UTC Wed 3 Sep)"
    assert embargo.headline() == "00:01:30 BST THURSDAY 4 SEPTEMBER 2014"


def test_utc_year_shown_only_when_it_differs() -> None:
    new_year = resolve("2015-01-01", at=None, zone="Pacific/Auckland", now=SEED_NOW)

    assert new_year.instant == datetime(2014, 12, 31, 11, 1, tzinfo=UTC)
    assert new_year.describe() == "00:01 NZDT Thu 1 Jan 2015 (11:01 UTC Wed 31 Dec 2014)"
    assert new_year.describe_long() == (
        "00:01 NZDT Thursday 1 January 2015 (11:01 UTC Wednesday 31 December 2014)"
    )


def test_winter_london_is_gmt() -> None:
    embargo = resolve("2014-12-04", at=None, zone=LONDON, now=SEED_NOW)

    assert embargo.instant == datetime(2014, 12, 4, 0, 1, tzinfo=UTC)
    assert embargo.describe() == "00:01 GMT Thu 4 Dec 2014 (00:01 UTC Thu 4 Dec)"


# Gaps and folds


def test_spring_forward_gap_is_refused_naming_both_candidates() -> None:
    message = _error("2015-03-29", at="01:30")

    assert "does not exist in Europe/London" in message
    assert "01:30 GMT = 01:30 UTC" in message
    assert "01:30 BST = 00:30 UTC" in message
    assert "01:00-02:00" in message


@pytest.mark.parametrize("at", ["01:00", "01:59:59"])
def test_gap_edges_inside_are_refused(at: str) -> None:
    assert "does not exist" in _error("2015-03-29", at=at)


@pytest.mark.parametrize(
    ("at", "instant"),
    [
        ("00:59:59", datetime(2015, 3, 29, 0, 59, 59, tzinfo=UTC)),
        ("02:00", datetime(2015, 3, 29, 1, 0, tzinfo=UTC)),
    ],
)
def test_gap_edges_outside_are_accepted(at: str, instant: datetime) -> None:
    assert resolve("2015-03-29", at=at, zone=LONDON, now=SEED_NOW).instant == instant


def test_autumn_fold_is_refused_naming_both_candidates() -> None:
    message = _error("2014-10-26", at="01:30")

    assert "happens twice in Europe/London" in message
    assert "01:30 BST (00:30 UTC)" in message
    assert "01:30 GMT (01:30 UTC)" in message
    assert "2014-10-26T01:30+01:00" in message
    assert "2014-10-26T01:30+00:00" in message


@pytest.mark.parametrize(
    ("publish_on", "instant"),
    [
        ("2014-10-26T01:30+01:00", datetime(2014, 10, 26, 0, 30, tzinfo=UTC)),
        ("2014-10-26T01:30+00:00", datetime(2014, 10, 26, 1, 30, tzinfo=UTC)),
    ],
)
def test_fold_with_explicit_offset_is_accepted(publish_on: str, instant: datetime) -> None:
    embargo = resolve(publish_on, at=None, zone=LONDON, now=SEED_NOW)

    assert embargo.instant == instant
    assert embargo.wall == "2014-10-26T01:30"


@pytest.mark.parametrize(
    ("at", "instant"),
    [
        ("00:59:59", datetime(2014, 10, 25, 23, 59, 59, tzinfo=UTC)),
        ("02:00", datetime(2014, 10, 26, 2, 0, tzinfo=UTC)),
    ],
)
def test_fold_edges_outside_are_accepted(at: str, instant: datetime) -> None:
    assert resolve("2014-10-26", at=at, zone=LONDON, now=SEED_NOW).instant == instant


@pytest.mark.parametrize(
    ("zone", "day", "abbreviations", "candidates"),
    [
        # tzdata 2025b: Cuba springs forward at midnight, CST -> CDT.
        ("America/Havana", "2027-03-14", ("CST", "CDT"), ("05:01 UTC", "04:01 UTC")),
        # tzdata 2025b: mainland Chile springs forward at 24:00 Saturday, -04 -> -03.
        ("America/Santiago", "2027-09-05", ("-04", "-03"), ("04:01 UTC", "03:01 UTC")),
    ],
)
def test_midnight_gap_is_refused_at_one_minute_past(
    zone: str, day: str, abbreviations: tuple[str, str], candidates: tuple[str, str]
) -> None:
    message = _error(day, zone=zone, now=NOW_2027)

    assert f"does not exist in {zone}" in message
    assert f"00:01 {abbreviations[0]} = {candidates[0]}" in message
    assert f"00:01 {abbreviations[1]} = {candidates[1]}" in message
    assert "00:00-01:00" in message


@pytest.mark.parametrize(
    ("zone", "day", "instant"),
    [
        ("America/Havana", "2027-03-14", datetime(2027, 3, 14, 5, 1, tzinfo=UTC)),
        ("America/Santiago", "2027-09-05", datetime(2027, 9, 5, 4, 1, tzinfo=UTC)),
    ],
)
def test_midnight_gap_zones_accept_one_hour_later(zone: str, day: str, instant: datetime) -> None:
    assert resolve(day, at="01:01", zone=zone, now=NOW_2027).instant == instant


def test_midnight_fold_is_refused() -> None:
    message = _error("2027-11-07", zone="America/Havana", now=NOW_2027)

    assert "happens twice in America/Havana" in message
    assert "00:01 CDT (04:01 UTC)" in message
    assert "00:01 CST (05:01 UTC)" in message


def test_gap_candidates_on_another_utc_day_show_that_day() -> None:
    message = _error("2015-09-27", at="02:30", zone="Pacific/Auckland")

    assert "02:30 NZST = 14:30 UTC Sat 26 Sep" in message
    assert "02:30 NZDT = 13:30 UTC Sat 26 Sep" in message


# Weekday and the past


@pytest.mark.parametrize(
    "publish_on", ["Wednesday 4 September 2014", "wed 4 sep 2014", "Fri, 4 Sep 2014"]
)
def test_weekday_must_match_the_date(publish_on: str) -> None:
    message = _error(publish_on)

    assert message.startswith("4 September 2014 is a Thursday, not a ")


def test_weekday_mismatch_message() -> None:
    assert _error("Wednesday 4 September 2014") == (
        "4 September 2014 is a Thursday, not a Wednesday"
    )


def test_now_exactly_at_the_instant_is_refused() -> None:
    message = _error("2014-09-04", now=SEED_INSTANT)

    assert "00:01 BST Thu 4 Sep 2014 (23:01 UTC Wed 3 Sep)" in message
    assert "now is 00:01:00 BST Thu 4 Sep 2014 (23:01:00 UTC Wed 3 Sep)" in message


def test_now_one_microsecond_after_the_instant_is_refused() -> None:
    message = _error("2014-09-04", now=SEED_INSTANT + timedelta(microseconds=1))

    assert "is in the past" in message


def test_now_one_microsecond_before_the_instant_is_accepted() -> None:
    now = SEED_INSTANT - timedelta(microseconds=1)

    assert resolve("2014-09-04", at=None, zone=LONDON, now=now).instant == SEED_INSTANT


def test_past_message_shows_both_instants() -> None:
    message = _error("2014-09-04", now=datetime(2014, 9, 5, 12, 0, tzinfo=UTC))

    assert message == (
        "embargo 00:01 BST Thu 4 Sep 2014 (23:01 UTC Wed 3 Sep) is in the past: "
        "now is 13:00:00 BST Fri 5 Sep 2014 (12:00:00 UTC Fri 5 Sep)"
    )


def test_now_in_another_offset_is_compared_as_an_instant() -> None:
    now = datetime(2014, 9, 4, 0, 1, tzinfo=timezone(timedelta(hours=1)))

    assert "is not in the future" in _error("2014-09-04", now=now)


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="naive"):
        resolve("2014-09-04", at=None, zone=LONDON, now=datetime(2014, 9, 1))


# Bad input: one line, naming the value


@pytest.mark.parametrize(
    ("publish_on", "named"),
    [
        ("2014-02-30", "'2014-02-30'"),
        ("2014-13-01", "'2014-13-01'"),
        ("31 September 2014", "'31 September 2014'"),
        ("tomorrow", "'tomorrow'"),
        ("2014/09/04", "'2014/09/04'"),
        ("Thrusday 4 September 2014", "'Thrusday'"),
        ("4 Septembre 2014", "'Septembre'"),
        ("2014-09-04T25:00Z", "'2014-09-04T25:00Z'"),
        ("2014-09-04T00:01:00.5Z", "'2014-09-04T00:01:00.5Z'"),
    ],
)
def test_bad_dates_are_refused_naming_the_value(publish_on: str, named: str) -> None:
    assert named in _error(publish_on)


def test_impossible_date_says_why() -> None:
    assert _error("2014-02-30") == "'2014-02-30' is not a real date: February 2014 has 28 days"


@pytest.mark.parametrize("at", ["25:00", "7pm", "24:00", "00:60", "7:30", "00:01:60", ""])
def test_bad_time_of_day_is_refused_naming_the_value(at: str) -> None:
    assert f"{at!r} is not a time of day" in _error("2014-09-04", at=at)


def test_bad_default_at_is_refused() -> None:
    with pytest.raises(InputError, match="'midnight'"):
        resolve("2014-09-04", at=None, zone=LONDON, now=SEED_NOW, default_at="midnight")


@pytest.mark.parametrize("zone", ["Europe/Londn", "europe/london", "Europe", "", "localtime"])
def test_unknown_zone_is_refused_naming_it(zone: str) -> None:
    assert f"unknown time zone {zone!r}" in _error("2014-09-04", zone=zone)


def test_unknown_zone_suggests_the_nearest() -> None:
    assert "did you mean 'Europe/London'?" in _error("2014-09-04", zone="Europe/Londn")


def test_timestamp_without_offset_is_refused() -> None:
    message = _error("2014-09-04T00:01")

    assert "'2014-09-04T00:01' has no UTC offset" in message
    assert "2014-09-04 at 00:01" in message  # the domain's words: no command-line option


def test_timestamp_and_at_together_are_refused() -> None:
    message = _error("2014-09-04T00:01+01:00", at="00:01")

    assert "'2014-09-04T00:01+01:00'" in message
    assert "'00:01'" in message


def test_timestamp_beyond_the_calendar_is_refused() -> None:
    assert "'9999-12-31T23:59Z'" in _error("9999-12-31T23:59Z", zone="Pacific/Auckland")


# Embargo as a value object


def _seed(**changes: object) -> Embargo:
    fields: dict[str, object] = {
        "instant": SEED_INSTANT, "zone": LONDON, "wall": "2014-09-04T00:01",
    }
    fields.update(changes)
    return Embargo(**fields)  # type: ignore[arg-type]


def test_embargo_built_directly_equals_resolved() -> None:
    assert _seed() == resolve("2014-09-04", at=None, zone=LONDON, now=SEED_NOW)


def test_embargo_rejects_naive_instant() -> None:
    with pytest.raises(InputError, match="naive"):
        _seed(instant=datetime(2014, 9, 3, 23, 1))


def test_embargo_rejects_non_utc_instant() -> None:
    with pytest.raises(InputError, match="not in UTC"):
        _seed(instant=datetime(2014, 9, 4, 0, 1, tzinfo=ZoneInfo(LONDON)))


def test_embargo_rejects_fraction_of_a_second() -> None:
    with pytest.raises(InputError, match="fraction of a second"):
        _seed(instant=SEED_INSTANT + timedelta(microseconds=1))


def test_embargo_normalises_a_zero_offset_to_utc() -> None:
    embargo = _seed(instant=datetime(2014, 9, 3, 23, 1, tzinfo=ZoneInfo("UTC")))

    assert embargo.instant.tzinfo is UTC


@pytest.mark.parametrize("wall", ["2014-09-03T23:01", "2014-09-04T00:01:00", "2014-09-04 00:01"])
def test_embargo_rejects_wall_that_does_not_match(wall: str) -> None:
    with pytest.raises(InputError, match="2014-09-04T00:01"):
        _seed(wall=wall)


def test_embargo_rejects_unknown_zone() -> None:
    with pytest.raises(InputError, match="'Mars/Olympus'"):
        _seed(zone="Mars/Olympus")


def test_embargo_is_frozen() -> None:
    embargo = _seed()

    with pytest.raises(AttributeError):
        embargo.zone = "UTC"  # type: ignore[misc]


# Durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", timedelta(hours=24)),
        ("90m", timedelta(minutes=90)),
        ("30s", timedelta(seconds=30)),
        ("1d", timedelta(days=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("0s", timedelta(0)),
        (" 24H ", timedelta(hours=24)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "h", "1.5h", "-1h", "1m30h", "1h 30m", "1w", "1hh"])
def test_parse_duration_refuses_naming_the_value(text: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_duration(text)

    assert str(caught.value).startswith(f"{text!r} is not a duration")


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (timedelta(days=2, hours=3, minutes=4, seconds=5), "2d 03:04:05"),
        (timedelta(hours=3, minutes=4, seconds=5), "03:04:05"),
        (timedelta(seconds=-1), "-00:00:01"),
        (timedelta(0), "00:00:00"),
        (timedelta(days=1), "1d 00:00:00"),
        (timedelta(days=1) - timedelta(microseconds=1), "23:59:59"),
        (timedelta(microseconds=999_999), "00:00:00"),
        (timedelta(microseconds=-1), "-00:00:00"),
        (-timedelta(days=3, seconds=1), "-3d 00:00:01"),
    ],
)
def test_format_delta(delta: timedelta, expected: str) -> None:
    assert format_delta(delta) == expected
