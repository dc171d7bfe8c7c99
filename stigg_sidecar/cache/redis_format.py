"""Stigg's Redis format for one cache entry: the key names and the JSON under each key.

Owns the names (entry keys, `#timestamp` siblings, the fetch lock and its channel, the peer
changes channel) and the conversion between a `CustomerEntry` and the values stored in Redis,
in the shape Stigg's own SDKs share: what Node SDK 3.x writes and reads, plus the fields that
@stigg/cache-redis-store 1.29 (Node SDK 4.x, persistent-cache-service) migrates 3.x entries to,
so both generations read what this sidecar writes, and it reads what either writes.
docs/redis-format.md describes every key and field. Pure: no I/O, no clock, no logging. The
connection, the newer-wins scripts and the miss rules that need Redis live in `redis.py`.

One entry is stored as (STIGG_REFERENCE §3.3), with `B = {prefix}:{cache_key}`:

- `B`             {refId: {"calculatedEntitlement": {...}, "featureUsage": {...}}, ...}
- `B:metadata`    {"accessDeniedReason": ...}
- `B:f_{id}`      {"currentUsage", "usagePeriodStart", "usagePeriodEnd"} per metered feature
- `B:credit_{id}` the same shape per credit entitlement
- `<key>#timestamp`  epoch ms of the value beside it; usage times live only there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from stigg_sidecar.entitlements.fields import FieldReader, freeze_json, parse_time, thaw_json
from stigg_sidecar.entitlements.interning import shared_feature
from stigg_sidecar.entitlements.records import (
    CreditEntitlement,
    CreditRate,
    Currency,
    CustomerEntry,
    Feature,
    FeatureEntitlement,
    Usage,
    cache_key,
)

TIMESTAMP_SUFFIX = "#timestamp"
FEATURE = "FEATURE"
CREDIT = "CREDIT"

_FETCH = "refetchEntityEntitlementsAfterCacheMiss"


class FormatError(ValueError):
    """A stored value cannot be read (not JSON, or not Stigg's shape); the message names the
    place. The read is a miss."""


class LegacyFormat(FormatError):
    """The entitlements key holds this project's earlier `{"v": 1, ...}` envelope: a miss, and
    the refetch's write replaces it."""


class MissingUsage(LookupError):
    """A usage-tracked record's usage key (or its `#timestamp`) is missing: the read is a miss."""


# --------------------------------------------------------------------------- names


def timestamp_key(key: str) -> str:
    return key + TIMESTAMP_SUFFIX


def usage_ref(kind: str, ref_id: str) -> str:
    """The suffix of a usage key: `f_{featureId}` or `credit_{currencyId}`."""
    if kind == FEATURE:
        return f"f_{ref_id}"
    if kind == CREDIT:
        return f"credit_{ref_id}"
    raise ValueError(f"unknown usage kind {kind!r} (FEATURE or CREDIT)")


def changes_channel(prefix: str) -> str:
    """The pub/sub channel on which sidecars announce the entries they changed."""
    return f"{prefix}:sidecar:changes"


@dataclass(frozen=True, slots=True)
class EntryKeys:
    """Every Redis name that belongs to one customer (or customer+resource) entry."""

    prefix: str
    customer_id: str
    resource_id: str | None = None

    @property
    def cache_key(self) -> str:
        return cache_key(self.customer_id, self.resource_id)

    @property
    def entitlements(self) -> str:
        return f"{self.prefix}:{self.cache_key}"

    @property
    def metadata(self) -> str:
        return f"{self.entitlements}:metadata"

    def usage(self, kind: str, ref_id: str) -> str:
        return f"{self.entitlements}:{usage_ref(kind, ref_id)}"

    @property
    def customer_timestamp(self) -> str:
        """The `#timestamp` of the customer-level entry (Stigg's "global" entry)."""
        return timestamp_key(f"{self.prefix}:{cache_key(self.customer_id, None)}")

    @property
    def _entity(self) -> str:
        return f"{self.customer_id}:{self.resource_id}" if self.resource_id else self.customer_id

    @property
    def fetch_lock(self) -> str:
        return f"{self.prefix}:{_FETCH}-{self._entity}"

    @property
    def fetch_channel(self) -> str:
        return f"{self.prefix}:{_FETCH}:{self._entity}"


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True, slots=True)
class Item:
    """One value to store under `key`, with `key#timestamp` set to `timestamp` (epoch ms)."""

    key: str
    value: str
    timestamp: int


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def is_usage_tracked(entitlement: FeatureEntitlement | CreditEntitlement) -> bool:
    """Whether the entitlement's usage lives in its own key (metered features and all credits)."""
    return isinstance(entitlement, CreditEntitlement) or entitlement.feature.is_metered


def credit_record_key(currency_id: str) -> str:
    """Where a credit entitlement sits in the entitlements object. Features sit under their
    refId, as Node SDK 3.x keys them; the key of a credit is this project's choice (4.x's is
    in the unpublished cache-core), and readers go by the record's `type`, not its key."""
    return f"credit:{currency_id}"


