"""Stigg's JSON, both ways: the one module that knows its shapes (ARCHITECTURE invariant 10).

- Requests: usage and event inputs of the GraphQL mutations (`usage_input`, `event_input`).
- Answers: a GraphQL/Edge document's `data` or its error (`answer_data`), an `entitlementsState`
  object as a `CustomerEntry` (`entry_from_state`, STIGG_REFERENCE 2.4), a usage result as the
  acknowledgement and the usage changes it carries (`usage_result`).
- The socket: graphql-transport-ws messages (`socket_frame`, `socket_message`, `pushed_data`) and
  the pushes they carry: entitlementsUpdatedV2, usageUpdatedV2 and packagePublished payloads
  (`pushed_entry`, `pushed_usage`, `package_migration`).

Pure: no I/O, no clock reads (`now_ms` is passed in), no logging. Stigg's messages can echo the
request, so every message taken from an answer is clipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stigg_sidecar.contracts import EventReport, UsageAck, UsageChange, UsageReport, UsageResult
from stigg_sidecar.entitlements.fields import FieldReader, freeze_json, parse_time
from stigg_sidecar.entitlements.interning import shared_feature, shared_time
from stigg_sidecar.entitlements.records import (
    CreditEntitlement,
    CreditRate,
    Currency,
    CustomerEntry,
    Feature,
    FeatureEntitlement,
    Malformed,
    Usage,
)
from stigg_sidecar.quoting import clipped
from stigg_sidecar.upstream.errors import Problem, UpstreamError

# --------------------------------------------------------------------------- requests


def graphql_request(operation: str, query: str, variables: Mapping[str, Any]) -> bytes:
    """The body of a GraphQL POST."""
    return json.dumps({"operationName": operation, "variables": variables, "query": query}).encode()


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def usage_input(usage: UsageReport, idempotency_key: str) -> dict[str, Any]:
    item: dict[str, Any] = {
        "customerId": usage.customer_id,
        "featureId": usage.feature_id,
        "value": usage.value,
        "idempotencyKey": idempotency_key,
    }
    if usage.resource_id:
        item["resourceId"] = usage.resource_id
    if usage.update_behavior:
        item["updateBehavior"] = usage.update_behavior
    if usage.dimensions:
        item["dimensions"] = dict(usage.dimensions)
    if usage.timestamp is not None:
        item["createdAt"] = _iso(usage.timestamp)
    return item


def event_input(event: EventReport) -> dict[str, Any]:
    item: dict[str, Any] = {
        "eventName": event.event_name,
        "customerId": event.customer_id,
        "idempotencyKey": event.idempotency_key,
    }
    if event.resource_id:
        item["resourceId"] = event.resource_id
    if event.dimensions:
        item["dimensions"] = dict(event.dimensions)
    if event.timestamp is not None:
        item["timestamp"] = _iso(event.timestamp)
    return item


# --------------------------------------------------------------------------- answers


class BadAnswer(Exception):
    """Stigg's answer is an error or not a usable document: `error` says what to raise, `outcome`
    how the attempt is counted ("malformed", "graphql-error")."""

    def __init__(self, outcome: str, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.outcome = outcome
        self.error = error


def answer_data(body: bytes) -> dict[str, Any]:
    """The `data` object of an HTTP 200 answer from Edge or GraphQL; raises BadAnswer."""
    try:
        document = json.loads(body)
    except ValueError:
        raise BadAnswer("malformed", UpstreamError(Problem.UNAVAILABLE, "Stigg answered a body that is not JSON", True)) from None
    if not isinstance(document, dict):
        raise BadAnswer("malformed", UpstreamError(Problem.UNAVAILABLE, "Stigg answered an unexpected body", True))
    errors = document.get("errors")
    if errors:
        raise BadAnswer("graphql-error", graphql_failure(errors if isinstance(errors, list) else [errors]))
    data = document.get("data")
    if not isinstance(data, dict):
        raise BadAnswer("malformed", UpstreamError(Problem.UNAVAILABLE, "Stigg answered no data", True))
    return data


def graphql_failure(errors: Sequence[Any]) -> UpstreamError:
    """The failure a GraphQL `errors` list describes (its first error), with its code."""
    first = errors[0] if errors and isinstance(errors[0], dict) else {}
    # Stigg's messages can echo the request (ids), so they are clipped before they go anywhere.
    message = clipped(str(first.get("message") or "GraphQL error"))
    extensions = first.get("extensions")
    if not isinstance(extensions, dict):
        extensions = {}
    code = str(extensions.get("code") or "")
    if code == "Unauthenticated":
        return UpstreamError(Problem.KEY_REJECTED, "Stigg rejected the API key", code=code)
    if code in ("BadUserInput", "GRAPHQL_VALIDATION_FAILED", "GRAPHQL_PARSE_FAILED"):
        return UpstreamError(Problem.REFUSED, f"Stigg rejected the request: {message}", code=code)
    if code.endswith("NotFound"):
        return UpstreamError(Problem.NOT_FOUND, f"Stigg: {message}", code=code)
    if code == "RateLimitExceeded":
        return UpstreamError(Problem.RATE_LIMITED, f"Stigg rate limit: {message}", code=code)
    return UpstreamError(Problem.UNAVAILABLE, f"Stigg error{f' {code}' if code else ''}: {message}", code=code)


def entitlements_state(data: Mapping[str, Any]) -> dict[str, Any]:
    """The `entitlementsState` object of a GetEntitlementsState or Edge answer."""
    state = data.get("entitlementsState")
    if not isinstance(state, dict):
        raise UpstreamError(Problem.UNAVAILABLE, "Stigg answered no entitlementsState", True)
    return state


def usage_results(data: Mapping[str, Any], operation: str, count: int) -> list[dict[str, Any]]:
    """The UsageMeasurementWithCurrentUsage objects of a ReportUsage (one) or ReportUsageBulk answer."""
    results = [data.get("reportUsage")] if operation == "ReportUsage" else data.get("reportUsageBulk")
    if not isinstance(results, list) or len(results) != count or not all(isinstance(r, dict) for r in results):
        raise UpstreamError(Problem.UNAVAILABLE, "Stigg answered an unexpected usage result")
    return results


def _float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def usage_result(usage: UsageReport, result: Mapping[str, Any], now_ms: int) -> UsageResult:
    """Stigg's answer to `usage`: the acknowledgement, and the usage it now counts (authoritative)."""
    ack = UsageAck(
        measurement_id=str(result.get("id") or ""),
        customer_id=str(result.get("customerId") or usage.customer_id),
        feature_id=str(result.get("featureId") or usage.feature_id),
        resource_id=result.get("resourceId") or usage.resource_id,
        current_usage=_float(result.get("currentUsage")),
        usage_period_start=parse_time(result.get("usagePeriodStart")),
        usage_period_end=parse_time(result.get("usagePeriodEnd")),
    )
    stamp = parse_time(result.get("timestamp")) or now_ms
    changes = []
    current = _float(result.get("currentUsage"))
    if current is not None:
        start, end = parse_time(result.get("usagePeriodStart")), parse_time(result.get("usagePeriodEnd"))
        changes.append(UsageChange(usage.customer_id, usage.resource_id, "FEATURE", usage.feature_id,
                                   Usage(current, start, end, stamp)))
    credit = result.get("credit")
    if isinstance(credit, dict) and credit.get("currencyId") and _float(credit.get("currentUsage")) is not None:
        changes.append(UsageChange(
            usage.customer_id, usage.resource_id, "CREDIT", str(credit["currencyId"]),
            Usage(float(credit["currentUsage"]), None, parse_time(credit.get("usagePeriodEnd")),
                  parse_time(credit.get("timestamp")) or stamp),
        ))
    return UsageResult(ack, tuple(changes))


