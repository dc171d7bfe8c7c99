"""A `CustomerEntry` as the values Stigg's writers store (Node SDK 3.x's shape, plus the fields
cache-redis-store 1.29 migrates to): one `Item` per key, with its `#timestamp`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from stigg_sidecar.cache.redis.format.names import CREDIT, FEATURE, EntryKeys
from stigg_sidecar.entitlements.fields import thaw_json
from stigg_sidecar.entitlements.records import CreditEntitlement, CustomerEntry, FeatureEntitlement


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
