"""Usage-period roll-over: a metered entitlement whose period has ended starts a new one.

Owns `roll_over` (STIGG_REFERENCE §4.4), applied on read: once `usage_period_end` is in the past,
usage is 0 and the period is the one, counted in whole reset periods from `usage_period_anchor`,
that contains now. HOUR, DAY and WEEK are fixed lengths; MONTH and YEAR follow the UTC calendar,
with the anchor's day clamped to shorter months (Jan 31 -> Feb 28/29 -> Mar 31), always counted
from the anchor so a clamped month does not shift the ones after it.

Pure: no I/O, no clock reads (`now_ms` is passed in), no globals.
"""

from __future__ import annotations

import calendar
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from stigg_sidecar.entitlements.records import FeatureEntitlement, Usage

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_FIXED_MS = {"HOUR": 3_600_000, "DAY": 86_400_000, "WEEK": 7 * 86_400_000}
_MONTHS_PER = {"MONTH": 1, "YEAR": 12}


def roll_over(ent: FeatureEntitlement, now_ms: int) -> FeatureEntitlement:
    """`ent` with its usage moved to the period containing `now_ms`, or `ent` itself if current.

    Only metered entitlements whose `usage_period_end < now_ms` change. Without an anchor or a
    known reset period, usage still resets and the period dates become None.
    """
    end = ent.usage.usage_period_end
    if end is None or end >= now_ms or not ent.feature.is_metered:
        return ent
    period = current_period(ent.usage_period_anchor, ent.reset_period, now_ms)
    start, end = period if period is not None else (None, None)
    return replace(ent, usage=Usage(0.0, start, end, ent.usage.updated_at))


def current_period(anchor_ms: int | None, reset_period: str | None, now_ms: int) -> tuple[int, int] | None:
    """The `[start, end)` reset period containing `now_ms` that starts on an anchor boundary.

    None without an anchor, for an unknown reset period, or when the dates fall outside what a
    calendar can hold (years 1 to 9999).
    """
    if anchor_ms is None or reset_period is None:
        return None
    length = _FIXED_MS.get(reset_period)
    if length is not None:
        start = anchor_ms + (now_ms - anchor_ms) // length * length
        return start, start + length
    step = _MONTHS_PER.get(reset_period)
    if step is None:
        return None
    try:
        return _calendar_period(anchor_ms, step, now_ms)
    except (OverflowError, ValueError):
        return None


def _calendar_period(anchor_ms: int, step: int, now_ms: int) -> tuple[int, int]:
    anchor = _EPOCH + anchor_ms * _ONE_MS
    now = _EPOCH + now_ms * _ONE_MS
    # Whole steps by year and month alone; the anchor's day and time can make it one too many.
    months = (now.year - anchor.year) * 12 + (now.month - anchor.month)
    n = months // step
    if _add_months_ms(anchor, n * step) > now_ms:
        n -= 1
    return _add_months_ms(anchor, n * step), _add_months_ms(anchor, (n + 1) * step)


def _add_months_ms(anchor: datetime, months: int) -> int:
    """Epoch ms of `anchor` plus `months` calendar months, the day clamped to the month's end."""
    year, month_index = divmod(anchor.year * 12 + anchor.month - 1 + months, 12)
    month = month_index + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return (anchor.replace(year=year, month=month, day=day) - _EPOCH) // _ONE_MS
