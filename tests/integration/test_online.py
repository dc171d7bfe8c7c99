"""Online mode end to end: the emulator as Stigg, the sidecar in the same reactor, real gRPC over
127.0.0.1. Each decision rule through the wire, usage, single flight, key validation."""

from __future__ import annotations

import grpc
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness

R = pb  # enum values live on the module


def boolean(customer, feature, **kw):
    return pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id=feature, **kw)


def metered(customer, feature, usage=None):
    options = pb.MeteredEntitlementOptions(requested_usage=usage) if usage is not None else None
    return pb.GetMeteredEntitlementRequest(customer_id=customer, feature_id=feature, options=options)


class DecisionRulesOverGrpcTests(TestCase):
    timeout = 30

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.h = await OnlineHarness(self, reactor).start(data.SEED)

    async def test_boolean_grants(self):
        r = await self.h.call("GetBooleanEntitlement", boolean("acme", "sso"))
        self.assertEqual((r.has_access, r.is_fallback, r.HasField("access_denied_reason")), (True, False, False))
        self.assertEqual(r.entitlement.feature.id, "sso")

    async def test_numeric_answers_the_limit(self):
        r = await self.h.call("GetNumericEntitlement", pb.GetNumericEntitlementRequest(customer_id="acme", feature_id="projects"))
        self.assertTrue(r.has_access)
        self.assertEqual(r.entitlement.value, 10)
        r = await self.h.call(
            "GetNumericEntitlement", pb.GetNumericEntitlementRequest(customer_id="acme", feature_id="seats-unlimited")
        )
        self.assertTrue(r.entitlement.is_unlimited)

    async def test_metered_grants_within_limit_and_denies_past_it(self):
        r = await self.h.call("GetMeteredEntitlement", metered("acme", "api-calls", 10))
        self.assertEqual((r.has_access, r.requested_usage, r.entitlement.current_usage), (True, 10, 90))
        r = await self.h.call("GetMeteredEntitlement", metered("acme", "api-calls", 11))
        self.assertFalse(r.has_access)
        self.assertFalse(r.is_fallback)
        self.assertEqual(r.access_denied_reason, pb.ACCESS_DENIED_REASON_REQUESTED_USAGE_EXCEEDING_LIMIT)

    async def test_metered_requested_usage_defaults_to_zero(self):
        r = await self.h.call("GetMeteredEntitlement", metered("acme", "api-calls"))
        self.assertTrue(r.has_access)
        self.assertEqual(r.requested_usage, 0)

    async def test_unlimited_and_soft_limit_always_grant(self):
        for feature in ("dashboards", "exports"):
            r = await self.h.call("GetMeteredEntitlement", metered("acme", feature, 10_000))
            self.assertTrue(r.has_access, feature)

    async def test_enum_subset_grants_and_other_values_deny(self):
        ok = pb.GetEnumEntitlementRequest(customer_id="acme", feature_id="regions", options=pb.EnumEntitlementOptions(requested_values=["eu"]))
        r = await self.h.call("GetEnumEntitlement", ok)
        self.assertTrue(r.has_access)
        self.assertEqual(list(r.entitlement.enum_values), ["us", "eu"])
        bad = pb.GetEnumEntitlementRequest(customer_id="acme", feature_id="regions", options=pb.EnumEntitlementOptions(requested_values=["eu", "ap"]))
        r = await self.h.call("GetEnumEntitlement", bad)
        self.assertFalse(r.has_access)
        self.assertEqual(r.access_denied_reason, pb.ACCESS_DENIED_REASON_REQUESTED_VALUES_MISMATCH)
        self.assertEqual(list(r.requested_values), ["eu", "ap"])

    async def test_entitlement_own_reason_denies(self):
        r = await self.h.call("GetBooleanEntitlement", boolean("acme", "beta"))
        self.assertEqual((r.has_access, r.is_fallback, r.access_denied_reason), (False, False, pb.ACCESS_DENIED_REASON_REVOKED))

    async def test_missing_feature_is_no_entitlement_in_subscription(self):
        r = await self.h.call("GetBooleanEntitlement", boolean("acme", "nope"))
        self.assertEqual(r.access_denied_reason, pb.ACCESS_DENIED_REASON_NO_FEATURE_ENTITLEMENT_IN_SUBSCRIPTION)
        self.assertFalse(r.is_fallback)

    async def test_customer_level_reasons_win(self):
        cases = {
            "archived": pb.ACCESS_DENIED_REASON_CUSTOMER_IS_ARCHIVED,
            "lapsed": pb.ACCESS_DENIED_REASON_NO_ACTIVE_SUBSCRIPTION,
            "stranger": pb.ACCESS_DENIED_REASON_CUSTOMER_NOT_FOUND,
        }
        for customer, reason in cases.items():
            r = await self.h.call("GetBooleanEntitlement", boolean(customer, "sso"))
            self.assertEqual((r.has_access, r.is_fallback, r.access_denied_reason), (False, False, reason), customer)
            state = await self.h.call("GetEntitlementsStateV2", pb.GetEntitlementsStateV2Request(customer_id=customer))
            self.assertEqual(state.access_denied_reason, reason)

    async def test_type_mismatch_answers_fallback(self):
        request = pb.GetNumericEntitlementRequest(
            customer_id="acme", feature_id="sso",
            options=pb.NumericEntitlementOptions(fallback=pb.NumericEntitlementFallback(has_access=True, value=3)),
        )
        r = await self.h.call("GetNumericEntitlement", request)
        self.assertTrue(r.is_fallback)
        self.assertEqual(r.access_denied_reason, pb.ACCESS_DENIED_REASON_FEATURE_TYPE_MISMATCH)
        self.assertEqual(r.entitlement.value, 3)

    async def test_credits_grant_while_balance_covers_request(self):
        def v2(currency, usage):
            return pb.GetEntitlementV2Request(
                customer_id="acme", currency_id=currency, options=pb.GetEntitlementOptions(requested_usage=usage)
            )

        r = (await self.h.call("GetEntitlementV2", v2("tokens", 600))).entitlement
        self.assertTrue(r.has_access)
        self.assertEqual((r.credit.remaining, r.credit.usage_limit, r.credit.current_usage), (600, 1000, 400))
        r = (await self.h.call("GetEntitlementV2", v2("tokens", 601))).entitlement
        self.assertEqual((r.has_access, r.access_denied_reason), (False, pb.ACCESS_DENIED_REASON_INSUFFICIENT_CREDITS))
        r = (await self.h.call("GetEntitlementV2", v2("empty-wallet", 0))).entitlement
        self.assertFalse(r.has_access)

    async def test_v1_state_has_features_only_and_v2_adds_credits(self):
        v1 = await self.h.call("GetEntitlements", pb.GetEntitlementsRequest(customer_id="acme"))
        v2 = await self.h.call("GetEntitlementsStateV2", pb.GetEntitlementsStateV2Request(customer_id="acme"))
        self.assertEqual(len(v1.entitlements), 8)
        self.assertEqual(len(v2.entitlements), 10)
        self.assertEqual(sum(1 for e in v2.entitlements if e.WhichOneof("entitlement") == "credit"), 2)
        self.assertFalse(any(e.is_fallback for e in v2.entitlements))

    async def test_generic_check_takes_the_cached_type(self):
        r = await self.h.call("GetEntitlement", pb.GetEntitlementRequest(customer_id="acme", feature_id="api-calls"))
        self.assertEqual(r.WhichOneof("entitlement"), "metered")
        self.assertEqual(r.metered.usage_limit, 100)