# --------------------------------------------------------------------------- the socket


def socket_frame(message: Mapping[str, Any]) -> bytes:
    """A graphql-transport-ws message as the socket sends it."""
    return json.dumps(message).encode()


def socket_message(frame: bytes) -> dict[str, Any]:
    """A graphql-transport-ws message received; its "type" is a string. Raises ValueError."""
    try:
        message = json.loads(frame)
    except ValueError:
        raise ValueError("not a graphql-transport-ws message") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("not a graphql-transport-ws message")
    return message


def pushed_data(message: Mapping[str, Any], field: str | None) -> tuple[Mapping[str, Any] | None, Any]:
    """A `next` message's update for subscription `field`, or (None, its GraphQL errors if any)."""
    payload = message.get("payload")
    data = payload.get("data") if isinstance(payload, dict) else None
    if field is None or not isinstance(data, dict) or not isinstance(data.get(field), dict):
        return None, payload.get("errors") if isinstance(payload, dict) else None
    return data[field], None


def package_migration(payload: Mapping[str, Any]) -> str | None:
    """A packagePublished payload's migration type ("ALL_CUSTOMERS", ...)."""
    migration = payload.get("migrationType")
    return migration if isinstance(migration, str) else None


# --------------------------------------------------------------------------- pushes


@dataclass(frozen=True, slots=True)
class PushedEntitlements:
    customer_id: str
    resource_id: str | None
    entry: CustomerEntry | None  # None: the customer's entry is to be dropped


