"""CircuitBreaker: outage memory per upstream, driven by a task.Clock (no sleeping)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from stigg_sidecar.upstream.breaker import BreakerOpen, BreakerPolicy, CircuitBreaker
from stigg_sidecar.upstream.recovery import StiggRecovery

POLICY = BreakerPolicy(threshold=3, initial=1.0, factor=2.0, max_delay=5.0)


class CircuitBreakerTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.changes: list[bool] = []
        self.jitter = 1.0  # 0.5 + jitter/2 of the delay: 1.0 means the whole delay
        self.breaker = CircuitBreaker("Edge API", self.clock, POLICY, rng=lambda: self.jitter, on_change=self.changes.append)

    def fail_times(self, n: int = 1, why: str = "Stigg is unreachable (ConnectError)") -> None:
        for _ in range(n):
            self.breaker.failed(self.breaker.admit(), why)

    def assertRefused(self) -> BreakerOpen:
        with self.assertRaises(BreakerOpen) as caught:
            self.breaker.admit()
        return caught.exception

    def test_stays_closed_below_the_threshold_and_a_success_resets_the_count(self):
        self.fail_times(2)
        self.breaker.succeeded(self.breaker.admit())
        self.fail_times(2)
        self.assertFalse(self.breaker.is_open)
        self.assertFalse(self.breaker.admit().probe)
        self.assertEqual(self.changes, [])

    def test_opens_after_consecutive_failures_and_refuses_with_a_precise_message(self):
        self.fail_times(3)
        self.assertTrue(self.breaker.is_open)
        self.assertEqual(self.changes, [True])
        refused = self.assertRefused()
        self.assertEqual(
            refused.message,
            "not sent: Stigg's Edge API failed 3 times in a row (last: Stigg is unreachable (ConnectError));"
            " calls fail at once until a probe succeeds (next in 1.0s)",
        )

    def test_one_probe_at_a_time_once_the_backoff_has_passed(self):
        self.fail_times(3)
        self.clock.advance(0.99)
        self.assertRefused()
        self.clock.advance(0.01)
        probe = self.breaker.admit()
        self.assertTrue(probe.probe)
        self.assertRefused()  # the probe is out: everyone else still fails at once
        self.clock.advance(100)
        self.assertRefused()
        self.breaker.succeeded(probe)
        self.assertFalse(self.breaker.is_open)
        self.assertEqual(self.changes, [True, False])
        self.assertFalse(self.breaker.admit().probe)

    def test_failed_probes_back_off_exponentially_up_to_the_cap(self):
        self.fail_times(3)
        waits = []
        for _ in range(5):
            start = self.clock.seconds()
            while True:
                try:
                    probe = self.breaker.admit()
                    break
                except BreakerOpen:
                    self.clock.advance(0.25)
            waits.append(self.clock.seconds() - start)
            self.breaker.failed(probe, "Stigg answered HTTP 503")
        self.assertEqual(waits, [1.0, 2.0, 4.0, 5.0, 5.0])
        self.assertEqual(self.breaker.failures, 8)
        self.assertEqual(self.changes, [True])

    def test_jitter_shortens_the_delay_to_no_less_than_half(self):
        self.jitter = 0.0
        self.fail_times(3)
        self.clock.advance(0.49)
        self.assertRefused()
        self.clock.advance(0.01)
        self.assertTrue(self.breaker.admit().probe)

    def test_any_success_closes_it_even_from_a_call_admitted_before_it_opened(self):
        early = self.breaker.admit()
        self.fail_times(3)
        self.breaker.succeeded(early)
        self.assertFalse(self.breaker.is_open)
        self.assertEqual(self.changes, [True, False])

    def test_late_failures_of_calls_admitted_before_it_opened_do_not_push_the_probe_back(self):
        early = [self.breaker.admit() for _ in range(4)]
        self.fail_times(3)
        self.clock.advance(0.5)
        for ticket in early:
            self.breaker.failed(ticket, "timeout")
        self.clock.advance(0.5)
        self.assertTrue(self.breaker.admit().probe)

    def test_an_abandoned_probe_lets_the_next_call_probe(self):
        self.fail_times(3)
        self.clock.advance(1.0)
        probe = self.breaker.admit()
        self.breaker.abandoned(probe)
        self.assertTrue(self.breaker.admit().probe)

    def test_a_ticket_counts_once(self):
        ticket = self.breaker.admit()
        self.breaker.failed(ticket, "x")
        self.breaker.failed(ticket, "x")
        self.breaker.failed(ticket, "x")
        self.assertEqual(self.breaker.failures, 1)

    def test_closed_from_outside_at_once_and_a_late_probe_answer_counts_as_an_ordinary_call(self):
        self.fail_times(3)
        self.clock.advance(1.0)
        probe = self.breaker.admit()
        self.breaker.close("the real-time socket is connected")
        self.assertFalse(self.breaker.is_open)
        self.assertEqual(self.changes, [True, False])
        self.assertFalse(self.breaker.admit().probe)
        self.breaker.failed(probe, "late")  # one failure, not a failed probe of a closed breaker
        self.assertFalse(self.breaker.is_open)
        self.breaker.close("again")  # closed already: nothing changes
        self.assertEqual(self.changes, [True, False])

    def test_the_default_policy_probes_at_most_two_seconds_apart(self):
        policy = BreakerPolicy()
        self.assertEqual(max(policy.delay(n, lambda: 1.0) for n in range(64)), 2.0)


class StiggRecoveryTests(TestCase):
    def test_listeners_hear_of_an_answer_after_a_failure_once_and_of_every_reconnect(self):
        clock = Clock()
        recovery = StiggRecovery(clock)
        heard: list[str] = []
        recovery.subscribe(heard.append)
        recovery.answered("edge")  # nothing was in doubt
        clock.advance(0)
        self.assertEqual(heard, [])
        recovery.failed()
        recovery.answered("graphql")
        self.assertEqual(heard, [])  # told on the next reactor turn, not inside the call
        clock.advance(0)
        recovery.answered("graphql")
        self.assertEqual(heard, ["graphql"])
        recovery.reconnected()  # at once: the breakers close before the socket's revalidation fetches
        self.assertEqual(heard, ["graphql", "socket"])
