"""UpstreamWrites: where every write ends, direct or spooled: Stigg, then the cache.

Runs on the reactor. Sends a batch of usage reports (ReportUsage for one, ReportUsageBulk for
more) or events (one ReportEvent carrying them all), applies Stigg's answer (authoritative usage)
to the cache through the online backend, and builds the acknowledgements from it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks

from stigg_sidecar.contracts import EventReport, UsageAck, UsageReport
from stigg_sidecar.entitlements.records import parse_time
from stigg_sidecar.upstream.api import StiggApi


def _float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def ack_from_result(usage: UsageReport, result: dict) -> UsageAck:
    """The acknowledgement of `usage` from Stigg's UsageMeasurementWithCurrentUsage."""
    return UsageAck(
        measurement_id=str(result.get("id") or ""),
        customer_id=str(result.get("customerId") or usage.customer_id),
        feature_id=str(result.get("featureId") or usage.feature_id),
        resource_id=result.get("resourceId") or usage.resource_id,
        current_usage=_float(result.get("currentUsage")),
        usage_period_start=parse_time(result.get("usagePeriodStart")),
        usage_period_end=parse_time(result.get("usagePeriodEnd")),
    )


class UpstreamWrites:
    """Stigg's write API plus the cache update its answers carry (reactor only)."""

    def __init__(self, api: StiggApi, backend) -> None:
        self._api = api
        self._backend = backend  # OnlineSidecar: apply_usage_result

    @inlineCallbacks
    def usage(self, usages: Sequence[UsageReport], keys: Sequence[str] | None, timeout: float,
              settled: Callable[[], None] | None = None):
        """Send `usages` (with these idempotency keys, else fresh ones); fires with Stigg's results
        in order, already applied to the cache. `settled` runs when the results arrive, before
        they are applied (the spool takes its records out of the pending usage there)."""
        results = yield self._api.report_usage(usages, timeout, keys=keys)
        if settled is not None:
            settled()
        for usage, result in zip(usages, results, strict=True):
            self._backend.apply_usage_result(usage, result)
        return results

    def events(self, events: Sequence[EventReport], timeout: float) -> Deferred:
        return self._api.report_events(events, timeout)
