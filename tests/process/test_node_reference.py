"""The benchmarks' Node reference answers the sidecar's gRPC API from Stigg's own Node SDK.

bench/node/server.js (`@stigg/node-server-sdk` 3.95.0 behind grpc-js) is what bench/grpc_load.py,
memory.py and cold_fill.py compare the sidecar with; a wrong answer or an SDK that re-fetches on
every read would make those comparisons meaningless. Here the emulator runs in-process on a
loopback port and the reference as a real `node` process (its locked packages installed by
bench/harness.py with `npm ci` when missing). Without node or npm on PATH the test is skipped,
except when the CI environment variable is set: there it fails (`.ci/run` installs them).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import grpc
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from bench.harness import ensure_node_reference
from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from stigg_sidecar.emulator.web import EDGE_ENTITLEMENTS
from tests.fixtures.clients import grpc_deferred
from tests.fixtures.paths import ROOT
from tests.fixtures.processes import DrainedProcess

LISTENING = r"^node reference listening on .*:(\d+)$"
API_KEY = "node-reference-key"
START_TIMEOUT = 60.0  # node's start and the SDK's first API call, on a loaded machine



def _feature(ref: str, ftype: str, meter: str | None = None) -> dict:
    feature = {"refId": ref, "displayName": ref, "featureType": ftype}
    if meter:
        feature["meterType"] = meter
    return feature


DATA = {
    "apiKeys": [API_KEY],
    "customers": {
        "acme": {
            "accessDeniedReason": None,
            "entitlements": [
                {"isGranted": True, "feature": _feature("feature-sso", "BOOLEAN", "None")},
                {
                    "isGranted": False,
                    "accessDeniedReason": "Revoked",
                    "feature": _feature("feature-beta", "BOOLEAN", "None"),
                },
                {
                    "isGranted": True,
                    "usageLimit": 100,
                    "currentUsage": 60,
                    "feature": _feature("feature-api-calls", "NUMBER", "Incremental"),
                },
            ],
        }
    },
}



class NodeReferenceTests(unittest.TestCase):
    timeout = 300  # a first `npm ci` downloads the locked packages

    def setUp(self) -> None:
        missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
        if missing:
            message = f"{' and '.join(missing)} not on PATH (Debian: apt-get install nodejs npm)"
            if os.environ.get("CI"):
                raise AssertionError(f"{message}, and CI is set")
            raise unittest.SkipTest(message)
        ensure_node_reference()

    async def _start(self) -> tuple[Any, SidecarServiceStub]:
        emulator = await start_emulator(reactor, DATA)
        self.addCleanup(stop_emulator, emulator)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STIGG_", "NODE_OPTIONS"))}
        env.update(STIGG_API_KEY=API_KEY, STIGG_API_URL=emulator.url, PORT="0", BIND_ADDRESS="127.0.0.1")
        node = shutil.which("node")
        assert node is not None
        # server.js finds its files from its own directory. Its SDK's first call is to the
        # emulator in this reactor: the wait for its port runs in a thread, the reactor serves.
        process = DrainedProcess([node, str(ROOT / "bench" / "node" / "server.js")], env)
        self.addCleanup(threads.deferToThread, process.stop)
        listening = await threads.deferToThread(process.wait_for, LISTENING, START_TIMEOUT)
        port = int(listening.group(1))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.addCleanup(channel.close)
        return emulator, SidecarServiceStub(channel)

    async def test_answers_are_the_sdks_from_its_cache(self) -> None:
        emulator, stub = await self._start()

        def call(method: Any, request: Any) -> Deferred[Any]:
            return grpc_deferred(reactor, method.future(request, timeout=30))

        def boolean(customer: str, feature: str) -> Deferred[Any]:
            request = pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id=feature)
            return call(stub.GetBooleanEntitlement, request)

        sso = await boolean("acme", "feature-sso")
        self.assertTrue(sso.has_access)
        self.assertFalse(sso.is_fallback)
        self.assertEqual(sso.entitlement.feature.id, "feature-sso")
        self.assertEqual(sso.entitlement.feature.feature_type, pb.FEATURE_TYPE_BOOLEAN)

        beta = await boolean("acme", "feature-beta")
        self.assertFalse(beta.has_access)
        self.assertEqual(beta.access_denied_reason, pb.ACCESS_DENIED_REASON_REVOKED)

        def metered(requested: float) -> pb.GetMeteredEntitlementRequest:
            return pb.GetMeteredEntitlementRequest(
                customer_id="acme",
                feature_id="feature-api-calls",
                options=pb.MeteredEntitlementOptions(requested_usage=requested),
            )

        within = await call(stub.GetMeteredEntitlement, metered(40))
        self.assertTrue(within.has_access)
        self.assertEqual((within.entitlement.usage_limit, within.entitlement.current_usage), (100, 60))
        self.assertEqual(within.requested_usage, 40)
        self.assertEqual(within.entitlement.feature.meter_type, pb.METER_TYPE_INCREMENTAL)
        over = await call(stub.GetMeteredEntitlement, metered(41))
        self.assertFalse(over.has_access)
        self.assertEqual(over.access_denied_reason, pb.ACCESS_DENIED_REASON_REQUESTED_USAGE_EXCEEDING_LIMIT)

        state = await call(stub.GetEntitlementsStateV2, pb.GetEntitlementsStateV2Request(customer_id="acme"))
        self.assertEqual(
            sorted((e.WhichOneof("entitlement"), e.has_access, e.is_fallback) for e in state.entitlements),
            [("boolean", False, False), ("boolean", True, False), ("metered", True, False)],
        )

        # Six reads, one fetch: the SDK answered from its in-memory cache (real-time on, subscribed).
        self.assertEqual(emulator.state.request_counts().get(EDGE_ENTITLEMENTS), 1)

        nobody = await boolean("nobody", "feature-sso")
        self.assertFalse(nobody.has_access)
        self.assertEqual(nobody.access_denied_reason, pb.ACCESS_DENIED_REASON_CUSTOMER_NOT_FOUND)
