"""Cached records: parsing the API's entitlementsState, sizes, usage updates, newer-wins."""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import FrozenInstanceError, fields, replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.entitlements.changes import apply_usage, newer_or_equal
from stigg_sidecar.entitlements.fields import thaw_json
from stigg_sidecar.entitlements.records import (
    CreditEntitlement,
    Currency,
    CustomerEntry,
    Feature,
    FeatureEntitlement,
    Usage,
    cache_key,
)
from stigg_sidecar.entitlements.sizing import entry_bytes
from stigg_sidecar.upstream.wire import MalformedState, entry_from_state
from tests.fixtures.edge import NOV_1, NOW, OCT_1, boolean_item, credit_item, metered_item, state


class CacheKeyTests(SynchronousTestCase):
    def test_customer_key(self) -> None:
        self.assertEqual(cache_key("cust-1", None), "c_cust-1")

    def test_resource_key(self) -> None:
        self.assertEqual(cache_key("cust-1", "site-9"), "c_cust-1:r_site-9")

    def test_empty_resource_means_none(self) -> None:
        self.assertEqual(cache_key("cust-1", ""), "c_cust-1")

    def test_entry_knows_its_key(self) -> None:
        self.assertEqual(CustomerEntry("cust-1", "site-9").key, "c_cust-1:r_site-9")


