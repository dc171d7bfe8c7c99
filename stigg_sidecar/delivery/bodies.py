"""The spool's record bodies: a usage report or an event, with its idempotency key, as JSON.

Owns the body format (compact JSON, field names as in Stigg's GraphQL inputs) and its reading
back. A body that cannot be read back is reported with `BodyError`, never guessed at.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from stigg_sidecar.contracts import EventReport, UsageReport

USAGE = "usage"
EVENT = "event"


class BodyError(ValueError):
    """A stored body that is not a record this sidecar can deliver."""


@dataclass(frozen=True, slots=True)
class SpooledUsage:
    usage: UsageReport
    key: str  # the idempotency key, assigned at acknowledgement


def usage_body(usage: UsageReport, key: str) -> str:
    body: dict[str, Any] = {"customerId": usage.customer_id, "featureId": usage.feature_id, "value": usage.value,
                            "idempotencyKey": key}
    if usage.resource_id:
        body["resourceId"] = usage.resource_id
    if usage.update_behavior:
        body["updateBehavior"] = usage.update_behavior
    if usage.dimensions:
        body["dimensions"] = dict(usage.dimensions)
    if usage.timestamp is not None:
        body["timestamp"] = usage.timestamp
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


def event_body(event: EventReport) -> str:
    body: dict[str, Any] = {"eventName": event.event_name, "customerId": event.customer_id,
                            "idempotencyKey": event.idempotency_key}
    if event.resource_id:
        body["resourceId"] = event.resource_id
    if event.dimensions:
        body["dimensions"] = dict(event.dimensions)
    if event.timestamp is not None:
        body["timestamp"] = event.timestamp
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


def _load(body: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError as e:
        raise BodyError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise BodyError("not a JSON object")
    return value


def read_usage(body: str) -> SpooledUsage:
    raw = _load(body)
    try:
        usage = UsageReport(
            customer_id=str(raw["customerId"]),
            feature_id=str(raw["featureId"]),
            value=float(raw["value"]),
            resource_id=raw.get("resourceId"),
            update_behavior=raw.get("updateBehavior"),
            dimensions=dict(raw.get("dimensions") or {}),
            timestamp=raw.get("timestamp"),
        )
        return SpooledUsage(usage, str(raw["idempotencyKey"]))
    except (KeyError, TypeError, ValueError) as e:
        raise BodyError(f"not a usage record: {e!r}") from None


def read_event(body: str) -> EventReport:
    raw = _load(body)
    try:
        return EventReport(
            event_name=str(raw["eventName"]),
            customer_id=str(raw["customerId"]),
            idempotency_key=str(raw["idempotencyKey"]),
            resource_id=raw.get("resourceId"),
            dimensions=dict(raw.get("dimensions") or {}),
            timestamp=raw.get("timestamp"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BodyError(f"not an event record: {e!r}") from None
