"""Usage periods as Stigg's API rolls them: fixed steps (hour, day, week) or calendar months."""

from __future__ import annotations

import calendar
import math
from datetime import datetime, timedelta

_FIXED_PERIODS = {"HOUR": timedelta(hours=1), "DAY": timedelta(days=1), "WEEK": timedelta(weeks=1)}


def current_period(anchor: datetime, period: str, now: datetime) -> tuple[datetime, datetime]:
    """The [start, end) usage period containing ``now``: anchor + N and anchor + N+1 periods."""
    if period in _FIXED_PERIODS:
        step = _FIXED_PERIODS[period]
        n = max(0, math.floor((now - anchor) / step))
        return anchor + n * step, anchor + (n + 1) * step
    months = 12 if period == "YEAR" else 1
    n = max(0, ((now.year - anchor.year) * 12 + now.month - anchor.month) // months)
    if n and _add_months(anchor, n * months) > now:
        n -= 1
    return _add_months(anchor, n * months), _add_months(anchor, (n + 1) * months)


def _add_months(moment: datetime, months: int) -> datetime:
    """Calendar months later, clamping the day to the month's length (Jan 31 + 1 = Feb 28)."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)
