"""StopBudget: one deadline for the whole stop, with room kept for the last step."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from stigg_sidecar.lifecycle.stopping import StopBudget


class StopBudgetTests(TestCase):
    def test_before_the_stop_the_whole_budget_is_left(self):
        budget = StopBudget(8.0, Clock())
        self.assertEqual((budget.begun, budget.remaining(), budget.elapsed()), (False, 8.0, 0.0))

    def test_every_part_counts_down_to_the_same_deadline(self):
        clock = Clock()
        budget = StopBudget(8.0, clock)
        budget.begin()
        clock.advance(3)
        budget.begin()  # a part stopping later does not start a new budget
        self.assertEqual((budget.remaining(), budget.elapsed()), (5.0, 3.0))
        clock.advance(10)
        self.assertEqual(budget.remaining(), 0.0)

    def test_the_last_step_keeps_its_reservation_and_no_more_than_half(self):
        clock = Clock()
        budget = StopBudget(8.0, clock)
        budget.reserve_last_step(1.5)
        budget.begin()
        clock.advance(2)
        self.assertEqual((budget.remaining(), budget.remaining_for_last_step()), (4.5, 6.0))
        budget.reserve_last_step(100)
        self.assertEqual(budget.remaining(), 2.0)
