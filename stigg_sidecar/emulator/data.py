"""The emulator's data file: its format, its validation, and Stigg's entitlement JSON shapes.

Owns the parsing of the data file (and of the admin API's PUT bodies, which use the same
per-customer shape, resources included) into `EmulatorData`, with error messages that name the offending place, e.g.
``customers.acme.entitlements[2].feature.featureType: must be one of BOOLEAN, NUMBER, ENUM``.
Entitlements are normalised into exactly the JSON Stigg's API returns (every field of the client
fragments present, ``__typename`` on every object), so they can be served as they are.
Also owns the V1 (``Entitlement``) view of a feature entitlement; the GraphQL DateTime format
and the readers of single fields are `fields.py`'s.

Pure: no I/O except `load_data_file`, no clock (missing timestamps stay ``None``; the state
fills them in), no globals.

Format::

    {"apiKeys": ["local-dev-key"],
     "customers": {
       "acme": {"accessDeniedReason": null,
                "entitlements": [{"__typename": "FeatureEntitlement", "feature": {...}, ...},
                                 {"__typename": "CreditEntitlement", "currency": {...}, ...}],
                "resources": {"site-1": {"accessDeniedReason": null, "entitlements": [...]}}}}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stigg_sidecar.emulator.fields import (
    DataError,
    as_object,
    boolean_field,
    check_keys,
    check_typename,
    child_place,
    enum_field,
    number_field,
    parse_timestamp,
    string_field,
    string_list_field,
    timestamp_field,
)

ACCESS_DENIED_REASONS = (
    "BudgetExceeded", "CustomerIsArchived", "CustomerNotFound", "CustomerResourceNotFound",
    "EntitlementNotFound", "FeatureNotFound", "FeatureTypeMismatch", "InsufficientCredits",
    "NoActiveSubscription", "NoFeatureEntitlementInSubscription", "RequestedUsageExceedingLimit",
    "RequestedValuesMismatch", "Revoked", "Unknown",
)  # fmt: skip
STATE_ACCESS_DENIED_REASONS = ("CustomerIsArchived", "CustomerNotFound", "NoActiveSubscription")
FEATURE_TYPES = ("BOOLEAN", "NUMBER", "ENUM")
METER_TYPES = ("None", "Fluctuating", "Incremental")
METERED_TYPES = ("Fluctuating", "Incremental")
RESET_PERIODS = ("DAY", "HOUR", "MONTH", "WEEK", "YEAR")
ROUNDINGS = ("UP", "DOWN")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
RESET_PERIOD_CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "MonthlyResetPeriodConfig": ("monthlyAccordingTo", ("SubscriptionStart", "StartOfTheMonth")),
    "WeeklyResetPeriodConfig": (
        "weeklyAccordingTo",
        ("SubscriptionStart", *(f"Every{day}" for day in _WEEKDAYS)),
    ),
    "YearlyResetPeriodConfig": ("yearlyAccordingTo", ("SubscriptionStart",)),
}

_FEATURE_ENTITLEMENT_FIELDS = (
    "__typename", "isGranted", "accessDeniedReason", "usageLimit", "hasUnlimitedUsage",
    "hasSoftLimit", "currentUsage", "enumValues", "entitlementUpdatedAt", "usageUpdatedAt",
    "usagePeriodAnchor", "usagePeriodStart", "usagePeriodEnd", "resetPeriod",
    "resetPeriodConfiguration", "feature", "creditRate", "validUntil",
)  # fmt: skip
_CREDIT_ENTITLEMENT_FIELDS = (
    "__typename", "isGranted", "accessDeniedReason", "currency", "usageLimit", "currentUsage",
    "hasSoftLimit", "usageUpdatedAt", "entitlementUpdatedAt", "usagePeriodEnd", "validUntil",
)  # fmt: skip
_FEATURE_FIELDS = (
    "__typename", "refId", "featureType", "meterType", "displayName", "description",
    "featureUnits", "featureUnitsPlural", "unitTransformation",
)  # fmt: skip
_CURRENCY_FIELDS = (
    "__typename", "currencyId", "displayName", "description", "unitSingular", "unitPlural",
    "additionalMetaData",
)  # fmt: skip
@dataclass
class EntityState:
    """What Stigg knows about one customer, or one resource of a customer."""

    access_denied_reason: str | None = None
    entitlements: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CustomerData:
    state: EntityState
    resources: dict[str, EntityState] = field(default_factory=dict)


@dataclass
class EmulatorData:
    api_keys: list[str]
    customers: dict[str, CustomerData]


# -- entry points ---------------------------------------------------------------------------------


def load_data_file(path: str) -> EmulatorData:
    """Read and validate a data file; a DataError's message starts with the path."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    try:
        return parse_data(raw)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None


