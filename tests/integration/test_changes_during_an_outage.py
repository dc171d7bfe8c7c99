"""A change made while Stigg is down is served within one revalidation of its return (issue 20,
finding 10).

A whole sidecar in this process with the real-time socket, against the emulator, over gRPC. Many
customers are cached; Stigg goes down (connections and the socket dropped), the poller starts a
pass that fails, customers change at Stigg meanwhile, and Stigg returns while that pass still
runs. The socket's reconnect must start a pass of its own rather than join the failing one, so
every change is served once that pass has reached it. Without the socket, the customers whose
refetch failed are refetched the moment Stigg answers anything again, not at the next poll.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness
from tests.fixtures.polling import until

CUSTOMERS = [f"c-{i}" for i in range(400)]  # a pass over them takes 8 s at the refresher's 50/s


def boolean(customer: str) -> pb.GetBooleanEntitlementRequest:
    return pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso")


class ChangesDuringAnOutageTests(TestCase):
    timeout = 120

    async def test_changes_made_while_stigg_was_down_are_served_after_the_socket_reconnects(self):
        h = await OnlineHarness(self, reactor).start(
            {"apiKeys": ["test-key"], "customers": {c: data.ACME for c in CUSTOMERS}},
            realtime=True, POLL_INTERVAL_SECS="1",
        )
        realtime = h.parts.online.realtime
        await until(lambda: realtime.is_connected, 10, "the socket")
        for customer in CUSTOMERS:
            self.assertTrue((await h.call("GetBooleanEntitlement", boolean(customer))).has_access)
        refresher = h.parts.online.refresher
        h.emulator.state.faults.update({"down": True})
        await until(lambda: not realtime.is_connected, 10, "the socket dropped")
        await until(lambda: refresher.busy, 5, "the poller's pass during the outage")
        # Changed at Stigg while it cannot be reached: the most recently read, whom a pass reaches first.
        changed = CUSTOMERS[-5:]
        for customer in changed:
            code, _ = await h.admin("PUT", f"customers/{customer}", data.customer(data.feature("other")))
            self.assertEqual(code, 200)
        await deferLater(reactor, 1.0, lambda: None)
        h.emulator.state.faults.update({"down": False})
        await until(lambda: realtime.is_connected, 30, "the socket reconnecting")
        self.assertTrue(refresher.busy, "the outage's pass should still run when the socket is back")

        async def all_served() -> bool:
            for customer in changed:
                answer = await h.call("GetBooleanEntitlement", boolean(customer))
                if answer.has_access or answer.is_fallback:
                    return False
            return True

        # One pass of 400 customers at 50/s (8 s), with room for a loaded machine.
        await until(all_served, 25, "every change made during the outage served", interval=0.5)

    async def test_customers_whose_refetch_failed_are_refetched_the_moment_stigg_answers(self):
        h = await OnlineHarness(self, reactor).start(
            {"apiKeys": ["test-key"], "customers": {c: data.ACME for c in CUSTOMERS[:20]}},
            POLL_INTERVAL_SECS="3600",  # no poll during the test: only the retry can refetch
        )
        for customer in CUSTOMERS[:10]:
            self.assertTrue((await h.call("GetBooleanEntitlement", boolean(customer))).has_access)
        h.emulator.state.faults.update({"down": True})
        await h.parts.online.refresher.refresh()  # a pass during the outage: every refetch fails
        code, _ = await h.admin("PUT", f"customers/{CUSTOMERS[0]}", data.customer(data.feature("other")))
        self.assertEqual(code, 200)
        h.emulator.state.faults.update({"down": False})
        # Any answer from Stigg after the failures (here a cold read, once the breaker lets it probe).
        await until(lambda: h.call("GetBooleanEntitlement", boolean(CUSTOMERS[15]))
                    .addCallback(lambda a: not a.is_fallback), 10, "Stigg answering", interval=0.2)

        async def served() -> bool:
            answer = await h.call("GetBooleanEntitlement", boolean(CUSTOMERS[0]))
            return not answer.has_access and not answer.is_fallback

        await until(served, 5, "the change, refetched once Stigg answered", interval=0.2)
