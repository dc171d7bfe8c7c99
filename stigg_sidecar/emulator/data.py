"""The emulator's data file: its format, its validation, and Stigg's entitlement JSON shapes.

Owns the parsing of the data file (and of the admin API's PUT bodies, which use the same
per-customer shape, resources included) into `EmulatorData`, with error messages that name the offending place, e.g.
``customers.acme.entitlements[2].feature.featureType: must be one of BOOLEAN, NUMBER, ENUM``.
Entitlements are normalised into exactly the JSON Stigg's API returns (every field of the client
fragments present, ``__typename`` on every object), so they can be served as they are.
Also owns the GraphQL DateTime format and the V1 (``Entitlement``) view of a feature entitlement.

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

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

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
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class DataError(ValueError):
    """Data that does not describe valid Stigg state; ``str()`` names the place and the problem."""


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


# -- timestamps -----------------------------------------------------------------------------------


def format_timestamp(moment: datetime) -> str:
    """GraphQL DateTime as Stigg sends it: UTC, milliseconds, ``Z``."""
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_timestamp(value: str) -> datetime:
    """An ISO-8601 timestamp with a timezone (``Z`` or an offset); raises ValueError otherwise."""
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("no timezone")
    return moment.astimezone(timezone.utc)


def timestamp_from_seconds(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


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
    top = _object(raw, "(top level)")
    _check_keys(top, ("apiKeys", "customers", "description"), "")
    keys = top.get("apiKeys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise DataError("apiKeys: must be a list of non-empty strings")
    customers_raw = _object(top.get("customers", {}), "customers")
    customers = {}
    for customer_id, customer_raw in customers_raw.items():
        place = _child("customers", customer_id)
        if not customer_id:
            raise DataError(f"{place}: customer ids must be non-empty")
        customers[customer_id] = parse_customer(customer_raw, place=place)
    return EmulatorData(api_keys=list(keys), customers=customers)


def parse_customer(raw: object, *, place: str = "") -> CustomerData:
    """Validate one customer of the data file: ``{"accessDeniedReason", "entitlements",
    "resources": {resourceId: {"accessDeniedReason", "entitlements"}}}`` (the admin PUT body)."""
    customer_obj = _object(raw, place or "(body)")
    _check_keys(customer_obj, ("accessDeniedReason", "entitlements", "resources"), place)
    state = parse_entity_state(
        {k: v for k, v in customer_obj.items() if k != "resources"}, place=place
    )
    resources = {}
    resources_place = _child(place, "resources")
    for resource_id, resource_raw in _object(
        customer_obj.get("resources", {}), resources_place
    ).items():
        resource_place = _child(resources_place, resource_id)
        if not resource_id:
            raise DataError(f"{resource_place}: resource ids must be non-empty")
        resources[resource_id] = parse_entity_state(resource_raw, place=resource_place)
    return CustomerData(state, resources)


def parse_entity_state(raw: object, *, place: str = "") -> EntityState:
    """Validate one customer's or resource's ``{"accessDeniedReason", "entitlements"}``."""
    obj = _object(raw, place or "(body)")
    _check_keys(obj, ("accessDeniedReason", "entitlements"), place)
    reason = _enum(obj, "accessDeniedReason", STATE_ACCESS_DENIED_REASONS, place)
    items_place = _child(place, "entitlements")
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
    obj = _object(raw, place)
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
    _check_keys(obj, _FEATURE_ENTITLEMENT_FIELDS, place)
    feature = _feature(obj.get("feature"), _child(place, "feature"))
    metered = feature["featureType"] == "NUMBER" and feature["meterType"] in METERED_TYPES
    reason = _enum(obj, "accessDeniedReason", ACCESS_DENIED_REASONS, place)
    enum_values = _string_list(obj, "enumValues", place)
    if enum_values is None and feature["featureType"] == "ENUM":
        enum_values = []
    current_usage = _number(obj, "currentUsage", place)
    credit_rate = obj.get("creditRate")
    if credit_rate is not None:
        rate_place = _child(place, "creditRate")
        rate = _object(credit_rate, rate_place)
        _check_keys(rate, ("__typename", "amount", "currencyId"), rate_place)
        credit_rate = {
            "__typename": "CreditRate",
            "amount": _number(rate, "amount", rate_place, required=True),
            "currencyId": _string(rate, "currencyId", rate_place, required=True),
        }
    return {
        "__typename": "FeatureEntitlement",
        "isGranted": _is_granted(obj, reason, place),
        "accessDeniedReason": reason,
        "usageLimit": _number(obj, "usageLimit", place),
        "hasUnlimitedUsage": _boolean(obj, "hasUnlimitedUsage", place, default=False),
        "hasSoftLimit": _boolean(obj, "hasSoftLimit", place, default=False),
        "currentUsage": 0 if current_usage is None and metered else current_usage,
        "enumValues": enum_values,
        "entitlementUpdatedAt": _timestamp(obj, "entitlementUpdatedAt", place),
        "usageUpdatedAt": _timestamp(obj, "usageUpdatedAt", place),
        "usagePeriodAnchor": _timestamp(obj, "usagePeriodAnchor", place),
        "usagePeriodStart": _timestamp(obj, "usagePeriodStart", place),
        "usagePeriodEnd": _timestamp(obj, "usagePeriodEnd", place),
        "resetPeriod": _enum(obj, "resetPeriod", RESET_PERIODS, place),
        "resetPeriodConfiguration": _reset_period_configuration(obj, place),
        "feature": feature,
        "creditRate": credit_rate,
        "validUntil": _timestamp(obj, "validUntil", place),
    }


def _credit_entitlement(obj: Mapping[str, Any], place: str) -> dict[str, Any]:
    _check_keys(obj, _CREDIT_ENTITLEMENT_FIELDS, place)
    currency_place = _child(place, "currency")
    currency = _object(obj.get("currency"), currency_place)
    _check_keys(currency, _CURRENCY_FIELDS, currency_place)
    _typename(currency, "EntitlementCurrency", currency_place)
    currency_id = _string(currency, "currencyId", currency_place, required=True)
    reason = _enum(obj, "accessDeniedReason", ACCESS_DENIED_REASONS, place)
    current_usage = _number(obj, "currentUsage", place)
    return {
        "__typename": "CreditEntitlement",
        "isGranted": _is_granted(obj, reason, place),
        "accessDeniedReason": reason,
        "currency": {
            "__typename": "EntitlementCurrency",
            "currencyId": currency_id,
            "displayName": _string(currency, "displayName", currency_place) or currency_id,
            "description": _string(currency, "description", currency_place),
            "unitSingular": _string(currency, "unitSingular", currency_place),
            "unitPlural": _string(currency, "unitPlural", currency_place),
            "additionalMetaData": currency.get("additionalMetaData"),
        },
        "usageLimit": _number(obj, "usageLimit", place),
        "currentUsage": 0 if current_usage is None else current_usage,
        "hasSoftLimit": _boolean(obj, "hasSoftLimit", place, default=False),
        "usageUpdatedAt": _timestamp(obj, "usageUpdatedAt", place),
        "entitlementUpdatedAt": _timestamp(obj, "entitlementUpdatedAt", place),
        "usagePeriodEnd": _timestamp(obj, "usagePeriodEnd", place),
        "validUntil": _timestamp(obj, "validUntil", place),
    }


def _feature(raw: object, place: str) -> dict[str, Any]:
    obj = _object(raw, place)
    _check_keys(obj, _FEATURE_FIELDS, place)
    _typename(obj, "EntitlementFeature", place)
    ref_id = _string(obj, "refId", place, required=True)
    feature_type = _enum(obj, "featureType", FEATURE_TYPES, place, required=True)
    meter_type = _enum(obj, "meterType", METER_TYPES, place)
    if meter_type in METERED_TYPES and feature_type != "NUMBER":
        raise DataError(f"{_child(place, 'meterType')}: only NUMBER features can be metered")
    transformation = obj.get("unitTransformation")
    if transformation is not None:
        tr_place = _child(place, "unitTransformation")
        tr = _object(transformation, tr_place)
        _check_keys(
            tr,
            ("__typename", "divide", "round", "featureUnits", "featureUnitsPlural"),
            tr_place,
        )
        divide = _number(tr, "divide", tr_place, required=True)
        if divide <= 0:
            raise DataError(f"{_child(tr_place, 'divide')}: must be greater than 0")
        transformation = {
            "__typename": "UnitTransformation",
            "divide": divide,
            "round": _enum(tr, "round", ROUNDINGS, tr_place, required=True),
            "featureUnits": _string(tr, "featureUnits", tr_place),
            "featureUnitsPlural": _string(tr, "featureUnitsPlural", tr_place),
        }
    return {
        "__typename": "EntitlementFeature",
        "featureType": feature_type,
        "meterType": meter_type,
        "featureUnits": _string(obj, "featureUnits", place),
        "featureUnitsPlural": _string(obj, "featureUnitsPlural", place),
        "description": _string(obj, "description", place),
        "displayName": _string(obj, "displayName", place) or ref_id,
        "refId": ref_id,
        "unitTransformation": transformation,
    }


def _reset_period_configuration(obj: Mapping[str, Any], place: str) -> dict[str, Any] | None:
    raw = obj.get("resetPeriodConfiguration")
    if raw is None:
        return None
    config_place = _child(place, "resetPeriodConfiguration")
    config = _object(raw, config_place)
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
    _check_keys(config, ("__typename", key), config_place)
    return {"__typename": typename, key: _enum(config, key, choices, config_place)}


def _is_granted(obj: Mapping[str, Any], reason: str | None, place: str) -> bool:
    granted = _boolean(obj, "isGranted", place, default=reason is None)
    if granted and reason is not None:
        raise DataError(f"{_child(place, 'isGranted')}: cannot be true with an accessDeniedReason")
    return granted


# -- field readers --------------------------------------------------------------------------------


def _child(place: str, key: str) -> str:
    step = key if _IDENTIFIER.match(key) else json.dumps(key)
    return f"{place}.{step}" if place else step


def _object(value: object, place: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{place}: must be an object")
    return value


def _check_keys(obj: Mapping[str, Any], allowed: Iterable[str], place: str) -> None:
    allowed = tuple(allowed)
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise DataError(f"{_child(place, key)}: unknown field{hint}")


def _typename(obj: Mapping[str, Any], expected: str, place: str) -> None:
    if obj.get("__typename", expected) != expected:
        raise DataError(f"{_child(place, '__typename')}: must be {expected}")


def _missing(obj: Mapping[str, Any], key: str, place: str, required: bool) -> bool:
    if obj.get(key) is None:
        if required:
            raise DataError(f"{_child(place, key)}: required")
        return True
    return False


def _string(obj: Mapping[str, Any], key: str, place: str, *, required: bool = False) -> Any:
    if _missing(obj, key, place, required):
        return None
    value = obj[key]
    if not isinstance(value, str) or (required and not value):
        raise DataError(f"{_child(place, key)}: must be a{' non-empty' if required else ''} string")
    return value


def _number(obj: Mapping[str, Any], key: str, place: str, *, required: bool = False) -> Any:
    if _missing(obj, key, place, required):
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{_child(place, key)}: must be a finite number")
    return value


def _boolean(obj: Mapping[str, Any], key: str, place: str, *, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise DataError(f"{_child(place, key)}: must be true or false")
    return value


def _enum(
    obj: Mapping[str, Any],
    key: str,
    choices: tuple[str, ...],
    place: str,
    *,
    required: bool = False,
) -> Any:
    if _missing(obj, key, place, required):
        return None
    if obj[key] not in choices:
        raise DataError(f"{_child(place, key)}: must be one of {', '.join(choices)}")
    return obj[key]


def _string_list(obj: Mapping[str, Any], key: str, place: str) -> list[str] | None:
    if _missing(obj, key, place, False):
        return None
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataError(f"{_child(place, key)}: must be a list of strings")
    return list(value)


def _timestamp(obj: Mapping[str, Any], key: str, place: str) -> str | None:
    if _missing(obj, key, place, False):
        return None
    value = obj[key]
    try:
        if not isinstance(value, str):
            raise ValueError
        return format_timestamp(parse_timestamp(value))
    except ValueError:
        raise DataError(
            f"{_child(place, key)}: must be an ISO-8601 timestamp with a timezone, "
            "e.g. 2025-01-31T00:00:00.000Z"
        ) from None
