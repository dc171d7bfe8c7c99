"""Stigg's Redis format: key layout, the JSON under each key as Stigg's writers leave it, round trips."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.cache.redis.format import (
    EntryKeys,
    FormatError,
    LegacyFormat,
    changes_channel,
    decode_change,
    decode_entitlements,
    decode_from,
    encode_change,
    encode_entry,
    encode_fetch_result,
    fetch_succeeded,
    timestamp_key,
)
from stigg_sidecar.entitlements.fields import freeze_json
from stigg_sidecar.entitlements.records import (
    CreditEntitlement,
    CreditRate,
    Currency,
    CustomerEntry,
    Feature,
    FeatureEntitlement,
    Usage,
)
from stigg_sidecar.upstream.wire import entry_from_state
from tests.fixtures.edge import boolean_item, credit_item, metered_item, state
from tests.fixtures.redis import as_store

NOW = 1_792_000_000_000
ENTITLEMENTS_AT = 1_790_935_200_000  # 2026-10-02T10:00:00Z, metered_item's entitlementUpdatedAt
USAGE_AT = 1_791_021_600_000  # 2026-10-03T10:00:00Z, metered_item's usageUpdatedAt
CREDIT_USAGE_AT = 1_791_158_400_000  # 2026-10-05T00:00:00Z


def sample_entry(resource_id: str | None = None, reason: str | None = None) -> CustomerEntry:
    items = state(metered_item(), boolean_item(), credit_item(), reason=reason)
    return entry_from_state("cust-1", resource_id, items, NOW)


class KeyNameTests(SynchronousTestCase):
    def test_customer_entry_keys(self) -> None:
        keys = EntryKeys("prod", "cust-1")
        self.assertEqual(keys.entitlements, "prod:c_cust-1")
        self.assertEqual(keys.metadata, "prod:c_cust-1:metadata")
        self.assertEqual(keys.usage("FEATURE", "api-calls"), "prod:c_cust-1:f_api-calls")
        self.assertEqual(keys.usage("CREDIT", "tokens"), "prod:c_cust-1:credit_tokens")
        self.assertEqual(timestamp_key(keys.metadata), "prod:c_cust-1:metadata#timestamp")

    def test_resource_entry_keys_and_the_customer_timestamp(self) -> None:
        keys = EntryKeys("prod", "cust-1", "site-9")
        self.assertEqual(keys.entitlements, "prod:c_cust-1:r_site-9")
        self.assertEqual(keys.usage("FEATURE", "x"), "prod:c_cust-1:r_site-9:f_x")
        self.assertEqual(keys.customer_timestamp, "prod:c_cust-1#timestamp")

    def test_fetch_lock_and_channel_names(self) -> None:
        self.assertEqual(
            EntryKeys("prod", "cust-1").fetch_lock, "prod:refetchEntityEntitlementsAfterCacheMiss-cust-1"
        )
        self.assertEqual(
            EntryKeys("prod", "cust-1", "site-9").fetch_channel,
            "prod:refetchEntityEntitlementsAfterCacheMiss:cust-1:site-9",
        )
        self.assertEqual(changes_channel("prod"), "prod:sidecar:changes")

    def test_unknown_usage_kind_is_refused(self) -> None:
        self.assertRaises(ValueError, EntryKeys("prod", "c").usage, "SEAT", "x")


class EncodeTests(SynchronousTestCase):
    def test_items_are_entitlements_metadata_then_usage_of_metered_features_and_credits(self) -> None:
        items = encode_entry("prod", sample_entry())
        self.assertEqual(
            [i.key for i in items],
            [
                "prod:c_cust-1",
                "prod:c_cust-1:metadata",
                "prod:c_cust-1:f_feature-api-calls",
                "prod:c_cust-1:credit_cred-tokens",
            ],
        )

    def test_entitlements_and_metadata_carry_the_entry_timestamp_usage_its_own(self) -> None:
        entry = sample_entry()
        self.assertEqual(entry.timestamp, ENTITLEMENTS_AT)
        stamps = [i.timestamp for i in encode_entry("prod", entry)]
        self.assertEqual(stamps, [ENTITLEMENTS_AT, ENTITLEMENTS_AT, USAGE_AT, CREDIT_USAGE_AT])

    def test_entitlements_value_is_stiggs_map_keyed_by_feature_refid(self) -> None:
        value = json.loads(encode_entry("prod", sample_entry())[0].value)
        self.assertEqual(set(value), {"feature-api-calls", "feature-sso", "credit:cred-tokens"})
        metered = value["feature-api-calls"]
        calculated = metered["calculatedEntitlement"]
        self.assertEqual(calculated["type"], "FEATURE")
        self.assertEqual(calculated["feature"]["id"], "feature-api-calls")
        self.assertEqual(calculated["feature"]["meterType"], "Incremental")
        self.assertEqual(calculated["usageLimit"], 1000)
        # 3.x reads the period from featureUsage; 4.x's migration moves it into calculatedEntitlement
        self.assertEqual(calculated["resetPeriod"], metered["featureUsage"]["resetPeriod"])
        self.assertEqual(calculated["usagePeriodAnchor"], metered["featureUsage"]["usagePeriodAnchor"])
        self.assertEqual(metered["featureUsage"]["currentUsage"], 42.0)
        self.assertNotIn("usageData", metered)
        credit = value["credit:cred-tokens"]["calculatedEntitlement"]
        self.assertEqual(credit["type"], "CREDIT")
        self.assertNotIn("feature", credit)  # a 3.x reader never takes it for a feature
        self.assertEqual(credit["currency"]["additionalMetaData"], {"tier": "gold", "limits": [1, 2]})

    def test_a_boolean_feature_keeps_its_static_usage_inline(self) -> None:
        value = json.loads(encode_entry("prod", sample_entry())[0].value)
        self.assertEqual(value["feature-sso"]["featureUsage"]["currentUsage"], 0.0)
        self.assertNotIn("usageLimit", value["feature-sso"]["calculatedEntitlement"])  # null left out

    def test_an_empty_entry_is_an_empty_object(self) -> None:
        entry = entry_from_state("cust-1", None, state(reason="CustomerNotFound"), NOW)
        self.assertEqual(encode_entry("prod", entry)[0].value, "{}")

    def test_metadata_and_usage_values(self) -> None:
        items = encode_entry("prod", sample_entry(reason="NoActiveSubscription"))
        self.assertEqual(json.loads(items[1].value), {"accessDeniedReason": "NoActiveSubscription"})
        self.assertEqual(
            json.loads(items[2].value),
            {"currentUsage": 42.0, "usagePeriodStart": 1_790_812_800_000, "usagePeriodEnd": 1_793_491_200_000},
        )
        self.assertEqual(  # null fields are left out, as 3.x writes them
            json.loads(items[3].value), {"currentUsage": 120.5, "usagePeriodEnd": 1_793_491_200_000}
        )


class DecodeTests(SynchronousTestCase):
    def test_round_trip_of_a_fetched_entry(self) -> None:
        entry = sample_entry(reason="NoActiveSubscription")
        self.assertEqual(decode_from("prod", "cust-1", None, as_store("prod", entry).get), entry)

    def test_round_trip_of_a_resource_entry(self) -> None:
        entry = sample_entry("site-9")
        self.assertEqual(decode_from("prod", "cust-1", "site-9", as_store("prod", entry).get), entry)

    def test_missing_entitlements_or_timestamp_is_a_miss(self) -> None:
        store = as_store("prod", sample_entry())
        del store["prod:c_cust-1#timestamp"]
        self.assertIsNone(decode_from("prod", "cust-1", None, store.get))
        self.assertIsNone(decode_from("prod", "cust-2", None, store.get))

    def test_any_missing_usage_key_is_a_miss(self) -> None:
        for gone in ("prod:c_cust-1:f_feature-api-calls", "prod:c_cust-1:credit_cred-tokens#timestamp"):
            store = as_store("prod", sample_entry())
            del store[gone]
            self.assertIsNone(decode_from("prod", "cust-1", None, store.get), gone)

    def test_missing_metadata_means_no_reason(self) -> None:
        store = as_store("prod", sample_entry(reason="Revoked"))
        del store["prod:c_cust-1:metadata"]
        entry = decode_from("prod", "cust-1", None, store.get)
        assert entry is not None
        self.assertIsNone(entry.access_denied_reason)

    def test_usage_lives_in_the_usage_key_and_its_timestamp(self) -> None:
        store = as_store("prod", sample_entry())
        store["prod:c_cust-1:f_feature-api-calls"] = '{"currentUsage":7,"usagePeriodStart":null,"usagePeriodEnd":null}'
        store["prod:c_cust-1:f_feature-api-calls#timestamp"] = "1800000000000"
        entry = decode_from("prod", "cust-1", None, store.get)
        assert entry is not None
        self.assertEqual(entry.features["feature-api-calls"].usage, Usage(7.0, None, None, 1_800_000_000_000))

    def test_garbage_is_a_format_error(self) -> None:
        for text in ("not json", "[]", '{"x": 1}', '{"x": {"featureUsage": {}}}'):
            self.assertRaises(FormatError, decode_entitlements, text)
        bad_record = '{"x":{"calculatedEntitlement":{"type":"FEATURE","feature":{"id":3}}}}'
        self.assertRaises(FormatError, decode_entitlements, bad_record)

    def test_this_projects_earlier_v1_envelope_is_a_legacy_miss(self) -> None:
        self.assertRaises(LegacyFormat, decode_entitlements, '{"v":1,"entitlements":{}}')

    def test_an_unknown_record_type_and_unknown_fields_are_skipped(self) -> None:
        stored = decode_entitlements('{"s_x":{"calculatedEntitlement":{"type":"SEAT"}},'
                                     '"y":{"calculatedEntitlement":{"enumValues":[]}}}')
        self.assertEqual((stored.features, stored.credits), ((), ()))
        stored = decode_entitlements(
            '{"sso":{"calculatedEntitlement":{"feature":{"id":"sso","featureType":"BOOLEAN","new":1},'
            '"brandNew":true},"featureUsage":{"currentUsage":0},"extra":{}}}'
        )
        self.assertEqual(stored.features[0].feature.id, "sso")

    def test_an_empty_entry_round_trips(self) -> None:
        entry = entry_from_state("cust-1", None, state(reason="CustomerNotFound"), NOW)
        self.assertEqual(decode_from("prod", "cust-1", None, as_store("prod", entry).get), entry)


class StiggWritersTests(SynchronousTestCase):
    """Values as Stigg's own writers leave them (shapes from their published code)."""

    SDK3 = {  # Node SDK 3.95.0: CacheMapper + JSON.stringify (undefined left out, no type, no metadata)
        "prod:c_cust-1": json.dumps({
            "api-calls": {
                "calculatedEntitlement": {
                    "feature": {"id": "api-calls", "featureType": "NUMBER", "meterType": "Incremental",
                                "units": "", "unitsPlural": ""},
                    "usageLimit": 1000, "hasUnlimitedUsage": False, "hasSoftLimit": False, "enumValues": [],
                },
                "featureUsage": {"resetPeriod": "MONTH", "currentUsage": 40,
                                 "usagePeriodAnchor": 1_767_225_600_000,
                                 "usagePeriodStart": 1_790_812_800_000, "usagePeriodEnd": 1_793_491_200_000},
            },
            "seats": {
                "calculatedEntitlement": {
                    "feature": {"id": "seats", "featureType": "NUMBER", "meterType": "None", "units": "",
                                "unitsPlural": ""},
                    "usageLimit": 5, "hasUnlimitedUsage": False, "hasSoftLimit": False, "enumValues": [],
                    "validUntil": 1_893_456_000_000,
                },
                "featureUsage": {"currentUsage": 0},
            },
        }),
        "prod:c_cust-1#timestamp": str(ENTITLEMENTS_AT),
        "prod:c_cust-1:f_api-calls": '{"currentUsage":42,"usagePeriodStart":1790812800000,"usagePeriodEnd":1793491200000}',
        "prod:c_cust-1:f_api-calls#timestamp": str(USAGE_AT),
    }

    def test_node_sdk_3_entries_are_read(self) -> None:
        entry = decode_from("prod", "cust-1", None, self.SDK3.get)
        assert entry is not None
        metered = entry.features["api-calls"]
        self.assertEqual((metered.usage_limit, metered.reset_period), (1000, "MONTH"))
        self.assertEqual(metered.usage_period_anchor, 1_767_225_600_000)
        self.assertEqual(metered.usage, Usage(42.0, 1_790_812_800_000, 1_793_491_200_000, USAGE_AT))
        self.assertEqual(metered.updated_at, ENTITLEMENTS_AT)  # 3.x stores none: the entry's time
        self.assertEqual(entry.features["seats"].valid_until, 1_893_456_000_000)
        self.assertIsNone(entry.access_denied_reason)

    def test_cache_redis_store_1_29_entries_are_read(self) -> None:
        store = {
            "prod:c_cust-1": json.dumps({
                "api-calls": {
                    "calculatedEntitlement": {
                        "type": "FEATURE",
                        "feature": {"id": "api-calls", "featureType": "NUMBER", "meterType": "Fluctuating",
                                    "displayName": "API calls"},
                        "usageLimit": 10, "hasUnlimitedUsage": False, "hasSoftLimit": True,
                        "resetPeriod": "DAY", "usagePeriodAnchor": "2026-01-01T00:00:00.000Z",
                    },
                    "usageData": {"currentUsage": 1, "updatedAt": 5},
                },
                "anything": {
                    "calculatedEntitlement": {"type": "CREDIT", "currency": {"currencyId": "tokens"},
                                              "usageLimit": 100},
                },
            }),
            "prod:c_cust-1#timestamp": "1000",
            "prod:c_cust-1:metadata": '{"accessDeniedReason":null}',
            "prod:c_cust-1:f_api-calls": '{"currentUsage":3,"nextResetDate":1793491200000}',
            "prod:c_cust-1:f_api-calls#timestamp": "2000",
            "prod:c_cust-1:credit_tokens": '{"currentUsage":7.5}',
            "prod:c_cust-1:credit_tokens#timestamp": "3000",
        }
        entry = decode_from("prod", "cust-1", None, store.get)
        assert entry is not None
        metered = entry.features["api-calls"]
        self.assertEqual((metered.has_soft_limit, metered.reset_period), (True, "DAY"))
        self.assertEqual(metered.usage_period_anchor, 1_767_225_600_000)
        self.assertEqual(metered.usage, Usage(3.0, None, 1_793_491_200_000, 2000))
        credit = entry.credits["tokens"]
        self.assertEqual((credit.usage_limit, credit.current_usage, credit.usage_updated_at), (100, 7.5, 3000))

    def test_a_3x_entry_missing_its_usage_key_is_a_miss(self) -> None:
        store = {k: v for k, v in self.SDK3.items() if ":f_" not in k}
        self.assertIsNone(decode_from("prod", "cust-1", None, store.get))