class UsageTests(TestCase):
    timeout = 30

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.h = await OnlineHarness(self, reactor).start(data.SEED)

    async def test_reported_usage_is_reflected_in_the_next_check(self):
        before = await self.h.call("GetMeteredEntitlement", metered("acme", "api-calls", 10))
        self.assertTrue(before.has_access)
        ack = await self.h.call("ReportUsage", pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=5))
        self.assertEqual(ack.current_usage, 95)
        self.assertTrue(ack.measurement_id)
        after = await self.h.call("GetMeteredEntitlement", metered("acme", "api-calls", 10))
        self.assertEqual(after.entitlement.current_usage, 95)
        self.assertFalse(after.has_access)
        # the cache answered: one entitlements fetch in all
        counts = await self.h.requests()
        self.assertEqual(counts.get("/v1/c/{customerId}/entitlements-state.json"), 1)

    async def test_set_behaviour_and_bulk(self):
        acks = await self.h.call(
            "ReportUsageBulk",
            pb.ReportUsageBulkRequest(
                usages=[
                    pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=3,
                                          update_behavior=pb.USAGE_UPDATE_BEHAVIOR_SET),
                    pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=2),
                ]
            ),
        )
        self.assertEqual([a.current_usage for a in acks.usages], [3, 5])
        log = (await self.h.admin("GET", "usage"))[1]
        self.assertEqual(len(log), 2)

    async def test_events_reach_stigg(self):
        await self.h.call(
            "ReportEvents",
            pb.ReportEventsRequest(events=[pb.Event(event_name="call", customer_id="acme", idempotency_key="e1",
                                                    dimensions={"n": pb.EventDimensionValue(number_value=2)})]),
        )
        events = (await self.h.admin("GET", "events"))[1]
        self.assertEqual(len(events), 1)

    async def test_usage_for_unknown_customer_is_a_precise_error(self):
        with self.assertRaises(grpc.RpcError) as caught:
            await self.h.call("ReportUsage", pb.ReportUsageRequest(customer_id="stranger", feature_id="api-calls", value=1))
        self.assertEqual(caught.exception.code(), grpc.StatusCode.NOT_FOUND)

    async def test_reload_refetches_through_graphql(self):
        r = await self.h.call("ReloadEntitlements", pb.ReloadEntitlementsRequest(customer_id="acme"))
        self.assertTrue(r.entitled_entity_exists)
        r = await self.h.call("ReloadEntitlements", pb.ReloadEntitlementsRequest(customer_id="archived"))
        self.assertFalse(r.entitled_entity_exists)
        r = await self.h.call("ReloadEntitlements", pb.ReloadEntitlementsRequest(customer_id="lapsed"))
        self.assertTrue(r.entitled_entity_exists)
        counts = await self.h.requests()
        self.assertEqual(counts.get("GetEntitlementsState"), 3)

    async def test_admin_change_then_reload_changes_the_answer(self):
        r = await self.h.call("GetBooleanEntitlement", boolean("acme", "sso"))
        self.assertTrue(r.has_access)
        code, _ = await self.h.admin("PUT", "customers/acme", data.customer(data.feature("other")))
        self.assertEqual(code, 200)
        await self.h.call("ReloadEntitlements", pb.ReloadEntitlementsRequest(customer_id="acme"))
        r = await self.h.call("GetBooleanEntitlement", boolean("acme", "sso"))
        self.assertFalse(r.has_access)


