"""Entitlement decisions: pure rules from a cached entry and a request to an answer.

Owns `Decision` and the rules of STIGG_REFERENCE §4.1-4.2: the feature getters (generic and
typed), credit checks, fallback answers and the V1/V2 state lists. Denials computed from Stigg's
data have `is_fallback=False`; only answers not computed from that data (a type mismatch, no data
at all) are fallbacks.

Pure: no I/O, no clock reads (`now_ms` is passed in), no globals, no logging (ARCHITECTURE
invariant 4). Kinds are "boolean", "numeric", "metered", "enum" and "credit"; reasons are
Stigg's GraphQL strings, mapped to protobuf elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from stigg_sidecar.entitlements.fallback import FallbackValues
from stigg_sidecar.entitlements.periods import roll_over
from stigg_sidecar.entitlements.records import (
    CreditEntitlement,
    Currency,
    CustomerEntry,
    Feature,
    FeatureEntitlement,
    malformed_ids,
)

FEATURE_KINDS = ("boolean", "numeric", "metered", "enum")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True, slots=True)
class Decision:
    """One answer. Fields past `feature` belong to the kinds named beside them."""

    kind: str
    has_access: bool
    is_fallback: bool = False
    reason: str | None = None
    feature: Feature | None = None  # every kind but credit
    # numeric (and metered's is_unlimited)
    value: int | None = None
    is_unlimited: bool = False
    # metered, and credit for usage_limit, has_soft_limit, current_usage, usage_period_end
    usage_limit: float | None = None
    has_soft_limit: bool | None = None
    current_usage: float = 0.0
    requested_usage: float = 0.0
    reset_period: str | None = None
    usage_period_anchor: int | None = None
    usage_period_start: int | None = None
    usage_period_end: int | None = None
    # enum
    enum_values: tuple[str, ...] = ()
    requested_values: tuple[str, ...] = ()
    # credit
    currency: Currency | None = None
    remaining: float = 0.0


def feature_kind(feature: Feature) -> str | None:
    """The getter kind a feature answers to; None for a feature type this code does not know."""
    if feature.feature_type == "BOOLEAN":
        return "boolean"
    if feature.feature_type == "ENUM":
        return "enum"
    if feature.feature_type == "NUMBER":
        return "metered" if feature.is_metered else "numeric"
    return None


def placeholder_feature(kind: str, feature_id: str) -> Feature:
    """A Feature with only an id and the type that fits `kind`, for answers without Stigg data."""
    if kind == "numeric":
        return Feature(feature_id, "NUMBER", "None")
    if kind == "metered":
        return Feature(feature_id, "NUMBER", "Incremental")
    if kind == "enum":
        return Feature(feature_id, "ENUM")
    if kind == "boolean":
        return Feature(feature_id, "BOOLEAN")
    raise ValueError(f"unknown feature kind {kind!r}")


def decide_feature(
    entry: CustomerEntry,
    feature_id: str,
    kind: str | None,
    requested_usage: float | None,
    requested_values: tuple[str, ...],
    fallback: FallbackValues | None,
    now_ms: int,
) -> Decision:
    """Decide one feature check (§4.2). `kind=None` is the generic getter: the cached feature's kind.

    Rules, first match wins: customer-level reason; no entitlement
    (NoFeatureEntitlementInSubscription); the entitlement's own reason; type mismatch (the
    fallback, FeatureTypeMismatch); then the kind's own rule, and for a feature priced in a
    cached credit currency, InsufficientCredits when the balance cannot cover it. A feature of a
    type this code does not know counts as a mismatch of the boolean getter.
    """
    if kind is not None and kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}")
    ent = entry.features.get(feature_id)
    actual = feature_kind(ent.feature) if ent is not None else None
    if kind is None:
        kind = actual or "boolean"
    usage = requested_usage or 0.0
    if ent is not None and actual == kind:
        typed = _typed(kind, ent, usage, requested_values, now_ms)
    else:
        typed = _empty(kind, feature_id, usage, requested_values)

    if entry.access_denied_reason:
        return replace(typed, has_access=False, reason=entry.access_denied_reason)
    if ent is None:
        if entry.malformed and feature_id in malformed_ids(entry, "FEATURE"):
            # Stigg has this entitlement but sent it malformed: its data cannot decide.
            return fallback_decision(kind, feature_id, fallback, requested_usage, requested_values)
        return replace(typed, has_access=False, reason="NoFeatureEntitlementInSubscription")
    if ent.access_denied_reason:
        return replace(typed, has_access=False, reason=ent.access_denied_reason)
    if actual != kind:
        # Stigg answers the fallback *and* says why, even when the fallback grants access.
        mismatch = fallback_decision(kind, feature_id, fallback, requested_usage, requested_values)
        return replace(mismatch, reason="FeatureTypeMismatch")
    if typed.has_access and _short_of_credits(entry, ent, usage):
        return replace(typed, has_access=False, reason="InsufficientCredits")
    return typed


def _typed(
    kind: str, ent: FeatureEntitlement, usage: float, requested_values: tuple[str, ...], now_ms: int
) -> Decision:
    """The kind's own rule (§4.2 rules 5-8) on an entitlement of that kind."""
    if kind == "boolean":
        return Decision("boolean", True, feature=ent.feature)
    if kind == "numeric":
        value = None if ent.has_unlimited_usage else _int32(ent.usage_limit)
        return Decision("numeric", True, feature=ent.feature, value=value, is_unlimited=ent.has_unlimited_usage)
    if kind == "metered":
        ent = roll_over(ent, now_ms)
        current = ent.usage.current_usage
        within = ent.has_unlimited_usage or ent.has_soft_limit or current + usage <= (ent.usage_limit or 0.0)
        return Decision(
            "metered",
            within,
            reason=None if within else "RequestedUsageExceedingLimit",
            feature=ent.feature,
            is_unlimited=ent.has_unlimited_usage,
            usage_limit=ent.usage_limit,
            has_soft_limit=ent.has_soft_limit,
            current_usage=current,
            requested_usage=usage,
            reset_period=ent.reset_period,
            usage_period_anchor=ent.usage_period_anchor,
            usage_period_start=ent.usage.usage_period_start,
            usage_period_end=ent.usage.usage_period_end,
        )
    matches = set(requested_values) <= set(ent.enum_values)
    return Decision(
        "enum",
        matches,
        reason=None if matches else "RequestedValuesMismatch",
        feature=ent.feature,
        enum_values=ent.enum_values,
        requested_values=requested_values,
    )


