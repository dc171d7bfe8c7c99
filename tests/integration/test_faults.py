"""Reads never fail, writes never lie: every emulator fault knob against a live sidecar, and an
API key Stigg rejects. Reads must answer (from cache or fallback, never a gRPC error); writes must
answer a precise status."""

from __future__ import annotations

from typing import Any, cast

import grpc
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness

# Long enough that retried failures end by running out of attempts (backoff totals ~1.5 s at
# most), not of time, even on a loaded machine; the slow-upstream test outlasts it on purpose.
RETRY_BUDGET: dict[str, Any] = {"ENTITLEMENTS_TIMEOUT_MS": "4000"}
FALLBACK = '{"sso": {"hasAccess": true}}'


def sso(customer="acme"):
    return pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso")


def usage():
    return pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=1)


class FaultTests(TestCase):
    timeout = 60

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.h = await OnlineHarness(self, reactor).start(data.SEED, seed=7, ENTITLEMENTS_FALLBACK=FALLBACK, **RETRY_BUDGET)

    async def assertReadFallsBack(self):
        r = await self.h.call("GetBooleanEntitlement", sso(), timeout=8)
        self.assertTrue(r.is_fallback)
        self.assertTrue(r.has_access)  # the configured fallback
        r = await self.h.call("GetMeteredEntitlement", pb.GetMeteredEntitlementRequest(customer_id="acme", feature_id="x"), timeout=8)
        self.assertTrue(r.is_fallback)
        self.assertEqual(r.access_denied_reason, pb.ACCESS_DENIED_REASON_UNKNOWN)
        r = await self.h.call("GetEntitlementsStateV2", pb.GetEntitlementsStateV2Request(customer_id="acme"), timeout=8)
        self.assertEqual([e.is_fallback for e in r.entitlements], [True])

    async def assertWriteFails(self, code, method="ReportUsage", request=None):
        with self.assertRaises(grpc.RpcError) as caught:
            await self.h.call(method, request or usage(), timeout=8)
        self.assertEqual(caught.exception.code(), code)
        self.assertTrue(caught.exception.details())
        self.assertNotIn("test-key", caught.exception.details())
        return caught.exception.details()

    async def test_slow_upstream(self):
        await self.h.faults(latency_ms=9000)
        await self.assertReadFallsBack()
        await self.assertWriteFails(grpc.StatusCode.DEADLINE_EXCEEDED)

    async def test_server_errors(self):
        await self.h.faults(error_status=500)
        await self.assertReadFallsBack()
        message = await self.assertWriteFails(grpc.StatusCode.UNAVAILABLE)
        self.assertIn("500", message)

    async def test_rejected_key_mid_run(self):
        await self.h.faults(error_status=401)
        await self.assertReadFallsBack()
        await self.assertWriteFails(grpc.StatusCode.UNAUTHENTICATED)

    async def test_malformed_bodies(self):
        await self.h.faults(malformed=True)
        await self.assertReadFallsBack()
        await self.assertWriteFails(grpc.StatusCode.UNAVAILABLE)

    async def test_unreachable_upstream(self):
        await self.h.faults(down=True)
        await self.assertReadFallsBack()
        await self.assertWriteFails(grpc.StatusCode.UNAVAILABLE)
        await self.assertWriteFails(
            grpc.StatusCode.UNAVAILABLE,
            "ReportEvents",
            pb.ReportEventsRequest(events=[pb.Event(event_name="e", customer_id="acme", idempotency_key="k")]),
        )
        r = await self.h.call("ReloadEntitlements", pb.ReloadEntitlementsRequest(customer_id="acme"), timeout=8)
        self.assertFalse(r.entitled_entity_exists)

    async def test_intermittent_errors_are_retried(self):
        await self.h.faults(error_status=503, error_rate=0.5)
        r = await self.h.call("GetBooleanEntitlement", sso(), timeout=8)
        self.assertEqual((r.has_access, r.is_fallback), (True, False))
        counts = await self.h.requests()
        self.assertGreaterEqual(counts["/v1/c/{customerId}/entitlements-state.json"], 1)

    async def test_cached_reads_survive_an_outage(self):
        r = await self.h.call("GetMeteredEntitlement", pb.GetMeteredEntitlementRequest(customer_id="acme", feature_id="api-calls"))
        self.assertFalse(r.is_fallback)
        await self.h.faults(down=True)
        r = await self.h.call("GetMeteredEntitlement", pb.GetMeteredEntitlementRequest(customer_id="acme", feature_id="api-calls"))
        self.assertEqual((r.is_fallback, r.entitlement.usage_limit), (False, 100))

    async def test_upstream_recovers(self):
        await self.h.faults(down=True)
        await self.assertReadFallsBack()
        await self.h.faults(down=False)

        # The Edge breaker opened during the outage: the first read after its backoff probes, and
        # that success closes it. The backoff doubles with each probe that failed during the
        # outage (more of them when the machine is slow), so the wait covers what is left of it.
        edge = self.h.parts.online.api.breakers["edge"]
        backoff_left = max(0.0, edge._retry_at - reactor.seconds())

        async def recovered():
            r = await self.h.call("GetBooleanEntitlement", sso(), timeout=10)
            self.assertTrue(r.has_access)
            return not r.is_fallback

        await self.h.wait_until(recovered, timeout=backoff_left + 15, interval=0.1)


