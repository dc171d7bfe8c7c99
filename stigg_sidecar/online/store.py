"""EntitlementStore: the one writer of cached state (ARCHITECTURE invariant 11), on the reactor.

Every change of a cached entry goes through here: fetch results, entries read from Redis, pushes
from the socket, Stigg's answers to usage reports, changes a peer of the fleet announced, snapshot
loads, and the pending-usage overlay of the write spool. The store keeps memory (the
`EntitlementCache`), Redis (the mirror, when one is configured) and the overlay consistent with
one policy:

- newer wins (entries by their timestamp unless forced, usage per entitlement by its own);
- memory shows Stigg's usage plus the usage acknowledged but not yet delivered (`PendingUsage`);
- Redis holds Stigg's usage only, never the overlay (docs/redis-format.md says why), and only
  what Stigg said: entries read from Redis and snapshot loads are not written back.

Handler threads only read (`fresh`); every method that changes something runs on the reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from twisted.internet.defer import Deferred, inlineCallbacks

from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.contracts import UsageChange, UsageReport
from stigg_sidecar.entitlements.changes import apply_usage
from stigg_sidecar.entitlements.records import CustomerEntry, Usage, cache_key
from stigg_sidecar.entitlements.tracking import untrack
from stigg_sidecar.online.pending import PendingUsage


class SharedCache(Protocol):
    """The writes the store makes to the fleet's Redis (`cache.redis.RedisMirror`)."""

    def read(self, customer_id: str, resource_id: str | None = None) -> Deferred: ...

    def write(self, entry: CustomerEntry, only_if_cached: bool = False, force: bool = False) -> Deferred: ...

    def write_usage(self, customer_id: str, resource_id: str | None, kind: str, ref_id: str, usage: Usage) -> Deferred: ...

    def purge(self, customer_id: str, resource_id: str | None = None) -> Deferred: ...


