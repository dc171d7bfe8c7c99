"""StiggClock: what time it is for decisions, and how far the local wall clock is from Stigg's.

Usage periods, `validUntil` and the freshness of entries are Stigg's dates: a decision compares
them with the time, so a local clock that is off (40 days ahead: every period rolled over,
usage shown as 0; two hours behind: a period Stigg already reset keeps denying) answers wrongly.
Each answer from Stigg carries its `Date`; from the last one, Stigg's time now is that date plus
the monotonic time elapsed since, which a step of the local wall clock cannot move. The skew
(local minus Stigg's) is a metric; past `tolerance` seconds it is logged as a warning, and
`now_ms()` answers Stigg's time instead of the local clock. Within it (a `Date` has one-second
resolution) the local clock is used as it is.

Thread-safe for readers: `now_ms()` runs on gRPC handler threads and reads one tuple, replaced
whole on the reactor by `observe`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

# Beyond this (seconds) the local clock is off: warned about, and Stigg's time used instead.
SKEW_TOLERANCE = 5.0
# How often the skew is checked for a warning (the local clock can step between Stigg's answers).
CHECK_INTERVAL = 5.0


def parse_http_date(value: bytes | str | None) -> int | None:
    """An HTTP `Date` header as epoch milliseconds, or None when absent or unreadable."""
    if not value:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return int(moment.timestamp() * 1000)


def _describe(seconds: float) -> str:
    size = abs(seconds)
    if size >= 2 * 86400:
        amount = f"{size / 86400:.1f} days"
    elif size >= 2 * 3600:
        amount = f"{size / 3600:.1f} hours"
    elif size >= 120:
        amount = f"{size / 60:.1f} minutes"
    else:
        amount = f"{size:.1f}s"
    return f"{amount} {'ahead of' if seconds > 0 else 'behind'}"


class StiggClock:
    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        tolerance: float = SKEW_TOLERANCE,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._tolerance = tolerance
        # (Stigg's epoch ms at the reading, monotonic seconds at the reading), or None before any.
        self._reading: tuple[float, float] | None = None
        self._warned = False

    def observe(self, date: bytes | str | None) -> None:
        """An answer from Stigg just arrived with this `Date` header (reactor)."""
        stigg_ms = parse_http_date(date)
        if stigg_ms is None:
            return
        # `Date` is truncated to the second: the middle of that second is the best guess.
        self._reading = (stigg_ms + 500.0, self._monotonic())
        self.check()

    def stigg_ms(self) -> float | None:
        """Stigg's time now (epoch ms), from its last `Date` and the monotonic time since."""
        reading = self._reading
        if reading is None:
            return None
        stigg_ms, at = reading
        return stigg_ms + (self._monotonic() - at) * 1000

    def skew(self) -> float:
        """The local wall clock minus Stigg's, in seconds (0 before Stigg has answered)."""
        stigg = self.stigg_ms()
        return 0.0 if stigg is None else (self._wall() * 1000 - stigg) / 1000

    def now_ms(self) -> int:
        """The time for decisions: the local clock, or Stigg's when the local one is off."""
        wall = self._wall() * 1000
        stigg = self.stigg_ms()
        if stigg is not None and abs(wall - stigg) > self._tolerance * 1000:
            return int(stigg)
        return int(wall)

    def check(self) -> None:
        """Log when the skew goes past the tolerance, and when it comes back within it."""
        skew = self.skew()
        off = abs(skew) > self._tolerance
        if off and not self._warned:
            log.warn(
                "The local clock is {skew} Stigg's (its responses' Date); usage periods and expiries"
                " are decided on Stigg's time until it is corrected",
                skew=_describe(skew),
                skew_seconds=round(skew, 1),
            )
        elif not off and self._warned:
            log.info("The local clock agrees with Stigg's again (within {t:.0f}s)", t=self._tolerance)
        self._warned = off



class ClockSkewCheck(TimerService):
    """Checks `stigg_clock`'s skew every CHECK_INTERVAL seconds of `clock` (the reactor), so a
    step of the local clock is warned about even while Stigg is not being called."""

    name = "clock-skew"

    def __init__(self, stigg_clock: StiggClock, clock: IReactorTime) -> None:
        super().__init__(CHECK_INTERVAL, stigg_clock.check)
        self.clock = clock