class ReloadIsAuthoritativeTests(TestCase):
    timeout = 30

    async def test_reload_applies_an_entry_whose_timestamp_went_backwards(self):
        h = await OnlineHarness(self, reactor).start(data.SEED)
        self.assertTrue((await h.call("GetBooleanEntitlement", boolean("acme", "sso"))).has_access)
        # sso removed; what remains was last updated long ago, so the entry's timestamp is older
        older = data.customer(data.feature("other", entitlementUpdatedAt="2026-01-01T00:00:00.000Z"))
        await h.admin("PUT", "customers/acme", older)
        await h.call("ReloadEntitlements", pb.ReloadEntitlementsRequest(customer_id="acme"))
        r = await h.call("GetBooleanEntitlement", boolean("acme", "sso"))
        self.assertEqual(r.access_denied_reason, pb.ACCESS_DENIED_REASON_NO_FEATURE_ENTITLEMENT_IN_SUBSCRIPTION)


class SingleFlightTests(TestCase):
    timeout = 30

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.h = await OnlineHarness(self, reactor).start(data.SEED)

    async def test_concurrent_misses_share_one_upstream_request(self):
        await self.h.faults(latency_ms=300)
        await self.h.admin("POST", "requests/reset")
        answers = await gatherResults([self.h.call("GetBooleanEntitlement", boolean("acme", "sso")) for _ in range(10)])
        self.assertTrue(all(a.has_access and not a.is_fallback for a in answers))
        counts = await self.h.requests()
        self.assertEqual(counts.get("/v1/c/{customerId}/entitlements-state.json"), 1)


