"""NCRONTAB and TimeSpan schedules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.host.errors import HostStartupError
from sandbox.host.timers import CronSchedule, IntervalSchedule, default_use_monitor, parse_schedule

T0 = datetime(2026, 3, 28, 23, 59, 58, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("0 */5 * * * *", datetime(2026, 3, 29, 0, 0, 0, tzinfo=UTC)),
        ("*/10 * * * * *", datetime(2026, 3, 29, 0, 0, 0, tzinfo=UTC)),
        ("30 0 9 * * Mon-Fri", datetime(2026, 3, 30, 9, 0, 30, tzinfo=UTC)),
        ("0 0 0 1 1 *", datetime(2027, 1, 1, tzinfo=UTC)),
    ],
)
def test_next_occurrence_seconds_first(expression: str, expected: datetime) -> None:
    assert parse_schedule(expression, where="t").next_after(T0) == expected


def test_time_zone_setting_shifts_the_schedule() -> None:
    schedule = parse_schedule("0 0 9 * * *", where="t", time_zone="Europe/London")
    # 30 March 2026 is after the clocks went forward: 09:00 London is 08:00 UTC.
    assert schedule.next_after(datetime(2026, 3, 30, 0, 0, tzinfo=UTC)) == datetime(2026, 3, 30, 8, 0, tzinfo=UTC)


def test_timespan_schedule_is_an_interval() -> None:
    schedule = parse_schedule("00:05:00", where="t")
    assert isinstance(schedule, IntervalSchedule)
    assert schedule.next_after(T0) == T0 + timedelta(minutes=5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("*/5 * * * *", "5 fields"),
        ("0 0 0 0 0 0 0", "7 fields"),
        ("0 0 25 * * *", "not a valid NCRONTAB"),
        ("00:00:00", "longer than zero"),
        ("", "0 fields"),
    ],
)
def test_bad_schedules_are_explained(text: str, message: str) -> None:
    with pytest.raises(HostStartupError, match=message):
        parse_schedule(text, where="function 'f'")


def test_monitor_defaults_on_only_for_intervals_of_a_minute_or_more() -> None:
    assert default_use_monitor(parse_schedule("0 */5 * * * *", where="t"), T0)
    assert not default_use_monitor(parse_schedule("*/10 * * * * *", where="t"), T0)


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - hypothesis takes naive bounds and adds the zone
        max_value=datetime(2090, 1, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    st.sampled_from(["0 */5 * * * *", "*/15 * * * * *", "0 0 */2 * * *", "0 30 9 * * 1-5"]),
)
def test_next_occurrence_is_later_and_matches_the_seconds_field(moment: datetime, expression: str) -> None:
    nxt = CronSchedule(expression).next_after(moment)
    assert nxt > moment
    assert nxt - moment <= timedelta(days=4)
    second_field = expression.split(maxsplit=1)[0]
    assert nxt.second % (int(second_field[2:]) if second_field.startswith("*/") else 60) == (
        0 if second_field.startswith("*/") else int(second_field)
    )
    assert nxt.microsecond == 0
