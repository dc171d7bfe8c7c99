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

Refreshes walk the keys in slices (`keys_by_recency`), never copying them all in one reactor turn.
The walk's order is a plain list of the keys (`_order`; each slot knows its position) that removals
keep partitioned into the keys the walk has handed out and those it has not, so a walk visits
every key cached throughout it exactly once while keys come and go.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from itertools import islice

from stigg_sidecar.entitlements.changes import keep_newer_usage, newer_or_equal
from stigg_sidecar.entitlements.records import CustomerEntry
from stigg_sidecar.entitlements.tracking import untrack

# Reads remembered for the reactor to replay: bounds both the memory and one replay's work
# (~1 ms at the bound).
_RECENT_READS = 8192
# Keys that keys_by_recency lists in recency order before the rest (~1 ms of the reactor).
_HOT_KEYS = 1024
# Entries one call evicts at most beyond what brings the total under `max_bytes` (the batch down
# to `low_water`): a batch amortizes the check, a bound keeps a pause short at any cache size.
_MAX_EXTRA_EVICTIONS = 64
# Keys a refresh walk copies per slice: ~50 us of the reactor, however large the cache.
_WALK_SLICE = 1024


def earliest_expiry(entry: CustomerEntry) -> int | None:
    """The first `validUntil` among the entry's entitlements (epoch ms), or None."""
    times = [e.valid_until for e in entry.features.values() if e.valid_until is not None]
    times += [c.valid_until for c in entry.credits.values() if c.valid_until is not None]
    return min(times) if times else None


class _Slot:
    __slots__ = ("entry", "expires", "extra", "pos")

    def __init__(self, entry: CustomerEntry, pos: int) -> None:
        self.entry = entry
        self.expires = earliest_expiry(entry)
        self.extra = 0  # bytes charged for what readers memoized on the entry
        self.pos = pos  # the key's index in EntitlementCache._order
        untrack(self)  # holds an entry and numbers: never in a cycle (see gcpolicy.untrack)

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
        # Every key once, in no meaningful order: the refresh walk's positions. Keys before
        # `_walked` were handed out by the current walk, the others not yet (see `_unlist`).
        self._order: list[str] = []
        self._walked = 0
        self._walk = 0  # the current walk's number: a new walk ends the previous one
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
            self._unlist(slot.pos)

    def clear(self) -> None:
        self.changes += 1
        self._slots.clear()
        self._reads.clear()
        self._order.clear()
        self._walked = 0
        self._bytes = 0

    def keys_by_recency(self, slice_size: int = _WALK_SLICE) -> Iterator[str]:
        """Keys for refreshes that should favour hot customers: the `_HOT_KEYS` most recently
        placed or read first, most recent first, then every other key, `slice_size` at a time as
        the caller consumes them (no turn of the reactor copies more).

        The caller iterates it while the cache changes, on the reactor: every key cached from
        the start of the walk to its end is yielded exactly once; a key added meanwhile is yielded
        at most once (once more if it was evicted and added again); a key yielded may have been
        evicted since (the caller looks it up). One walk at a time: starting another ends this one.
        """
        self._replay_reads()
        hot = list(islice(reversed(self._slots), _HOT_KEYS))
        self._walk += 1
        self._walked = 0
        return self._walk_keys(self._walk, hot, slice_size)

    def _walk_keys(self, walk: int, hot: list[str], slice_size: int) -> Iterator[str]:
        yield from hot
        seen = frozenset(hot)
        order = self._order
        while self._walk == walk:
            start = self._walked
            keys = order[start : start + slice_size]
            if not keys:
                return
            self._walked = start + len(keys)
            for key in keys:
                if key not in seen:
                    yield key

    def entries(self) -> Iterator[CustomerEntry]:
        return (slot.entry for slot in list(self._slots.values()))

    def _store(self, key: str, entry: CustomerEntry, slot: _Slot | None) -> None:
        self.changes += 1
        if slot is None:
            self._slots[key] = _Slot(entry, len(self._order))
            self._order.append(key)
        else:
            self._bytes -= slot.bytes
            # A new slot, not a mutated one: a reader holding the old slot sees its entry and
            # expiry together. Assigning an existing key keeps its place in the order.
            self._slots[key] = _Slot(entry, slot.pos)
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
            self._unlist(slot.pos)
            self.evictions += 1

    def _unlist(self, pos: int) -> None:
        """Remove the key at `pos` of `_order` (already gone from `_slots`) in O(1): the last key
        fills the hole. A hole among the keys the walk handed out is first filled by the last key
        it handed out, so the walk's part of the list shrinks by one and keeps only handed-out
        keys, and its rest keeps only keys it has not handed out."""
        order, slots = self._order, self._slots
        if pos < self._walked:
            self._walked -= 1
            last_walked = self._walked
            if pos != last_walked:
                key = order[last_walked]
                order[pos] = key
                slots[key].pos = pos
            pos = last_walked
        last = order.pop()
        if pos < len(order):
            order[pos] = last
            slots[last].pos = pos
