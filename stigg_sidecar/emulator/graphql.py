"""Stigg's GraphQL operations, answered from an `EmulatorState`.

Owns the dispatch of a decoded ``POST /graphql`` body ``{operationName, variables, query}`` to
the operations Stigg's server SDKs send, the validation of their variables (``BadUserInput``)
and the GraphQL response envelopes. It is not a GraphQL engine: the operation is chosen by
``operationName`` (or the name in the ``query`` text) and the answer always carries every field
Stigg's clients select, with ``__typename`` on each object.

Also owns the subscriptions' side: which root field a ``subscription`` document asks for
(`subscription_field`) and the ``next`` payloads each `StateChange` becomes for it
(`subscription_events`), for the V2 subscriptions and for the v1 ones (entitlementsUpdated,
usageUpdated, creditBalanceUpdated) with the payloads of Stigg's schema (stigg-api-client
6.25.0).

Pure functions over the state: no HTTP, no JSON encoding, no clock of its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from stigg_sidecar.emulator.fields import parse_timestamp
from stigg_sidecar.emulator.model import (
    EntitlementsChanged,
    PackagePublished,
    StateChange,
    StiggError,
    UsageChanged,
    UsageEvent,
    UsageReport,
)
from stigg_sidecar.emulator.state import ACCOUNT_ID, ENVIRONMENT_ID, EmulatorState

Variables = Mapping[str, Any]
Operation = Callable[[EmulatorState, Variables], dict[str, Any]]

SDK_CONFIGURATION = {
    "__typename": "SdkConfiguration",
    "sentryDsn": None,
    "isWidgetWatermarkEnabled": False,
    "showWatermark": False,
}

ENTITLEMENTS_UPDATED = "entitlementsUpdatedV2"
USAGE_UPDATED = "usageUpdatedV2"
PACKAGE_PUBLISHED = "packagePublished"
# The v1 subscriptions, which Stigg's Node SDK 3.x (and other older SDKs) subscribe to.
ENTITLEMENTS_UPDATED_V1 = "entitlementsUpdated"
USAGE_UPDATED_V1 = "usageUpdated"
CREDIT_BALANCE_UPDATED = "creditBalanceUpdated"
SUBSCRIPTIONS = (
    ENTITLEMENTS_UPDATED,
    USAGE_UPDATED,
    PACKAGE_PUBLISHED,
    ENTITLEMENTS_UPDATED_V1,
    USAGE_UPDATED_V1,
    CREDIT_BALANCE_UPDATED,
)

_TOKENS = re.compile(r"#[^\n]*|\"(?:[^\"\\]|\\.)*\"|[{}]|\b(query|mutation|subscription)\b\s*(\w*)")


class GraphQLError(Exception):
    """A request-level failure: answered with this HTTP status and one error."""

    def __init__(self, code: str, message: str, http_status: int = 200) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


def error_response(code: str, message: str) -> dict[str, Any]:
    return {"errors": [{"message": message, "extensions": {"code": code}}], "data": None}


def operation_name(body: Mapping[str, Any]) -> str | None:
    """``operationName``, or else the name of the first operation defined in ``query``."""
    name = body.get("operationName")
    if isinstance(name, str) and name:
        return name
    query = body.get("query")
    if not isinstance(query, str):
        return None
    depth = 0
    for match in _TOKENS.finditer(query):
        token = match.group(0)
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
        elif match.group(1) and depth == 0:
            return match.group(2) or None
    return None


def execute(
    state: EmulatorState, name: str | None, body: Mapping[str, Any], api_key: str | None
) -> tuple[int, dict[str, Any]]:
    """Answer one decoded request: ``(http_status, response_json)``."""
    if not state.is_authorized(api_key):
        return 200, error_response("Unauthenticated", "Unauthenticated")
    operation = OPERATIONS.get(name or "")
    if operation is None:
        what = f'Unknown operation "{name}"' if name else "No operation name given"
        return 400, error_response(
            "GRAPHQL_VALIDATION_FAILED",
            f"{what}: the Stigg emulator answers {', '.join(sorted(OPERATIONS))}",
        )
    variables = body.get("variables") or {}
    try:
        if not isinstance(variables, Mapping):
            raise GraphQLError("BadUserInput", "variables: must be an object")
        return 200, {"data": operation(state, variables)}
    except GraphQLError as error:
        return error.http_status, error_response(error.code, error.message)
    except StiggError as error:
        return 200, error_response(error.code, error.message)


def subscription_field(query: str) -> tuple[str, str] | None:
    """``(response_key, field)`` of the first root field of the first ``subscription``
    operation in ``query`` (the key is the alias if there is one), or None if it has none."""
    text = _COMMENTS_AND_STRINGS.sub(lambda m: " " * len(m.group(0)), query)
    depth = 0
    for match in _BRACES_AND_SUBSCRIPTION.finditer(text):
        if match.group(0) == "{":
            depth += 1
        elif match.group(0) == "}":
            depth -= 1
        elif depth == 0:
            root = _SUBSCRIPTION_ROOT.match(text, match.start())
            if root is None:
                return None
            alias, field = root.group(1), root.group(2)
            return alias or field, field
    return None


def subscription_events(field: str, change: StateChange) -> list[dict[str, Any]]:
    """The objects a subscription to ``field`` receives for ``change``, in order: one, none, or
    for ``creditBalanceUpdated`` one per credit entitlement of a replaced customer."""
    if field == CREDIT_BALANCE_UPDATED:
        return _credit_balances(change)
    data = subscription_data(field, change)
    return [] if data is None else [data]


def subscription_data(field: str, change: StateChange) -> dict[str, Any] | None:
    """The object a subscription to ``field`` receives for ``change``, or None if none (the
    first credit's, for ``creditBalanceUpdated``)."""
    if field == CREDIT_BALANCE_UPDATED:
        balances = _credit_balances(change)
        return balances[0] if balances else None
    if field == ENTITLEMENTS_UPDATED_V1 and isinstance(change, EntitlementsChanged):
        # Stigg's schema (stigg-api-client 6.25.0): EntitlementsUpdated, V1 `Entitlement`s.
        return {
            "__typename": "EntitlementsUpdated",
            "accountId": ACCOUNT_ID,
            "environmentId": ENVIRONMENT_ID,
            "customerId": change.customer_id,
            "resourceId": change.resource_id,
            "accessDeniedReason": change.state["accessDeniedReason"],
            "entitlements": change.state["entitlements"],
        }
    if field == USAGE_UPDATED_V1 and isinstance(change, UsageChanged):
        if change.reference_type != "FEATURE" or change.entitlement is None:
            return None
        end = _epoch_ms(change.usage_period_end)
        return {
            "__typename": "UsageUpdated",
            "usage": {
                "__typename": "UsageMeasurementUpdated",
                "accountId": ACCOUNT_ID,
                "environmentId": ENVIRONMENT_ID,
                "customerId": change.customer_id,
                "resourceId": change.resource_id,
                "featureId": change.reference_id,
                "currentUsage": change.current_usage,
                "usagePeriodStart": _epoch_ms(change.usage_period_start),
                "usagePeriodEnd": end,
                "nextResetDate": end,
            },
            "entitlement": change.entitlement,
        }
    if field == ENTITLEMENTS_UPDATED and isinstance(change, EntitlementsChanged):
        return {
            "__typename": "EntitlementsUpdatedV2",
            "customerId": change.customer_id,
            "resourceId": change.resource_id,
            "accessDeniedReason": change.state["accessDeniedReason"],
            "entitlements": change.state["entitlementsV2"],
        }
    if field == USAGE_UPDATED and isinstance(change, UsageChanged):
        return {
            "__typename": "UsageUpdatedV2",
            "customerId": change.customer_id,
            "resourceId": change.resource_id,
            "entitlementReference": {
                "__typename": "EntitlementReference",
                "id": change.reference_id,
                "type": change.reference_type,
            },
            "usage": {
                "__typename": "UsageV2",
                "currentUsage": change.current_usage,
                "usageUpdatedAt": change.usage_updated_at,
                "usagePeriodStart": change.usage_period_start,
                "usagePeriodEnd": change.usage_period_end,
            },
        }
    if field == PACKAGE_PUBLISHED and isinstance(change, PackagePublished):
        return {
            "__typename": "PackagePublished",
            "accountId": change.account_id,
            "environmentId": change.environment_id,
            "packageType": change.package_type,
            "packageRefId": change.package_ref_id,
            "packageVersion": change.package_version,
            "migrationType": change.migration_type,
        }
    return None


def _credit_balances(change: StateChange) -> list[dict[str, Any]]:
    """creditBalanceUpdated for each credit entitlement of a replaced customer (or resource):
    granted is its limit, consumed its usage, the balance what is left."""
    if not isinstance(change, EntitlementsChanged):
        return []
    balances = []
    for item in change.state["entitlementsV2"]:
        if item["__typename"] != "CreditEntitlement":
            continue
        currency = item["currency"]
        granted = item["usageLimit"] or 0
        consumed = item["currentUsage"] or 0
        balances.append({
            "__typename": "CreditBalanceUpdated",
            "accountId": ACCOUNT_ID,
            "environmentId": ENVIRONMENT_ID,
            "customerId": change.customer_id,
            "resourceId": change.resource_id,
            "currencyId": currency["currencyId"],
            "currency": {
                "__typename": "SlimCustomCurrency",
                "currencyId": currency["currencyId"],
                "displayName": currency["displayName"],
                "symbol": None,
                "units": {
                    "__typename": "Units",
                    "singular": currency["unitSingular"],
                    "plural": currency["unitPlural"],
                },
            },
            "currentBalance": granted - consumed,
            "totalConsumed": consumed,
            "totalGranted": granted,
            "validUntil": _epoch_ms(item["validUntil"]),
        })
    return balances


def _epoch_ms(timestamp: str | None) -> float | None:
    """A DateTime as the schema's Float fields carry times: epoch milliseconds."""
    return None if timestamp is None else parse_timestamp(timestamp).timestamp() * 1000


_COMMENTS_AND_STRINGS = re.compile(r'#[^\n]*|"""(?:[^"\\]|\\.|"(?!""))*"""|"(?:[^"\\\n]|\\.)*"')
_BRACES_AND_SUBSCRIPTION = re.compile(r"[{}]|\bsubscription\b")
# `subscription Name($v: T) @dir {` then an optional `alias:` and the field name
_SUBSCRIPTION_ROOT = re.compile(r"\bsubscription\b[^{]*\{\s*(?:(\w+)\s*:\s*)?(\w+)")


# -- operations -----------------------------------------------------------------------------------


def _get_entitlements_state(state: EmulatorState, variables: Variables) -> dict[str, Any]:
    customer_id, resource_id = _entitlements_query(variables)
    return {"entitlementsState": state.entitlements_state(customer_id, resource_id)}


def _get_entitlements(state: EmulatorState, variables: Variables) -> dict[str, Any]:
    customer_id, resource_id = _entitlements_query(variables)
    return {"entitlements": state.entitlements_v1(customer_id, resource_id)}


def _report_usage(state: EmulatorState, variables: Variables) -> dict[str, Any]:
    report = _usage_report(_object(variables.get("input"), "input"), "input")
    return {"reportUsage": state.report_usage([report])[0]}


def _report_usage_bulk(state: EmulatorState, variables: Variables) -> dict[str, Any]:
    usages = _object(variables.get("input"), "input").get("usages")
    if not isinstance(usages, list):
        raise _bad("input.usages", "must be a list")
    reports = [
        _usage_report(_object(u, f"input.usages[{i}]"), f"input.usages[{i}]")
        for i, u in enumerate(usages)
    ]
    return {"reportUsageBulk": state.report_usage(reports)}


def _report_event(state: EmulatorState, variables: Variables) -> dict[str, Any]:
    raw_events = _object(variables.get("input"), "input").get("usageEvents")
    if not isinstance(raw_events, list):
        raise _bad("input.usageEvents", "must be a list")
    events = []
    for index, raw in enumerate(raw_events):
        place = f"input.usageEvents[{index}]"
        event = _object(raw, place)
        events.append(
            UsageEvent(
                event_name=_string(event, "eventName", place, required=True),
                customer_id=_string(event, "customerId", place, required=True),
                idempotency_key=_string(event, "idempotencyKey", place, required=True),
                resource_id=_string(event, "resourceId", place) or None,
                dimensions=_dimensions(event, place),
                timestamp=_timestamp(event, "timestamp", place),
            )
        )
    state.report_events(events)
    return {"reportEvent": "OK"}


def _get_sdk_configuration(state: EmulatorState, variables: Variables) -> dict[str, Any]:
    return {"sdkConfiguration": dict(SDK_CONFIGURATION)}


OPERATIONS: dict[str, Operation] = {
    "GetEntitlementsState": _get_entitlements_state,
    "GetEntitlements": _get_entitlements,
    "ReportUsage": _report_usage,
    "ReportUsageBulk": _report_usage_bulk,
    "ReportEvent": _report_event,
    "GetSdkConfiguration": _get_sdk_configuration,
}


# -- variables ------------------------------------------------------------------------------------


def _bad(place: str, problem: str) -> GraphQLError:
    return GraphQLError("BadUserInput", f"variables.{place}: {problem}")


def _object(value: object, place: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(place, "required object")
    return value


def _string(obj: Mapping[str, Any], key: str, place: str, *, required: bool = False) -> Any:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise _bad(
            f"{place}.{key}", "required non-empty string" if required else "must be a string"
        )
    return value


def _timestamp(obj: Mapping[str, Any], key: str, place: str) -> Any:
    value = _string(obj, key, place)
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError:
        raise _bad(f"{place}.{key}", "must be an ISO-8601 DateTime with a timezone") from None


def _dimensions(obj: Mapping[str, Any], place: str) -> Any:
    value = obj.get("dimensions")
    if value is not None and not isinstance(value, Mapping):
        raise _bad(f"{place}.dimensions", "must be an object")
    return value


def _entitlements_query(variables: Variables) -> tuple[str, str | None]:
    query = _object(variables.get("query"), "query")
    customer_id = _string(query, "customerId", "query", required=True)
    return customer_id, _string(query, "resourceId", "query") or None


def _usage_report(usage: Mapping[str, Any], place: str) -> UsageReport:
    value = usage.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"{place}.value", "required finite number")
    behavior = usage.get("updateBehavior") or "DELTA"
    if behavior not in ("DELTA", "SET"):
        raise _bad(f"{place}.updateBehavior", "must be DELTA or SET")
    return UsageReport(
        customer_id=_string(usage, "customerId", place, required=True),
        feature_id=_string(usage, "featureId", place, required=True),
        value=value,
        resource_id=_string(usage, "resourceId", place) or None,
        update_behavior=behavior,
        created_at=_timestamp(usage, "createdAt", place),
        dimensions=_dimensions(usage, place),
        idempotency_key=_string(usage, "idempotencyKey", place) or None,
    )
