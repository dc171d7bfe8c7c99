"""EntitlementCache: the in-memory cache of customer entries, bounded in bytes.

Owned by the reactor: only reactor code calls `put`, `update`, `purge` and `clear`. gRPC handler
threads call `get`, which is one dict lookup and one attribute write (the recency stamp) with no
lock: entries are immutable and replaced whole, and a dict read of a key being replaced sees
either the old entry or the new one. Eviction is approximate LRU, in batches: when the byte total
passes the budget, the least recently read entries go until the total is under `low_water` of it.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

from stigg_sidecar.entitlements.records import CustomerEntry, keep_newer_usage, newer_or_equal


def earliest_expiry(entry: CustomerEntry) -> int | None:
    """The first `validUntil` among the entry's entitlements (epoch ms), or None."""
    times = [e.valid_until for e in entry.features.values() if e.valid_until is not None]
    times += [c.valid_until for c in entry.credits.values() if c.valid_until is not None]
    return min(times) if times else None


class _Slot:
    __slots__ = ("entry", "used", "expires", "extra")

    def __init__(self, entry: CustomerEntry, used: int) -> None:
        self.entry = entry
        self.used = used
        self.expires = earliest_expiry(entry)
        self.extra = 0  # bytes charged for what readers memoized on the entry

    @property
    def bytes(self) -> int:
        return self.entry.size + self.extra


class EntitlementCache:
    def __init__(self, max_bytes: int, low_water: float = 0.9) -> None:
        self.max_bytes = max_bytes
        self._low_water_bytes = int(max_bytes * low_water)
        self._slots: dict[str, _Slot] = {}
        self._bytes = 0
        # A global tick for recency: next() on itertools.count is atomic under the GIL.
        self._ticks = itertools.count()
        self.evictions = 0

    # -- any thread -------------------------------------------------------------------------------

    def get(self, key: str) -> CustomerEntry | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        slot.used = next(self._ticks)
        return slot.entry

    def get_entry(self, key: str) -> CustomerEntry | None:
        """The entry without counting it as a read (for refreshes, which must not skew recency)."""
        slot = self._slots.get(key)
        return slot.entry if slot is not None else None

    def get_fresh(self, key: str, now_ms: int) -> CustomerEntry | None:
        """The entry unless missing or one of its entitlements is past validUntil."""
        slot = self._slots.get(key)
        if slot is None or (slot.expires is not None and slot.expires <= now_ms):
            return None
        slot.used = next(self._ticks)
        return slot.entry

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def bytes(self) -> int:
        return self._bytes

    # -- reactor only -----------------------------------------------------------------------------

    def put(self, entry: CustomerEntry, force: bool = False) -> bool:
        """Store `entry` unless the cached one is newer (newer wins). True when stored.

        Usage is versioned apart from the entitlements (it moves on every report), so usage the
        cache holds that is newer than the incoming entry's is kept. `force` skips the entry-level
        check (for sources that are authoritative whatever the timestamp), never the usage one.
        """
        key = entry.key
        slot = self._slots.get(key)
        if slot is not None:
            if not force and not newer_or_equal(entry, slot.entry):
                return False
            entry = keep_newer_usage(entry, slot.entry)
        self._store(key, entry, slot)
        return True

    def update(self, key: str, change: Callable[[CustomerEntry], CustomerEntry | None]) -> CustomerEntry | None:
        """Replace the cached entry with `change(entry)` unless that returns None."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        changed = change(slot.entry)
        if changed is None:
            return None
        self._store(key, changed, slot)
        return changed

    def charge(self, entry: CustomerEntry, nbytes: int) -> None:
        """Count `nbytes` more against `entry` (answers memoized on it), if it is still cached."""
        slot = self._slots.get(entry.key)
        if slot is None or slot.entry is not entry:
            return
        slot.extra += nbytes
        self._bytes += nbytes
        if self._bytes > self.max_bytes:
            self._evict()

    def purge(self, key: str) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._bytes -= slot.bytes

    def clear(self) -> None:
        self._slots.clear()
        self._bytes = 0

    def keys_by_recency(self) -> list[str]:
        """Keys, most recently read first (for refreshes that should favour hot customers)."""
        return [k for k, _ in sorted(self._slots.items(), key=lambda kv: kv[1].used, reverse=True)]

    def entries(self) -> Iterator[CustomerEntry]:
        return (slot.entry for slot in list(self._slots.values()))

    def _store(self, key: str, entry: CustomerEntry, slot: _Slot | None) -> None:
        if slot is None:
            self._slots[key] = _Slot(entry, next(self._ticks))
        else:
            self._bytes -= slot.bytes
            # A new slot, not a mutated one: a reader holding the old slot keeps a whole entry.
            self._slots[key] = _Slot(entry, slot.used)
        self._bytes += entry.size
        if self._bytes > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        by_age = sorted(self._slots.items(), key=lambda kv: kv[1].used)
        for key, slot in by_age:
            if self._bytes <= self._low_water_bytes:
                break
            del self._slots[key]
            self._bytes -= slot.bytes
            self.evictions += 1