def parse_data(raw: object) -> EmulatorData:
    """Validate a decoded data file."""
    top = as_object(raw, "(top level)")
    check_keys(top, ("apiKeys", "customers", "description"), "")
    keys = top.get("apiKeys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise DataError("apiKeys: must be a list of non-empty strings")
    customers_raw = as_object(top.get("customers", {}), "customers")
    customers = {}
    for customer_id, customer_raw in customers_raw.items():
        place = child_place("customers", customer_id)
        if not customer_id:
            raise DataError(f"{place}: customer ids must be non-empty")
        customers[customer_id] = parse_customer(customer_raw, place=place)
    return EmulatorData(api_keys=list(keys), customers=customers)


def parse_customer(raw: object, *, place: str = "") -> CustomerData:
    """Validate one customer of the data file: ``{"accessDeniedReason", "entitlements",
    "resources": {resourceId: {"accessDeniedReason", "entitlements"}}}`` (the admin PUT body)."""
    customer_obj = as_object(raw, place or "(body)")
    check_keys(customer_obj, ("accessDeniedReason", "entitlements", "resources"), place)
    state = parse_entity_state(
        {k: v for k, v in customer_obj.items() if k != "resources"}, place=place
    )
    resources = {}
    resources_place = child_place(place, "resources")
    for resource_id, resource_raw in as_object(
        customer_obj.get("resources", {}), resources_place
    ).items():
        resource_place = child_place(resources_place, resource_id)
        if not resource_id:
            raise DataError(f"{resource_place}: resource ids must be non-empty")
        resources[resource_id] = parse_entity_state(resource_raw, place=resource_place)
    return CustomerData(state, resources)


def parse_entity_state(raw: object, *, place: str = "") -> EntityState:
    """Validate one customer's or resource's ``{"accessDeniedReason", "entitlements"}``."""
    obj = as_object(raw, place or "(body)")
    check_keys(obj, ("accessDeniedReason", "entitlements"), place)
    reason = enum_field(obj, "accessDeniedReason", STATE_ACCESS_DENIED_REASONS, place)
    items_place = child_place(place, "entitlements")
    items = obj.get("entitlements", [])
    if not isinstance(items, list):
        raise DataError(f"{items_place}: must be a list")
    entitlements = [
        parse_entitlement(item, f"{items_place}[{index}]") for index, item in enumerate(items)
    ]
    seen: dict[str, int] = {}
    for index, item in enumerate(entitlements):
        key = entitlement_key(item)
        if key in seen:
            raise DataError(
                f"{items_place}[{index}]: duplicates {items_place}[{seen[key]}] ({key})"
            )
        seen[key] = index
    return EntityState(reason, entitlements)


def entitlement_key(entitlement: Mapping[str, Any]) -> str:
    """``feature:<refId>`` or ``credit:<currencyId>``: what an entitlement is about."""
    if entitlement["__typename"] == "FeatureEntitlement":
        return f"feature:{entitlement['feature']['refId']}"
    return f"credit:{entitlement['currency']['currencyId']}"


def is_metered(entitlement: Mapping[str, Any]) -> bool:
    feature = entitlement.get("feature") or {}
    return feature.get("featureType") == "NUMBER" and feature.get("meterType") in METERED_TYPES


def parse_entitlement(raw: object, place: str) -> dict[str, Any]:
    """One ``entitlementsV2`` item, normalised to the API's shape."""
    obj = as_object(raw, place)
    typename = obj.get("__typename")
    if typename is None:
        typename = "CreditEntitlement" if "currency" in obj else "FeatureEntitlement"
    if typename == "FeatureEntitlement":
        return _feature_entitlement(obj, place)
    if typename == "CreditEntitlement":
        return _credit_entitlement(obj, place)
    raise DataError(f"{place}.__typename: must be one of FeatureEntitlement, CreditEntitlement")


def v1_entitlement(
    entitlement: Mapping[str, Any], customer_id: str, resource_id: str | None
) -> dict[str, Any]:
    """The V1 ``Entitlement`` shape of a feature entitlement (GetEntitlements, entitlements.json)."""
    valid_until = entitlement["validUntil"]
    return {
        "__typename": "Entitlement",
        "isGranted": entitlement["isGranted"],
        "accessDeniedReason": entitlement["accessDeniedReason"],
        "customerId": customer_id,
        "resourceId": resource_id,
        "usageLimit": entitlement["usageLimit"],
        "hasUnlimitedUsage": entitlement["hasUnlimitedUsage"],
        "hasSoftLimit": entitlement["hasSoftLimit"],
        "currentUsage": entitlement["currentUsage"],
        "requestedUsage": None,
        "requestedValues": None,
        "enumValues": entitlement["enumValues"],
        "entitlementUpdatedAt": entitlement["entitlementUpdatedAt"],
        "usageUpdatedAt": entitlement["usageUpdatedAt"],
        "usagePeriodAnchor": entitlement["usagePeriodAnchor"],
        "usagePeriodStart": entitlement["usagePeriodStart"],
        "usagePeriodEnd": entitlement["usagePeriodEnd"],
        "nextResetDate": entitlement["usagePeriodEnd"],
        "resetPeriod": entitlement["resetPeriod"],
        "resetPeriodConfiguration": entitlement["resetPeriodConfiguration"],
        "feature": entitlement["feature"],
        "creditRate": entitlement["creditRate"],
        # V1 `Entitlement.validUntil` is a Float (epoch ms), unlike FeatureEntitlement's DateTime.
        "validUntil": (
            parse_timestamp(valid_until).timestamp() * 1000 if valid_until is not None else None
        ),
    }


# -- entitlement shapes ---------------------------------------------------------------------------


def _feature_entitlement(obj: Mapping[str, Any], place: str) -> dict[str, Any]:
    check_keys(obj, _FEATURE_ENTITLEMENT_FIELDS, place)
    feature = _feature(obj.get("feature"), child_place(place, "feature"))
    metered = feature["featureType"] == "NUMBER" and feature["meterType"] in METERED_TYPES
    reason = enum_field(obj, "accessDeniedReason", ACCESS_DENIED_REASONS, place)
    enum_values = string_list_field(obj, "enumValues", place)
    if enum_values is None and feature["featureType"] == "ENUM":
        enum_values = []
    current_usage = number_field(obj, "currentUsage", place)
    credit_rate = obj.get("creditRate")
    if credit_rate is not None:
        rate_place = child_place(place, "creditRate")
        rate = as_object(credit_rate, rate_place)
        check_keys(rate, ("__typename", "amount", "currencyId"), rate_place)
        credit_rate = {
            "__typename": "CreditRate",
            "amount": number_field(rate, "amount", rate_place, required=True),
            "currencyId": string_field(rate, "currencyId", rate_place, required=True),
        }
    return {
        "__typename": "FeatureEntitlement",
        "isGranted": _is_granted(obj, reason, place),
        "accessDeniedReason": reason,
        "usageLimit": number_field(obj, "usageLimit", place),
        "hasUnlimitedUsage": boolean_field(obj, "hasUnlimitedUsage", place, default=False),
        "hasSoftLimit": boolean_field(obj, "hasSoftLimit", place, default=False),
        "currentUsage": 0 if current_usage is None and metered else current_usage,
        "enumValues": enum_values,
        "entitlementUpdatedAt": timestamp_field(obj, "entitlementUpdatedAt", place),
        "usageUpdatedAt": timestamp_field(obj, "usageUpdatedAt", place),
        "usagePeriodAnchor": timestamp_field(obj, "usagePeriodAnchor", place),
        "usagePeriodStart": timestamp_field(obj, "usagePeriodStart", place),
        "usagePeriodEnd": timestamp_field(obj, "usagePeriodEnd", place),
        "resetPeriod": enum_field(obj, "resetPeriod", RESET_PERIODS, place),
        "resetPeriodConfiguration": _reset_period_configuration(obj, place),
        "feature": feature,
        "creditRate": credit_rate,
        "validUntil": timestamp_field(obj, "validUntil", place),
    }


def _credit_entitlement(obj: Mapping[str, Any], place: str) -> dict[str, Any]:
    check_keys(obj, _CREDIT_ENTITLEMENT_FIELDS, place)
    currency_place = child_place(place, "currency")
    currency = as_object(obj.get("currency"), currency_place)
    check_keys(currency, _CURRENCY_FIELDS, currency_place)
    check_typename(currency, "EntitlementCurrency", currency_place)
    currency_id = string_field(currency, "currencyId", currency_place, required=True)
    reason = enum_field(obj, "accessDeniedReason", ACCESS_DENIED_REASONS, place)
    current_usage = number_field(obj, "currentUsage", place)
    return {
        "__typename": "CreditEntitlement",
        "isGranted": _is_granted(obj, reason, place),
        "accessDeniedReason": reason,
        "currency": {
            "__typename": "EntitlementCurrency",
            "currencyId": currency_id,
            "displayName": string_field(currency, "displayName", currency_place) or currency_id,
            "description": string_field(currency, "description", currency_place),
            "unitSingular": string_field(currency, "unitSingular", currency_place),
            "unitPlural": string_field(currency, "unitPlural", currency_place),
            "additionalMetaData": currency.get("additionalMetaData"),
        },
        "usageLimit": number_field(obj, "usageLimit", place),
        "currentUsage": 0 if current_usage is None else current_usage,
        "hasSoftLimit": boolean_field(obj, "hasSoftLimit", place, default=False),
        "usageUpdatedAt": timestamp_field(obj, "usageUpdatedAt", place),
        "entitlementUpdatedAt": timestamp_field(obj, "entitlementUpdatedAt", place),
        "usagePeriodEnd": timestamp_field(obj, "usagePeriodEnd", place),
        "validUntil": timestamp_field(obj, "validUntil", place),
    }


def _feature(raw: object, place: str) -> dict[str, Any]:
    obj = as_object(raw, place)
    check_keys(obj, _FEATURE_FIELDS, place)
    check_typename(obj, "EntitlementFeature", place)
    ref_id = string_field(obj, "refId", place, required=True)
    feature_type = enum_field(obj, "featureType", FEATURE_TYPES, place, required=True)
    meter_type = enum_field(obj, "meterType", METER_TYPES, place)
    if meter_type in METERED_TYPES and feature_type != "NUMBER":
        raise DataError(f"{child_place(place, 'meterType')}: only NUMBER features can be metered")
    transformation = obj.get("unitTransformation")
    if transformation is not None:
        tr_place = child_place(place, "unitTransformation")
        tr = as_object(transformation, tr_place)
        check_keys(
            tr,
            ("__typename", "divide", "round", "featureUnits", "featureUnitsPlural"),
            tr_place,
        )
        divide = number_field(tr, "divide", tr_place, required=True)
        if divide <= 0:
            raise DataError(f"{child_place(tr_place, 'divide')}: must be greater than 0")
        transformation = {
            "__typename": "UnitTransformation",
            "divide": divide,
            "round": enum_field(tr, "round", ROUNDINGS, tr_place, required=True),
            "featureUnits": string_field(tr, "featureUnits", tr_place),
            "featureUnitsPlural": string_field(tr, "featureUnitsPlural", tr_place),
        }
    return {
        "__typename": "EntitlementFeature",
        "featureType": feature_type,
        "meterType": meter_type,
        "featureUnits": string_field(obj, "featureUnits", place),
        "featureUnitsPlural": string_field(obj, "featureUnitsPlural", place),
        "description": string_field(obj, "description", place),
        "displayName": string_field(obj, "displayName", place) or ref_id,
        "refId": ref_id,
        "unitTransformation": transformation,
    }


def _reset_period_configuration(obj: Mapping[str, Any], place: str) -> dict[str, Any] | None:
    raw = obj.get("resetPeriodConfiguration")
    if raw is None:
        return None
    config_place = child_place(place, "resetPeriodConfiguration")
    config = as_object(raw, config_place)
    typename = config.get("__typename")
    if typename is None:  # infer it from the one "...AccordingTo" key given
        typename = next(
            (name for name, (key, _) in RESET_PERIOD_CONFIGS.items() if key in config), None
        )
    if typename not in RESET_PERIOD_CONFIGS:
        raise DataError(
            f"{config_place}.__typename: must be one of {', '.join(RESET_PERIOD_CONFIGS)}"
        )
    key, choices = RESET_PERIOD_CONFIGS[typename]
    check_keys(config, ("__typename", key), config_place)
    return {"__typename": typename, key: enum_field(config, key, choices, config_place)}


def _is_granted(obj: Mapping[str, Any], reason: str | None, place: str) -> bool:
    granted = boolean_field(obj, "isGranted", place, default=reason is None)
    if granted and reason is not None:
        raise DataError(f"{child_place(place, 'isGranted')}: cannot be true with an accessDeniedReason")
    return granted