class EntryFromStateTests(SynchronousTestCase):
    def test_parses_metered_feature_entitlement(self) -> None:
        entry = entry_from_state("cust-1", None, state(metered_item()), NOW)
        ent = entry.features["feature-api-calls"]
        self.assertEqual(
            ent.feature,
            Feature("feature-api-calls", "NUMBER", "Incremental", "call", "calls", "API calls", "API calls"),
        )
        self.assertTrue(ent.feature.is_metered)
        self.assertEqual(ent.usage_limit, 1000.0)
        self.assertEqual(ent.reset_period, "MONTH")
        self.assertEqual(ent.usage_period_anchor, 1_767_225_600_000)
        self.assertEqual(ent.updated_at, 1_790_935_200_000)  # 2026-10-02T10:00Z
        self.assertEqual(ent.usage, Usage(42.0, OCT_1, NOV_1, 1_791_021_600_000))  # usageUpdatedAt
        self.assertIsNone(ent.access_denied_reason)
        self.assertEqual(ent.enum_values, ())

    def test_parses_boolean_with_nulls(self) -> None:
        ent = entry_from_state("cust-1", None, state(boolean_item()), NOW).features["feature-sso"]
        self.assertEqual(ent.feature.feature_type, "BOOLEAN")
        self.assertFalse(ent.feature.is_metered)
        self.assertIsNone(ent.usage_limit)
        self.assertFalse(ent.has_soft_limit)
        self.assertEqual(ent.usage.current_usage, 0.0)
        # No usageUpdatedAt: the usage is as recent as the entitlement.
        self.assertEqual(ent.usage.updated_at, ent.updated_at)

    def test_parses_enum_values_and_credit_rate(self) -> None:
        item = boolean_item(
            "feature-region",
            enumValues=["eu", "us"],
            creditRate={"__typename": "CreditRate", "amount": 2.5, "currencyId": "cred-tokens"},
        )
        item["feature"]["featureType"] = "ENUM"
        ent = entry_from_state("cust-1", None, state(item), NOW).features["feature-region"]
        self.assertEqual(ent.enum_values, ("eu", "us"))
        assert ent.credit_rate is not None
        self.assertEqual((ent.credit_rate.amount, ent.credit_rate.currency_id), (2.5, "cred-tokens"))

    def test_parses_credit_entitlement(self) -> None:
        credit = entry_from_state("cust-1", None, state(credit_item()), NOW).credits["cred-tokens"]
        self.assertEqual(credit.currency.currency_id, "cred-tokens")
        self.assertEqual(credit.currency.unit_plural, "tokens")
        self.assertEqual(credit.usage_limit, 500.0)
        self.assertEqual(credit.current_usage, 120.5)
        self.assertEqual(credit.remaining, 379.5)
        self.assertEqual(credit.usage_period_end, NOV_1)
        self.assertEqual(credit.valid_until, 1_798_761_600_000)
        self.assertGreater(credit.usage_updated_at, credit.updated_at)

    def test_credit_metadata_is_frozen_and_thaws_to_plain_json(self) -> None:
        currency = entry_from_state("cust-1", None, state(credit_item()), NOW).credits["cred-tokens"].currency
        assert currency.additional_meta_data is not None
        with self.assertRaises(TypeError):
            currency.additional_meta_data["tier"] = "silver"  # type: ignore[index]
        self.assertEqual(thaw_json(currency.additional_meta_data), {"tier": "gold", "limits": [1, 2]})

    def test_customer_level_reason_is_kept(self) -> None:
        entry = entry_from_state("ghost", None, state(reason="CustomerNotFound"), NOW)
        self.assertEqual(entry.access_denied_reason, "CustomerNotFound")
        self.assertEqual(dict(entry.features), {})

    def test_resource_id_is_kept(self) -> None:
        entry = entry_from_state("cust-1", "site-9", state(boolean_item()), NOW)
        self.assertEqual((entry.customer_id, entry.resource_id), ("cust-1", "site-9"))

    def test_feature_without_ref_id_is_skipped(self) -> None:
        nameless = boolean_item()
        del nameless["feature"]["refId"]
        featureless = boolean_item(feature=None)
        entry = entry_from_state("cust-1", None, state(nameless, featureless, boolean_item("feature-ok")), NOW)
        self.assertEqual(list(entry.features), ["feature-ok"])

    def test_unknown_typename_is_skipped(self) -> None:
        entry = entry_from_state("cust-1", None, state({"__typename": "FutureEntitlement"}, boolean_item()), NOW)
        self.assertEqual(list(entry.features), ["feature-sso"])

    def test_missing_optional_fields_are_tolerated(self) -> None:
        minimal = {"__typename": "FeatureEntitlement", "feature": {"refId": "f", "featureType": "BOOLEAN"}}
        ent = entry_from_state("cust-1", None, state(minimal), NOW).features["f"]
        self.assertEqual(ent.feature, Feature("f", "BOOLEAN"))
        self.assertEqual(ent.usage, Usage(0.0, None, None, NOW))

    def test_missing_entitlements_list_means_empty(self) -> None:
        entry = entry_from_state("cust-1", None, {"accessDeniedReason": "NoActiveSubscription"}, NOW)
        self.assertEqual(entry.timestamp, 0)
        self.assertEqual(entry.access_denied_reason, "NoActiveSubscription")

    def test_mappings_are_read_only(self) -> None:
        entry = entry_from_state("cust-1", None, state(boolean_item()), NOW)
        with self.assertRaises(TypeError):
            entry.features["x"] = entry.features["feature-sso"]  # type: ignore[index]
        with self.assertRaises(FrozenInstanceError):
            entry.timestamp = 5  # type: ignore[misc]

    def test_entry_does_not_share_the_callers_dict(self) -> None:
        features = {"f": FeatureEntitlement(Feature("f", "BOOLEAN"))}
        entry = CustomerEntry("cust-1", features=features)
        features.clear()
        self.assertEqual(list(entry.features), ["f"])


