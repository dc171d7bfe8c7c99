"""The emulator's mutable store: what Stigg would know, and what it was told.

Owns the customers' entitlement state, the usage and event logs, the per-endpoint request
counters and the fault settings, with the rules by which Stigg changes them: usage reports add
(DELTA) or set (SET) a metered entitlement's ``currentUsage``; usage periods that end roll over
and reset usage; idempotency keys de-duplicate usage reports and events; admin replacements bump
``entitlementUpdatedAt``; publishing a package is only an announcement (there is no catalogue).

Every change is announced to the listeners (`EmulatorState.add_listener`) as a `StateChange`,
synchronously, after it is applied: that is how the web layer's WebSocket subscribers learn of
it. Plain methods over plain data: no I/O, no HTTP, no JSON encoding. Time comes from an injected
`IReactorTime`, randomness (measurement ids, ``error_rate``) from an injected `random.Random`.
Objects returned are copies: callers may keep or change them. The records it takes and
announces are `model.py`'s; usage periods are `periods.py`'s.
"""

from __future__ import annotations

import copy
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from random import Random
from typing import Any

from twisted.internet.interfaces import IReactorTime

from stigg_sidecar.emulator.data import CustomerData, EmulatorData, EntityState, is_metered, v1_entitlement
from stigg_sidecar.emulator.fields import format_timestamp, parse_timestamp, timestamp_from_seconds
from stigg_sidecar.emulator.model import (
    EntitlementsChanged,
    Faults,
    FaultsChanged,
    Listener,
    PackagePublished,
    StateChange,
    StiggError,
    UsageChanged,
    UsageEvent,
    UsageReport,
)
from stigg_sidecar.emulator.periods import current_period

ENVIRONMENT_ID = "00000000-0000-4000-8000-00000000e1e1"  # the emulator's one environment
ACCOUNT_ID = "00000000-0000-4000-8000-00000000acc1"  # and the account it belongs to
MIGRATION_TYPES = ("ALL_CUSTOMERS", "NEW_CUSTOMERS")


