"""Answers memoized on immutable cache entries: reused while valid, gone with the entry, a metered
answer dropped when its usage period rolls over or the clock goes back before it, and their bytes charged to the cache budget."""

from __future__ import annotations

from typing import cast

import grpc
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.contracts import EntitlementSource
from stigg_sidecar.entitlements.records import CustomerEntry, Feature, FeatureEntitlement, Usage
from stigg_sidecar.grpc.servicer import SidecarServicer
from stigg_sidecar.offline import OfflineSidecar

DAY = 86_400_000
START = 1_790_000_000_000


class CacheSource:
    """The servicer's EntitlementSource over a real EntitlementCache, with a settable clock and
    memo charges applied at once (the online sidecar hands them to the reactor)."""

    def __init__(self, cache: EntitlementCache) -> None:
        self.cache = cache
        self.now = START

    def peek(self, customer_id, resource_id):
        return self.cache.get_fresh(f"c_{customer_id}", self.now)

    def lookup(self, customer_id, resource_id, timeout):
        return self.peek(customer_id, resource_id)

    def memo_grew(self, entry, nbytes):
        self.cache.charge(entry, nbytes)

    def now_ms(self):
        return self.now


class Context:
    def time_remaining(self):
        return None


def entry(usage: float) -> CustomerEntry:
    metered = FeatureEntitlement(
        Feature("calls", "NUMBER", "Incremental"),
        usage_limit=10,
        reset_period="DAY",
        usage_period_anchor=START - DAY,
        updated_at=1,
        usage=Usage(usage, START, START + DAY, 1),
    )
    return CustomerEntry("acme", features={"calls": metered}, timestamp=1)


REQUEST = pb.GetMeteredEntitlementRequest(
    customer_id="acme", feature_id="calls", options=pb.MeteredEntitlementOptions(requested_usage=5)
)


class MemoTests(SynchronousTestCase):
    def setUp(self):
        self.cache = EntitlementCache(max_bytes=10**9)
        self.source = CacheSource(self.cache)
        self.servicer = SidecarServicer(cast(EntitlementSource, self.source), OfflineSidecar(), {}, 1, 1)

    def raw(self):
        """The handler's return: a message, or a memoized answer's bytes (the server's serializer
        passes those through)."""
        return self.servicer.GetMeteredEntitlement(REQUEST, cast(grpc.ServicerContext, Context()))

    def check(self):
        answer = self.raw()
        return pb.GetMeteredEntitlementResponse.FromString(answer) if isinstance(answer, bytes) else answer

    def test_a_repeated_request_gets_the_same_answer_object(self):
        self.cache.put(entry(3))
        first = self.raw()
        self.assertIs(self.raw(), first)
        self.assertEqual((self.check().has_access, self.check().entitlement.current_usage), (True, 3))

    def test_a_new_entry_starts_without_answers(self):
        self.cache.put(entry(3))
        self.assertTrue(self.check().has_access)
        self.cache.put(entry(8))
        answer = self.check()
        self.assertEqual((answer.has_access, answer.entitlement.current_usage), (False, 8))

    def test_metered_answer_expires_when_the_period_rolls_over(self):
        self.cache.put(entry(8))
        self.assertFalse(self.check().has_access)
        self.source.now = START + DAY + 1
        answer = self.check()
        self.assertEqual((answer.has_access, answer.entitlement.current_usage), (True, 0))

    def test_an_answer_memoized_while_the_clock_was_ahead_is_dropped_when_it_is_corrected(self):
        self.cache.put(entry(8))
        self.source.now = START + 40 * DAY  # the clock 40 days ahead: a later period, usage reset
        ahead = self.check()
        self.assertEqual((ahead.has_access, ahead.entitlement.current_usage), (True, 0))
        self.assertIsInstance(self.raw(), bytes)  # memoized
        self.source.now = START + 1000  # corrected
        answer = self.check()
        self.assertEqual((answer.has_access, answer.entitlement.current_usage), (False, 8))

    def test_memoized_answers_count_against_the_budget_and_leave_with_the_entry(self):
        self.cache.put(entry(3))
        bare = self.cache.bytes
        self.check()
        grown = self.cache.bytes
        # The memo, its key (the request's bytes) and the answer's bytes.
        self.assertGreater(grown, bare + 2 * REQUEST.ByteSize() + 200)
        self.check()
        self.assertEqual(self.cache.bytes, grown)  # reuse costs nothing more
        self.cache.put(entry(4))
        self.assertEqual(self.cache.bytes, entry(4).size)
