"""Decision rules (STIGG_REFERENCE §4.1-4.2): one test per rule, then hypothesis properties."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.entitlements.decide import (
    Decision,
    decide_credit,
    decide_feature,
    fallback_decision,
    fallback_state,
    feature_kind,
    state_v1,
    state_v2,
)
from stigg_sidecar.entitlements.fallback import FallbackValues
from stigg_sidecar.entitlements.records import (
    CreditEntitlement,
    CreditRate,
    Currency,
    CustomerEntry,
    Feature,
    FeatureEntitlement,
    Usage,
)

NOW = 1_792_000_000_000
DAY = 86_400_000

BOOLEAN = Feature("sso", "BOOLEAN", "None")
NUMERIC = Feature("seats", "NUMBER", "None", "seat", "seats")
METERED = Feature("api-calls", "NUMBER", "Incremental", "call", "calls")
ENUM = Feature("region", "ENUM")
TOKENS = Currency("tokens", "Tokens", unit_singular="token", unit_plural="tokens")


def entry(
    *features: FeatureEntitlement, credits: tuple[CreditEntitlement, ...] = (), reason: str | None = None
) -> CustomerEntry:
    return CustomerEntry(
        "cust-1",
        access_denied_reason=reason,
        features={ent.feature.id: ent for ent in features},
        credits={credit.currency.currency_id: credit for credit in credits},
        timestamp=NOW - DAY,
    )


def metered(limit: float | None = 100, used: float = 40, **kwargs: Any) -> FeatureEntitlement:
    """A monthly metered entitlement whose current period runs from yesterday to tomorrow."""
    period = Usage(used, NOW - DAY, NOW + DAY, NOW - DAY)
    return FeatureEntitlement(METERED, usage_limit=limit, usage=period, reset_period="MONTH", **kwargs)


def check(
    e: CustomerEntry,
    feature_id: str,
    kind: str | None,
    usage: float | None = None,
    values: tuple[str, ...] = (),
    fallback: FallbackValues | None = None,
) -> Decision:
    return decide_feature(e, feature_id, kind, usage, values, fallback, NOW)


class OrderOfRulesTests(SynchronousTestCase):
    def test_customer_level_reason_wins_over_everything(self) -> None:
        e = entry(FeatureEntitlement(BOOLEAN, access_denied_reason="Revoked"), reason="CustomerIsArchived")
        for feature_id, kind in (("sso", "boolean"), ("sso", "metered"), ("missing", None)):
            decision = check(e, feature_id, kind)
            self.assertFalse(decision.has_access)
            self.assertFalse(decision.is_fallback)
            self.assertEqual(decision.reason, "CustomerIsArchived")

    def test_customer_level_reason_still_fills_typed_fields(self) -> None:
        decision = check(entry(metered(), reason="NoActiveSubscription"), "api-calls", "metered", 1)
        self.assertEqual((decision.usage_limit, decision.current_usage, decision.requested_usage), (100, 40, 1))

    def test_missing_entitlement_denies_with_no_feature_entitlement(self) -> None:
        decision = check(entry(FeatureEntitlement(BOOLEAN)), "analytics", "boolean")
        self.assertEqual(
            decision,
            Decision(
                "boolean", False, reason="NoFeatureEntitlementInSubscription", feature=Feature("analytics", "BOOLEAN")
            ),
        )

    def test_missing_entitlement_in_generic_getter_is_a_boolean_denial_not_a_fallback(self) -> None:
        decision = check(entry(), "analytics", None, fallback=FallbackValues(has_access=True))
        self.assertEqual((decision.kind, decision.has_access, decision.is_fallback), ("boolean", False, False))
        self.assertEqual(decision.reason, "NoFeatureEntitlementInSubscription")

    def test_entitlement_reason_denies_and_keeps_typed_fields(self) -> None:
        decision = check(entry(metered(access_denied_reason="BudgetExceeded")), "api-calls", "metered", 1)
        self.assertFalse(decision.has_access)
        self.assertFalse(decision.is_fallback)
        self.assertEqual(decision.reason, "BudgetExceeded")
        self.assertEqual((decision.feature, decision.usage_limit, decision.current_usage), (METERED, 100, 40))

    def test_entitlement_reason_comes_before_type_mismatch(self) -> None:
        decision = check(entry(FeatureEntitlement(BOOLEAN, access_denied_reason="Revoked")), "sso", "enum")
        self.assertEqual((decision.reason, decision.is_fallback, decision.kind), ("Revoked", False, "enum"))

    def test_type_mismatch_returns_the_fallback(self) -> None:
        fallback = FallbackValues(has_access=True, usage_limit=5)
        decision = check(entry(FeatureEntitlement(BOOLEAN)), "sso", "metered", 2, fallback=fallback)
        expected = replace(fallback_decision("metered", "sso", fallback, 2, ()), reason="FeatureTypeMismatch")
        self.assertEqual(decision, expected)
        self.assertTrue(decision.is_fallback)
        self.assertTrue(decision.has_access)
        self.assertEqual(decision.reason, "FeatureTypeMismatch")

    def test_type_mismatch_without_fallback_denies_with_feature_type_mismatch(self) -> None:
        decision = check(entry(metered()), "api-calls", "numeric")
        self.assertEqual(
            (decision.has_access, decision.is_fallback, decision.reason), (False, True, "FeatureTypeMismatch")
        )
        self.assertEqual(decision.feature, Feature("api-calls", "NUMBER", "None"))

    def test_unknown_feature_type_is_a_mismatch_in_the_generic_getter(self) -> None:
        decision = check(entry(FeatureEntitlement(Feature("odd", "DATE"))), "odd", None)
        self.assertEqual(
            (decision.kind, decision.reason, decision.is_fallback), ("boolean", "FeatureTypeMismatch", True)
        )

    def test_unknown_kind_is_a_programming_error(self) -> None:
        self.assertRaises(ValueError, check, entry(), "sso", "bool")


class KindRuleTests(SynchronousTestCase):
    def test_boolean_grants(self) -> None:
        decision = check(entry(FeatureEntitlement(BOOLEAN)), "sso", "boolean")
        self.assertEqual(decision, Decision("boolean", True, feature=BOOLEAN))

    def test_numeric_grants_with_its_value(self) -> None:
        decision = check(entry(FeatureEntitlement(NUMERIC, usage_limit=25)), "seats", "numeric")
        self.assertEqual((decision.has_access, decision.value, decision.is_unlimited), (True, 25, False))

    def test_numeric_unlimited_has_no_value(self) -> None:
        decision = check(
            entry(FeatureEntitlement(NUMERIC, usage_limit=25, has_unlimited_usage=True)), "seats", "numeric"
        )
        self.assertEqual((decision.has_access, decision.value, decision.is_unlimited), (True, None, True))

    def test_numeric_value_is_clamped_to_int32(self) -> None:
        self.assertEqual(
            check(entry(FeatureEntitlement(NUMERIC, usage_limit=1e12)), "seats", "numeric").value, 2**31 - 1
        )
        self.assertEqual(
            check(entry(FeatureEntitlement(NUMERIC, usage_limit=-1e12)), "seats", "numeric").value, -(2**31)
        )
        self.assertIsNone(check(entry(FeatureEntitlement(NUMERIC)), "seats", "numeric").value)

    def test_metered_grants_when_request_fits(self) -> None:
        decision = check(entry(metered()), "api-calls", "metered", 60)
        self.assertTrue(decision.has_access)
        self.assertIsNone(decision.reason)
        self.assertEqual(decision.requested_usage, 60)

    def test_metered_denies_when_request_exceeds_remaining(self) -> None:
        decision = check(entry(metered()), "api-calls", "metered", 61)
        self.assertEqual((decision.has_access, decision.reason), (False, "RequestedUsageExceedingLimit"))

    def test_metered_request_defaults_to_zero(self) -> None:
        self.assertTrue(check(entry(metered(used=100)), "api-calls", "metered").has_access)
        self.assertFalse(check(entry(metered(used=101)), "api-calls", "metered").has_access)

    def test_metered_null_limit_counts_as_zero(self) -> None:
        self.assertTrue(check(entry(metered(limit=None, used=0)), "api-calls", "metered").has_access)
        self.assertFalse(check(entry(metered(limit=None, used=0)), "api-calls", "metered", 1).has_access)

    def test_metered_unlimited_grants(self) -> None:
        decision = check(entry(metered(used=1e9, has_unlimited_usage=True)), "api-calls", "metered", 1e9)
        self.assertEqual((decision.has_access, decision.is_unlimited), (True, True))

    def test_metered_soft_limit_grants(self) -> None:
        decision = check(entry(metered(used=500, has_soft_limit=True)), "api-calls", "metered", 10)
        self.assertEqual((decision.has_access, decision.has_soft_limit), (True, True))

    def test_metered_carries_period_fields(self) -> None:
        decision = check(entry(metered(usage_period_anchor=NOW - 30 * DAY)), "api-calls", "metered")
        self.assertEqual(decision.reset_period, "MONTH")
        self.assertEqual(decision.usage_period_anchor, NOW - 30 * DAY)
        self.assertEqual((decision.usage_period_start, decision.usage_period_end), (NOW - DAY, NOW + DAY))

    def test_metered_rolls_over_an_ended_period_before_deciding(self) -> None:
        ent = FeatureEntitlement(
            METERED,
            usage_limit=10,
            reset_period="DAY",
            usage_period_anchor=NOW - 10 * DAY,
            usage=Usage(10, NOW - 3 * DAY, NOW - 2 * DAY, 0),
        )
        decision = check(entry(ent), "api-calls", "metered", 10)
        self.assertTrue(decision.has_access)
        self.assertEqual(decision.current_usage, 0)
        self.assertEqual((decision.usage_period_start, decision.usage_period_end), (NOW, NOW + DAY))

    def test_enum_grants_subset(self) -> None:
        decision = check(entry(FeatureEntitlement(ENUM, enum_values=("eu", "us"))), "region", "enum", values=("eu",))
        self.assertEqual(
            (decision.has_access, decision.enum_values, decision.requested_values), (True, ("eu", "us"), ("eu",))
        )

    def test_enum_empty_request_passes(self) -> None:
        self.assertTrue(check(entry(FeatureEntitlement(ENUM)), "region", "enum").has_access)

    def test_enum_denies_values_outside_the_entitlement(self) -> None:
        decision = check(entry(FeatureEntitlement(ENUM, enum_values=("eu",))), "region", "enum", values=("eu", "apac"))
        self.assertEqual((decision.has_access, decision.reason), (False, "RequestedValuesMismatch"))

    def test_generic_getter_uses_the_cached_kind(self) -> None:
        e = entry(FeatureEntitlement(BOOLEAN), FeatureEntitlement(NUMERIC), metered(), FeatureEntitlement(ENUM))
        kinds = [check(e, feature_id, None).kind for feature_id in ("sso", "seats", "api-calls", "region")]
        self.assertEqual(kinds, ["boolean", "numeric", "metered", "enum"])


class CreditBackedFeatureTests(SynchronousTestCase):
    def backed(self, remaining: float, soft: bool = False) -> CustomerEntry:
        ent = metered(limit=None, has_unlimited_usage=True, credit_rate=CreditRate(2.0, "tokens"))
        return entry(
            ent,
            credits=(CreditEntitlement(TOKENS, usage_limit=100, current_usage=100 - remaining, has_soft_limit=soft),),
        )

    def test_feature_denied_when_credits_cannot_cover_the_cost(self) -> None:
        decision = check(self.backed(remaining=9), "api-calls", "metered", 5)
        self.assertEqual((decision.has_access, decision.reason), (False, "InsufficientCredits"))

    def test_feature_granted_when_credits_cover_the_cost(self) -> None:
        self.assertTrue(check(self.backed(remaining=10), "api-calls", "metered", 5).has_access)

    def test_feature_without_request_needs_a_positive_balance(self) -> None:
        self.assertFalse(check(self.backed(remaining=0), "api-calls", "metered").has_access)
        self.assertTrue(check(self.backed(remaining=0.5), "api-calls", "metered").has_access)

    def test_soft_limited_credit_never_denies(self) -> None:
        self.assertTrue(check(self.backed(remaining=-50, soft=True), "api-calls", "metered", 5).has_access)

    def test_uncached_currency_is_not_judged(self) -> None:
        ent = metered(credit_rate=CreditRate(2.0, "gems"))
        self.assertTrue(check(entry(ent), "api-calls", "metered", 1).has_access)

    def test_usage_limit_reason_comes_before_credits(self) -> None:
        ent = metered(limit=1, credit_rate=CreditRate(2.0, "tokens"))
        e = entry(ent, credits=(CreditEntitlement(TOKENS, usage_limit=0),))
        self.assertEqual(check(e, "api-calls", "metered", 5).reason, "RequestedUsageExceedingLimit")


class CreditTests(SynchronousTestCase):
    def credit(self, **kwargs: Any) -> CustomerEntry:
        """100 tokens granted, 30 used, unless `kwargs` say otherwise."""
        fields: dict[str, Any] = {"usage_limit": 100, "current_usage": 30, **kwargs}
        return entry(credits=(CreditEntitlement(TOKENS, **fields),))

    def test_credit_grants_request_within_remaining(self) -> None:
        decision = decide_credit(self.credit(usage_period_end=NOW + DAY), "tokens", 70, None, NOW)
        self.assertTrue(decision.has_access)
        self.assertEqual((decision.kind, decision.currency, decision.remaining), ("credit", TOKENS, 70))
        self.assertEqual(
            (decision.usage_limit, decision.current_usage, decision.usage_period_end), (100, 30, NOW + DAY)
        )

    def test_credit_denies_request_beyond_remaining(self) -> None:
        decision = decide_credit(self.credit(), "tokens", 70.5, None, NOW)
        self.assertEqual((decision.has_access, decision.reason), (False, "InsufficientCredits"))

    def test_credit_without_request_needs_a_positive_balance(self) -> None:
        self.assertTrue(decide_credit(self.credit(current_usage=99.9), "tokens", None, None, NOW).has_access)
        self.assertFalse(decide_credit(self.credit(current_usage=100), "tokens", None, None, NOW).has_access)
        self.assertFalse(decide_credit(self.credit(current_usage=100), "tokens", 0, None, NOW).has_access)

    def test_credit_soft_limit_grants(self) -> None:
        self.assertTrue(
            decide_credit(self.credit(current_usage=500, has_soft_limit=True), "tokens", 10, None, NOW).has_access
        )

    def test_credit_customer_level_reason_wins(self) -> None:
        e = entry(credits=(CreditEntitlement(TOKENS, usage_limit=100),), reason="CustomerNotFound")
        self.assertEqual(decide_credit(e, "tokens", 1, None, NOW).reason, "CustomerNotFound")

    def test_missing_credit_denies_with_entitlement_not_found(self) -> None:
        decision = decide_credit(entry(), "gems", 1, None, NOW)
        self.assertEqual(
            decision,
            Decision("credit", False, reason="EntitlementNotFound", currency=Currency("gems"), requested_usage=1),
        )

    def test_credit_own_reason_denies(self) -> None:
        decision = decide_credit(self.credit(access_denied_reason="Revoked"), "tokens", 1, None, NOW)
        self.assertEqual((decision.has_access, decision.reason, decision.remaining), (False, "Revoked", 70))


class FallbackTests(SynchronousTestCase):
    def test_no_fallback_denies_with_unknown(self) -> None:
        decision = fallback_decision("boolean", "sso", None)
        self.assertEqual(
            decision, Decision("boolean", False, is_fallback=True, reason="Unknown", feature=Feature("sso", "BOOLEAN"))
        )

    def test_granting_fallback_has_no_reason(self) -> None:
        decision = fallback_decision("boolean", "sso", FallbackValues(has_access=True), reason="FeatureTypeMismatch")
        self.assertEqual((decision.has_access, decision.reason, decision.is_fallback), (True, None, True))

    def test_numeric_fallback(self) -> None:
        decision = fallback_decision("numeric", "seats", FallbackValues(has_access=True, value=5, is_unlimited=False))
        self.assertEqual(
            (decision.value, decision.is_unlimited, decision.feature), (5, False, Feature("seats", "NUMBER", "None"))
        )

    def test_metered_fallback_echoes_the_request(self) -> None:
        decision = fallback_decision("metered", "api-calls", FallbackValues(usage_limit=10, is_unlimited=True), 3)
        self.assertEqual(
            (decision.usage_limit, decision.is_unlimited, decision.current_usage, decision.requested_usage),
            (10, True, 0, 3),
        )
        self.assertEqual(decision.feature, Feature("api-calls", "NUMBER", "Incremental"))
        self.assertEqual(fallback_decision("metered", "api-calls", None).requested_usage, 0)

    def test_enum_fallback_echoes_the_request(self) -> None:
        decision = fallback_decision("enum", "region", FallbackValues(enum_values=("eu",)), requested_values=("us",))
        self.assertEqual(
            (decision.enum_values, decision.requested_values, decision.feature),
            (("eu",), ("us",), Feature("region", "ENUM")),
        )

    def test_credit_fallback_names_only_the_currency(self) -> None:
        decision = fallback_decision("credit", "tokens", FallbackValues(has_access=True))
        self.assertEqual(decision, Decision("credit", True, is_fallback=True, currency=Currency("tokens")))

    def test_fallback_state_uses_each_values_kind(self) -> None:
        fallbacks = {
            "sso": FallbackValues(has_access=True),
            "seats": FallbackValues(value=3),
            "api-calls": FallbackValues(usage_limit=10),
            "region": FallbackValues(enum_values=("eu",)),
        }
        decisions = fallback_state(fallbacks)
        self.assertEqual([d.kind for d in decisions], ["boolean", "numeric", "metered", "enum"])
        self.assertEqual([d.feature.id for d in decisions if d.feature], list(fallbacks))
        self.assertTrue(all(d.is_fallback for d in decisions))
        self.assertEqual([d.reason for d in decisions], [None, "Unknown", "Unknown", "Unknown"])


class StateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.entry = entry(
            FeatureEntitlement(BOOLEAN),
            metered(used=100),
            FeatureEntitlement(ENUM, access_denied_reason="Revoked"),
            credits=(CreditEntitlement(TOKENS, usage_limit=10, current_usage=10),),
        )

    def test_state_v2_lists_features_then_credits(self) -> None:
        decisions = state_v2(self.entry, NOW)
        self.assertEqual([d.kind for d in decisions], ["boolean", "metered", "enum", "credit"])
        self.assertEqual([d.has_access for d in decisions], [True, True, False, False])
        self.assertEqual([d.reason for d in decisions], [None, None, "Revoked", "InsufficientCredits"])
        self.assertFalse(any(d.is_fallback for d in decisions))

    def test_state_v1_drops_credits(self) -> None:
        self.assertEqual(state_v1(self.entry, NOW), state_v2(self.entry, NOW)[:3])

    def test_customer_level_reason_denies_the_whole_state(self) -> None:
        denied = CustomerEntry(
            "cust-1",
            access_denied_reason="CustomerIsArchived",
            features=self.entry.features,
            credits=self.entry.credits,
        )
        decisions = state_v2(denied, NOW)
        self.assertEqual(len(decisions), 4)
        self.assertTrue(all(not d.has_access and d.reason == "CustomerIsArchived" for d in decisions))


class FeatureKindTests(SynchronousTestCase):
    def test_feature_kind_follows_type_and_meter(self) -> None:
        self.assertEqual(feature_kind(Feature("a", "NUMBER", None)), "numeric")
        self.assertEqual(feature_kind(Feature("a", "NUMBER", "None")), "numeric")
        self.assertEqual(feature_kind(Feature("a", "NUMBER", "Fluctuating")), "metered")
        self.assertEqual(feature_kind(Feature("a", "ENUM")), "enum")
        self.assertIsNone(feature_kind(Feature("a", "DATE")))


# ------------------------------------------------------------------------------ properties

amounts = st.floats(min_value=0, max_value=1e9, allow_nan=False)
any_floats = st.floats(allow_nan=True, allow_infinity=True)
words = st.sampled_from(["eu", "us", "apac", "", "x"])
reasons = st.none() | st.sampled_from(["Revoked", "BudgetExceeded", "CustomerNotFound"])
times = st.none() | st.integers(min_value=-(2**62), max_value=2**62)

features = st.builds(
    Feature,
    id=st.sampled_from(["a", "b", "c"]),
    feature_type=st.sampled_from(["BOOLEAN", "NUMBER", "ENUM", "DATE", ""]),
    meter_type=st.none() | st.sampled_from(["None", "Fluctuating", "Incremental", "Other"]),
)
feature_entitlements = st.builds(
    FeatureEntitlement,
    feature=features,
    usage_limit=st.none() | any_floats,
    has_unlimited_usage=st.booleans(),
    has_soft_limit=st.booleans(),
    access_denied_reason=reasons,
    enum_values=st.tuples(words, words),
    valid_until=times,
    usage_period_anchor=times,
    reset_period=st.none() | st.sampled_from(["HOUR", "DAY", "WEEK", "MONTH", "YEAR", "DECADE"]),
    credit_rate=st.none() | st.builds(CreditRate, amount=any_floats, currency_id=st.sampled_from(["a", "b"])),
    usage=st.builds(Usage, current_usage=any_floats, usage_period_start=times, usage_period_end=times),
)
credit_entitlements = st.builds(
    CreditEntitlement,
    currency=st.builds(Currency, currency_id=st.sampled_from(["a", "b"])),
    usage_limit=any_floats,
    current_usage=any_floats,
    has_soft_limit=st.booleans(),
    access_denied_reason=reasons,
    valid_until=times,
)
entries = st.builds(
    lambda fs, cs, reason: CustomerEntry(
        "c",
        access_denied_reason=reason,
        features={f.feature.id: f for f in fs},
        credits={c.currency.currency_id: c for c in cs},
    ),
    st.lists(feature_entitlements, max_size=3),
    st.lists(credit_entitlements, max_size=2),
    st.none() | st.sampled_from(["CustomerNotFound", "NoActiveSubscription"]),
)


class DecisionPropertyTests(SynchronousTestCase):
    @given(limit=st.none() | amounts, used=amounts, requested=amounts, unlimited=st.booleans(), soft=st.booleans())
    def test_metered_grants_iff_within_limit_unless_unlimited_or_soft(
        self, limit: float | None, used: float, requested: float, unlimited: bool, soft: bool
    ) -> None:
        ent = metered(limit=limit, used=used, has_unlimited_usage=unlimited, has_soft_limit=soft)
        decision = check(entry(ent), "api-calls", "metered", requested)
        expected = unlimited or soft or used + requested <= (limit or 0)
        self.assertEqual(decision.has_access, expected)
        self.assertEqual(decision.reason, None if expected else "RequestedUsageExceedingLimit")

    @given(offered=st.frozensets(words), requested=st.lists(words, max_size=4))
    def test_enum_grants_iff_subset(self, offered: frozenset[str], requested: list[str]) -> None:
        ent = FeatureEntitlement(ENUM, enum_values=tuple(sorted(offered)))
        decision = check(entry(ent), "region", "enum", values=tuple(requested))
        self.assertEqual(decision.has_access, set(requested) <= offered)

    @given(
        e=entries,
        feature_id=st.sampled_from(["a", "b", "c", "z"]),
        kind=st.none() | st.sampled_from(["boolean", "numeric", "metered", "enum"]),
        requested=st.none() | any_floats,
        values=st.tuples(words),
        fallback=st.none() | st.builds(FallbackValues, has_access=st.booleans()),
        now=st.integers(min_value=-(2**62), max_value=2**62),
    )
    def test_decisions_never_raise(
        self,
        e: CustomerEntry,
        feature_id: str,
        kind: str | None,
        requested: float | None,
        values: tuple[str, ...],
        fallback: FallbackValues | None,
        now: int,
    ) -> None:
        decision = decide_feature(e, feature_id, kind, requested, values, fallback, now)
        # A granted answer has no reason, except a type mismatch, whose fallback may grant.
        if decision.reason == "FeatureTypeMismatch":
            self.assertTrue(decision.is_fallback)
        else:
            self.assertEqual(decision.has_access, decision.reason is None)
        if kind is not None:
            self.assertEqual(decision.kind, kind)
        if e.access_denied_reason:
            self.assertEqual(decision.reason, e.access_denied_reason)
        credit = decide_credit(e, feature_id, requested, fallback, now)
        self.assertEqual(credit.has_access, credit.reason is None)
        state = state_v2(e, now)
        self.assertEqual(len(state), len(e.features) + len(e.credits))

    @given(e=entries, now=st.integers(min_value=0, max_value=2**45))
    def test_state_answers_match_single_checks(self, e: CustomerEntry, now: int) -> None:
        singles = [decide_feature(e, f, None, None, (), None, now) for f in e.features]
        singles += [decide_credit(e, c, None, None, now) for c in e.credits]
        # Compared as text: a NaN balance is not equal to itself.
        self.assertEqual(repr(list(state_v2(e, now))), repr(singles))
