"""Entitlements in the shape of Stigg's API (entitlementsV2 items), for emulator seeds."""

from __future__ import annotations

from typing import Any

UPDATED = "2026-11-01T00:00:00.000Z"


def feature(ref: str, feature_type: str = "BOOLEAN", meter_type: str = "None", **fields: Any) -> dict:
    item = {
        "__typename": "FeatureEntitlement",
        "isGranted": True,
        "entitlementUpdatedAt": UPDATED,
        "feature": {"refId": ref, "featureType": feature_type, "meterType": meter_type, "displayName": ref},
    }
    item.update(fields)
    return item


def metered(ref: str, limit: float | None, usage: float = 0, meter: str = "Incremental", **fields: Any) -> dict:
    return feature(ref, "NUMBER", meter, usageLimit=limit, currentUsage=usage, usageUpdatedAt=UPDATED, **fields)


def credit(currency: str, limit: float, used: float, **fields: Any) -> dict:
    item = {
        "__typename": "CreditEntitlement",
        "isGranted": True,
        "entitlementUpdatedAt": UPDATED,
        "usageUpdatedAt": UPDATED,
        "currency": {"currencyId": currency, "displayName": currency},
        "usageLimit": limit,
        "currentUsage": used,
        "hasSoftLimit": False,
    }
    item.update(fields)
    return item


def customer(*entitlements: dict, reason: str | None = None, resources: dict | None = None) -> dict:
    body: dict = {"accessDeniedReason": reason, "entitlements": list(entitlements)}
    if resources:
        body["resources"] = resources
    return body


ACME = customer(
    feature("sso"),
    feature("projects", "NUMBER", "None", usageLimit=10),
    feature("seats-unlimited", "NUMBER", "None", hasUnlimitedUsage=True),
    metered("api-calls", 100, 90),
    metered("dashboards", None, 500, meter="Fluctuating", hasUnlimitedUsage=True),
    metered("exports", 10, 50, hasSoftLimit=True),
    feature("regions", "ENUM", enumValues=["us", "eu"]),
    feature("beta", accessDeniedReason="Revoked", isGranted=False),
    credit("tokens", 1000, 400),
    credit("empty-wallet", 10, 10),
)

SEED = {
    "apiKeys": ["test-key"],
    "customers": {
        "acme": ACME,
        "archived": customer(feature("sso"), reason="CustomerIsArchived"),
        "lapsed": customer(reason="NoActiveSubscription"),
    },
}
