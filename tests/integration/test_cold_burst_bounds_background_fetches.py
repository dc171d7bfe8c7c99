"""A cold burst past MAX_WAITING_READS must not start a fetch per fallback it answers (unbounded,
those fetches piled up on the reactor and ballooned the heap; issue 12): background fetches are
bounded like the waiting reads, and the customers they skip are fetched on a later read."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness


def boolean(customer: str) -> pb.GetBooleanEntitlementRequest:
    return pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso")


class BackgroundFetchTests(TestCase):
    timeout = 30

    async def test_a_burst_past_the_waiting_limit_fetches_within_a_bound(self):
        seed = {"apiKeys": ["test-key"], "customers": {f"c{i}": data.ACME for i in range(12)}}
        h = await OnlineHarness(self, reactor).start(seed, MAX_WAITING_READS="2", ENTITLEMENTS_TIMEOUT_MS="5000")
        await h.faults(latency_ms=1500)
        fetcher = h.parts.online.fetcher
        most = [0]
        watching = [True]

        def watch() -> None:
            most[0] = max(most[0], fetcher.in_flight)
            if watching[0]:
                reactor.callLater(0.01, watch)

        watch()
        answers = await gatherResults([h.call("GetBooleanEntitlement", boolean(f"c{i}")) for i in range(12)])
        fallbacks = sum(r.is_fallback for r in answers)
        self.assertGreaterEqual(fallbacks, 10 - 2)  # at most two waited (and a few may have hit)
        # Two waiting reads and at most two background fetches were in flight, never one a fallback.
        self.assertLessEqual(most[0], 4)

        async def all_cached() -> bool:
            results = await gatherResults([h.call("GetBooleanEntitlement", boolean(f"c{i}")) for i in range(12)])
            return not any(r.is_fallback for r in results)

        await h.faults(latency_ms=0)
        await h.wait_until(all_cached, timeout=15)  # the skipped ones: fetched on a later read
        watching[0] = False
