"""Recovery the moment Stigg is back (issue 20, finding 9).

A whole sidecar in this process against the emulator, over gRPC. Stigg goes down (connections
dropped) long enough for every backoff to grow; then it returns:

- without the socket, a cold read answers Stigg's data within about 2 s of its return (the
  breaker probes at most 1-2 s apart, however long the outage);
- with the socket, once it reconnects no read answers a fallback (its acknowledgement closes the
  breakers) and the spooled writes go at once, not after the spool's own backoff.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness
from tests.fixtures.polling import until

CUSTOMERS = {f"cold-{i}": data.ACME for i in range(400)}
# Long enough for the old backoffs (doubling up to 30 s) to have grown past several seconds.
OUTAGE = 14.0


def boolean(customer: str) -> pb.GetBooleanEntitlementRequest:
    return pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso")


class RecoveryTests(TestCase):
    timeout = 90

    async def start(self, **settings: Any) -> OnlineHarness:
        self.h = await OnlineHarness(self, reactor).start({"apiKeys": ["test-key"], "customers": CUSTOMERS}, **settings)
        self.next_customer = 0
        return self.h

    async def cold_read(self):
        """A read of a customer nobody asked for yet: a miss that needs Stigg."""
        self.next_customer += 1
        return await self.h.call("GetBooleanEntitlement", boolean(f"cold-{self.next_customer}"), timeout=5)

    async def outage(self, seconds: float) -> None:
        """Stigg drops every connection for `seconds`, while cold reads keep coming (all fallbacks)."""
        self.h.emulator.state.faults.update({"down": True})
        ends = reactor.seconds() + seconds
        while reactor.seconds() < ends:
            answer = await self.cold_read()
            self.assertTrue(answer.is_fallback)
            await deferLater(reactor, 0.25, lambda: None)

    async def test_cold_reads_answer_stiggs_data_within_two_seconds_of_its_return(self):
        await self.start(WS_ENABLED="0")
        await self.outage(OUTAGE)
        self.h.emulator.state.faults.update({"down": False})
        back = reactor.seconds()

        async def stiggs_data() -> bool:
            return not (await self.cold_read()).is_fallback

        await until(stiggs_data, 30, "Stigg's data", interval=0.1)
        # At most one probe interval (1-2 s) and a fetch on a loaded machine.
        took = reactor.seconds() - back
        self.assertLess(took, 3.5, f"Stigg's data {took:.1f}s after its return")

    async def test_once_the_socket_is_back_no_read_falls_back_and_spooled_writes_go_at_once(self):
        state_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, state_dir, True)
        await self.start(realtime=True, STATE_DIR=state_dir, SPOOL_WRITES="1", SPOOL_FLUSH_MS="20")
        realtime = self.h.parts.online.realtime
        delivery = self.h.parts.writer
        await until(lambda: realtime.is_connected and delivery._loaded, 10, "socket and spool up")
        self.h.emulator.state.faults.update({"down": True})
        for value in (1, 2, 3):  # acknowledged once durable, delivered later
            await self.h.call("ReportUsage", pb.ReportUsageRequest(customer_id="cold-0", feature_id="api-calls",
                                                                   value=value))
        await self.outage(OUTAGE)
        self.assertEqual(delivery.records, 3)
        self.h.emulator.state.faults.update({"down": False})
        await until(lambda: realtime.is_connected, 40, "the socket reconnecting")
        for _ in range(5):
            answer = await self.cold_read()
            self.assertFalse(answer.is_fallback, "a fallback after Stigg acknowledged the socket")
        await until(lambda: delivery.records == 0, 1.5, "spooled writes delivered after the reconnect")
        self.assertEqual(sorted(u["value"] for u in self.h.emulator.state.usage_log()), [1, 2, 3])