def pushed_entry(payload: Mapping[str, Any], now_ms: int) -> PushedEntitlements:
    """An entitlementsUpdatedV2 payload: the customer's new entry, or None (neither entitlements
    nor a reason: drop it)."""
    customer_id = payload["customerId"]
    resource_id = payload.get("resourceId") or None
    entitlements = payload.get("entitlements") or []
    reason = payload.get("accessDeniedReason")
    if not entitlements and reason is None:
        return PushedEntitlements(customer_id, resource_id, None)
    state = {"entitlementsV2": entitlements, "accessDeniedReason": reason}
    return PushedEntitlements(customer_id, resource_id, entry_from_state(customer_id, resource_id, state, now_ms))


def pushed_usage(payload: Mapping[str, Any], now_ms: int) -> UsageChange:
    """A usageUpdatedV2 payload: one entitlement's usage as Stigg now counts it."""
    reference = payload["entitlementReference"]
    usage = payload["usage"]
    current = _float(usage.get("currentUsage"))
    if current is None:
        raise ValueError("usageUpdatedV2 without a numeric currentUsage")
    stamp = parse_time(usage.get("usageUpdatedAt")) or now_ms
    start, end = parse_time(usage.get("usagePeriodStart")), parse_time(usage.get("usagePeriodEnd"))
    return UsageChange(payload["customerId"], payload.get("resourceId") or None, str(reference.get("type")),
                       str(reference["id"]), Usage(current, start, end, stamp))


# --------------------------------------------------------------------------- entitlementsState


class MalformedState(ValueError):
    """The API's entitlementsState is not the shape Stigg documents; the message names the place."""


