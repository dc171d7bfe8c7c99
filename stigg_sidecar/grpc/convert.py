"""Conversion between decisions and the wire: the only module that builds sidecar protobuf messages.

Owns the mapping of Stigg's GraphQL strings (reasons, feature and meter types, reset periods) to
the proto enums, `Decision` -> response messages, and request options -> `FallbackValues`.
Never decides anything and never touches the cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.entitlements.decide import Decision
from stigg_sidecar.entitlements.fallback import FallbackValues
from stigg_sidecar.entitlements.fields import thaw_json
from stigg_sidecar.entitlements.records import Currency, Feature

REASONS: Mapping[str, pb.AccessDeniedReason] = {
    "Unknown": pb.ACCESS_DENIED_REASON_UNKNOWN,
    "CustomerIsArchived": pb.ACCESS_DENIED_REASON_CUSTOMER_IS_ARCHIVED,
    "CustomerNotFound": pb.ACCESS_DENIED_REASON_CUSTOMER_NOT_FOUND,
    "CustomerResourceNotFound": pb.ACCESS_DENIED_REASON_CUSTOMER_RESOURCE_NOT_FOUND,
    "FeatureNotFound": pb.ACCESS_DENIED_REASON_FEATURE_NOT_FOUND,
    "NoActiveSubscription": pb.ACCESS_DENIED_REASON_NO_ACTIVE_SUBSCRIPTION,
    "NoFeatureEntitlementInSubscription": pb.ACCESS_DENIED_REASON_NO_FEATURE_ENTITLEMENT_IN_SUBSCRIPTION,
    "RequestedUsageExceedingLimit": pb.ACCESS_DENIED_REASON_REQUESTED_USAGE_EXCEEDING_LIMIT,
    "BudgetExceeded": pb.ACCESS_DENIED_REASON_BUDGET_EXCEEDED,
    "RequestedValuesMismatch": pb.ACCESS_DENIED_REASON_REQUESTED_VALUES_MISMATCH,
    "FeatureTypeMismatch": pb.ACCESS_DENIED_REASON_FEATURE_TYPE_MISMATCH,
    "InsufficientCredits": pb.ACCESS_DENIED_REASON_INSUFFICIENT_CREDITS,
    "Revoked": pb.ACCESS_DENIED_REASON_REVOKED,
    "EntitlementNotFound": pb.ACCESS_DENIED_REASON_ENTITLEMENT_NOT_FOUND,
}
FEATURE_TYPES: Mapping[str, pb.FeatureType] = {
    "BOOLEAN": pb.FEATURE_TYPE_BOOLEAN,
    "NUMBER": pb.FEATURE_TYPE_NUMBER,
    "ENUM": pb.FEATURE_TYPE_ENUM,
}
METER_TYPES: Mapping[str | None, pb.MeterType] = {
    None: pb.METER_TYPE_NONE,
    "None": pb.METER_TYPE_NONE,
    "Fluctuating": pb.METER_TYPE_FLUCTUATING,
    "Incremental": pb.METER_TYPE_INCREMENTAL,
}
RESET_PERIODS: Mapping[str, pb.EntitlementResetPeriod] = {
    "DAY": pb.ENTITLEMENT_RESET_PERIOD_DAY,
    "HOUR": pb.ENTITLEMENT_RESET_PERIOD_HOUR,
    "MONTH": pb.ENTITLEMENT_RESET_PERIOD_MONTH,
    "WEEK": pb.ENTITLEMENT_RESET_PERIOD_WEEK,
    "YEAR": pb.ENTITLEMENT_RESET_PERIOD_YEAR,
}


def reason(name: str | None) -> pb.AccessDeniedReason | None:
    """A GraphQL reason as the proto enum; an unrecognised one is UNKNOWN, never dropped."""
    if name is None:
        return None
    return REASONS.get(name, pb.ACCESS_DENIED_REASON_UNKNOWN)


def timestamp(ms: int | None) -> Timestamp | None:
    if ms is None:
        return None
    seconds, millis = divmod(ms, 1000)
    return Timestamp(seconds=seconds, nanos=millis * 1_000_000)


def feature(f: Feature | None) -> pb.EntitlementFeature | None:
    if f is None:
        return None
    return pb.EntitlementFeature(
        id=f.id,
        feature_type=FEATURE_TYPES.get(f.feature_type, pb.FEATURE_TYPE_UNSPECIFIED),
        units=f.units,
        units_plural=f.units_plural,
        meter_type=METER_TYPES.get(f.meter_type, pb.METER_TYPE_UNSPECIFIED),
        is_metered=f.is_metered,
    )


def boolean(d: Decision) -> pb.BooleanEntitlement:
    return pb.BooleanEntitlement(feature=feature(d.feature))


def numeric(d: Decision) -> pb.NumericEntitlement:
    return pb.NumericEntitlement(feature=feature(d.feature), value=d.value, is_unlimited=d.is_unlimited)


def metered(d: Decision) -> pb.MeteredEntitlement:
    end = timestamp(d.usage_period_end)
    return pb.MeteredEntitlement(
        feature=feature(d.feature),
        usage_limit=d.usage_limit,
        is_unlimited=d.is_unlimited,
        current_usage=d.current_usage,
        reset_period=RESET_PERIODS.get(d.reset_period) if d.reset_period else None,
        next_reset_date=end,
        usage_period_anchor=timestamp(d.usage_period_anchor),
        usage_period_start=timestamp(d.usage_period_start),
        usage_period_end=end,
        has_soft_limit=d.has_soft_limit,
    )


def enum(d: Decision) -> pb.EnumEntitlement:
    return pb.EnumEntitlement(feature=feature(d.feature), enum_values=d.enum_values)


def _struct(data: Mapping[str, Any] | None) -> Struct | None:
    if data is None:
        return None
    s = Struct()
    s.update(thaw_json(data))
    return s


def currency(c: Currency | None) -> pb.EntitlementCurrency:
    if c is None:
        return pb.EntitlementCurrency()
    return pb.EntitlementCurrency(
        currency_id=c.currency_id,
        display_name=c.display_name or "",
        description=c.description,
        unit_singular=c.unit_singular,
        unit_plural=c.unit_plural,
        additional_meta_data=_struct(c.additional_meta_data),
    )


def credit(d: Decision) -> pb.CreditEntitlement:
    return pb.CreditEntitlement(
        currency=currency(d.currency),
        usage_limit=d.usage_limit or 0.0,
        current_usage=d.current_usage,
        remaining=d.remaining,
        usage_period_end=timestamp(d.usage_period_end),
        has_soft_limit=bool(d.has_soft_limit),
    )


_BUILDERS = {"boolean": boolean, "numeric": numeric, "metered": metered, "enum": enum, "credit": credit}


def boolean_response(d: Decision) -> pb.GetBooleanEntitlementResponse:
    return pb.GetBooleanEntitlementResponse(
        has_access=d.has_access,
        is_fallback=d.is_fallback,
        access_denied_reason=reason(d.reason),
        entitlement=boolean(d),
    )


def numeric_response(d: Decision) -> pb.GetNumericEntitlementResponse:
    return pb.GetNumericEntitlementResponse(
        has_access=d.has_access,
        is_fallback=d.is_fallback,
        access_denied_reason=reason(d.reason),
        entitlement=numeric(d),
    )


def metered_response(d: Decision) -> pb.GetMeteredEntitlementResponse:
    return pb.GetMeteredEntitlementResponse(
        has_access=d.has_access,
        is_fallback=d.is_fallback,
        access_denied_reason=reason(d.reason),
        requested_usage=d.requested_usage,
        entitlement=metered(d),
    )


def enum_response(d: Decision) -> pb.GetEnumEntitlementResponse:
    return pb.GetEnumEntitlementResponse(
        has_access=d.has_access,
        is_fallback=d.is_fallback,
        access_denied_reason=reason(d.reason),
        requested_values=d.requested_values,
        entitlement=enum(d),
    )


def generic_response(d: Decision) -> pb.GetEntitlementResponse:
    """GetEntitlement: the typed entitlement in its oneof (credits have no V1 shape)."""
    response = pb.GetEntitlementResponse(
        has_access=d.has_access, is_fallback=d.is_fallback, access_denied_reason=reason(d.reason)
    )
    if d.kind != "credit":
        getattr(response, d.kind).CopyFrom(_BUILDERS[d.kind](d))
    return response


def entitlement_v1(d: Decision) -> pb.Entitlement:
    # The oneof member is named by the decision's kind; the stubs cannot type a keyword chosen at run time.
    return pb.Entitlement(**{d.kind: _BUILDERS[d.kind](d)})  # type: ignore[arg-type]


def entitlement_v2(d: Decision) -> pb.EntitlementV2:
    return pb.EntitlementV2(
        has_access=d.has_access,
        is_fallback=d.is_fallback,
        access_denied_reason=reason(d.reason),
        **{d.kind: _BUILDERS[d.kind](d)},  # type: ignore[arg-type]  # oneof member named at run time
    )


def fallback_values(message: Any) -> FallbackValues:
    """Any of the request-side *Fallback messages as FallbackValues (absent fields stay unset)."""
    present = {f.name for f, _ in message.ListFields()}
    return FallbackValues(
        has_access=message.has_access,
        value=message.value if "value" in present else None,
        usage_limit=message.usage_limit if "usage_limit" in present else None,
        is_unlimited=message.is_unlimited if "is_unlimited" in present else None,
        enum_values=tuple(getattr(message, "enum_values", ())),
    )


# -- writes ---------------------------------------------------------------------------------------

_UPDATE_BEHAVIORS = {pb.USAGE_UPDATE_BEHAVIOR_DELTA: "DELTA", pb.USAGE_UPDATE_BEHAVIOR_SET: "SET"}


def update_behavior(request: pb.ReportUsageRequest) -> str | None:
    if not request.HasField("update_behavior"):
        return None
    return _UPDATE_BEHAVIORS.get(request.update_behavior)


def dimensions(values: Mapping[str, pb.EventDimensionValue]) -> dict[str, str | float | bool]:
    out: dict[str, str | float | bool] = {}
    for key, value in values.items():
        which = value.WhichOneof("value")
        if which is not None:
            out[key] = getattr(value, which)
    return out


def request_timestamp(message: Any) -> int | None:
    if not message.HasField("timestamp"):
        return None
    return message.timestamp.ToMilliseconds()


def usage_ack(ack: Any) -> pb.ReportUsageResponse:
    return pb.ReportUsageResponse(
        measurement_id=ack.measurement_id,
        customer_id=ack.customer_id,
        resource_id=ack.resource_id,
        feature_id=ack.feature_id,
        current_usage=ack.current_usage,
        usage_period_start=timestamp(ack.usage_period_start),
        usage_period_end=timestamp(ack.usage_period_end),
    )
