"""PendingUsage: what the cache shows for usage that is acknowledged but not yet delivered.

Bookkeeping only: it never touches the cache; the store (`online.store`, the one writer of
cached state) asks it what to show and shows it. Reactor only. For each (cache key, feature) with spooled usage not yet delivered, it keeps the
last authoritative usage Stigg gave (`base`: value, period and timestamp) and the undelivered
records in order. The cache always shows `base` with the records applied (DELTA adds, SET sets),
stamped with the base's timestamp, so:

- a new record moves the cached usage at once (limits hold during an outage);
- authoritative usage (a delivery result, a push, a refetch, Redis) replaces the base if it is
  newer or as new (newer wins) and the records still undelivered are applied on top again;
- a record leaves when its delivery result arrives (or it is dead-lettered), before that result
  is applied: nothing is counted twice, nothing lost.

A record sent but not yet answered still counts: until its result arrives the sidecar cannot know
whether Stigg applied it. Records loaded at start are the exception (`SpooledDelivery` adds them
only once a delivery fails): they may have been delivered before the restart, and Stigg's usage
would then hold them already. Redis and snapshots hold the base, never the overlay.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from stigg_sidecar.contracts import UsageReport
from stigg_sidecar.entitlements.changes import apply_usage
from stigg_sidecar.entitlements.records import CustomerEntry, Usage, cache_key


@dataclass
class _Tracked:
    base: Usage | None  # None: the cache did not hold this entitlement when the first record came
    records: dict[int, tuple[str, float]] = field(default_factory=dict)  # seq -> (behavior, value)

    def value(self) -> float | None:
        current = self.base.current_usage if self.base is not None else None
        for _, (behavior, value) in sorted(self.records.items()):  # spool order, whatever came first
            if behavior == "SET":
                current = value
            elif current is not None:
                current += value
        return current


class PendingUsage:
    def __init__(self) -> None:
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self._features: dict[str, set[str]] = {}  # cache key -> tracked feature ids

    def __len__(self) -> int:
        return sum(len(t.records) for t in self._tracked.values())

    def add(self, seq: int, usage: UsageReport, cached: Usage | None) -> Usage | None:
        """Count an acknowledged record (`cached`: the usage the cache holds for its entitlement,
        None when it holds none); the usage to show now (None: nothing to show)."""
        key = cache_key(usage.customer_id, usage.resource_id)
        pair = (key, usage.feature_id)
        tracked = self._tracked.get(pair)
        if tracked is None:
            tracked = self._tracked[pair] = _Tracked(cached)
            self._features.setdefault(key, set()).add(usage.feature_id)
        tracked.records[seq] = (usage.update_behavior or "DELTA", usage.value)
        return self._shown(tracked)

    def remove(self, seq: int, usage: UsageReport) -> None:
        """The record is settled (delivered or refused); what the cache shows changes with
        `refresh` or with the authoritative usage that comes with the delivery."""
        tracked = self._tracked.get((cache_key(usage.customer_id, usage.resource_id), usage.feature_id))
        if tracked is not None:
            tracked.records.pop(seq, None)

    def refresh(self, usage: UsageReport) -> Usage | None:
        """The usage to show for the record's entitlement (base plus what is still pending; None:
        nothing to show); stop tracking when nothing is pending."""
        key = cache_key(usage.customer_id, usage.resource_id)
        pair = (key, usage.feature_id)
        tracked = self._tracked.get(pair)
        if tracked is None:
            return None
        shown = self._shown(tracked)
        if not tracked.records:
            del self._tracked[pair]
            features = self._features[key]
            features.discard(usage.feature_id)
            if not features:
                del self._features[key]
        return shown

    def base(self, key: str, feature_id: str) -> Usage | None:
        """The authoritative usage behind what the cache shows, if the pair is tracked."""
        tracked = self._tracked.get((key, feature_id))
        return tracked.base if tracked is not None else None

    def tracked_keys(self) -> set[str]:
        return set(self._features)

    # -- authoritative usage arriving -------------------------------------------------------------

    def adjust_entry(self, entry: CustomerEntry) -> CustomerEntry:
        """`entry` (from Stigg, Redis or a snapshot) with the pending records applied."""
        for feature_id in self._features.get(entry.key, ()):
            feature = entry.features.get(feature_id)
            if feature is None:
                continue
            tracked = self._tracked[(entry.key, feature_id)]
            self._offer(tracked, feature.usage)
            value = tracked.value()
            base = tracked.base
            if value is not None and base is not None:
                entry = apply_usage(entry, "FEATURE", feature_id, replace(base, current_usage=value)) or entry
        return entry

    def with_bases(self, entry: CustomerEntry) -> CustomerEntry:
        """`entry` with Stigg's own usage where usage is pending (what a snapshot holds: the spool
        re-applies the pending records at the next start; holding them too would count them twice)."""
        if entry.key not in self._features:
            return entry
        for feature_id in list(entry.features):
            base = self.base(entry.key, feature_id)
            if base is not None:
                entry = apply_usage(entry, "FEATURE", feature_id, base) or entry
        return entry

    def adjust_usage(self, key: str, kind: str, ref_id: str, usage: Usage) -> Usage:
        """One authoritative usage update, as the cache should show it."""
        tracked = self._tracked.get((key, ref_id)) if kind == "FEATURE" else None
        if tracked is None:
            return usage
        self._offer(tracked, usage)
        value = tracked.value()
        base = tracked.base
        assert base is not None
        return Usage(base.current_usage if value is None else value, base.usage_period_start,
                     base.usage_period_end, base.updated_at)

    # -- internals --------------------------------------------------------------------------------

    @staticmethod
    def _offer(tracked: _Tracked, usage: Usage) -> None:
        if tracked.base is None or usage.updated_at >= tracked.base.updated_at:
            tracked.base = usage

    @staticmethod
    def _shown(tracked: _Tracked) -> Usage | None:
        value, base = tracked.value(), tracked.base
        if value is None or base is None:
            return None
        return Usage(value, base.usage_period_start, base.usage_period_end, base.updated_at)
