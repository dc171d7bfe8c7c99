"""EntitlementCache: the in-memory cache of customer entries, bounded in bytes.

Owned by the reactor: only reactor code calls `put`, `update`, `charge`, `purge` and `clear`.
gRPC handler threads call `get`, which is one dict lookup and one append to a bounded deque of
recent reads, with no lock (a deque append is atomic): entries are immutable and replaced whole,
and a dict read of a key being replaced sees either the old slot or the new one.

Every operation is O(1); nothing walks or sorts the whole cache on the reactor. The slots sit in
an OrderedDict in recency order (front = least recent). Readers do not reorder it themselves (the
reactor owns it); the reactor replays the recent reads (`move_to_end`, each O(1)) before it evicts
or lists keys. Recency is approximate only in that reads older than the deque's length are
forgotten when the reactor has not replayed them in time.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import chain, islice
from typing import Callable, Iterator

from stigg_sidecar.entitlements.records import CustomerEntry, keep_newer_usage, newer_or_equal

# Reads remembered for the reactor to replay: bounds both the memory and one replay's work
# (~1 ms at the bound).
_RECENT_READS = 8192
# Keys that keys_by_recency lists in recency order before the rest (~1 ms of the reactor).
_HOT_KEYS = 1024
# Entries one call evicts at most beyond what brings the total under `max_bytes` (the batch down
# to `low_water`): a batch amortizes the check, a bound keeps a pause short at any cache size.
_MAX_EXTRA_EVICTIONS = 64


def earliest_expiry(entry: CustomerEntry) -> int | None:
    """The first `validUntil` among the entry's entitlements (epoch ms), or None."""
    times = [e.valid_until for e in entry.features.values() if e.valid_until is not None]
    times += [c.valid_until for c in entry.credits.values() if c.valid_until is not None]
    return min(times) if times else None


class _Slot:
    __slots__ = ("entry", "expires", "extra")

    def __init__(self, entry: CustomerEntry) -> None:
        self.entry = entry
        self.expires = earliest_expiry(entry)
        self.extra = 0  # bytes charged for what readers memoized on the entry

    @property
    def bytes(self) -> int:
        return self.entry.size + self.extra


class EntitlementCache:
    def __init__(self, max_bytes: int, low_water: float = 0.9) -> None:
        self.max_bytes = max_bytes
        self._low_water_bytes = int(max_bytes * low_water)
        # Front = least recently placed or given a second chance; back = newest.
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._reads: deque[str] = deque(maxlen=_RECENT_READS)
        self._bytes = 0
        self.evictions = 0
        self.changes = 0  # bumped by every store, purge and clear (the snapshot writes when it moved)

    # -- any thread -------------------------------------------------------------------------------

    def get(self, key: str) -> CustomerEntry | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        self._reads.append(key)
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
        self._reads.append(key)
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
        self.changes += 1
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._bytes -= slot.bytes

    def clear(self) -> None:
        self.changes += 1
        self._slots.clear()
        self._reads.clear()
        self._bytes = 0

    def keys_by_recency(self) -> Iterator[str]:
        """Keys for refreshes that should favour hot customers: the `_HOT_KEYS` most recently
        placed or read first, most recent first, then every other key in the order it was first
        cached. A snapshot taken at C speed without walking the recency list end to end (its
        nodes are scattered in memory: ~200 ms at 500,000 keys against ~6 ms for the dict's own
        order); the caller may iterate it while the cache changes."""
        self._replay_reads()
        hot = list(islice(reversed(self._slots), _HOT_KEYS))
        rest = list(dict.keys(self._slots))
        if len(hot) == len(rest):
            return iter(hot)
        seen = frozenset(hot)
        return chain(hot, (key for key in rest if key not in seen))

    def entries(self) -> Iterator[CustomerEntry]:
        return (slot.entry for slot in list(self._slots.values()))

    def _store(self, key: str, entry: CustomerEntry, slot: _Slot | None) -> None:
        self.changes += 1
        if slot is None:
            self._slots[key] = _Slot(entry)
        else:
            self._bytes -= slot.bytes
            # A new slot, not a mutated one: a reader holding the old slot sees its entry and
            # expiry together. Assigning an existing key keeps its place in the order.
            self._slots[key] = _Slot(entry)
        self._bytes += entry.size
        if self._bytes > self.max_bytes:
            self._evict()

    def _replay_reads(self) -> None:
        reads, slots = self._reads, self._slots
        # Only what is there now: handler threads may keep appending meanwhile.
        for _ in range(len(reads)):
            key = reads.popleft()
            if key in slots:
                slots.move_to_end(key)

    def _evict(self) -> None:
        self._replay_reads()
        slots = self._slots
        extra = _MAX_EXTRA_EVICTIONS
        while slots and self._bytes > self._low_water_bytes:
            if self._bytes <= self.max_bytes:
                if extra == 0:
                    return
                extra -= 1
            key, slot = next(iter(slots.items()))
            del slots[key]
            self._bytes -= slot.bytes
            self.evictions += 1