class MessageTests(SynchronousTestCase):
    def test_peer_change_round_trips(self) -> None:
        self.assertEqual(decode_change(encode_change("c_x", "abc", "usage")), ("c_x", "abc", "usage"))
        self.assertIsNone(decode_change("nope"))
        self.assertIsNone(decode_change('{"key":1}'))

    def test_fetch_results(self) -> None:
        self.assertEqual(encode_fetch_result(None), "{}")
        self.assertTrue(fetch_succeeded(encode_fetch_result(None)))
        self.assertFalse(fetch_succeeded(encode_fetch_result("boom")))
        self.assertFalse(fetch_succeeded("garbage"))


# --------------------------------------------------------------------------- property

ids = st.text(min_size=1, max_size=10)
opt_text = st.none() | st.text(max_size=10)
epoch_ms = st.integers(min_value=0, max_value=4_102_444_800_000)
opt_ms = st.none() | epoch_ms
finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
features = st.builds(
    Feature,
    id=ids,
    feature_type=st.sampled_from(["BOOLEAN", "NUMBER", "ENUM"]),
    meter_type=st.sampled_from([None, "None", "Fluctuating", "Incremental"]),
    units=opt_text,
    units_plural=opt_text,
    display_name=opt_text,
    description=opt_text,
)
feature_entitlements = st.builds(
    FeatureEntitlement,
    feature=features,
    usage_limit=st.none() | finite,
    has_unlimited_usage=st.booleans(),
    has_soft_limit=st.booleans(),
    access_denied_reason=st.none() | st.sampled_from(["Revoked", "RequestedUsageExceedingLimit", "Unknown"]),
    enum_values=st.lists(st.text(max_size=5), max_size=3).map(tuple),
    valid_until=opt_ms,
    usage_period_anchor=opt_ms,
    reset_period=st.none() | st.sampled_from(["HOUR", "DAY", "WEEK", "MONTH", "YEAR"]),
    credit_rate=st.none() | st.builds(CreditRate, amount=finite, currency_id=ids),
    updated_at=epoch_ms,
    usage=st.builds(
        Usage, current_usage=finite, usage_period_start=opt_ms, usage_period_end=opt_ms, updated_at=epoch_ms
    ),
)
credit_entitlements = st.builds(
    CreditEntitlement,
    currency=st.builds(
        Currency,
        currency_id=ids,
        display_name=opt_text,
        description=opt_text,
        unit_singular=opt_text,
        unit_plural=opt_text,
        additional_meta_data=st.none() | st.dictionaries(st.text(max_size=4), json_values, max_size=3).map(freeze_json),
    ),
    usage_limit=finite,
    current_usage=finite,
    has_soft_limit=st.booleans(),
    access_denied_reason=opt_text,
    usage_period_end=opt_ms,
    valid_until=opt_ms,
    updated_at=epoch_ms,
    usage_updated_at=epoch_ms,
)
entries = st.builds(
    lambda customer, resource, reason, fs, cs, stamp: CustomerEntry(
        customer,
        resource,
        reason,
        {f.feature.id: f for f in fs},
        {c.currency.currency_id: c for c in cs},
        stamp,
    ),
    ids,
    st.none() | ids,
    st.none() | st.sampled_from(["CustomerNotFound", "NoActiveSubscription", "CustomerIsArchived"]),
    st.lists(feature_entitlements, max_size=5),
    st.lists(credit_entitlements, max_size=3),
    epoch_ms,
)


class RoundTripPropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(entries, st.sampled_from(["prod", "env:eu-1", "p"]))
    def test_decode_of_encode_is_the_entry(self, entry: CustomerEntry, prefix: str) -> None:
        store = as_store(prefix, entry)
        self.assertEqual(decode_from(prefix, entry.customer_id, entry.resource_id, store.get), entry)