class EntitlementStore:
    def __init__(self, cache: EntitlementCache, mirror: SharedCache | None = None,
                 pending: PendingUsage | None = None) -> None:
        self._cache = cache
        self._mirror = mirror
        self._pending = pending
        # fresh(key, now_ms): the entry unless missing or past an entitlement's validUntil, counted
        # as a read. The cache's own method, not a wrapper: every cached read calls it.
        self.fresh: Callable[[str, int], CustomerEntry | None] = cache.get_fresh

    # -- reads (handler threads too) --------------------------------------------------------------

    def entry(self, key: str) -> CustomerEntry | None:
        """The entry, not counted as a read (refreshes must not skew recency)."""
        return self._cache.get_entry(key)

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def changes(self) -> int:
        """Bumped by every change: the snapshot writes when it moved."""
        return self._cache.changes

    def keys_by_recency(self) -> Iterator[str]:
        return self._cache.keys_by_recency()

    def snapshot_entries(self) -> list[CustomerEntry]:
        """Every entry as a snapshot holds it: with Stigg's own usage where spooled usage is not
        yet delivered (the spool re-applies it at the next start; holding it would count it twice)."""
        entries = list(self._cache.entries())
        pending = self._pending
        if pending is not None and pending.tracked_keys():
            entries = [pending.with_bases(entry) for entry in entries]
        # Held while the file is written (seconds at 100,000 entries): a list of records only,
        # which a full collection need not walk (see gcpolicy.untrack).
        untrack(entries)
        return entries

    # -- whole entries (reactor) ------------------------------------------------------------------

    def put(self, entry: CustomerEntry, force: bool = False) -> CustomerEntry:
        """Cache `entry` in memory unless a newer one is cached (or `force`); whichever is current.

        For entries that came from Redis or a snapshot: Redis already holds what it holds. Usage
        acknowledged but not yet delivered (the write spool) is applied on top."""
        if self._pending is not None:
            entry = self._pending.adjust_entry(entry)
        self._cache.put(entry, force=force)
        return self._cache.get_entry(entry.key) or entry

    @inlineCallbacks
    def fetched(self, entry: CustomerEntry, force: bool = False) -> Any:
        """Stigg's answer for a customer: into memory (as `put`), then into Redis (newer wins
        there too); fires with the current entry once Redis has it (before the fleet's fetch lock
        goes, so waiters find it). An explicit reload is `force`d: Stigg's answer is the truth
        even when its timestamp went backwards (an entitlement removed)."""
        current = self.put(entry, force=force)
        if self._mirror is not None:
            yield self._mirror.write(entry, force=force)  # a reload replaces Redis's copy too
        return current

    def pushed(self, entry: CustomerEntry, keep: bool) -> None:
        """A pushed entry (entitlementsUpdatedV2), in order on one socket: the latest push is the
        truth even when its timestamp is older (an entitlement removed); usage still newer wins.
        Memory takes it only when `keep` (the customer is cached or being fetched: customers
        nobody here asked about stay out); Redis only where it already holds the customer."""
        if keep:
            self.put(entry, force=True)
        if self._mirror is not None:
            # Redis may hold customers this sidecar never read (a peer's, or from before a restart).
            self._mirror.write(entry, only_if_cached=True, force=True)

    def drop(self, customer_id: str, resource_id: str | None) -> None:
        """Stigg says the entry is gone: from memory and from Redis."""
        self._cache.purge(cache_key(customer_id, resource_id))
        if self._mirror is not None:
            self._mirror.purge(customer_id, resource_id)

    def clear(self) -> None:
        """Everything cached is stale (a package published for all customers): memory only;
        each fleet member clears its own, and Redis entries are refetched as they are read."""
        self._cache.clear()

    def peer_changed(self, key: str, kind: str) -> None:
        """Another sidecar of the fleet changed `key` in Redis: refresh (or drop) our copy."""
        if kind == "purge":
            self._cache.purge(key)
            return
        entry = self._cache.get_entry(key)
        if entry is not None and self._mirror is not None:
            self._mirror.read(entry.customer_id, entry.resource_id).addCallback(
                lambda shared: self.put(shared) if shared is not None else None
            )

    def charge(self, entry: CustomerEntry, nbytes: int) -> None:
        """Readers memoized `nbytes` more on `entry`: count them against the memory budget."""
        self._cache.charge(entry, nbytes)

    # -- usage (reactor) --------------------------------------------------------------------------

    def usage_changed(self, change: UsageChange) -> None:
        """One entitlement's usage as Stigg now counts it (a usage result, a push): in memory with
        the pending overlay on top, and in Redis as Stigg said it, each if newer."""
        key = change.key
        shown = change.usage
        if self._pending is not None:
            shown = self._pending.adjust_usage(key, change.kind, change.ref_id, shown)
        self._show(key, change.kind, change.ref_id, shown)
        if self._mirror is not None:
            self._mirror.write_usage(change.customer_id, change.resource_id, change.kind, change.ref_id, change.usage)

    def pending_added(self, seq: int, usage: UsageReport) -> Usage | None:
        """Count an acknowledged, spooled record; the usage the cache shows now (None: not cached)."""
        assert self._pending is not None, "pending usage needs the write spool"
        key = cache_key(usage.customer_id, usage.resource_id)
        entry = self._cache.get_entry(key)
        feature = entry.features.get(usage.feature_id) if entry is not None else None
        shown = self._pending.add(seq, usage, feature.usage if feature is not None else None)
        return self._show_pending(key, usage.feature_id, shown)

    def pending_settled(self, seq: int, usage: UsageReport) -> None:
        """The record was delivered or refused: it stops counting (`pending_shown` shows it)."""
        assert self._pending is not None, "pending usage needs the write spool"
        self._pending.remove(seq, usage)

    def pending_shown(self, usage: UsageReport) -> None:
        """Show Stigg's usage plus what is still pending for the record's entitlement."""
        assert self._pending is not None, "pending usage needs the write spool"
        shown = self._pending.refresh(usage)
        self._show_pending(cache_key(usage.customer_id, usage.resource_id), usage.feature_id, shown)

    def _show_pending(self, key: str, feature_id: str, shown: Usage | None) -> Usage | None:
        if shown is None:
            return None
        return shown if self._show(key, "FEATURE", feature_id, shown) is not None else None

    def _show(self, key: str, kind: str, ref_id: str, usage: Usage) -> CustomerEntry | None:
        return self._cache.update(key, lambda e: apply_usage(e, kind, ref_id, usage))
