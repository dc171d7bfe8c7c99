"""Operations: /metrics moves with traffic and holds no secret, gRPC health follows readiness,
reflection lists the service, JSON logs parse and carry no secret."""

from __future__ import annotations

import io
import json
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twisted.internet import reactor
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.process.logs import make_observer
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness

FALLBACK = '{"sso": {"hasAccess": true}}'


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        if metric.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in metric for k, v in labels.items()):
            return float(value)
    return 0.0


class MetricsTests(TestCase):
    timeout = 30

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.h = await OnlineHarness(self, reactor).start(data.SEED, ENTITLEMENTS_FALLBACK=FALLBACK)

    async def scrape(self) -> str:
        response = await self.h.http.get(f"http://127.0.0.1:{self.h.http_port}/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn("text/plain", response.headers.getRawHeaders("content-type")[0])
        return await response.text()

    async def test_hits_misses_fallbacks_errors_and_calls_are_counted(self):
        before = await self.scrape()
        self.assertEqual(sample(before, "sidecar_cache_misses_total"), 0)
        request = pb.GetBooleanEntitlementRequest(customer_id="acme", feature_id="sso")
        await self.h.call("GetBooleanEntitlement", request)  # miss, then fetch
        await self.h.call("GetBooleanEntitlement", request)  # hit
        await self.h.faults(error_status=500)
        r = await self.h.call("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(customer_id="other", feature_id="sso"))
        self.assertTrue(r.is_fallback)
        try:
            await self.h.call("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(customer_id="", feature_id="sso"))
        except grpc.RpcError:
            pass
        after = await self.scrape()
        self.assertEqual(sample(after, "sidecar_cache_hits_total"), 1)
        self.assertEqual(sample(after, "sidecar_cache_misses_total"), 2)
        self.assertEqual(sample(after, "sidecar_fallback_answers_total", reason="granted"), 1)
        self.assertGreaterEqual(sample(after, "sidecar_network_request_errors_total"), 1)
        self.assertEqual(sample(after, "sidecar_grpc_requests_total", method="GetBooleanEntitlement", code="OK"), 3)
        self.assertEqual(
            sample(after, "sidecar_grpc_requests_total", method="GetBooleanEntitlement", code="INVALID_ARGUMENT"), 1
        )
        self.assertEqual(sample(after, "sidecar_grpc_request_duration_seconds_count", method="GetBooleanEntitlement"), 4)
        self.assertEqual(sample(after, "sidecar_cache_entries"), 1)
        self.assertGreater(sample(after, "sidecar_cache_bytes"), 0)
        self.assertGreater(
            sample(after, "sidecar_upstream_request_duration_seconds_count",
                   endpoint="/v1/c/{customerId}/entitlements-state.json", outcome="ok"), 0
        )
        self.assertEqual(sample(after, "sidecar_ready"), 1)
        self.assertGreater(sample(after, "process_resident_memory_bytes"), 0)
        for name in ("sidecar_initialization_errors_total", "sidecar_invalid_api_key_errors_total",
                     "sidecar_redis_client_errors_total"):
            self.assertIn(name, after)
        self.assertNotIn("test-key", after)

    async def test_health_follows_readiness_and_reflection_lists_the_service(self):
        stub: Any = health_pb2_grpc.HealthStub(self.h.channel)  # the stubs' HealthStub lists no methods

        async def status():
            return (await self.h.call_stub(stub.Check, health_pb2.HealthCheckRequest(service="stigg.sidecar.v1.SidecarService"))).status

        async def serving():
            return await status() == health_pb2.HealthCheckResponse.SERVING

        await self.h.wait_until(serving)
        self.h.sidecar.readiness.block("test", "held down by the test")
        self.assertEqual(await status(), health_pb2.HealthCheckResponse.NOT_SERVING)
        self.h.sidecar.readiness.unblock("test")
        self.assertEqual(await status(), health_pb2.HealthCheckResponse.SERVING)

        reflect: Any = reflection_pb2_grpc.ServerReflectionStub(self.h.channel)  # as HealthStub
        responses = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
        self.assertIn("stigg.sidecar.v1.SidecarService", names)
        self.assertIn("grpc.health.v1.Health", names)


class MetricsDisabledTests(TestCase):
    timeout = 30

    async def test_no_metrics_page_when_disabled(self):
        h = await OnlineHarness(self, reactor).start(data.SEED, METRICS_ENABLED="0")
        response = await h.http.get(f"http://127.0.0.1:{h.http_port}/metrics")
        self.assertEqual(response.code, 404)
        await response.text()
        r = await h.call("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(customer_id="acme", feature_id="sso"))
        self.assertTrue(r.has_access)


class JsonLogTests(SynchronousTestCase):
    def test_one_parsable_object_per_event_without_secrets(self):
        out = io.StringIO()
        observer = make_observer("info", "json", out)
        log = Logger(namespace="stigg_sidecar.test", observer=observer)
        log.info("Fetched {customer} in {ms}ms", customer="acme", ms=12)
        log.debug("not shown at info")
        try:
            raise ValueError("boom")
        except ValueError:
            log.failure("It failed")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["namespace"], "stigg_sidecar.test")
        self.assertEqual(first["message"], "Fetched acme in 12ms")
        self.assertEqual(first["fields"], {"customer": "acme", "ms": 12})
        self.assertIsInstance(first["timestamp"], float)
        self.assertEqual(second["level"], "critical")
        self.assertIn("boom", second["error"])


class HotPathTallyTests(SynchronousTestCase):
    def test_counts_from_many_threads_add_up_exactly(self):
        import threading

        from prometheus_client import CollectorRegistry, generate_latest

        from stigg_sidecar.ops.metrics import HotPathTally

        registry = CollectorRegistry()
        tally = HotPathTally(registry)

        def work():
            for i in range(5000):
                tally.observe_call("GetBooleanEntitlement", "OK", 0.0002 if i % 2 else 0.003)
                tally.mine().hits += 1

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        text = generate_latest(registry).decode()
        self.assertEqual(sample(text, "sidecar_cache_hits_total"), 20000)
        self.assertEqual(sample(text, "sidecar_grpc_requests_total", method="GetBooleanEntitlement", code="OK"), 20000)
        self.assertEqual(sample(text, "sidecar_grpc_request_duration_seconds_count", method="GetBooleanEntitlement"), 20000)
        self.assertEqual(
            sample(text, "sidecar_grpc_request_duration_seconds_bucket", method="GetBooleanEntitlement", le="0.00025"),
            10000,
        )
        self.assertAlmostEqual(
            sample(text, "sidecar_grpc_request_duration_seconds_sum", method="GetBooleanEntitlement"), 10000 * 0.0032, 6
        )