class TimestampRuleTests(SynchronousTestCase):
    def test_empty_list_is_epoch_zero(self) -> None:
        self.assertEqual(entry_from_state("cust-1", None, state(), NOW).timestamp, 0)

    def test_first_valid_entitlement_updated_at(self) -> None:
        first = boolean_item("a", entitlementUpdatedAt=None)
        second = boolean_item("b", entitlementUpdatedAt="2026-10-02T00:00:00Z")
        third = boolean_item("c", entitlementUpdatedAt="2026-10-09T00:00:00Z")
        entry = entry_from_state("cust-1", None, state(first, second, third), NOW)
        self.assertEqual(entry.timestamp, OCT_1 + 86_400_000)

    def test_unparseable_dates_are_not_valid(self) -> None:
        first = boolean_item("a", entitlementUpdatedAt="yesterday")
        second = boolean_item("b", entitlementUpdatedAt="2026-10-02T00:00:00.000Z")
        self.assertEqual(entry_from_state("cust-1", None, state(first, second), NOW).timestamp, OCT_1 + 86_400_000)

    def test_none_valid_uses_now(self) -> None:
        items = state(boolean_item("a", entitlementUpdatedAt=None), boolean_item("b", entitlementUpdatedAt="soon"))
        entry = entry_from_state("cust-1", None, items, NOW)
        self.assertEqual(entry.timestamp, NOW)
        # Entitlements without their own stamp take the entry's.
        self.assertEqual(entry.features["a"].updated_at, NOW)

    def test_naive_dates_are_utc(self) -> None:
        entry = entry_from_state("cust-1", None, state(boolean_item(entitlementUpdatedAt="2026-10-01T00:00:00")), NOW)
        self.assertEqual(entry.timestamp, OCT_1)

    def test_epoch_ms_numbers_are_accepted(self) -> None:
        entry = entry_from_state("cust-1", None, state(boolean_item(entitlementUpdatedAt=OCT_1)), NOW)
        self.assertEqual(entry.timestamp, OCT_1)


class MalformedStateTests(SynchronousTestCase):
    """A malformed whole raises; a malformed entitlement is left out and listed, the rest kept."""

    def assertMalformed(self, raw: Any, place: str) -> None:
        with self.assertRaises(MalformedState) as caught:
            entry_from_state("cust-1", None, raw, NOW)
        self.assertIn(place, str(caught.exception))
        self.assertIsInstance(caught.exception, ValueError)

    def assertItemMalformed(self, raw: Any, place: str, ref_id: str | None = "feature-api-calls") -> None:
        good = boolean_item("feature-kept")
        raw = {**raw, "entitlementsV2": [*raw["entitlementsV2"], good]}
        entry = entry_from_state("cust-1", None, raw, NOW)
        (malformed,) = entry.malformed
        self.assertIn(place, malformed.problem)
        self.assertEqual(malformed.ref_id, ref_id)
        self.assertEqual(list(entry.features), ["feature-kept"])
        self.assertEqual(dict(entry.credits), {})

    def test_state_not_an_object(self) -> None:
        self.assertMalformed(["nope"], "entitlementsState: must be an object")

    def test_entitlements_not_a_list(self) -> None:
        self.assertMalformed({"entitlementsV2": {"a": 1}}, "entitlementsState.entitlementsV2: must be a list")

    def test_item_not_an_object(self) -> None:
        entry = entry_from_state("cust-1", None, state(boolean_item(), "x"), NOW)
        self.assertEqual(list(entry.features), ["feature-sso"])
        self.assertIn("entitlementsState.entitlementsV2[1]: must be an object", entry.malformed[0].problem)

    def test_usage_overflowed_to_infinity_costs_one_entitlement(self) -> None:
        # Two reports of 1e308 upstream: Stigg's usage is inf, which JSON carries as 1e999.
        raw = json.loads(json.dumps(state(metered_item(currentUsage=1e308), boolean_item())).replace("1e+308", "1e999"))
        entry = entry_from_state("cust-1", None, raw, NOW)
        self.assertEqual(list(entry.features), ["feature-sso"])
        self.assertEqual(
            [(m.kind, m.ref_id) for m in entry.malformed], [("FEATURE", "feature-api-calls")]
        )
        self.assertIn("entitlementsV2[0].currentUsage: must be a finite number", entry.malformed[0].problem)

    def test_a_later_good_item_for_the_same_feature_wins(self) -> None:
        entry = entry_from_state("cust-1", None, state(metered_item(usageLimit="x"), metered_item()), NOW)
        self.assertEqual((list(entry.features), entry.malformed), (["feature-api-calls"], ()))

    def test_a_malformed_credit_is_listed_under_its_currency(self) -> None:
        entry = entry_from_state("cust-1", None, state(credit_item(usageLimit=[1])), NOW)
        self.assertEqual([(m.kind, m.ref_id) for m in entry.malformed], [("CREDIT", "cred-tokens")])

    def test_limit_of_wrong_type(self) -> None:
        self.assertItemMalformed(state(metered_item(usageLimit="1000")), "entitlementsV2[0].usageLimit")

    def test_boolean_is_not_a_number(self) -> None:
        self.assertItemMalformed(state(metered_item(currentUsage=True)), "entitlementsV2[0].currentUsage")

    def test_flag_of_wrong_type(self) -> None:
        self.assertItemMalformed(state(metered_item(hasSoftLimit="no")), "entitlementsV2[0].hasSoftLimit")

    def test_bad_period_date(self) -> None:
        self.assertItemMalformed(state(metered_item(usagePeriodEnd="next month")), "entitlementsV2[0].usagePeriodEnd")

    def test_feature_of_wrong_type(self) -> None:
        self.assertItemMalformed(state(boolean_item(feature="sso")), "entitlementsV2[0].feature: must be an object", None)

    def test_ref_id_of_wrong_type(self) -> None:
        item = boolean_item()
        item["feature"]["refId"] = 7
        self.assertItemMalformed(state(item), "entitlementsV2[0].feature.refId", None)

    def test_enum_values_of_wrong_type(self) -> None:
        self.assertItemMalformed(state(boolean_item(enumValues=[1, 2])), "entitlementsV2[0].enumValues", "feature-sso")

    def test_currency_of_wrong_type(self) -> None:
        self.assertItemMalformed(state(credit_item(currency=[])), "entitlementsV2[0].currency: must be an object", None)

    def test_customer_reason_of_wrong_type(self) -> None:
        self.assertMalformed({"entitlementsV2": [], "accessDeniedReason": 3}, "entitlementsState.accessDeniedReason")

    def test_non_finite_number(self) -> None:
        self.assertItemMalformed(state(metered_item(usageLimit=float("inf"))), "usageLimit")

    def test_number_too_large_for_a_float(self) -> None:
        self.assertItemMalformed(state(metered_item(usageLimit=10**400)), "entitlementsV2[0].usageLimit")


