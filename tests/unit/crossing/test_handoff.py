"""Handoff: a write's answer is either claimed by the reactor or abandoned by its caller, never both."""

from __future__ import annotations

import time

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.crossing.wait import Handoff


class HandoffTests(SynchronousTestCase):
    def test_claimed_first_cannot_be_abandoned(self):
        handoff = Handoff(time.monotonic() + 60)
        self.assertTrue(handoff.claim())
        self.assertFalse(handoff.abandon())
        self.assertTrue(handoff.claim())

    def test_abandoned_first_cannot_be_claimed(self):
        handoff = Handoff(time.monotonic() + 60)
        self.assertTrue(handoff.abandon())
        self.assertFalse(handoff.claim())

    def test_past_its_answer_time_it_cannot_be_claimed(self):
        handoff = Handoff(time.monotonic() - 0.001)
        self.assertFalse(handoff.claim())
        self.assertTrue(handoff.abandon())

    def test_a_call_no_longer_wanted_cannot_be_claimed(self):
        handoff = Handoff(time.monotonic() + 60, still_wanted=lambda: False)
        self.assertFalse(handoff.claim())
