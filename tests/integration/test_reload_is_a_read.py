"""A reload is a read: it waits in the reads' budget, never in the writes', so writes filling
MAX_WAITING_WRITES while Stigg is slow do not turn a reload into "no such customer".

Real parts: the emulator as Stigg (slowed by its latency fault), the sidecar in this process, a
grpcio client.
"""

from __future__ import annotations

import grpc
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness
from tests.fixtures.polling import until


class ReloadIsAReadTests(TestCase):
    timeout = 60

    async def test_a_reload_answers_while_the_writes_budget_is_full(self):
        h = await OnlineHarness(self, reactor).start(data.SEED, MAX_WAITING_WRITES="1", ENTITLEMENTS_TIMEOUT_MS="8000")
        await h.faults(latency_ms=1500)
        waiting_writes = h.parts.online.waiting_writes
        write = h.call("ReportUsage", pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=1))
        await until(lambda: waiting_writes.in_use == 1, timeout=5, what="the write waiting on Stigg")
        # The one write place is taken: a second write is refused at once...
        with self.assertRaises(grpc.RpcError) as refused:
            await h.call("ReportUsage", pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=1))
        self.assertEqual(refused.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("writes already waiting", refused.exception.details())
        # ...while a reload, a read, waits in the reads' budget and gets Stigg's answer (in the
        # writes' budget it was refused at once, and a refused reload answers false).
        reloaded = await h.call("ReloadEntitlements", pb.ReloadEntitlementsRequest(customer_id="acme"))
        self.assertTrue(reloaded.entitled_entity_exists)
        self.assertTrue((await write).measurement_id)  # and the write got Stigg's answer