def encode_entry(prefix: str, entry: CustomerEntry) -> list[Item]:
    """The items that store `entry`: entitlements first, then metadata, then one per usage key."""
    keys = EntryKeys(prefix, entry.customer_id, entry.resource_id)
    records: dict[str, Any] = {}
    usages: list[Item] = []
    for feature in entry.features.values():
        records[feature.feature.id] = _feature_record(feature)
        if is_usage_tracked(feature):
            usage = feature.usage
            value = encode_usage(usage.current_usage, usage.usage_period_start, usage.usage_period_end)
            usages.append(Item(keys.usage(FEATURE, feature.feature.id), value, usage.updated_at))
    for credit in entry.credits.values():
        records[credit_record_key(credit.currency.currency_id)] = _credit_record(credit)
        value = encode_usage(credit.current_usage, None, credit.usage_period_end)
        usages.append(Item(keys.usage(CREDIT, credit.currency.currency_id), value, credit.usage_updated_at))
    return [
        Item(keys.entitlements, dumps(records), entry.timestamp),
        Item(keys.metadata, dumps({"accessDeniedReason": entry.access_denied_reason}), entry.timestamp),
        *usages,
    ]


def encode_usage(current_usage: float, usage_period_start: int | None, usage_period_end: int | None) -> str:
    """A usage key's value; a period bound that is not known is left out, as Node SDK 3.x's
    JSON.stringify leaves out `undefined`."""
    return dumps(_present({
        "currentUsage": current_usage,
        "usagePeriodStart": usage_period_start,
        "usagePeriodEnd": usage_period_end,
    }))


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` without the ones that are None: absent reads as null in both generations."""
    return {k: v for k, v in fields.items() if v is not None}


def _feature_record(entitlement: FeatureEntitlement) -> dict[str, Any]:
    feature = entitlement.feature
    usage = entitlement.usage
    rate = entitlement.credit_rate
    calculated = _present({
        "type": FEATURE,  # 4.x's discriminator; 3.x ignores it
        "feature": _present({
            "id": feature.id,
            "featureType": feature.feature_type,
            "meterType": feature.meter_type,
            "units": feature.units,
            "unitsPlural": feature.units_plural,
            "displayName": feature.display_name,
            "description": feature.description,
        }),
        "usageLimit": entitlement.usage_limit,
        "hasUnlimitedUsage": entitlement.has_unlimited_usage,
        "hasSoftLimit": entitlement.has_soft_limit,
        "accessDeniedReason": entitlement.access_denied_reason,
        "enumValues": list(entitlement.enum_values),
        "validUntil": entitlement.valid_until,
        "creditRate": None if rate is None else {"amount": rate.amount, "currencyId": rate.currency_id},
        # Where 4.x's migration moves them to; 3.x reads them from featureUsage below.
        "usagePeriodAnchor": entitlement.usage_period_anchor,
        "resetPeriod": entitlement.reset_period,
        "updatedAt": entitlement.updated_at,
    })
    # 3.x's featureUsage (4.x renames it usageData on read). For a metered feature the usage key
    # wins over it in both readers; for the others it is the only usage there is.
    feature_usage = _present({
        "resetPeriod": entitlement.reset_period,
        "usagePeriodAnchor": entitlement.usage_period_anchor,
        "currentUsage": usage.current_usage,
        "usagePeriodStart": usage.usage_period_start,
        "usagePeriodEnd": usage.usage_period_end,
        "updatedAt": usage.updated_at,
    })
    return {"calculatedEntitlement": calculated, "featureUsage": feature_usage}


def _credit_record(credit: CreditEntitlement) -> dict[str, Any]:
    # A 3.x reader sees a record without a feature: never metered, never matched by a feature
    # refId, listed by getEntitlements as a denied boolean. Its usage is only in its usage key.
    currency = credit.currency
    meta = currency.additional_meta_data
    return {
        "calculatedEntitlement": _present({
            "type": CREDIT,
            "currency": _present({
                "currencyId": currency.currency_id,
                "displayName": currency.display_name,
                "description": currency.description,
                "unitSingular": currency.unit_singular,
                "unitPlural": currency.unit_plural,
                "additionalMetaData": None if meta is None else thaw_json(meta),
            }),
            "usageLimit": credit.usage_limit,
            "hasSoftLimit": credit.has_soft_limit,
            "accessDeniedReason": credit.access_denied_reason,
            "validUntil": credit.valid_until,
            "updatedAt": credit.updated_at,
        })
    }


# --------------------------------------------------------------------------- decoding


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

# --------------------------------------------------------------------------- messages


def encode_change(cache_key: str, instance: str, kind: str) -> str:
    """A peer notification: `kind` is "entry", "usage" or "purge"."""
    return dumps({"key": cache_key, "instance": instance, "kind": kind})


def decode_change(text: Any) -> tuple[str, str, str] | None:
    """(key, instance, kind) of a peer notification, or None when it is not one."""
    try:
        message = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(message, dict):
        return None
    fields = message.get("key"), message.get("instance"), message.get("kind")
    if not all(isinstance(f, str) for f in fields):
        return None
    return fields  # type: ignore[return-value]


def encode_fetch_result(error: str | None) -> str:
    """What the fetch-lock holder publishes: `{}` on success, `{"error": msg}` on failure."""
    return "{}" if error is None else dumps({"error": error})


def fetch_succeeded(text: Any) -> bool:
    """Whether a fetch-channel message reports success (`{}`; anything with "error" is failure)."""
    try:
        message = json.loads(text)
    except (TypeError, ValueError):
        return False
    return isinstance(message, dict) and message.get("error") is None
