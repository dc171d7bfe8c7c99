"""Usage-period roll-over (STIGG_REFERENCE §4.4): fixed lengths, calendar months and years."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.entitlements.periods import current_period, roll_over
from stigg_sidecar.entitlements.records import Feature, FeatureEntitlement, Usage

HOUR = 3_600_000
DAY = 24 * HOUR
WEEK = 7 * DAY
METERED = Feature("feature-api-calls", "NUMBER", "Incremental")


def ms(text: str) -> int:
    """Epoch ms of a UTC ISO-8601 date-time."""
    return (datetime.fromisoformat(text).replace(tzinfo=UTC) - _utc(0)) // timedelta(milliseconds=1)


def metered(
    anchor: int | None, reset: str | None, start: int | None, end: int | None, usage: float = 7.0
) -> FeatureEntitlement:
    return FeatureEntitlement(
        METERED,
        usage_limit=10,
        usage_period_anchor=anchor,
        reset_period=reset,
        usage=Usage(usage, start, end, updated_at=123),
    )


class RollOverTests(SynchronousTestCase):
    def assertPeriod(self, ent: FeatureEntitlement, start: str, end: str) -> None:
        self.assertEqual(ent.usage.current_usage, 0)
        self.assertEqual((ent.usage.usage_period_start, ent.usage.usage_period_end), (ms(start), ms(end)))

    def test_current_period_is_returned_unchanged(self) -> None:
        ent = metered(ms("2026-01-15"), "MONTH", ms("2026-10-15"), ms("2026-11-15"))
        self.assertIs(roll_over(ent, ms("2026-10-20")), ent)

    def test_period_ending_exactly_now_is_unchanged(self) -> None:
        ent = metered(ms("2026-01-15"), "MONTH", ms("2026-10-15"), ms("2026-11-15"))
        self.assertIs(roll_over(ent, ms("2026-11-15")), ent)

    def test_unmetered_entitlement_is_unchanged(self) -> None:
        ent = FeatureEntitlement(Feature("seats", "NUMBER", "None"), usage=Usage(3, 0, 1, 0))
        self.assertIs(roll_over(ent, ms("2026-11-15")), ent)

    def test_entitlement_without_period_end_is_unchanged(self) -> None:
        ent = metered(ms("2026-01-15"), "MONTH", None, None)
        self.assertIs(roll_over(ent, ms("2026-11-15")), ent)

    def test_monthly_rolls_to_the_month_containing_now(self) -> None:
        ent = metered(ms("2026-01-15T08:30"), "MONTH", ms("2026-02-15T08:30"), ms("2026-03-15T08:30"))
        rolled = roll_over(ent, ms("2026-10-20"))
        self.assertPeriod(rolled, "2026-10-15T08:30", "2026-11-15T08:30")
        self.assertEqual(rolled.usage.updated_at, 123)
        self.assertEqual(rolled.usage_limit, 10)

    def test_monthly_before_the_anchor_day_stays_in_the_previous_month(self) -> None:
        ent = metered(ms("2026-01-15T08:30"), "MONTH", ms("2026-02-15T08:30"), ms("2026-03-15T08:30"))
        self.assertPeriod(roll_over(ent, ms("2026-10-15T08:29")), "2026-09-15T08:30", "2026-10-15T08:30")

    def test_month_end_anchor_is_clamped_then_restored(self) -> None:
        ent = metered(ms("2025-01-31"), "MONTH", ms("2025-01-31"), ms("2025-02-28"))
        self.assertPeriod(roll_over(ent, ms("2025-03-01")), "2025-02-28", "2025-03-31")
        self.assertPeriod(roll_over(ent, ms("2025-04-10")), "2025-03-31", "2025-04-30")

    def test_month_end_anchor_in_a_leap_year(self) -> None:
        ent = metered(ms("2024-01-31"), "MONTH", ms("2024-01-31"), ms("2024-02-01"))
        self.assertPeriod(roll_over(ent, ms("2024-02-29T12:00")), "2024-02-29", "2024-03-31")
        self.assertPeriod(roll_over(ent, ms("2024-02-28T12:00")), "2024-01-31", "2024-02-29")

    def test_leap_day_yearly_anchor(self) -> None:
        ent = metered(ms("2024-02-29"), "YEAR", ms("2024-02-29"), ms("2025-02-28"))
        self.assertPeriod(roll_over(ent, ms("2027-06-01")), "2027-02-28", "2028-02-29")
        self.assertPeriod(roll_over(ent, ms("2028-02-29T00:00")), "2028-02-29", "2029-02-28")

    def test_yearly_before_the_anniversary(self) -> None:
        ent = metered(ms("2020-07-04"), "YEAR", ms("2020-07-04"), ms("2021-07-04"))
        self.assertPeriod(roll_over(ent, ms("2026-03-01")), "2025-07-04", "2026-07-04")

    def test_hourly(self) -> None:
        ent = metered(ms("2026-10-01T00:15"), "HOUR", ms("2026-10-01T00:15"), ms("2026-10-01T01:15"))
        self.assertPeriod(roll_over(ent, ms("2026-10-03T07:14")), "2026-10-03T06:15", "2026-10-03T07:15")

    def test_daily(self) -> None:
        ent = metered(ms("2026-10-01T06:00"), "DAY", ms("2026-10-01T06:00"), ms("2026-10-02T06:00"))
        self.assertPeriod(roll_over(ent, ms("2026-10-09T05:00")), "2026-10-08T06:00", "2026-10-09T06:00")

    def test_weekly(self) -> None:
        ent = metered(ms("2026-10-05"), "WEEK", ms("2026-10-05"), ms("2026-10-12"))
        self.assertPeriod(roll_over(ent, ms("2026-10-27")), "2026-10-26", "2026-11-02")

    def test_without_anchor_usage_resets_and_dates_clear(self) -> None:
        rolled = roll_over(metered(None, "MONTH", 0, 1), ms("2026-10-27"))
        self.assertEqual(rolled.usage, Usage(0.0, None, None, 123))

    def test_without_reset_period_usage_resets_and_dates_clear(self) -> None:
        rolled = roll_over(metered(0, None, 0, 1), ms("2026-10-27"))
        self.assertEqual(rolled.usage, Usage(0.0, None, None, 123))

    def test_unknown_reset_period_clears_dates(self) -> None:
        self.assertIsNone(current_period(0, "FORTNIGHT", ms("2026-10-27")))

    def test_dates_beyond_the_calendar_clear_instead_of_raising(self) -> None:
        self.assertIsNone(current_period(0, "MONTH", 10**18))
        rolled = roll_over(metered(0, "YEAR", 0, 1), 10**18)
        self.assertEqual(rolled.usage, Usage(0.0, None, None, 123))

    def test_fluctuating_meters_roll_over_too(self) -> None:
        ent = FeatureEntitlement(
            Feature("seats", "NUMBER", "Fluctuating"),
            usage_period_anchor=0,
            reset_period="DAY",
            usage=Usage(4, 0, DAY, 1),
        )
        self.assertEqual(roll_over(ent, DAY + 5).usage, Usage(0.0, DAY, 2 * DAY, 1))


# 1970 to ~2110, so calendar arithmetic stays inside datetime's range.
instants = st.integers(min_value=0, max_value=4_400_000_000_000)


class RollOverPropertyTests(SynchronousTestCase):
    @given(anchor=instants, now=instants, reset=st.sampled_from(["HOUR", "DAY", "WEEK", "MONTH", "YEAR"]))
    def test_rolled_period_contains_now_and_starts_on_an_anchor_boundary(
        self, anchor: int, now: int, reset: str
    ) -> None:
        rolled = roll_over(metered(anchor, reset, None, now - 1), now)
        start, end = rolled.usage.usage_period_start, rolled.usage.usage_period_end
        assert start is not None and end is not None
        self.assertTrue(start <= now < end)
        self.assertEqual(rolled.usage.current_usage, 0)
        self.assertTrue(_on_boundary(anchor, start, reset))
        self.assertTrue(_on_boundary(anchor, end, reset))
        if reset in ("MONTH", "YEAR"):
            self.assertEqual(_months_between(start, end), 1 if reset == "MONTH" else 12)

    @given(anchor=instants, now=instants, end=instants, reset=st.sampled_from(["HOUR", "MONTH", "YEAR"]))
    def test_unexpired_period_is_the_same_object(self, anchor: int, now: int, end: int, reset: str) -> None:
        ent = metered(anchor, reset, None, end)
        rolled = roll_over(ent, now)
        if end >= now:
            self.assertIs(rolled, ent)
        else:
            self.assertIsNot(rolled, ent)


def _on_boundary(anchor_ms: int, moment_ms: int, reset: str) -> bool:
    """Whether `moment_ms` is the anchor plus a whole number of reset periods."""
    fixed = {"HOUR": HOUR, "DAY": DAY, "WEEK": WEEK}.get(reset)
    if fixed is not None:
        return (moment_ms - anchor_ms) % fixed == 0
    anchor, moment = _utc(anchor_ms), _utc(moment_ms)
    if moment.time() != anchor.time() or (reset == "YEAR" and moment.month != anchor.month):
        return False
    month_end = (moment + timedelta(days=1)).day == 1
    return moment.day == anchor.day or (moment.day < anchor.day and month_end)


def _months_between(start_ms: int, end_ms: int) -> int:
    start, end = _utc(start_ms), _utc(end_ms)
    return (end.year - start.year) * 12 + end.month - start.month


def _utc(moment_ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=moment_ms)