class SizeTests(SynchronousTestCase):
    def test_size_is_positive(self) -> None:
        self.assertGreater(CustomerEntry("cust-1").size, 0)

    def test_size_grows_with_content(self) -> None:
        empty = entry_from_state("cust-1", None, state(), NOW)
        one = entry_from_state("cust-1", None, state(boolean_item("a")), NOW)
        many = entry_from_state("cust-1", None, state(*(boolean_item(f"f-{i}") for i in range(50))), NOW)
        self.assertLess(empty.size, one.size)
        self.assertLess(one.size, many.size)
        # Fifty entitlements, each at least its own record (the feature definitions and plan
        # terms are shared by the process and not charged): a few kilobytes.
        self.assertGreater(many.size, 50 * 64)

    def test_size_counts_long_strings(self) -> None:
        short = entry_from_state("cust-1", None, state(boolean_item("f")), NOW)
        item = boolean_item("f")
        item["enumValues"] = ["x" * 10_000]
        long = entry_from_state("cust-1", None, state(item), NOW)
        self.assertGreater(long.size - short.size, 10_000)

    def test_feature_definitions_are_shared_between_customers_and_not_charged(self) -> None:
        item = boolean_item("shared-f")
        item["feature"]["description"] = "z" * 10_000
        first = entry_from_state("cust-1", None, state(item), NOW)
        second = entry_from_state("cust-2", None, state(item), NOW)
        self.assertIs(first.features["shared-f"].feature, second.features["shared-f"].feature)
        self.assertLess(second.size, 10_000)

    def test_shared_objects_are_counted_once(self) -> None:
        feature = Feature("f", "BOOLEAN", description="y" * 10_000)
        one = CustomerEntry("c", features={"a": FeatureEntitlement(feature)})
        two = CustomerEntry("c", features={"a": FeatureEntitlement(feature), "b": FeatureEntitlement(feature)})
        self.assertLess(two.size - one.size, 10_000)

    def test_size_is_not_compared(self) -> None:
        self.assertEqual(CustomerEntry("c"), CustomerEntry("c"))


class ApplyUsageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.entry = entry_from_state("cust-1", None, state(metered_item(), credit_item()), NOW)
        self.usage_at = self.entry.features["feature-api-calls"].usage.updated_at

    def test_newer_feature_usage_applies(self) -> None:
        updated = apply_usage(self.entry, "FEATURE", "feature-api-calls", Usage(77, OCT_1, NOV_1, self.usage_at + 1))
        assert updated is not None
        self.assertEqual(updated.features["feature-api-calls"].usage, Usage(77, OCT_1, NOV_1, self.usage_at + 1))
        self.assertEqual(updated.timestamp, self.entry.timestamp)
        # The original entry is untouched.
        self.assertEqual(self.entry.features["feature-api-calls"].usage.current_usage, 42)

    def test_equal_timestamp_applies(self) -> None:
        updated = apply_usage(self.entry, "FEATURE", "feature-api-calls", Usage(5, None, None, self.usage_at))
        assert updated is not None
        self.assertEqual(updated.features["feature-api-calls"].usage.current_usage, 5)

    def test_older_usage_is_ignored(self) -> None:
        self.assertIsNone(apply_usage(self.entry, "FEATURE", "feature-api-calls", Usage(5, None, None, self.usage_at - 1)))

    def test_unknown_entitlement_is_ignored(self) -> None:
        self.assertIsNone(apply_usage(self.entry, "FEATURE", "feature-nope", Usage(5, None, None, NOW)))
        self.assertIsNone(apply_usage(self.entry, "CREDIT", "cred-nope", Usage(5, None, None, NOW)))
        self.assertIsNone(apply_usage(self.entry, "SEAT", "feature-api-calls", Usage(5, None, None, NOW)))

    def test_credit_usage_applies_and_ignores_start(self) -> None:
        stamp = self.entry.credits["cred-tokens"].usage_updated_at + 10
        updated = apply_usage(self.entry, "CREDIT", "cred-tokens", Usage(499, OCT_1, NOV_1 + 1, stamp))
        assert updated is not None
        credit = updated.credits["cred-tokens"]
        self.assertEqual(
            (credit.current_usage, credit.usage_period_end, credit.usage_updated_at), (499, NOV_1 + 1, stamp)
        )
        self.assertEqual(credit.remaining, 1)

    def test_older_credit_usage_is_ignored(self) -> None:
        stamp = self.entry.credits["cred-tokens"].usage_updated_at - 1
        self.assertIsNone(apply_usage(self.entry, "CREDIT", "cred-tokens", Usage(0, None, None, stamp)))

    def test_size_is_recomputed(self) -> None:
        entry = CustomerEntry("c", features={"f": FeatureEntitlement(Feature("f", "NUMBER", "Incremental"))})
        updated = apply_usage(entry, "FEATURE", "f", Usage(1.5, 10**15, 10**16, 1))
        assert updated is not None
        self.assertGreater(updated.size, entry.size)

    @given(
        stored=st.integers(min_value=0, max_value=2**45),
        incoming=st.integers(min_value=0, max_value=2**45),
        kind=st.sampled_from(["FEATURE", "CREDIT"]),
    )
    def test_older_never_overwrites_newer(self, stored: int, incoming: int, kind: str) -> None:
        entry = CustomerEntry(
            "c",
            features={
                "f": FeatureEntitlement(Feature("f", "NUMBER", "Incremental"), usage=Usage(1, None, None, stored))
            },
            credits={"f": CreditEntitlement(Currency("f"), 10, 1, usage_updated_at=stored)},
        )
        updated = apply_usage(entry, kind, "f", Usage(9, None, None, incoming))
        if incoming < stored:
            self.assertIsNone(updated)
        else:
            assert updated is not None
            stamps = (updated.features["f"].usage.updated_at, updated.credits["f"].usage_updated_at)
            self.assertEqual(max(stamps), incoming)
            self.assertTrue(all(stamp >= stored for stamp in stamps))


class NewerOrEqualTests(SynchronousTestCase):
    def test_anything_replaces_nothing(self) -> None:
        self.assertTrue(newer_or_equal(CustomerEntry("c", timestamp=5), None))

    def test_newer_and_equal_replace(self) -> None:
        self.assertTrue(newer_or_equal(CustomerEntry("c", timestamp=6), CustomerEntry("c", timestamp=5)))
        self.assertTrue(newer_or_equal(CustomerEntry("c", timestamp=5), CustomerEntry("c", timestamp=5)))

    def test_older_does_not_replace(self) -> None:
        self.assertFalse(newer_or_equal(CustomerEntry("c", timestamp=4), CustomerEntry("c", timestamp=5)))

    def test_epoch_zero_always_replaces(self) -> None:
        self.assertTrue(newer_or_equal(CustomerEntry("c", timestamp=0), CustomerEntry("c", timestamp=5)))


