"""Seed customers for the benchmarks: ids and ten entitlements each, one of every kind.

Pure data in the emulator's compact data-file form (stigg_sidecar/emulator/data.py fills in the
rest); the expected answers of the checks follow from `METERED_LIMIT` and `current_usage`.
"""

from __future__ import annotations

METERED_LIMIT = 1000.0


def customer_id(i: int) -> str:
    return f"bench-customer-{i}"


def current_usage(i: int) -> float:
    """Usage of feature-api-calls; differs per customer, so a crossed answer shows."""
    return 250.0 + i % 500


def _feature(ref: str, ftype: str, meter: str | None = None) -> dict:
    feature = {"refId": ref, "displayName": ref.replace("-", " "), "featureType": ftype}
    if meter:
        feature["meterType"] = meter
    return feature


def entitlements(i: int) -> list[dict]:
    """Ten features: five booleans, a revoked boolean, numeric, metered, unlimited metered, enum."""
    return [
        *({"isGranted": True, "feature": _feature(f"feature-bool-{n}", "BOOLEAN", "None")} for n in range(5)),
        {
            "isGranted": False,
            "accessDeniedReason": "Revoked",
            "feature": _feature("feature-revoked", "BOOLEAN", "None"),
        },
        {"isGranted": True, "usageLimit": 25, "feature": _feature("feature-seats", "NUMBER", "None")},
        {
            "isGranted": True,
            "usageLimit": METERED_LIMIT,
            "currentUsage": current_usage(i),
            "feature": _feature("feature-api-calls", "NUMBER", "Incremental"),
        },
        {
            "isGranted": True,
            "hasUnlimitedUsage": True,
            "currentUsage": 42,
            "feature": _feature("feature-storage", "NUMBER", "Fluctuating"),
        },
        {"isGranted": True, "enumValues": ["us-east-1", "eu-west-1"], "feature": _feature("feature-region", "ENUM")},
    ]
