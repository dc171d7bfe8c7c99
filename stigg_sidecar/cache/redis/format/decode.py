"""Stored values back into a `CustomerEntry`, whichever generation wrote them (Node SDK 3.x,
cache-redis-store 1.29, this sidecar); an unreadable value raises `FormatError` (a miss).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from stigg_sidecar.cache.redis.format.encode import is_usage_tracked
from stigg_sidecar.cache.redis.format.names import (
    CREDIT,
    FEATURE,
    EntryKeys,
    FormatError,
    LegacyFormat,
    MissingUsage,
    timestamp_key,
    usage_ref,
)
from stigg_sidecar.entitlements.fields import FieldReader, freeze_json, parse_time
from stigg_sidecar.entitlements.interning import shared_feature
from stigg_sidecar.entitlements.records import (
    CreditEntitlement,
    CreditRate,
    Currency,
    CustomerEntry,
    Feature,
    FeatureEntitlement,
    Usage,
)


@dataclass(frozen=True, slots=True)
class StoredEntitlements:
    """The decoded entitlements key: records whose live usage is still to be merged in.

    `usage_refs` lists the usage-key suffixes (`f_x`, `credit_y`) a read must fetch next.
    """

    features: tuple[FeatureEntitlement, ...]
    credits: tuple[CreditEntitlement, ...]

    @property
    def usage_refs(self) -> list[str]:
        refs = [usage_ref(FEATURE, f.feature.id) for f in self.features if is_usage_tracked(f)]
        refs.extend(usage_ref(CREDIT, c.currency.currency_id) for c in self.credits)
        return refs


def decode_entitlements(text: str, entry_timestamp: int = 0) -> StoredEntitlements:
    """The records in an entitlements value, written by Node SDK 3.x, by cache-redis-store 1.29
    (4.x) or by this sidecar. Records without an `updatedAt` (3.x writes none) take
    `entry_timestamp`. Raises FormatError (LegacyFormat for this project's old envelope)."""
    value = _load(text, "entitlements")
    if not isinstance(value, dict):
        raise FormatError("entitlements: must be a JSON object")
    if isinstance(value.get("v"), int) and isinstance(value.get("entitlements"), dict):
        raise LegacyFormat(f"entitlements: this sidecar's earlier format v{value['v']}, not Stigg's")
    features: list[FeatureEntitlement] = []
    credits: list[CreditEntitlement] = []
    for name, record in value.items():
        where = f"entitlements[{name!r}]"
        try:
            record = _obj(record, where)
            calculated = _obj(record.get("calculatedEntitlement"), f"{where}.calculatedEntitlement")
            kind = calculated.get("type")
            if kind is None:
                if calculated.get("feature") is None:
                    continue  # 4.x's migration drops such a 3.x record too
                kind = FEATURE  # 3.x wrote features only, without a type
            if not isinstance(kind, str):
                raise FormatError(f"{where}.calculatedEntitlement.type: must be a string")
            kind = kind.upper()
            if kind == FEATURE:
                features.append(_feature_from(record, calculated, where, entry_timestamp))
            elif kind == CREDIT:
                credits.append(_credit_from(calculated, f"{where}.calculatedEntitlement", entry_timestamp))
            # Another type is from a newer writer: skipped, not fatal.
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"{where}: {e}") from None
    return StoredEntitlements(tuple(features), tuple(credits))


def decode_entry(
    customer_id: str,
    resource_id: str | None,
    stored: StoredEntitlements,
    metadata: str | None,
    timestamp: str,
    usages: Mapping[str, tuple[str | None, str | None]],
) -> CustomerEntry:
    """The entry, with each usage-tracked record's usage taken from `usages` (ref -> (value,
    timestamp)). Raises FormatError, or MissingUsage naming the usage ref that is missing."""
    reason = None
    if metadata:
        meta = _obj(_load(metadata, "metadata"), "metadata")
        reason = _opt_str(meta, "accessDeniedReason", "metadata")
    features: dict[str, FeatureEntitlement] = {}
    credits: dict[str, CreditEntitlement] = {}
    for feature in stored.features:
        if is_usage_tracked(feature):
            ref = usage_ref(FEATURE, feature.feature.id)
            current, start, end, stamp = _usage_from(ref, usages)
            feature = _replace_usage(feature, Usage(current, start, end, stamp))
        features[feature.feature.id] = feature
    for credit in stored.credits:
        ref = usage_ref(CREDIT, credit.currency.currency_id)
        current, _, end, stamp = _usage_from(ref, usages)
        credits[credit.currency.currency_id] = CreditEntitlement(
            currency=credit.currency,
            usage_limit=credit.usage_limit,
            current_usage=current,
            has_soft_limit=credit.has_soft_limit,
            access_denied_reason=credit.access_denied_reason,
            usage_period_end=end,
            valid_until=credit.valid_until,
            updated_at=credit.updated_at,
            usage_updated_at=stamp,
        )
    return CustomerEntry(
        customer_id=customer_id,
        resource_id=resource_id or None,
        access_denied_reason=reason,
        features=features,
        credits=credits,
        timestamp=decode_timestamp(timestamp, "entitlements#timestamp"),
    )