class ParsingNeverCorruptsTests(SynchronousTestCase):
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=5),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
            max_leaves=12,
        )
    )
    def test_arbitrary_json_parses_or_raises_malformed(self, raw: Any) -> None:
        for candidate in (
            raw,
            {"entitlementsV2": raw},
            state(metered_item(usageLimit=raw)),
            state(credit_item(currency=raw)),
        ):
            before = copy.deepcopy(candidate)
            with contextlib.suppress(MalformedState):
                entry_from_state("c", None, candidate, NOW)
            self.assertEqual(candidate, before)


class CompactRecordTests(SynchronousTestCase):
    """The compact layout keeps the records' value semantics and charges sizes incrementally."""

    def test_plan_terms_are_shared_between_customers(self) -> None:
        first = entry_from_state("cust-1", None, state(metered_item()), NOW)
        second = entry_from_state("cust-2", None, state(metered_item()), NOW)
        a, b = first.features["feature-api-calls"], second.features["feature-api-calls"]
        self.assertIs(a._terms, b._terms)  # type: ignore[attr-defined]  # the shared plan terms behind each record
        self.assertEqual(a, b)
        self.assertEqual(hash(a), hash(b))

    def test_replace_equality_and_copies_behave_as_for_a_dataclass(self) -> None:
        ent = entry_from_state("cust-1", None, state(metered_item()), NOW).features["feature-api-calls"]
        usage = Usage(3.0, OCT_1, NOV_1, ent.updated_at + 5)
        changed = replace(ent, usage=usage)
        self.assertEqual(changed.usage, usage)
        self.assertEqual((changed.usage_limit, changed.feature), (ent.usage_limit, ent.feature))
        self.assertNotEqual(changed, ent)
        self.assertEqual(replace(changed, usage=ent.usage), ent)
        self.assertEqual(copy.deepcopy(changed), changed)
        self.assertEqual([f.name for f in fields(ent)][-2:], ["updated_at", "usage"])
        with self.assertRaises(FrozenInstanceError):
            ent.updated_at = 1  # type: ignore[misc]

    def test_implicit_usage_reads_as_nothing_used_as_of_the_entitlement(self) -> None:
        ent = FeatureEntitlement(Feature("f", "BOOLEAN"), updated_at=7, usage=Usage(0.0, None, None, 7))
        self.assertEqual(ent.usage, Usage(0.0, None, None, 7))
        self.assertEqual(FeatureEntitlement(Feature("f", "BOOLEAN"), updated_at=7).usage, Usage())

    def test_usage_updates_keep_the_size_exact(self) -> None:
        entry = entry_from_state("cust-1", None, state(metered_item(), boolean_item("b"), credit_item()), NOW)
        at = entry.features["feature-api-calls"].usage.updated_at
        for step, value in enumerate((1.5, 0.0, 10**6, 2.25), start=1):
            updated = apply_usage(entry, "FEATURE", "feature-api-calls", Usage(value, OCT_1, NOV_1 + step, at + step))
            assert updated is not None
            self.assertEqual(updated.size, entry_bytes(updated))
            rebuilt = replace(entry, features={**entry.features, "feature-api-calls": updated.features["feature-api-calls"]})
            self.assertEqual((updated, updated.size), (rebuilt, rebuilt.size))
            entry = updated

    def test_maps_are_read_only_and_compare_as_mappings(self) -> None:
        entry = entry_from_state("cust-1", None, state(metered_item(), boolean_item("b")), NOW)
        self.assertEqual(dict(entry.features), {k: entry.features[k] for k in ("feature-api-calls", "b")})
        self.assertIsNone(entry.features.get("nope"))
        with self.assertRaises(TypeError):
            entry.features["b"] = None  # type: ignore[index]
