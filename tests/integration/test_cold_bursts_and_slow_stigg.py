"""The read path under bursts and a slow Stigg, over real sockets (issue 10, findings 1 and 2).

The emulator is Stigg; the sidecar runs in this reactor; calls are real gRPC over 127.0.0.1.
A burst of cold reads must get Stigg's answers, not fallbacks; a slow Stigg holding many reads
must not take the places writes and cached reads need.
"""

from __future__ import annotations

import grpc
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness


def sso(customer: str) -> pb.GetBooleanEntitlementRequest:
    return pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso")


def customers(n: int) -> dict:
    return {"apiKeys": ["test-key"], "customers": {f"c{i}": data.ACME for i in range(n)}}


class ColdBurstTests(TestCase):
    timeout = 60

    async def test_256_concurrent_cold_reads_all_answer_stiggs_data(self):
        # Stigg's default budget: a fallback here means the sidecar gave up while Stigg answered
        h = await OnlineHarness(self, reactor).start(customers(257), ENTITLEMENTS_TIMEOUT_MS="10000")
        await h.call("GetBooleanEntitlement", sso("c256"))  # connected and warm
        answers = await gatherResults([h.call("GetBooleanEntitlement", sso(f"c{i}"), timeout=20) for i in range(256)])
        self.assertEqual(sum(r.is_fallback for r in answers), 0)
        self.assertTrue(all(r.has_access for r in answers))
        counts = await h.requests()
        self.assertEqual(counts["/v1/c/{customerId}/entitlements-state.json"], 257)


class SlowStiggStormTests(TestCase):
    timeout = 60

    async def test_writes_and_cached_reads_go_through_while_64_cold_reads_wait_on_a_slow_stigg(self):
        h = await OnlineHarness(self, reactor).start(customers(65), ENTITLEMENTS_TIMEOUT_MS="10000")
        await h.call("GetBooleanEntitlement", sso("c64"))  # cached before Stigg slows down
        await h.faults(latency_ms=3000)
        storm = [h.call("GetBooleanEntitlement", sso(f"c{i}"), timeout=10) for i in range(64)]
        waiting = h.parts.online.waiting_reads

        async def storm_waiting():
            return waiting.in_use == 64

        await h.wait_until(storm_waiting)
        # the cached customer answers from memory while all 64 wait (asserted below, not timed:
        # a loaded machine can take a second for any call)
        cached = await h.call("GetBooleanEntitlement", sso("c64"))
        self.assertEqual((cached.has_access, cached.is_fallback), (True, False))
        self.assertEqual(waiting.in_use, 64)
        writes = [
            h.call("ReportUsage", pb.ReportUsageRequest(customer_id="c64", feature_id="api-calls", value=1), timeout=10)
            for _ in range(8)
        ]
        acks = await gatherResults(writes)
        self.assertEqual(len({a.measurement_id for a in acks}), 8)
        answers = await gatherResults(storm)
        self.assertEqual([r.is_fallback for r in answers], [False] * 64)
        self.assertTrue(all(r.has_access for r in answers))
        self.assertEqual(len((await h.admin("GET", "usage"))[1]), 8)


def metric(h: OnlineHarness, name: str, **labels: str) -> float | None:
    assert h.parts.metrics is not None  # METRICS_ENABLED is on in these tests
    return h.parts.metrics.registry.get_sample_value(name, labels)


class OutageMemoryTests(TestCase):
    timeout = 60

    async def test_once_stigg_is_known_down_cold_reads_and_writes_fail_at_once_until_a_probe_succeeds(self):
        h = await OnlineHarness(self, reactor).start(
            customers(20), ENTITLEMENTS_TIMEOUT_MS="4000", ENTITLEMENTS_FALLBACK='{"sso": {"hasAccess": true}}'
        )
        await h.wait_until(lambda: _ready(h))  # the key check is done: no call of its own meanwhile
        await h.faults(down=True)
        first = await h.call("GetBooleanEntitlement", sso("c0"), timeout=8)  # pays the retries, opens Edge's breaker
        self.assertEqual((first.is_fallback, first.has_access), (True, True))
        self.assertEqual(metric(h, "sidecar_upstream_breaker_open", upstream="edge"), 1)
        self.assertEqual(metric(h, "sidecar_upstream_breaker_open", upstream="graphql"), 0)
        edge = h.parts.online.api.breakers["edge"]
        probes_before = edge.probes
        await h.admin("POST", "requests/reset")

        answers = await gatherResults([h.call("GetBooleanEntitlement", sso(f"c{i}"), timeout=8) for i in range(1, 11)])
        self.assertEqual([(r.is_fallback, r.has_access) for r in answers], [(True, True)] * 10)
        probes = edge.probes - probes_before  # normally 0: the storm is over before the first probe is due
        self.assertLessEqual(probes, 2)
        counts = await h.requests()
        self.assertEqual(counts.get("/v1/c/{customerId}/entitlements-state.json", 0), probes)  # no retries, no others
        self.assertEqual(metric(h, "sidecar_fast_failed_reads_total", reason="upstream_down"), 10 - probes)
        self.assertEqual((await h.readiness())[0], 200)  # an outage at Stigg never takes the pod out

        # Writes: the first pays its retries and opens GraphQL's breaker; the next is refused unsent.
        usage = pb.ReportUsageRequest(customer_id="c0", feature_id="api-calls", value=1)
        with self.assertRaises(grpc.RpcError) as caught:
            await h.call("ReportUsage", usage, timeout=8)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
        sent = (await h.requests()).get("ReportUsage", 0)
        with self.assertRaises(grpc.RpcError) as caught:
            await h.call("ReportUsage", usage, timeout=8)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertRegex(caught.exception.details(), r"^not sent: Stigg's GraphQL API failed \d+ times in a row \(last: ")
        graphql = h.parts.online.api.breakers["graphql"]
        self.assertLessEqual((await h.requests()).get("ReportUsage", 0) - sent, graphql.probes)

        await h.faults(down=False)

        async def recovered():
            r = await h.call("GetBooleanEntitlement", sso("c11"), timeout=5)
            return not r.is_fallback

        await h.wait_until(recovered, timeout=10, interval=0.1)  # the backoff is at most 1-2 s here
        self.assertEqual(metric(h, "sidecar_upstream_breaker_open", upstream="edge"), 0)


async def _ready(h: OnlineHarness) -> bool:
    return (await h.readiness())[0] == 200
