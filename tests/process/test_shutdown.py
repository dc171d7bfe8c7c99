"""Graceful shutdown of a real `twistd -n stigg-sidecar` process: SIGTERM during a load of slow
calls lets every in-flight call finish, refuses new ones, and exits 0. Its JSON logs parse and
never carry the API key."""

from __future__ import annotations

import json
import signal

import grpc
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from tests.fixtures import data
from tests.fixtures.clients import grpc_deferred
from tests.fixtures.polling import until
from tests.fixtures.processes import SidecarProcess, base_env

KEY = "shutdown-test-key-0123456789"


class GracefulShutdownTests(TestCase):
    timeout = 60

    async def test_sigterm_drains_in_flight_calls_and_exits_zero(self):
        seed = {"apiKeys": [KEY], "customers": {f"c{i}": data.ACME for i in range(10)}}
        emulator = await start_emulator(reactor, seed)
        self.addCleanup(stop_emulator, emulator)
        sidecar = SidecarProcess(
            base_env(
                SERVER_API_KEY=KEY,
                API_URL=emulator.url,
                EDGE_API_URL=emulator.url,
                WS_ENABLED="0",
                LOG_FORMAT="json",
                SHUTDOWN_GRACE_SECS="10",
            )
        )
        self.addCleanup(sidecar.kill)
        channel = grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}")
        self.addCleanup(channel.close)
        stub = SidecarServiceStub(channel)

        emulator.state.faults.update({"latency_ms": 1500})
        in_flight = [
            grpc_deferred(reactor, stub.GetBooleanEntitlement.future(
                pb.GetBooleanEntitlementRequest(customer_id=f"c{i}", feature_id="sso"), timeout=20))
            for i in range(10)
        ]
        # SIGTERM once every call is waiting on Stigg (a call the sidecar has not yet received
        # when it stops is refused, rightly): the emulator counts a request before its latency.
        def fetches() -> int:
            return sum(n for name, n in emulator.state.request_counts().items() if "entitlements" in name.lower())

        await until(lambda: fetches() >= 10, 15, "every call waiting on Stigg")
        self.assertEqual(fetches(), 10)
        sidecar.process.send_signal(signal.SIGTERM)

        answers = await gatherResults(in_flight)
        self.assertEqual([(a.has_access, a.is_fallback) for a in answers], [(True, False)] * 10)

        await until(lambda: sidecar.process.poll() is not None, 10, "exit after SIGTERM")
        self.assertEqual(sidecar.stop(), 0)

        with self.assertRaises(grpc.RpcError) as caught:
            stub.GetBooleanEntitlement(pb.GetBooleanEntitlementRequest(customer_id="c0", feature_id="sso"), timeout=2)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)

        lines = [line for line in sidecar.text.splitlines() if line.strip()]
        events = [json.loads(line) for line in lines]
        self.assertTrue(any(e["message"] == "Stopping" for e in events))
        self.assertNotIn(KEY, sidecar.text)