class InvalidKeyTests(TestCase):
    timeout = 30

    async def test_rejected_key_keeps_readiness_down_and_reads_fall_back(self):
        h = await OnlineHarness(self, reactor).start(data.SEED, api_key="wrong-key", ENTITLEMENTS_FALLBACK=FALLBACK)

        async def rejected():
            code, body = await h.readiness()
            return code == 503 and "Stigg rejected the API key (SERVER_API_KEY)" in body["reasons"]

        await h.wait_until(rejected)
        r = await h.call("GetBooleanEntitlement", sso())
        self.assertEqual((r.has_access, r.is_fallback), (True, True))
        with self.assertRaises(grpc.RpcError) as caught:
            await h.call("ReportUsage", usage())
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        # fallbacks come without asking Stigg again
        counts = await h.requests()
        self.assertNotIn("/v1/c/{customerId}/entitlements-state.json", counts)
        self.assertEqual(counts["/v1/config/server-sdk-configuration.json"], 1)


class UnreachableAtStartTests(TestCase):
    timeout = 30

    async def test_readiness_is_not_held_by_an_outage(self):
        h = OnlineHarness(self, reactor)
        h_started = await h.start(data.SEED, ENTITLEMENTS_TIMEOUT_MS="300")
        # The first key check may already have passed; force an outage and a fresh sidecar view:
        await h_started.faults(down=True)

        async def ready():
            code, _ = await h_started.readiness()
            return code == 200

        await h_started.wait_until(ready)


class WriteBudgetTests(TestCase):
    timeout = 30

    async def test_a_deadline_too_short_to_reach_stigg_is_refused_before_sending(self):
        h = await OnlineHarness(self, reactor).start(data.SEED)
        with self.assertRaises(grpc.RpcError) as caught:
            await h.call("ReportUsage", usage(), timeout=0.04)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        from twisted.internet.task import deferLater

        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual((await h.admin("GET", "usage"))[1], [])

    async def test_waiting_writes_leave_threads_for_cached_reads(self):
        seed = {"apiKeys": ["test-key"], "customers": {"acme": data.ACME}}
        h = await OnlineHarness(self, reactor).start(
            seed, GRPC_MAX_WORKERS="1", MAX_WAITING_WRITES="2", ENTITLEMENTS_TIMEOUT_MS="15000"
        )
        await h.call("GetBooleanEntitlement", sso())
        # The writes wait for Stigg far longer than a loaded machine needs to answer a cached read.
        await h.faults(latency_ms=5000)
        slow = [h.call("ReportUsage", usage(), timeout=30) for _ in range(2)]
        waiting = h.parts.online.waiting_writes

        async def both_waiting():
            return waiting.in_use == 2

        await h.wait_until(both_waiting)
        with self.assertRaises(grpc.RpcError) as caught:
            await h.call("ReportUsage", usage())
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("MAX_WAITING_WRITES", caught.exception.details())
        cached = await h.call("GetBooleanEntitlement", sso())
        self.assertEqual((cached.has_access, cached.is_fallback), (True, False))
        self.assertEqual(waiting.in_use, 2)  # answered while both writes still held their places
        self.assertEqual(len(await gatherResults(slow)), 2)

    async def test_forbidden_is_not_a_rejected_key(self):
        h = await OnlineHarness(self, reactor).start(data.SEED, **RETRY_BUDGET)
        await h.faults(error_status=403)
        with self.assertRaises(grpc.RpcError) as caught:
            await h.call("ReportUsage", usage())
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)


class RedirectTests(TestCase):
    timeout = 30

    async def test_redirects_are_not_followed_so_the_key_stays_home(self):
        from klein import Klein
        from twisted.web.server import Site

        elsewhere_saw = []
        elsewhere = Klein()

        @elsewhere.route("/", branch=True)
        def record(request):
            elsewhere_saw.append(request.getHeader("x-api-key"))
            return b"{}"

        other = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(elsewhere.resource()))
        self.addCleanup(other.stopListening)
        redirector = Klein()

        @redirector.route("/", branch=True)
        def redirect(request):
            request.setResponseCode(302)
            request.setHeader("location", f"http://127.0.0.1:{cast(IPv4Address, other.getHost()).port}/stolen")
            return b""

        edge = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(redirector.resource()))
        self.addCleanup(edge.stopListening)
        h = await OnlineHarness(self, reactor).start(
            data.SEED, EDGE_API_URL=f"http://127.0.0.1:{cast(IPv4Address, edge.getHost()).port}", ENTITLEMENTS_FALLBACK=FALLBACK, **RETRY_BUDGET
        )
        r = await h.call("GetBooleanEntitlement", sso())
        self.assertTrue(r.is_fallback)
        self.assertEqual(elsewhere_saw, [])
