"""A malformed field in Stigg's answer (a usage that overflowed to inf upstream) costs that one
entitlement, never the customer (issue 10, finding 9): the bad entitlement answers the fallback,
the others Stigg's data; it is counted and logged, and a reload says which it was."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.logs import log_events
from tests.fixtures.online import OnlineHarness

FALLBACK = '{"api-calls": {"hasAccess": true, "usageLimit": 7}}'


class MalformedEntitlementTests(TestCase):
    timeout = 60

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.h = await OnlineHarness(self, reactor).start(data.SEED, ENTITLEMENTS_FALLBACK=FALLBACK)
        self.events = log_events(self)

    @property
    def logged(self) -> list[str]:
        return [e["log_format"].format(**e) for e in self.events if "Stigg sent" in str(e.get("log_format", ""))]

    async def metric(self, name: str) -> float:
        response = await self.h.http.get(f"http://127.0.0.1:{self.h.http_port}/metrics")
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exposed")

    async def test_usage_overflowed_to_inf_costs_one_entitlement(self):
        sso = pb.GetBooleanEntitlementRequest(customer_id="acme", feature_id="sso")
        calls = pb.GetMeteredEntitlementRequest(customer_id="acme", feature_id="api-calls")
        self.assertFalse((await self.h.call("GetBooleanEntitlement", sso)).is_fallback)
        self.assertEqual(await self.metric("sidecar_upstream_malformed_entitlements_total"), 0)

        for _ in range(2):  # Stigg adds them up: 2e308 is inf
            await self.h.call(
                "ReportUsage", pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=1e308)
            )
        reloaded = await self.h.call("ReloadEntitlements", pb.ReloadEntitlementsRequest(customer_id="acme"))
        self.assertTrue(reloaded.entitled_entity_exists)

        metered = await self.h.call("GetMeteredEntitlement", calls)
        self.assertTrue(metered.is_fallback)
        self.assertTrue(metered.has_access)
        self.assertEqual(metered.entitlement.usage_limit, 7)  # the configured fallback's
        boolean = await self.h.call("GetBooleanEntitlement", sso)
        self.assertFalse(boolean.is_fallback)  # the customer's other entitlements: Stigg's data
        self.assertTrue(boolean.has_access)
        state = await self.h.call("GetEntitlementsStateV2", pb.GetEntitlementsStateV2Request(customer_id="acme"))
        kinds = [e.WhichOneof("entitlement") for e in state.entitlements]
        listed = [getattr(e, k).feature.id for e, k in zip(state.entitlements, kinds, strict=True) if k != "credit"]
        self.assertIn("sso", listed)
        self.assertNotIn("api-calls", listed)

        self.assertEqual(await self.metric("sidecar_upstream_malformed_entitlements_total"), 1)
        # The reload says precisely which entitlement and why.
        self.assertEqual(len(self.logged), 1)
        self.assertIn("'acme'", self.logged[0])
        self.assertIn("currentUsage: must be a finite number", self.logged[0])
