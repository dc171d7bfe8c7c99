"""All twelve RPCs through Stigg's official client (stigg-sidecar-sdk 8.1.0) against a real
`twistd -n stigg-sidecar` process in OFFLINE mode, asserted field by field."""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime

import stigg_sidecar_sdk as sdk
from twisted.trial.unittest import SynchronousTestCase

from tests.fixtures.clients import run_async
from tests.fixtures.processes import base_env, shared_sidecar

FALLBACKS = {
    "feature-seats": {"hasAccess": True, "value": 5, "isUnlimited": False},
    "feature-api-calls": {"hasAccess": True, "usageLimit": 1000},
    "feature-sso": {"hasAccess": False},
    "feature-region": {"hasAccess": True, "enumValues": ["us", "eu"]},
}

R = sdk.AccessDeniedReason


class OfficialClientOfflineTests(SynchronousTestCase):
    """One sidecar process for the class; each test drives one RPC."""

    def setUp(self):
        self.sidecar = shared_sidecar("offline", base_env(OFFLINE="1", ENTITLEMENTS_FALLBACK=json.dumps(FALLBACKS)))

    def call(self, method: str, request):
        async def go():
            client = sdk.Stigg(
                sdk.ApiConfig(api_key="unused-offline"),
                remote_sidecar_host="127.0.0.1",
                remote_sidecar_port=self.sidecar.grpc_port,
            )
            try:
                return await getattr(client, method)(request)
            finally:
                client.close()

        return run_async(go())

    def test_boolean_denied_fallback_says_unknown(self):
        r = self.call("get_boolean_entitlement", sdk.GetBooleanEntitlementRequest(customer_id="c1", feature_id="feature-sso"))
        self.assertFalse(r.has_access)
        self.assertTrue(r.is_fallback)
        self.assertEqual(r.access_denied_reason, R.ACCESS_DENIED_REASON_UNKNOWN)
        self.assertEqual(r.entitlement.feature.id, "feature-sso")
        self.assertEqual(r.entitlement.feature.feature_type, sdk.FeatureType.FEATURE_TYPE_BOOLEAN)

    def test_boolean_request_fallback_replaces_configured_one(self):
        r = self.call(
            "get_boolean_entitlement",
            sdk.GetBooleanEntitlementRequest(
                customer_id="c1",
                feature_id="feature-sso",
                options=sdk.BooleanEntitlementOptions(fallback=sdk.BooleanEntitlementFallback(has_access=True)),
            ),
        )
        self.assertTrue(r.has_access)
        self.assertTrue(r.is_fallback)
        self.assertIsNone(r.access_denied_reason)

    def test_unknown_feature_denies_without_a_fallback(self):
        r = self.call("get_boolean_entitlement", sdk.GetBooleanEntitlementRequest(customer_id="c1", feature_id="nope"))
        self.assertFalse(r.has_access)
        self.assertTrue(r.is_fallback)
        self.assertEqual(r.access_denied_reason, R.ACCESS_DENIED_REASON_UNKNOWN)

    def test_numeric_answers_configured_value(self):
        r = self.call("get_numeric_entitlement", sdk.GetNumericEntitlementRequest(customer_id="c1", feature_id="feature-seats"))
        self.assertTrue(r.has_access)
        self.assertTrue(r.is_fallback)
        self.assertIsNone(r.access_denied_reason)
        self.assertEqual(r.entitlement.value, 5)
        self.assertFalse(r.entitlement.is_unlimited)
        self.assertEqual(r.entitlement.feature.feature_type, sdk.FeatureType.FEATURE_TYPE_NUMBER)

    def test_metered_echoes_requested_usage_and_limit(self):
        r = self.call(
            "get_metered_entitlement",
            sdk.GetMeteredEntitlementRequest(
                customer_id="c1", feature_id="feature-api-calls", options=sdk.MeteredEntitlementOptions(requested_usage=3)
            ),
        )
        self.assertTrue(r.has_access)
        self.assertTrue(r.is_fallback)
        self.assertEqual(r.requested_usage, 3)
        self.assertEqual(r.entitlement.usage_limit, 1000)
        self.assertEqual(r.entitlement.current_usage, 0)
        self.assertTrue(r.entitlement.feature.is_metered)

    def test_metered_request_fallback_with_limit(self):
        r = self.call(
            "get_metered_entitlement",
            sdk.GetMeteredEntitlementRequest(
                customer_id="c1",
                feature_id="feature-unknown",
                options=sdk.MeteredEntitlementOptions(
                    fallback=sdk.MeteredEntitlementFallback(has_access=True, usage_limit=7, is_unlimited=False)
                ),
            ),
        )
        self.assertTrue(r.has_access)
        self.assertEqual(r.entitlement.usage_limit, 7)
        self.assertEqual(r.requested_usage, 0)

    def test_enum_answers_configured_values_and_echoes_request(self):
        r = self.call(
            "get_enum_entitlement",
            sdk.GetEnumEntitlementRequest(
                customer_id="c1", feature_id="feature-region", options=sdk.EnumEntitlementOptions(requested_values=["us"])
            ),
        )
        self.assertTrue(r.has_access)
        self.assertTrue(r.is_fallback)
        self.assertEqual(r.requested_values, ["us"])
        self.assertEqual(r.entitlement.enum_values, ["us", "eu"])

    def test_generic_check_takes_its_type_from_the_fallback(self):
        r = self.call("get_entitlement", sdk.GetEntitlementRequest(customer_id="c1", feature_id="feature-seats"))
        self.assertTrue(r.has_access)
        self.assertTrue(r.is_fallback)
        self.assertEqual(r.numeric.value, 5)
        r = self.call("get_entitlement", sdk.GetEntitlementRequest(customer_id="c1", feature_id="feature-none"))
        self.assertFalse(r.has_access)
        self.assertEqual(r.access_denied_reason, R.ACCESS_DENIED_REASON_UNKNOWN)
        self.assertEqual(r.boolean.feature.id, "feature-none")

    def test_v2_feature_and_credit(self):
        r = self.call(
            "get_entitlement_v2", sdk.GetEntitlementV2Request(customer_id="c1", feature_id="feature-api-calls")
        ).entitlement
        self.assertTrue(r.has_access)
        self.assertTrue(r.is_fallback)
        self.assertEqual(r.metered.usage_limit, 1000)
        r = self.call("get_entitlement_v2", sdk.GetEntitlementV2Request(customer_id="c1", currency_id="credits")).entitlement
        self.assertFalse(r.has_access)
        self.assertTrue(r.is_fallback)
        self.assertEqual(r.access_denied_reason, R.ACCESS_DENIED_REASON_UNKNOWN)
        self.assertEqual(r.credit.currency.currency_id, "credits")

    def test_get_entitlements_lists_one_fallback_per_configured_feature(self):
        r = self.call("get_entitlements", sdk.GetEntitlementsRequest(customer_id="c1"))
        self.assertIsNone(r.access_denied_reason)
        by_id = {}
        for e in r.entitlements:
            kind, typed = next((k, v) for k in ("boolean", "numeric", "metered", "enum") if (v := getattr(e, k)).feature)
            by_id[typed.feature.id] = (kind, typed)
        self.assertEqual(
            {k: v[0] for k, v in by_id.items()},
            {"feature-seats": "numeric", "feature-api-calls": "metered", "feature-sso": "boolean", "feature-region": "enum"},
        )
        self.assertEqual(by_id["feature-seats"][1].value, 5)
        self.assertEqual(by_id["feature-region"][1].enum_values, ["us", "eu"])

    def test_state_v2_marks_every_item_fallback(self):
        r = self.call("get_entitlements_state_v2", sdk.GetEntitlementsStateV2Request(customer_id="c1"))
        self.assertEqual(len(r.entitlements), 4)
        self.assertTrue(all(e.is_fallback for e in r.entitlements))
        access = {next(getattr(e, k).feature.id for k in ("boolean", "numeric", "metered", "enum") if getattr(e, k).feature): e.has_access for e in r.entitlements}
        self.assertEqual(access, {"feature-seats": True, "feature-api-calls": True, "feature-sso": False, "feature-region": True})

    def test_report_usage_acknowledges_with_random_id(self):
        request = sdk.ReportUsageRequest(
            customer_id="c1",
            feature_id="feature-api-calls",
            resource_id="r1",
            value=2,
            update_behavior=sdk.UsageUpdateBehavior.USAGE_UPDATE_BEHAVIOR_SET,
            dimensions={"region": sdk.EventDimensionValue(string_value="eu")},
            timestamp=datetime(2026, 11, 1, tzinfo=UTC),
        )
        first = self.call("report_usage", request)
        second = self.call("report_usage", request)
        self.assertEqual((first.customer_id, first.feature_id, first.resource_id), ("c1", "feature-api-calls", "r1"))
        self.assertEqual(len(first.measurement_id), 21)
        self.assertNotEqual(first.measurement_id, second.measurement_id)
        self.assertIsNone(first.current_usage)

    def test_report_usage_bulk_acknowledges_each(self):
        r = self.call(
            "report_usage_bulk",
            sdk.ReportUsageBulkRequest(
                usages=[sdk.ReportUsageRequest(customer_id=f"c{i}", feature_id="f", value=i) for i in range(3)]
            ),
        )
        self.assertEqual([u.customer_id for u in r.usages], ["c0", "c1", "c2"])
        self.assertEqual(len({u.measurement_id for u in r.usages}), 3)

    def test_report_events_returns_empty(self):
        r = self.call(
            "report_events",
            sdk.ReportEventsRequest(events=[sdk.Event(event_name="call", customer_id="c1", idempotency_key="k1")]),
        )
        self.assertEqual(bytes(r), b"")

    def test_reload_says_entity_exists(self):
        r = self.call("reload_entitlements", sdk.ReloadEntitlementsRequest(customer_id="c1"))
        self.assertTrue(r.entitled_entity_exists)

    def test_health_and_readiness_over_http(self):
        for path in ("livez", "readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.sidecar.http_port}/{path}", timeout=5) as response:
                self.assertEqual(response.status, 200)
                self.assertEqual(response.headers["content-type"], "application/json")
                self.assertEqual(json.loads(response.read()), {"status": "UP"})