class EmulatorState:
    """Everything the emulator knows; one instance per emulator, owned by the reactor thread."""

    def __init__(
        self,
        data: EmulatorData,
        *,
        clock: IReactorTime,
        random: Random | None = None,
        api_keys: Sequence[str] = (),
    ) -> None:
        self.clock = clock
        self.random = random if random is not None else Random()
        self.api_keys = frozenset([*data.api_keys, *api_keys])
        self.faults = Faults()
        self.faults.observe(lambda faults: self._announce(FaultsChanged(faults.as_json())))
        self._listeners: list[Listener] = []
        self._package_versions: Counter[tuple[str, str]] = Counter()
        self._last_stamp: datetime | None = None
        self._customers: dict[str, CustomerData] = {}
        self._usage: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._usage_by_key: dict[tuple[str, str], dict[str, Any]] = {}
        self._event_keys: set[tuple[str, str]] = set()
        self._requests: Counter[str] = Counter()
        for customer_id, customer in data.customers.items():
            self.replace(customer_id, None, customer.state)
            for resource_id, resource in customer.resources.items():
                self.replace(customer_id, resource_id, resource)

    # -- time ----------------------------------------------------------------------------------

    def now(self) -> datetime:
        return timestamp_from_seconds(self.clock.seconds())

    def _stamp(self) -> str:
        """Now, but strictly later (by at least 1 ms) than any stamp before: version timestamps."""
        now = self.now()
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        if self._last_stamp is not None and now <= self._last_stamp:
            now = self._last_stamp + timedelta(milliseconds=1)
        self._last_stamp = now
        return format_timestamp(now)

    # -- listeners -----------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(change)`` after every change, in the order listeners were added."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _announce(self, change: StateChange) -> None:
        for listener in list(self._listeners):
            listener(change)

    # -- keys and counters ---------------------------------------------------------------------

    def is_authorized(self, api_key: str | None) -> bool:
        return api_key is not None and api_key in self.api_keys

    def count_request(self, endpoint: str) -> None:
        self._requests[endpoint] += 1

    def request_counts(self) -> dict[str, int]:
        return dict(self._requests)

    def reset_request_counts(self) -> None:
        self._requests.clear()

    # -- entitlements --------------------------------------------------------------------------

    def replace(self, customer_id: str, resource_id: str | None, entity: EntityState) -> None:
        """Set a customer's (or one of its resources') state, as an admin change in Stigg would.

        Entitlements without ``entitlementUpdatedAt`` get a fresh stamp; metered ones without
        ``usageUpdatedAt`` too. Usage periods already over are moved to the current period
        keeping the given usage: the data describes the present.
        """
        entity = copy.deepcopy(entity)
        stamp = self._stamp()
        for item in entity.entitlements:
            if item["entitlementUpdatedAt"] is None:
                item["entitlementUpdatedAt"] = stamp
            tracks_usage = item["__typename"] == "CreditEntitlement" or is_metered(item)
            if tracks_usage and item["usageUpdatedAt"] is None:
                item["usageUpdatedAt"] = stamp
            self._roll_period(item, reset_usage=False)
        customer = self._customers.get(customer_id)
        if resource_id is None:
            if customer is None:
                self._customers[customer_id] = CustomerData(entity)
            else:
                customer.state = entity
        else:
            if customer is None:
                customer = self._customers[customer_id] = CustomerData(EntityState())
            customer.resources[resource_id] = entity
        if self._listeners:
            state = self.entitlements_state(customer_id, resource_id)
            self._announce(EntitlementsChanged(customer_id, resource_id, state))

    def replace_resources(self, customer_id: str, resources: Mapping[str, EntityState]) -> None:
        """Make ``resources`` all of a customer's resources: each is replaced as by `replace`,
        and a resource no longer listed is removed (announced, with what Edge now answers)."""
        customer = self._customers.get(customer_id)
        removed = [] if customer is None else [r for r in customer.resources if r not in resources]
        for resource_id in removed:
            assert customer is not None
            del customer.resources[resource_id]
            if self._listeners:
                state = self.entitlements_state(customer_id, resource_id)
                self._announce(EntitlementsChanged(customer_id, resource_id, state))
        for resource_id, entity in resources.items():
            self.replace(customer_id, resource_id, entity)

    def entitlements_state(
        self, customer_id: str, resource_id: str | None = None
    ) -> dict[str, Any]:
        """The ``EntitlementsState`` object of GetEntitlementsState and entitlements-state.json."""
        reason, entitlements = self._lookup(customer_id, resource_id)
        return {
            "__typename": "EntitlementsState",
            "entitlements": [
                v1_entitlement(item, customer_id, resource_id)
                for item in entitlements
                if item["__typename"] == "FeatureEntitlement"
            ],
            "entitlementsV2": copy.deepcopy(entitlements),
            "accessDeniedReason": reason,
        }

    def entitlements_v1(self, customer_id: str, resource_id: str | None = None) -> list[dict]:
        """The ``Entitlement`` list of GetEntitlements and entitlements.json: features only."""
        return self.entitlements_state(customer_id, resource_id)["entitlements"]

    def _lookup(self, customer_id: str, resource_id: str | None) -> tuple[str | None, list[dict]]:
        customer = self._customers.get(customer_id)
        if customer is None:
            return "CustomerNotFound", []
        entity = customer.state if resource_id is None else customer.resources.get(resource_id)
        if entity is None or customer.state.access_denied_reason == "CustomerIsArchived":
            # CustomerResourceNotFound is not an EntitlementsStateAccessDeniedReason: a customer
            # that exists but has no subscription for this resource is NoActiveSubscription.
            return customer.state.access_denied_reason or "NoActiveSubscription", []
        for item in entity.entitlements:
            self._roll_period(item, reset_usage=True)
        return entity.access_denied_reason, entity.entitlements

    def _roll_period(self, item: dict[str, Any], *, reset_usage: bool) -> None:
        """Move an ended usage period to the one containing now, resetting usage if asked."""
        end, anchor, period = item.get("usagePeriodEnd"), item.get("usagePeriodAnchor"), None
        if item["__typename"] == "FeatureEntitlement":
            period = item["resetPeriod"]
        now = self.now()
        if end is None or anchor is None or period is None or parse_timestamp(end) > now:
            return
        start, end_dt = current_period(parse_timestamp(anchor), period, now)
        item["usagePeriodStart"] = format_timestamp(start)
        item["usagePeriodEnd"] = format_timestamp(end_dt)
        if reset_usage:
            item["currentUsage"] = 0
            item["usageUpdatedAt"] = self._stamp()

    # -- usage and events ----------------------------------------------------------------------

    def report_usage(self, reports: Sequence[UsageReport]) -> list[dict[str, Any]]:
        """Apply usage reports, all or none; returns UsageMeasurementWithCurrentUsage objects.

        Raises StiggError (CustomerNotFound, CustomerResourceNotFound, FeatureNotFound,
        NoFeatureEntitlementInSubscription, MeteringNotAvailableForFeatureType) before applying
        anything if any report cannot be applied. A repeated idempotency key (per customer)
        returns the first report's result and changes nothing. Once all are applied, announces
        one `UsageChanged` per entitlement changed, with its final usage.
        """
        targets = [self._usage_target(report) for report in reports]
        changed: dict[int, tuple[UsageReport, dict[str, Any]]] = {}
        results = []
        for report, item in zip(reports, targets, strict=True):
            stamp = item["usageUpdatedAt"]
            results.append(self._apply_usage(report, item))
            if item["usageUpdatedAt"] != stamp:  # not an idempotent repeat
                changed.setdefault(id(item), (report, item))
        for report, item in changed.values():
            self._announce(
                UsageChanged(
                    customer_id=report.customer_id,
                    resource_id=report.resource_id,
                    reference_id=report.feature_id,
                    reference_type="FEATURE",
                    current_usage=item["currentUsage"],
                    usage_updated_at=item["usageUpdatedAt"],
                    usage_period_start=item["usagePeriodStart"],
                    usage_period_end=item["usagePeriodEnd"],
                    entitlement=v1_entitlement(item, report.customer_id, report.resource_id),
                )
            )
        return results

    def _usage_target(self, report: UsageReport) -> dict[str, Any]:
        customer = self._customers.get(report.customer_id)
        if customer is None:
            raise StiggError("CustomerNotFound", f"Customer not found: {report.customer_id}")
        entity = customer.state
        if report.resource_id is not None:
            resource = customer.resources.get(report.resource_id)
            if resource is None:
                raise StiggError(
                    "CustomerResourceNotFound",
                    f"Resource {report.resource_id} not found for customer {report.customer_id}",
                )
            entity = resource
        for item in entity.entitlements:
            if item["__typename"] == "FeatureEntitlement":
                if item["feature"]["refId"] == report.feature_id:
                    if not is_metered(item):
                        raise StiggError(
                            "MeteringNotAvailableForFeatureType",
                            f"Feature {report.feature_id} is not metered: usage cannot be reported",
                        )
                    return item
        if not self._feature_exists(report.feature_id):
            raise StiggError("FeatureNotFound", f"Feature not found: {report.feature_id}")
        raise StiggError(
            "NoFeatureEntitlementInSubscription",
            f"Customer {report.customer_id} has no entitlement to feature {report.feature_id}",
        )

    def _feature_exists(self, feature_id: str) -> bool:
        for customer in self._customers.values():
            for entity in (customer.state, *customer.resources.values()):
                for item in entity.entitlements:
                    if (item.get("feature") or {}).get("refId") == feature_id:
                        return True
        return False

    def _apply_usage(self, report: UsageReport, item: dict[str, Any]) -> dict[str, Any]:
        key = (report.customer_id, report.idempotency_key or "")
        if report.idempotency_key and key in self._usage_by_key:
            return copy.deepcopy(self._usage_by_key[key])
        self._roll_period(item, reset_usage=True)
        before = item["currentUsage"] or 0
        item["currentUsage"] = (
            report.value if report.update_behavior == "SET" else before + report.value
        )
        item["usageUpdatedAt"] = self._stamp()
        now = format_timestamp(self.now())
        result = {
            "__typename": "UsageMeasurementWithCurrentUsage",
            "id": str(uuid.UUID(int=self.random.getrandbits(128), version=4)),
            "featureId": report.feature_id,
            "customerId": report.customer_id,
            "resourceId": report.resource_id,
            "environmentId": ENVIRONMENT_ID,
            "value": report.value,
            "currentUsage": item["currentUsage"],
            "usagePeriodStart": item["usagePeriodStart"],
            "usagePeriodEnd": item["usagePeriodEnd"],
            "nextResetDate": item["usagePeriodEnd"],
            "timestamp": format_timestamp(report.created_at) if report.created_at else now,
            "createdAt": now,
            "credit": None,
        }
        if report.idempotency_key:
            self._usage_by_key[key] = result
        self._usage.append(
            {
                **{k: result[k] for k in ("id", "customerId", "resourceId", "featureId")},
                "value": report.value,
                "updateBehavior": report.update_behavior,
                "idempotencyKey": report.idempotency_key,
                "dimensions": copy.deepcopy(report.dimensions),
                "timestamp": result["timestamp"],
                "currentUsage": result["currentUsage"],
            }
        )
        return copy.deepcopy(result)

    def report_events(self, events: Sequence[UsageEvent]) -> int:
        """Record raw events, skipping repeated (customerId, idempotencyKey); returns how many
        were new. Like Stigg's asynchronous ingestion, unknown customers are not checked and
        events do not change entitlements (the emulator has no meters)."""
        received_at = format_timestamp(self.now())
        recorded = 0
        for event in events:
            key = (event.customer_id, event.idempotency_key)
            if key in self._event_keys:
                continue
            self._event_keys.add(key)
            recorded += 1
            self._events.append(
                {
                    "eventName": event.event_name,
                    "customerId": event.customer_id,
                    "resourceId": event.resource_id,
                    "idempotencyKey": event.idempotency_key,
                    "dimensions": copy.deepcopy(event.dimensions),
                    "timestamp": format_timestamp(event.timestamp or self.now()),
                    "receivedAt": received_at,
                }
            )
        return recorded

    # -- the catalogue ---------------------------------------------------------------------------

    def publish_package(
        self,
        migration_type: str,
        *,
        package_ref_id: str = "emulator-plan",
        package_type: str = "Plan",
        package_version: int | None = None,
    ) -> PackagePublished:
        """Announce a published package version; raises ValueError if an argument is invalid.

        Without ``package_version``, versions count up per package from 1.
        """
        if migration_type not in MIGRATION_TYPES:
            raise ValueError(f"migrationType: must be one of {', '.join(MIGRATION_TYPES)}")
        for name, value in (("packageRefId", package_ref_id), ("packageType", package_type)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: must be a non-empty string")
        key = (package_type, package_ref_id)
        if package_version is None:
            package_version = self._package_versions[key] + 1
        elif isinstance(package_version, bool) or not isinstance(package_version, int):
            raise ValueError("packageVersion: must be an integer")
        self._package_versions[key] = max(self._package_versions[key], package_version)
        change = PackagePublished(
            account_id=ACCOUNT_ID,
            environment_id=ENVIRONMENT_ID,
            package_type=package_type,
            package_ref_id=package_ref_id,
            package_version=package_version,
            migration_type=migration_type,
        )
        self._announce(change)
        return change

    def usage_log(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._usage)

    def event_log(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._events)