def _empty(kind: str, feature_id: str, usage: float, requested_values: tuple[str, ...]) -> Decision:
    """A denial's typed fields when there is no entitlement of the asked kind to fill them from."""
    return Decision(
        kind,
        False,
        feature=placeholder_feature(kind, feature_id),
        requested_usage=usage if kind == "metered" else 0.0,
        requested_values=requested_values if kind == "enum" else (),
    )


def _short_of_credits(entry: CustomerEntry, ent: FeatureEntitlement, usage: float) -> bool:
    """Whether the cached credit that prices this feature cannot pay for the request.

    The cost is `usage * rate`; a positive cost needs that much remaining, no cost (nothing
    requested) needs a positive balance. Soft-limited credits never run short; a feature whose
    currency is not cached is not judged here.
    """
    if ent.credit_rate is None:
        return False
    credit = entry.credits.get(ent.credit_rate.currency_id)
    if credit is None or credit.has_soft_limit:
        return False
    cost = usage * ent.credit_rate.amount
    return credit.remaining < cost if cost > 0 else credit.remaining <= 0


def decide_credit(
    entry: CustomerEntry,
    currency_id: str,
    requested_usage: float | None,
    fallback: FallbackValues | None,
    now_ms: int,
) -> Decision:
    """Decide one credit check (§4.2 rule 10; the exact sdk-core formula is not published).

    Rules, first match wins: customer-level reason; no credit entitlement for the currency
    (EntitlementNotFound); the credit's own reason; a soft limit grants; a positive request is
    granted iff it is ≤ remaining (usage_limit - current_usage); with nothing requested (None, 0
    or less) access needs remaining > 0. Otherwise InsufficientCredits.

    `fallback` and `now_ms` are accepted for symmetry with `decide_feature`: credits have no type
    to mismatch and no period roll-over, so neither changes the answer today.
    """
    usage = requested_usage or 0.0
    credit = entry.credits.get(currency_id)
    if credit is None:
        typed = Decision("credit", False, currency=Currency(currency_id), requested_usage=usage)
    else:
        typed = _credit(credit, usage)
    if entry.access_denied_reason:
        return replace(typed, has_access=False, reason=entry.access_denied_reason)
    if credit is None:
        if entry.malformed and currency_id in malformed_ids(entry, "CREDIT"):
            return fallback_decision("credit", currency_id, fallback, requested_usage)
        return replace(typed, has_access=False, reason="EntitlementNotFound")
    if credit.access_denied_reason:
        return replace(typed, has_access=False, reason=credit.access_denied_reason)
    return typed


