"""RealtimeUpdates: real-time updates applied through the store (the socket's UpdateSink), on the reactor.

entitlementsUpdatedV2 replaces a cached customer's entry (the latest push wins) or drops it when it
carries neither entitlements nor a reason; usageUpdatedV2 updates one entitlement's usage if
newer; packagePublished for ALL_CUSTOMERS drops everything. Customers this sidecar has not cached
are left alone: it never fills memory with customers nobody here asked about.
The socket going down starts the poller; coming back stands it down and revalidates the cache in
the background instead of wiping it, so reads never go cold on a blip.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger

from stigg_sidecar.entitlements.records import cache_key
from stigg_sidecar.online.fetcher import Fetcher, wall_ms
from stigg_sidecar.online.malformed import MalformedEntitlements
from stigg_sidecar.online.refresh import Poller, Refresher
from stigg_sidecar.online.store import EntitlementStore
from stigg_sidecar.upstream import wire

log = Logger()


class RealtimeUpdates:
    def __init__(
        self,
        store: EntitlementStore,
        fetcher: Fetcher,
        malformed: MalformedEntitlements,
        poller: Poller,
        refresher: Refresher,
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self._store = store
        self._fetcher = fetcher
        self._malformed = malformed
        self._poller = poller
        self._refresher = refresher
        self._now_ms = now_ms
        self._ups = 0

    def socket_up(self) -> None:
        self._ups += 1
        self._poller.stand_down()
        if self._ups > 1 or len(self._store):
            # Not refresh(): a poll running now began while the socket was down (issue 20, 10).
            self._refresher.revalidate()

    def socket_down(self) -> None:
        self._poller.activate()

    def entitlements_updated(self, payload: Mapping[str, Any]) -> None:
        pushed = wire.pushed_entry(payload, self._now_ms())
        if pushed.entry is None:
            self._store.drop(pushed.customer_id, pushed.resource_id)
            return
        self._malformed.seen(pushed.entry)
        key = cache_key(pushed.customer_id, pushed.resource_id)
        # A fetch in flight may carry older data (a lagging Edge): the push lands first, and newer
        # wins when the fetch does.
        self._store.pushed(pushed.entry, keep=self._store.entry(key) is not None or self._fetcher.fetching(key))

    def usage_updated(self, payload: Mapping[str, Any]) -> None:
        self._store.usage_changed(wire.pushed_usage(payload, self._now_ms()))

    def package_published(self, payload: Mapping[str, Any]) -> None:
        if wire.package_migration(payload) == "ALL_CUSTOMERS":
            log.info("A package was published for all customers; dropping the cache")
            self._store.clear()
