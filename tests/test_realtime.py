"""Freshness: admin changes at the emulator reach gRPC answers through the real-time socket, or
through the poller when the socket is disabled or down."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests import data
from tests.support import OnlineHarness


def sso(customer="acme"):
    return pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso")


class PollerTests(TestCase):
    timeout = 30

    async def test_poller_refreshes_cached_customers_with_the_socket_disabled(self):
        h = await OnlineHarness(self, reactor).start(data.SEED, POLL_INTERVAL_SECS="0.2")
        r = await h.call("GetBooleanEntitlement", sso())
        self.assertTrue(r.has_access)
        code, _ = await h.admin("PUT", "customers/acme", data.customer(data.feature("other")))
        self.assertEqual(code, 200)

        async def changed():
            answer = await h.call("GetBooleanEntitlement", sso())
            return not answer.has_access and not answer.is_fallback

        await h.wait_until(changed, timeout=10)
        # polling never touched customers nobody asked for
        counts = await h.requests()
        self.assertGreaterEqual(counts["/v1/c/{customerId}/entitlements-state.json"], 2)
