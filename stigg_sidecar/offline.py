"""Offline mode: Stigg's semantics with no network at all.

Reads answer fallbacks (every lookup misses), usage is acknowledged with a random measurement id,
events are accepted and dropped, and reloads report that the entity exists. Holds no state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from stigg_sidecar.contracts import EventReport, UsageAck, UsageReport, measurement_id
from stigg_sidecar.entitlements.records import CustomerEntry


class OfflineSidecar:
    """Both the EntitlementSource and the Writer of an offline sidecar."""

    def peek(self, customer_id: str, resource_id: str | None) -> CustomerEntry | None:
        return None

    def lookup(self, customer_id: str, resource_id: str | None, timeout: float) -> CustomerEntry | None:
        return None

    def memo_grew(self, entry: CustomerEntry, nbytes: int) -> None:
        return None

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def report_usage(
        self, usages: Sequence[UsageReport], timeout: float, still_wanted: Callable[[], bool] | None = None
    ) -> Sequence[UsageAck]:
        return [
            UsageAck(
                measurement_id=measurement_id(),
                customer_id=u.customer_id,
                feature_id=u.feature_id,
                resource_id=u.resource_id,
            )
            for u in usages
        ]

    def report_events(
        self, events: Sequence[EventReport], timeout: float, still_wanted: Callable[[], bool] | None = None
    ) -> None:
        return None

    def reload(self, customer_id: str, resource_id: str | None, timeout: float) -> bool:
        return True
