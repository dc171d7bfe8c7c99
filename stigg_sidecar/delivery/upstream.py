"""UpstreamWrites: where every write ends, direct or spooled: Stigg, then the store.

Runs on the reactor. Sends a batch of usage reports (ReportUsage for one, ReportUsageBulk for
more) or events (one ReportEvent carrying them all), and hands the usage changes Stigg's answers
carry (authoritative usage) to the store, through the `UsageStore` protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred, inlineCallbacks

from stigg_sidecar.contracts import EventReport, UsageReport, UsageStore


class WriteApi(Protocol):
    """Stigg's write API (`upstream.api.StiggApi`)."""

    def report_usage(self, usages: Sequence[UsageReport], timeout: float,
                     keys: Sequence[str] | None = None) -> Deferred: ...

    def report_events(self, events: Sequence[EventReport], timeout: float) -> Deferred: ...


class UpstreamWrites:
    """Stigg's write API plus the cache update its answers carry (reactor only)."""

    def __init__(self, api: WriteApi, store: UsageStore) -> None:
        self._api = api
        self._store = store

    @inlineCallbacks
    def usage(self, usages: Sequence[UsageReport], keys: Sequence[str] | None, timeout: float,
              settled: Callable[[], None] | None = None) -> Any:
        """Send `usages` (with these idempotency keys, else fresh ones); fires with Stigg's results
        (`UsageResult`s) in order, already applied to the cache. `settled` runs when the results
        arrive, before they are applied (the spool takes its records out of the pending usage there)."""
        results = yield self._api.report_usage(usages, timeout, keys=keys)
        if settled is not None:
            settled()
        for result in results:
            for change in result.changes:
                self._store.usage_changed(change)
        return results

    def events(self, events: Sequence[EventReport], timeout: float) -> Deferred:
        return self._api.report_events(events, timeout)
