"""The write spool across real process deaths: `twistd -n stigg-sidecar` with SPOOL_WRITES=1
against the emulator (in this process) as Stigg.

Every write carries a unique dimension `n`, so the emulator's usage log shows whether a write was
delivered, lost (an acknowledged `n` missing) or counted twice (an `n` logged twice: a redelivery
that did not keep its idempotency key).
"""

from __future__ import annotations

import math
import re
import signal
import tempfile
from collections import Counter

import grpc
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from tests.fixtures import data
from tests.fixtures.clients import grpc_deferred
from tests.fixtures.polling import until
from tests.fixtures.processes import SidecarProcess, base_env, sidecar_with_stub, until_ready

KEY = "spool-test-key"
CUSTOMERS = [f"c{i}" for i in range(4)]
BATCH = 50


class SpoolProcessTests(TestCase):
    timeout = 120

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        seed = {"apiKeys": [KEY], "customers": {c: data.customer(data.metered("api-calls", 1_000_000, 0))
                                                for c in CUSTOMERS}}
        self.emulator = await start_emulator(reactor, seed)
        self.addCleanup(stop_emulator, self.emulator)
        self.state_dir = tempfile.mkdtemp()

    def sidecar(self, **settings: str) -> SidecarProcess:
        env = base_env(SERVER_API_KEY=KEY, API_URL=self.emulator.url, EDGE_API_URL=self.emulator.url, WS_ENABLED="0",
                       STATE_DIR=self.state_dir, SPOOL_WRITES="1", SPOOL_BATCH_SIZE=str(BATCH),
                       ENTITLEMENTS_TIMEOUT_MS="1000", **settings)
        return sidecar_with_stub(self, env)

    async def terminate(self, process: SidecarProcess) -> int:
        """SIGTERM, then wait without blocking the reactor (the emulator answers the last flush)."""
        process.process.send_signal(signal.SIGTERM)
        await until(lambda: process.process.poll() is not None, 30, "exit after SIGTERM")
        return process.stop()

    async def ready(self, process: SidecarProcess) -> None:
        await until_ready(process)

    def usage_write(self, process, n: int):
        request = pb.ReportUsageRequest(customer_id=CUSTOMERS[n % len(CUSTOMERS)], feature_id="api-calls", value=1)
        request.dimensions["n"].string_value = str(n)
        return grpc_deferred(reactor, process.stub.ReportUsage.future(request, timeout=5))

    def event_write(self, process, n: int):
        event = pb.Event(event_name="login", customer_id=CUSTOMERS[n % len(CUSTOMERS)], idempotency_key=f"ev-{n}")
        return grpc_deferred(reactor, process.stub.ReportEvents.future(pb.ReportEventsRequest(events=[event]), timeout=5))

    def delivered_usage(self) -> Counter:
        return Counter(str(u["dimensions"]["n"]) for u in self.emulator.state.usage_log())

    def delivered_events(self) -> Counter:
        return Counter(e["idempotencyKey"] for e in self.emulator.state.event_log())

    async def flood(self, process, kill_after: int) -> tuple[set[str], set[str]]:
        """8 writers, usage and events interleaved, until `kill_after` acks; then kill -9 with
        writes in flight. Returns the acknowledged usage `n`s and event keys."""
        acked_usage: set[str] = set()
        acked_events: set[str] = set()
        counter = iter(range(10**6))
        killed: list[bool] = []

        async def writer():
            while not killed:
                n = next(counter)
                try:
                    if n % 4 == 3:
                        await self.event_write(process, n)
                        acked_events.add(f"ev-{n}")
                    else:
                        await self.usage_write(process, n)
                        acked_usage.add(str(n))
                except grpc.RpcError:
                    if killed:
                        return
                    raise
                if len(acked_usage) + len(acked_events) >= kill_after and not killed:
                    killed.append(True)
                    process.process.send_signal(signal.SIGKILL)

        from twisted.internet.defer import ensureDeferred

        await gatherResults([ensureDeferred(writer()) for _ in range(8)])
        process.kill()
        return acked_usage, acked_events

    async def test_kill_9_mid_flood_then_restart_delivers_every_acknowledged_write_once_in_batches(self):
        self.emulator.state.faults.update({"down": True})
        first = self.sidecar()
        await self.ready(first)
        acked_usage, acked_events = await self.flood(first, kill_after=400)
        self.assertEqual(self.emulator.state.usage_log(), [])

        self.emulator.state.faults.update({"down": False})
        self.emulator.state.reset_request_counts()
        second = self.sidecar()
        await until(lambda: acked_usage <= set(self.delivered_usage()) and acked_events <= set(self.delivered_events()),
                    60, "every acknowledged write delivered")
        await deferLater(reactor, 0.5, lambda: None)  # anything more would show now
        usage, events = self.delivered_usage(), self.delivered_events()
        self.assertEqual([n for n, times in usage.items() if times > 1], [])
        self.assertEqual([k for k, times in events.items() if times > 1], [])
        # Stigg's counters agree: each customer's usage is the number of its writes delivered.
        for customer in CUSTOMERS:
            writes = sum(1 for n in usage if CUSTOMERS[int(n) % len(CUSTOMERS)] == customer)
            state = self.emulator.state.entitlements_state(customer, None)
            current = next(e["currentUsage"] for e in state["entitlements"] if e["feature"]["refId"] == "api-calls")
            self.assertEqual(current, writes, customer)
        counts = self.emulator.state.request_counts()
        usage_calls = counts.get("ReportUsageBulk", 0) + counts.get("ReportUsage", 0)
        self.assertLessEqual(usage_calls, math.ceil(len(usage) / BATCH) + 1, counts)
        self.assertLessEqual(counts.get("ReportEvent", 0), math.ceil(len(events) / BATCH) + 1, counts)
        second.wait_for(re.compile("records from before the restart, delivering"), 5)

    async def test_sigterm_delivers_within_the_grace_period_and_what_cannot_go_stays_for_the_next_start(self):
        # Stigg up: SIGTERM delivers what waits (the flush interval would be a minute).
        first = self.sidecar(SPOOL_FLUSH_MS="60000", SHUTDOWN_GRACE_SECS="5")
        await self.ready(first)
        await gatherResults([self.usage_write(first, n) for n in range(10)])
        self.assertEqual(self.emulator.state.usage_log(), [])
        self.assertEqual(await self.terminate(first), 0)
        self.assertEqual(sorted(self.delivered_usage()), sorted(str(n) for n in range(10)))

        # Stigg down: the grace period ends, the records stay on disk and go at the next start.
        self.emulator.state.faults.update({"down": True})
        second = self.sidecar(SHUTDOWN_GRACE_SECS="0.5")
        await self.ready(second)
        await gatherResults([self.usage_write(second, n) for n in range(10, 15)])
        self.assertEqual(await self.terminate(second), 0)
        self.assertIn("5 spooled records stay on disk for the next start", second.text)
        self.emulator.state.faults.update({"down": False})
        self.sidecar()
        await until(lambda: len(self.delivered_usage()) == 15, 30, "delivered at the next start")
        self.assertEqual(max(self.delivered_usage().values()), 1)
