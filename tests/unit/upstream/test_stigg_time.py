"""StiggClock: the skew between the local wall clock and Stigg's (from its responses' `Date`),
and the time decisions use: the local clock within the tolerance, Stigg's beyond it, carried
forward on the monotonic clock so a later step of the wall clock does not move it."""

from __future__ import annotations

from email.utils import formatdate

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.upstream.stigg_time import StiggClock, parse_http_date

TRUE = 1_790_000_000.0  # the true time (epoch seconds) when the test starts


class Clocks:
    def __init__(self) -> None:
        self.wall = TRUE
        self.monotonic = 100.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds


def date_header(epoch: float) -> bytes:
    return formatdate(epoch, usegmt=True).encode()


class StiggClockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clocks = Clocks()
        self.clock = StiggClock(wall=lambda: self.clocks.wall, monotonic=lambda: self.clocks.monotonic)

    def test_before_stigg_answered_the_local_clock_is_used(self):
        self.assertEqual(self.clock.now_ms(), int(TRUE * 1000))
        self.assertEqual(self.clock.skew(), 0.0)

    def test_within_the_tolerance_the_local_clock_is_used(self):
        self.clock.observe(date_header(TRUE - 2))
        self.assertEqual(self.clock.now_ms(), int(TRUE * 1000))
        self.assertAlmostEqual(self.clock.skew(), 1.5)

    def test_a_clock_ahead_uses_stiggs_time_and_keeps_it_after_a_step(self):
        self.clocks.wall += 40 * 86400
        self.clock.observe(date_header(TRUE))
        self.assertAlmostEqual(self.clock.skew(), 40 * 86400 - 0.5)
        self.assertEqual(self.clock.now_ms(), int(TRUE * 1000) + 500)
        self.clocks.advance(10)
        self.assertEqual(self.clock.now_ms(), int(TRUE * 1000) + 10_500)
        self.clocks.wall = TRUE + 10  # corrected, no answer from Stigg since
        self.assertAlmostEqual(self.clock.skew(), -0.5)
        self.assertEqual(self.clock.now_ms(), int((TRUE + 10) * 1000))

    def test_a_clock_behind_uses_stiggs_time(self):
        self.clocks.wall -= 7200
        self.clock.observe(date_header(TRUE))
        self.assertAlmostEqual(self.clock.skew(), -7200.5)
        self.assertEqual(self.clock.now_ms(), int(TRUE * 1000) + 500)

    def test_a_missing_or_unreadable_date_changes_nothing(self):
        for value in (None, b"", b"yesterday", b"Mon, 99 Foo 2026 99:99:99 GMT"):
            self.clock.observe(value)
        self.assertIsNone(self.clock.stigg_ms())
        self.assertIsNone(parse_http_date(b"Sat, 05 Dec 2026 10:00:00"))  # no zone: not trusted
        self.assertEqual(parse_http_date(b"Sat, 05 Dec 2026 10:00:00 GMT"), 1796464800000)