def decode_from(
    prefix: str, customer_id: str, resource_id: str | None, lookup: Callable[[str], str | None]
) -> CustomerEntry | None:
    """The entry stored under `prefix`, reading each key with `lookup` (a dict's `get` in the
    tests); None on a miss (entitlements, its timestamp or any usage key missing). The reference
    for `RedisMirror.read`, minus the customer-entry rule for resources (which is not format)."""
    keys = EntryKeys(prefix, customer_id, resource_id)
    text, stamp = lookup(keys.entitlements), lookup(timestamp_key(keys.entitlements))
    if not text or stamp is None:
        return None
    stored = decode_entitlements(text, decode_timestamp(stamp, "entitlements#timestamp"))
    usages = {}
    for ref in stored.usage_refs:
        key = f"{keys.entitlements}:{ref}"
        usages[ref] = (lookup(key), lookup(timestamp_key(key)))
    try:
        return decode_entry(customer_id, resource_id, stored, lookup(keys.metadata), stamp, usages)
    except MissingUsage:
        return None


def decode_timestamp(text: str, where: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise FormatError(f"{where}: must be an integer (epoch ms)") from None


def _usage_from(
    ref: str, usages: Mapping[str, tuple[str | None, str | None]]
) -> tuple[float, int | None, int | None, int]:
    value, stamp = usages.get(ref, (None, None))
    if value is None or stamp is None:
        raise MissingUsage(ref)
    where = f"usage {ref}"
    usage = _obj(_load(value, where), where)
    try:
        return (
            _float(usage, "currentUsage", where) or 0.0,
            _opt_time(usage, "usagePeriodStart", where),
            _period_end(usage, where),
            decode_timestamp(stamp, f"{where}#timestamp"),
        )
    except (TypeError, OverflowError) as e:
        raise FormatError(f"{where}: {e}") from None


def _period_end(usage: dict[str, Any], where: str) -> int | None:
    """`usagePeriodEnd`, or the `nextResetDate` older Stigg writers used for it."""
    end = _opt_time(usage, "usagePeriodEnd", where)
    return _opt_time(usage, "nextResetDate", where) if end is None else end


def _replace_usage(feature: FeatureEntitlement, usage: Usage) -> FeatureEntitlement:
    return FeatureEntitlement(
        feature=feature.feature,
        usage_limit=feature.usage_limit,
        has_unlimited_usage=feature.has_unlimited_usage,
        has_soft_limit=feature.has_soft_limit,
        access_denied_reason=feature.access_denied_reason,
        enum_values=feature.enum_values,
        valid_until=feature.valid_until,
        usage_period_anchor=feature.usage_period_anchor,
        reset_period=feature.reset_period,
        credit_rate=feature.credit_rate,
        updated_at=feature.updated_at,
        usage=usage,
    )


def _feature_from(
    record: dict[str, Any], calculated: dict[str, Any], where: str, entry_timestamp: int
) -> FeatureEntitlement:
    cw = f"{where}.calculatedEntitlement"
    fw = f"{cw}.feature"
    raw = _obj(calculated.get("feature"), fw)
    feature = shared_feature(Feature(
        id=_str(raw, "id", fw),
        feature_type=_str(raw, "featureType", fw),
        meter_type=_opt_str(raw, "meterType", fw),
        units=_opt_str(raw, "units", fw),
        units_plural=_opt_str(raw, "unitsPlural", fw),
        display_name=_opt_str(raw, "displayName", fw),
        description=_opt_str(raw, "description", fw),
    ))
    # 3.x: featureUsage; 4.x: usageData. Either may be absent (a 4.x record without usage).
    uw = f"{where}.usageData" if "usageData" in record else f"{where}.featureUsage"
    raw_usage = record.get("usageData", record.get("featureUsage"))
    usage = {} if raw_usage is None else _obj(raw_usage, uw)
    rate = calculated.get("creditRate")
    credit_rate = None
    if rate is not None:
        rw = f"{cw}.creditRate"
        rate = _obj(rate, rw)
        credit_rate = CreditRate(amount=_float(rate, "amount", rw) or 0.0, currency_id=_str(rate, "currencyId", rw))
    enum_values = calculated.get("enumValues") or []
    if not isinstance(enum_values, list) or not all(isinstance(v, str) for v in enum_values):
        raise FormatError(f"{cw}.enumValues: must be a list of strings")
    anchor = _opt_time(calculated, "usagePeriodAnchor", cw)
    if anchor is None:
        anchor = _opt_time(usage, "usagePeriodAnchor", uw)
    reset_period = _opt_str(calculated, "resetPeriod", cw)
    if reset_period is None:
        reset_period = _opt_str(usage, "resetPeriod", uw)
    updated_at = _opt_time(calculated, "updatedAt", cw)
    if updated_at is None:
        updated_at = entry_timestamp
    usage_updated_at = _opt_time(usage, "updatedAt", uw)
    return FeatureEntitlement(
        feature=feature,
        usage_limit=_float(calculated, "usageLimit", cw),
        has_unlimited_usage=_bool(calculated, "hasUnlimitedUsage", cw),
        has_soft_limit=_bool(calculated, "hasSoftLimit", cw),
        access_denied_reason=_opt_str(calculated, "accessDeniedReason", cw),
        enum_values=tuple(enum_values),
        valid_until=_opt_time(calculated, "validUntil", cw),
        usage_period_anchor=anchor,
        reset_period=reset_period,
        credit_rate=credit_rate,
        updated_at=updated_at,
        usage=Usage(
            current_usage=_float(usage, "currentUsage", uw) or 0.0,
            usage_period_start=_opt_time(usage, "usagePeriodStart", uw),
            usage_period_end=_period_end(usage, uw),
            updated_at=updated_at if usage_updated_at is None else usage_updated_at,
        ),
    )


def _credit_from(calculated: dict[str, Any], where: str, entry_timestamp: int) -> CreditEntitlement:
    cw = f"{where}.currency"
    raw = _obj(calculated.get("currency"), cw)
    meta = raw.get("additionalMetaData")
    if meta is not None and not isinstance(meta, dict):
        raise FormatError(f"{cw}.additionalMetaData: must be an object or null")
    currency = Currency(
        currency_id=_str(raw, "currencyId", cw),
        display_name=_opt_str(raw, "displayName", cw),
        description=_opt_str(raw, "description", cw),
        unit_singular=_opt_str(raw, "unitSingular", cw),
        unit_plural=_opt_str(raw, "unitPlural", cw),
        additional_meta_data=None if meta is None else freeze_json(meta),
    )
    updated_at = _opt_time(calculated, "updatedAt", where)
    return CreditEntitlement(
        currency=currency,
        usage_limit=_float(calculated, "usageLimit", where) or 0.0,
        has_soft_limit=_bool(calculated, "hasSoftLimit", where),
        access_denied_reason=_opt_str(calculated, "accessDeniedReason", where),
        valid_until=_opt_time(calculated, "validUntil", where),
        updated_at=entry_timestamp if updated_at is None else updated_at,
    )


def _load(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise FormatError(f"{where}: not JSON") from None


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{where}: must be an object")
    return value


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise FormatError(f"{where}.{key}: must be a string")
    return value


_fields = FieldReader(FormatError)
_opt_str = _fields.string
_bool = _fields.flag
_float = _fields.number


def _opt_time(obj: dict[str, Any], key: str, where: str) -> int | None:
    """Epoch ms (as every writer of this format stores times) or an ISO-8601 string (what a
    writer passing the API's DateTime through would store); None when absent."""
    value = obj.get(key)
    if value is None:
        return None
    parsed = parse_time(value)
    if parsed is None:
        raise FormatError(f"{where}.{key}: must be epoch ms, an ISO-8601 date-time or null")
    return parsed
