"""HandlerPool: runner roles, managed blocking, retiring spares; and the wait budgets.

Deterministic: threads are coordinated with events and the pool's own counts, never by sleeping.
Every wait is bounded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorFromThreads
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from stigg_sidecar.crossing.pool import HandlerPool, blocking
from stigg_sidecar.crossing.wait import BudgetExhausted, WaitBudget, wait_on_reactor

WAIT = 10  # seconds: generous bound on every wait, never reached when the code is right


class Gate:
    """A task that says it started, then waits for the gate (optionally inside blocking())."""

    def __init__(self, pool: HandlerPool, managed: bool) -> None:
        self.pool = pool
        self.managed = managed
        self.started = threading.Event()
        self.open = threading.Event()

    def __call__(self) -> str:
        self.started.set()
        if self.managed:
            with self.pool.blocking():
                assert self.open.wait(WAIT)
        else:
            assert self.open.wait(WAIT)
        return threading.current_thread().name


class HandlerPoolTests(TestCase):
    def pool(self, runners: int, idle_timeout: float = 60.0) -> HandlerPool:
        pool = HandlerPool(runners, idle_timeout=idle_timeout)
        self.addCleanup(pool.shutdown, wait=True)
        return pool

    def test_runs_calls_and_returns_their_results(self):
        pool = self.pool(2)
        self.assertEqual(pool.submit(lambda a, b=0: a + b, 2, b=3).result(WAIT), 5)
        failed = pool.submit(lambda: 1 / 0)
        self.assertIsInstance(failed.exception(WAIT), ZeroDivisionError)

    def test_no_more_than_runners_calls_run_unless_they_block(self):
        pool = self.pool(2)
        gates = [Gate(pool, managed=False) for _ in range(3)]
        futures = [pool.submit(g) for g in gates]
        self.assertTrue(gates[0].started.wait(WAIT) and gates[1].started.wait(WAIT))
        # both roles are held by calls that did not say they block: the third queues
        self.assertEqual(pool.counts()["queued"], 1)
        self.assertFalse(gates[2].started.is_set())
        gates[0].open.set()
        self.assertTrue(gates[2].started.wait(WAIT))
        for g in gates:
            g.open.set()
        for f in futures:
            f.result(WAIT)
        self.assertLessEqual(pool.counts()["threads"], 2)

    def test_blocked_calls_hand_their_role_on_so_the_runner_count_holds(self):
        pool = self.pool(2)
        blocked = [Gate(pool, managed=True) for _ in range(6)]
        blocked_futures = [pool.submit(g) for g in blocked]
        for g in blocked:
            self.assertTrue(g.started.wait(WAIT))
        self.assertTrue(pool.wait_until(lambda c: c["blocked"] == 6, WAIT))
        # six calls wait, and two quick calls still run at once: nothing queues behind the waits
        quick = [Gate(pool, managed=False) for _ in range(2)]
        quick_futures = [pool.submit(g) for g in quick]
        for g in quick:
            self.assertTrue(g.started.wait(WAIT))
        counts = pool.counts()
        self.assertEqual((counts["held"], counts["blocked"], counts["queued"]), (2, 6, 0))
        # a third quick call waits for a role: the pool never runs more than `runners` at once
        third = Gate(pool, managed=False)
        third_future = pool.submit(third)
        self.assertEqual(pool.counts()["queued"], 1)
        for g in (*quick, third):
            g.open.set()
        for f in (*quick_futures, third_future):
            f.result(WAIT)
        # a call leaving blocking() finishes without waiting for a role, even when all are held
        holders = [Gate(pool, managed=False) for _ in range(2)]
        holder_futures = [pool.submit(g) for g in holders]
        for g in holders:
            self.assertTrue(g.started.wait(WAIT))
        for g in blocked:
            g.open.set()
        for f in blocked_futures:
            f.result(WAIT)
        self.assertEqual(pool.counts()["held"], 2)
        for g in holders:
            g.open.set()
        for f in holder_futures:
            f.result(WAIT)
        self.assertTrue(pool.wait_until(lambda c: c["held"] == 0 and c["blocked"] == 0, WAIT))

    def test_spare_threads_retire_when_idle_and_the_core_stays(self):
        pool = self.pool(2, idle_timeout=0.05)
        gates = [Gate(pool, managed=True) for _ in range(5)]
        futures = [pool.submit(g) for g in gates]
        self.assertTrue(pool.wait_until(lambda c: c["blocked"] == 5, WAIT))
        self.assertGreaterEqual(pool.counts()["threads"], 5)
        for g in gates:
            g.open.set()
        for f in futures:
            f.result(WAIT)
        self.assertTrue(pool.wait_until(lambda c: c["threads"] == 2, WAIT))
        # the core threads stay parked through further idle periods, and serve the next call
        self.assertFalse(pool.wait_until(lambda c: c["threads"] < 2, 0.2))
        self.assertEqual(pool.submit(lambda: 7).result(WAIT), 7)

    def test_parked_threads_are_reused_before_new_ones_start(self):
        pool = self.pool(4)
        for _ in range(20):
            pool.submit(lambda: None).result(WAIT)
            self.assertTrue(pool.wait_until(lambda c: c["held"] == 0, WAIT))
        self.assertEqual(pool.counts()["threads"], 1)

    def test_blocking_elsewhere_does_nothing(self):
        pool = self.pool(1)
        with pool.blocking(), blocking():  # not a pool thread
            self.assertEqual(pool.counts()["blocked"], 0)
        other = self.pool(1)

        def block_in_the_other_pool():
            with other.blocking():
                return pool.counts()["held"], other.counts()["blocked"]

        self.assertEqual(pool.submit(block_in_the_other_pool).result(WAIT), (1, 0))

    def test_nested_blocking_releases_the_role_once(self):
        pool = self.pool(1)

        def nested():
            with blocking():
                with blocking():
                    return pool.counts()

        counts = pool.submit(nested).result(WAIT)
        self.assertEqual((counts["held"], counts["blocked"]), (0, 1))

    def test_shutdown_refuses_new_calls_and_lets_running_ones_finish(self):
        pool = HandlerPool(2)
        gate = Gate(pool, managed=True)
        running = pool.submit(gate)
        self.assertTrue(gate.started.wait(WAIT))
        pool.shutdown(wait=False)
        with self.assertRaises(RuntimeError):
            pool.submit(lambda: None)
        waiting = threading.Thread(target=pool.shutdown, kwargs={"wait": True})
        waiting.start()
        gate.open.set()
        self.assertTrue(running.result(WAIT))
        waiting.join(WAIT)
        self.assertFalse(waiting.is_alive())
        self.assertEqual(pool.counts()["threads"], 0)


class WaitBudgetTests(TestCase):
    def test_a_full_budget_refuses_without_waiting_and_frees_on_leave(self):
        budget = WaitBudget(2, "reads")
        self.assertTrue(budget.try_enter() and budget.try_enter())
        self.assertFalse(budget.try_enter())
        self.assertEqual(budget.in_use, 2)
        budget.leave()
        self.assertTrue(budget.try_enter())

    def test_wait_on_reactor_refuses_past_the_budget_before_crossing(self):
        crossed = []

        @implementer(IReactorFromThreads)
        class NoReactor:
            def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
                crossed.append(callable)

        budget = WaitBudget(1, "writes")
        self.assertTrue(budget.try_enter())
        with self.assertRaises(BudgetExhausted) as caught:
            wait_on_reactor(NoReactor(), budget, lambda: None, timeout=1)
        self.assertEqual(str(caught.exception), "1 writes already waiting on Stigg")
        self.assertEqual(crossed, [])
        self.assertEqual(budget.in_use, 1)

    def test_wait_on_reactor_gives_its_place_back_after_a_timeout(self):
        @implementer(IReactorFromThreads)
        class SilentReactor:
            def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
                pass  # never runs: the wait must end by its deadline

        budget = WaitBudget(1, "reads")
        with self.assertRaises(TimeoutError):
            wait_on_reactor(SilentReactor(), budget, lambda: None, timeout=0.01)
        self.assertEqual(budget.in_use, 0)