def entry_from_state(customer_id: str, resource_id: str | None, state: Mapping[str, Any], now_ms: int) -> CustomerEntry:
    """Build a `CustomerEntry` from the API's `entitlementsState` object (STIGG_REFERENCE §2.4).

    Items whose feature has no refId (or credits without a currencyId) are skipped; items of an
    unknown `__typename` are skipped too, so a new union member does not break old sidecars.
    A later item for the same id replaces an earlier one. An item with a malformed field (a
    non-finite number, a wrong type...) is left out and listed in the entry's `malformed`: one
    bad entitlement never costs the customer's others. Only a malformed whole (the state or its
    list not of the documented type) raises MalformedState.
    """
    where = "entitlementsState"
    if not isinstance(state, Mapping):
        raise MalformedState(f"{where}: must be an object")
    items = state.get("entitlementsV2")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise MalformedState(f"{where}.entitlementsV2: must be a list")
    reason = _string(state, "accessDeniedReason", where)
    times = _Times()
    timestamp = times.local(_entry_timestamp(items, now_ms))

    features: dict[str, FeatureEntitlement] = {}
    credits: dict[str, CreditEntitlement] = {}
    malformed: list[Malformed] = []
    for index, item in enumerate(items):
        item_where = f"{where}.entitlementsV2[{index}]"
        if not isinstance(item, Mapping):
            malformed.append(Malformed("FEATURE", None, f"{item_where}: must be an object"))
            continue
        typename = item.get("__typename") or ("CreditEntitlement" if "currency" in item else "FeatureEntitlement")
        try:
            if typename == "FeatureEntitlement":
                entitlement = _feature_entitlement(item, item_where, timestamp, times)
                if entitlement is not None:
                    features[entitlement.feature.id] = entitlement
            elif typename == "CreditEntitlement":
                credit = _credit_entitlement(item, item_where, timestamp)
                if credit is not None:
                    credits[credit.currency.currency_id] = credit
        except MalformedState as e:
            kind = "CREDIT" if typename == "CreditEntitlement" else "FEATURE"
            malformed.append(Malformed(kind, _readable_id(item, kind), str(e)))
    if malformed:
        # A later good item for an id wins over an earlier bad one, as any later item does.
        malformed = [m for m in malformed if m.ref_id not in (features if m.kind == "FEATURE" else credits)]
    return CustomerEntry(
        customer_id=customer_id,
        resource_id=resource_id,
        access_denied_reason=reason,
        features=features,
        credits=credits,
        timestamp=timestamp,
        malformed=tuple(malformed),
    )


def _readable_id(item: Mapping[str, Any], kind: str) -> str | None:
    """The malformed item's feature refId or currency id, if that much is readable."""
    holder, key = ("currency", "currencyId") if kind == "CREDIT" else ("feature", "refId")
    inner = item.get(holder)
    ref_id = inner.get(key) if isinstance(inner, Mapping) else None
    return ref_id if isinstance(ref_id, str) and ref_id else None


def _entry_timestamp(items: list[Any], now_ms: int) -> int:
    """§3.1.6: the first valid entitlementUpdatedAt; an empty list is epoch 0; none valid is now."""
    if not items:
        return 0
    for item in items:
        if isinstance(item, Mapping):
            updated_at = parse_time(item.get("entitlementUpdatedAt"))
            if updated_at is not None:
                return updated_at
    return now_ms


