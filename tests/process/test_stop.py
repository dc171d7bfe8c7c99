"""The whole stop within SHUTDOWN_GRACE_SECS, over a real `twistd -n stigg-sidecar` process.

With SPOOL_WRITES=1, writes acknowledged but not yet delivered and Stigg down (refusing, or
holding every request), SIGTERM ends in exit 0 within the default budget: the gRPC drain, the
spool's delivery attempts and the last snapshot share one deadline, and the process's own last
line says how long the stop took. Nothing is lost: the next start, with Stigg back, delivers every
acknowledged write exactly once and serves the snapshot written at the stop.
"""

from __future__ import annotations

import re
import signal
import tempfile
import time
from collections import Counter

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from stigg_sidecar.settings import Settings
from tests.fixtures import data
from tests.fixtures.clients import grpc_deferred
from tests.fixtures.polling import until
from tests.fixtures.processes import StubbedSidecar, base_env, sidecar_with_stub, until_ready

KEY = "stop-test-key-0123456789"
CUSTOMERS = [f"c{i}" for i in range(4)]
STOPPED = re.compile(r"stigg-sidecar stopped in ([0-9.]+)s \(SHUTDOWN_GRACE_SECS ([0-9.]+)s\)")


class StopWithinTheBudgetTests(TestCase):
    timeout = 120

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        seed = {"apiKeys": [KEY], "customers": {c: data.customer(data.metered("api-calls", 1_000_000, 0))
                                                for c in CUSTOMERS}}
        self.emulator = await start_emulator(reactor, seed)
        self.addCleanup(stop_emulator, self.emulator)
        self.state_dir = tempfile.mkdtemp()

    def sidecar(self) -> StubbedSidecar:
        # SHUTDOWN_GRACE_SECS and ENTITLEMENTS_TIMEOUT_MS (a send to Stigg may take 10 s) at their defaults.
        env = base_env(SERVER_API_KEY=KEY, API_URL=self.emulator.url, EDGE_API_URL=self.emulator.url, WS_ENABLED="0",
                       STATE_DIR=self.state_dir, SPOOL_WRITES="1")
        return sidecar_with_stub(self, env)

    def usage_write(self, process, n: int):
        request = pb.ReportUsageRequest(customer_id=CUSTOMERS[n % len(CUSTOMERS)], feature_id="api-calls", value=1)
        request.dimensions["n"].string_value = str(n)
        return grpc_deferred(reactor, process.stub.ReportUsage.future(request, timeout=5))

    def delivered(self) -> Counter:
        return Counter(str(u["dimensions"]["n"]) for u in self.emulator.state.usage_log())

    async def stop_with_stigg_down(self, fault: dict) -> float:
        """Cache some customers, spool 20 writes Stigg cannot take, SIGTERM; the stop's own
        figure, once the process exited 0 (checked against the default budget)."""
        first = self.sidecar()
        await until_ready(first)
        answers = await gatherResults([
            grpc_deferred(reactor, first.stub.GetMeteredEntitlement.future(
                pb.GetMeteredEntitlementRequest(customer_id=c, feature_id="api-calls"), timeout=10))
            for c in CUSTOMERS
        ])
        self.assertEqual([a.is_fallback for a in answers], [False] * len(CUSTOMERS))
        self.emulator.state.faults.update(fault)
        await gatherResults([self.usage_write(first, n) for n in range(20)])
        self.assertEqual(self.emulator.state.usage_log(), [])

        began = time.monotonic()
        first.process.send_signal(signal.SIGTERM)
        await until(lambda: first.process.poll() is not None, 60, "exit after SIGTERM")
        waited = time.monotonic() - began
        self.assertEqual(first.stop(), 0, first.text)

        grace = Settings().shutdown_grace_secs
        self.assertLess(grace, 10)  # under the 10 s stop timeout of Docker, podman and the manifests
        stopped = STOPPED.search(first.text)
        self.assertIsNotNone(stopped, first.text)
        assert stopped is not None
        took = float(stopped.group(1))
        self.assertEqual(float(stopped.group(2)), grace)
        self.assertLessEqual(took, grace, first.text)
        # The process itself, from the signal to its exit: the stop plus the reactor's own exit,
        # with room for a loaded machine (the figure that counts is the one above).
        self.assertLess(waited, grace + 5, first.text)
        self.assertIn("20 spooled records stay on disk for the next start", first.text)

        # Nothing lost: Stigg back, the next start serves the snapshot and delivers each write once.
        self.emulator.state.faults.update({"down": False, "latency_ms": 0})
        second = self.sidecar()
        await until(lambda: len(self.delivered()) == 20, 30, "every spooled write delivered")
        self.assertEqual(max(self.delivered().values()), 1)
        second.wait_for(re.compile(rf"Loaded {len(CUSTOMERS)} cached customers from the snapshot"), 10)
        return took

    async def test_stigg_refusing_the_stop_ends_early_within_the_budget(self):
        took = await self.stop_with_stigg_down({"down": True})
        print(f"stop with Stigg down (refusing), 20 records undelivered: {took:.2f}s")

    async def test_stigg_holding_every_request_the_stop_still_ends_within_the_budget(self):
        took = await self.stop_with_stigg_down({"latency_ms": 60_000})
        print(f"stop with Stigg holding requests, 20 records undelivered: {took:.2f}s")