def _credit(credit: CreditEntitlement, usage: float) -> Decision:
    remaining = credit.remaining
    granted = credit.has_soft_limit or (usage <= remaining if usage > 0 else remaining > 0)
    return Decision(
        "credit",
        granted,
        reason=None if granted else "InsufficientCredits",
        currency=credit.currency,
        usage_limit=credit.usage_limit,
        current_usage=credit.current_usage,
        remaining=remaining,
        usage_period_end=credit.usage_period_end,
        has_soft_limit=credit.has_soft_limit,
        requested_usage=usage,
    )


def fallback_decision(
    kind: str,
    feature_id: str,
    fallback: FallbackValues | None,
    requested_usage: float | None = None,
    requested_values: tuple[str, ...] = (),
    reason: str = "Unknown",
) -> Decision:
    """The answer when Stigg's data cannot decide (§4.1): the fallback's values, `is_fallback`.

    No fallback means no access. `reason` is kept only when access is denied. For "credit",
    `feature_id` is the currency id.
    """
    values = fallback if fallback is not None else FallbackValues()
    reason_or_none = None if values.has_access else reason
    if kind == "credit":
        return Decision(
            "credit",
            values.has_access,
            is_fallback=True,
            reason=reason_or_none,
            currency=Currency(feature_id),
            requested_usage=requested_usage or 0.0,
        )
    decision = Decision(
        kind, values.has_access, is_fallback=True, reason=reason_or_none, feature=placeholder_feature(kind, feature_id)
    )
    if kind == "numeric":
        return replace(decision, value=values.value, is_unlimited=bool(values.is_unlimited))
    if kind == "metered":
        return replace(
            decision,
            usage_limit=values.usage_limit,
            is_unlimited=bool(values.is_unlimited),
            has_soft_limit=False,
            requested_usage=requested_usage or 0.0,
        )
    if kind == "enum":
        return replace(decision, enum_values=values.enum_values, requested_values=requested_values)
    return decision


def state_v1(entry: CustomerEntry, now_ms: int) -> tuple[Decision, ...]:
    """GetEntitlements: one decision per feature entitlement, each of its own kind, no request."""
    return tuple(decide_feature(entry, feature_id, None, None, (), None, now_ms) for feature_id in entry.features)


def state_v2(entry: CustomerEntry, now_ms: int) -> tuple[Decision, ...]:
    """GetEntitlementsStateV2: the V1 list, then one decision per credit entitlement."""
    credits = (decide_credit(entry, currency_id, None, None, now_ms) for currency_id in entry.credits)
    return state_v1(entry, now_ms) + tuple(credits)


def fallback_state(fallbacks: Mapping[str, FallbackValues]) -> tuple[Decision, ...]:
    """The state answered without Stigg's data: one fallback per configured feature (§4.1)."""
    return tuple(fallback_decision(values.kind(), feature_id, values) for feature_id, values in fallbacks.items())


def _int32(limit: float | None) -> int | None:
    """A numeric entitlement's value: the limit truncated and clamped to int32; None if absent."""
    if limit is None or math.isnan(limit):
        return None
    if limit >= _INT32_MAX:
        return _INT32_MAX
    if limit <= _INT32_MIN:
        return _INT32_MIN
    return int(limit)