class MissRacingALandedFetchTests(TestCase):
    """A reader peeks once; a fetch that lands between its missed peek and its crossing to the
    reactor has stored the entry, and the crossing answers that instead of asking Stigg again."""

    timeout = 30

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.h = await OnlineHarness(self, reactor).start(data.SEED)

    async def test_a_lookup_after_the_entry_was_stored_asks_stigg_nothing(self):
        await self.h.call("GetBooleanEntitlement", boolean("acme", "sso"))
        await self.h.admin("POST", "requests/reset")
        # The reader's peek missed just before the entry was stored: it looks up (on its thread).
        entry = await deferToThread(self.h.parts.source.lookup, "acme", None, 5.0)
        self.assertIsNotNone(entry)
        counts = await self.h.requests()
        self.assertIsNone(counts.get("/v1/c/{customerId}/entitlements-state.json"))


class EdgeOffTests(TestCase):
    timeout = 30

    async def test_graphql_serves_reads_when_edge_is_off(self):
        h = await OnlineHarness(self, reactor).start(data.SEED, EDGE_ENABLED="0")
        r = await h.call("GetMeteredEntitlement", metered("acme", "api-calls", 1))
        self.assertTrue(r.has_access)
        counts = await h.requests()
        self.assertEqual(counts.get("GetEntitlementsState"), 1)
        self.assertEqual(counts.get("GetSdkConfiguration"), 1)
        self.assertNotIn("/v1/c/{customerId}/entitlements-state.json", counts)


class CacheBoundOverGrpcTests(TestCase):
    timeout = 60

    async def test_byte_budget_holds_while_many_customers_churn(self):
        seed = {"apiKeys": ["test-key"], "customers": {f"c{i}": data.ACME for i in range(40)}}
        h = await OnlineHarness(self, reactor).start(seed, CACHE_MAX_SIZE_BYTES="60000")
        cache = h.parts.online.cache
        for _round in range(2):
            for i in range(40):
                r = await h.call("GetMeteredEntitlement", metered(f"c{i}", "api-calls", 10))
                self.assertEqual((r.has_access, r.is_fallback), (True, False))
                self.assertLessEqual(cache.bytes, 60000)
        self.assertLess(len(cache), 40)
        self.assertGreater(cache.evictions, 0)


class SlowUpstreamTests(TestCase):
    timeout = 30

    async def test_misses_past_the_waiting_limit_answer_at_once_and_cached_reads_flow(self):
        seed = {"apiKeys": ["test-key"], "customers": {f"c{i}": data.ACME for i in range(4)}}
        # One thread runs calls; two misses may wait on Stigg. The waiting ones hand the running
        # role on, so the cached read is answered while both wait.
        h = await OnlineHarness(self, reactor).start(
            seed, GRPC_MAX_WORKERS="1", MAX_WAITING_READS="2", ENTITLEMENTS_TIMEOUT_MS="5000"
        )
        await h.call("GetBooleanEntitlement", boolean("c0", "sso"))
        await h.faults(latency_ms=1500)
        slow = [h.call("GetBooleanEntitlement", boolean(c, "sso")) for c in ("c1", "c2")]
        waiting = h.parts.online.waiting_reads

        async def both_waiting():
            return waiting.in_use == 2

        await h.wait_until(both_waiting)
        third = await h.call("GetBooleanEntitlement", boolean("c3", "sso"))
        self.assertTrue(third.is_fallback)
        cached = await h.call("GetBooleanEntitlement", boolean("c0", "sso"))
        self.assertEqual((cached.has_access, cached.is_fallback), (True, False))
        self.assertEqual(waiting.in_use, 2)  # both still waiting: the answers above did not queue behind them
        self.assertEqual([r.is_fallback for r in await gatherResults(slow)], [False, False])
        registry = h.parts.metrics.registry
        self.assertEqual(registry.get_sample_value("sidecar_fast_failed_reads_total", {"reason": "overloaded"}), 1)
        # the fallback's customer was fetched in the background all the same
        async def fetched():
            r = await h.call("GetBooleanEntitlement", boolean("c3", "sso"))
            return not r.is_fallback

        await h.wait_until(fetched, timeout=5)