class _Times:
    """One parse's times as shared int objects: the same instant repeats in an entry (each
    entitlement's update time), and period bounds repeat across customers (month starts), so
    the latter are shared process-wide (`interning.shared_time`; past its bound, per entry only)."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def local(self, value: int) -> int:
        return self._seen.setdefault(value, value)

    def shared(self, value: int | None) -> int | None:
        if value is None:
            return None
        existing = shared_time(value)
        return existing if existing is not None else self.local(value)


def _feature_entitlement(
    item: Mapping[str, Any], where: str, default_time: int, times: _Times
) -> FeatureEntitlement | None:
    raw_feature = item.get("feature")
    if raw_feature is None:
        return None
    if not isinstance(raw_feature, Mapping):
        raise MalformedState(f"{where}.feature: must be an object")
    feature_where = f"{where}.feature"
    ref_id = _string(raw_feature, "refId", feature_where)
    if not ref_id:
        return None
    feature = shared_feature(Feature(
        id=ref_id,
        feature_type=_string(raw_feature, "featureType", feature_where) or "",
        meter_type=_string(raw_feature, "meterType", feature_where),
        units=_string(raw_feature, "featureUnits", feature_where),
        units_plural=_string(raw_feature, "featureUnitsPlural", feature_where),
        display_name=_string(raw_feature, "displayName", feature_where),
        description=_string(raw_feature, "description", feature_where),
    ))
    updated_at = parse_time(item.get("entitlementUpdatedAt"))
    updated_at = default_time if updated_at is None else times.local(updated_at)
    usage_updated_at = parse_time(item.get("usageUpdatedAt"))
    if usage_updated_at is not None:
        usage_updated_at = times.local(usage_updated_at)
    return FeatureEntitlement(
        feature=feature,
        usage_limit=_number(item, "usageLimit", where),
        has_unlimited_usage=_flag(item, "hasUnlimitedUsage", where),
        has_soft_limit=_flag(item, "hasSoftLimit", where),
        access_denied_reason=_string(item, "accessDeniedReason", where),
        enum_values=_strings(item, "enumValues", where),
        valid_until=times.shared(_time(item, "validUntil", where)),
        usage_period_anchor=times.shared(_time(item, "usagePeriodAnchor", where)),
        reset_period=_string(item, "resetPeriod", where),
        credit_rate=_credit_rate(item.get("creditRate"), f"{where}.creditRate"),
        updated_at=updated_at,
        usage=Usage(
            current_usage=_number(item, "currentUsage", where) or 0.0,
            usage_period_start=times.shared(_time(item, "usagePeriodStart", where)),
            usage_period_end=times.shared(_time(item, "usagePeriodEnd", where)),
            # Without its own stamp, fetched usage is as recent as the entitlement it came with.
            updated_at=updated_at if usage_updated_at is None else usage_updated_at,
        ),
    )


def _credit_rate(raw: Any, where: str) -> CreditRate | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise MalformedState(f"{where}: must be an object")
    currency_id = _string(raw, "currencyId", where)
    if not currency_id:
        return None
    return CreditRate(amount=_number(raw, "amount", where) or 0.0, currency_id=currency_id)


def _credit_entitlement(item: Mapping[str, Any], where: str, default_time: int) -> CreditEntitlement | None:
    raw_currency = item.get("currency")
    if raw_currency is None:
        return None
    currency_where = f"{where}.currency"
    if not isinstance(raw_currency, Mapping):
        raise MalformedState(f"{currency_where}: must be an object")
    currency_id = _string(raw_currency, "currencyId", currency_where)
    if not currency_id:
        return None
    meta = raw_currency.get("additionalMetaData")
    if meta is not None and not isinstance(meta, Mapping):
        raise MalformedState(f"{currency_where}.additionalMetaData: must be an object or null")
    currency = Currency(
        currency_id=currency_id,
        display_name=_string(raw_currency, "displayName", currency_where),
        description=_string(raw_currency, "description", currency_where),
        unit_singular=_string(raw_currency, "unitSingular", currency_where),
        unit_plural=_string(raw_currency, "unitPlural", currency_where),
        additional_meta_data=None if meta is None else freeze_json(meta),
    )
    updated_at = parse_time(item.get("entitlementUpdatedAt"))
    if updated_at is None:
        updated_at = default_time
    usage_updated_at = parse_time(item.get("usageUpdatedAt"))
    return CreditEntitlement(
        currency=currency,
        usage_limit=_number(item, "usageLimit", where) or 0.0,
        current_usage=_number(item, "currentUsage", where) or 0.0,
        has_soft_limit=_flag(item, "hasSoftLimit", where),
        access_denied_reason=_string(item, "accessDeniedReason", where),
        usage_period_end=_time(item, "usagePeriodEnd", where),
        valid_until=_time(item, "validUntil", where),
        updated_at=updated_at,
        usage_updated_at=updated_at if usage_updated_at is None else usage_updated_at,
    )


_fields = FieldReader(MalformedState)
_string = _fields.string
_flag = _fields.flag
_number = _fields.number
_strings = _fields.strings
_time = _fields.time
