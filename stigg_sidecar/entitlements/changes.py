"""How a cached entry changes: one entitlement's usage (`apply_usage`), or replacement by a newer
entry (`newer_or_equal`, keeping newer usage with `keep_newer_usage`). ARCHITECTURE invariant 6.
Pure: every change returns a new entry; none mutates one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from stigg_sidecar.entitlements.compact import FrozenMap
from stigg_sidecar.entitlements.records import CustomerEntry
from stigg_sidecar.entitlements.sizing import usage_bytes
from stigg_sidecar.entitlements.tracking import untrack as _untrack
from stigg_sidecar.entitlements.values import Usage


def _derived(entry: CustomerEntry, size: int, **changes: Any) -> CustomerEntry:
    """`replace(entry, **changes)` whose size the caller worked out (an O(1) change)."""
    derived = object.__new__(CustomerEntry)
    for name in _ENTRY_FIELDS:
        object.__setattr__(derived, name, changes[name] if name in changes else getattr(entry, name))
    object.__setattr__(derived, "memo", None)
    object.__setattr__(derived, "size", size)
    _untrack(derived)
    return derived


_ENTRY_FIELDS = ("customer_id", "resource_id", "access_denied_reason", "features", "credits", "timestamp", "malformed")



def apply_usage(entry: CustomerEntry, kind: str, ref_id: str, usage: Usage) -> CustomerEntry | None:
    """A copy of `entry` with one entitlement's usage replaced by `usage`, or None when nothing applies.

    `kind` is "FEATURE" (ref_id is a feature refId) or "CREDIT" (a currency id; credits have no
    period start, so `usage.usage_period_start` is ignored). None when the entitlement is not in
    the entry, the kind is unknown, or the stored usage is newer than `usage.updated_at`; equal
    applies.
    """
    updated_at = usage.updated_at
    if kind == "FEATURE":
        feature = entry.features.get(ref_id)
        if feature is None or feature.usage.updated_at > updated_at:
            return None
        changed = replace(feature, usage=usage)
        size = entry.size - usage_bytes(feature._usage) + usage_bytes(changed._usage)  # type: ignore[attr-defined]
        features = entry.features
        assert isinstance(features, FrozenMap)  # __post_init__ makes it one
        return _derived(entry, size, features=features.replacing(ref_id, changed))
    if kind == "CREDIT":
        credit = entry.credits.get(ref_id)
        if credit is None or credit.usage_updated_at > updated_at:
            return None
        changed_credit = replace(
            credit, current_usage=usage.current_usage, usage_period_end=usage.usage_period_end,
            usage_updated_at=updated_at,
        )
        return replace(entry, credits={**entry.credits, ref_id: changed_credit})
    return None


def newer_or_equal(candidate: CustomerEntry, current: CustomerEntry | None) -> bool:
    """Whether `candidate` may replace `current`: not older, or stamped epoch 0 (§3.4 rule 3)."""
    return current is None or candidate.timestamp == 0 or candidate.timestamp >= current.timestamp


def keep_newer_usage(incoming: CustomerEntry, current: CustomerEntry) -> CustomerEntry:
    """`incoming`, except that any usage `current` holds with a newer `updated_at` is kept.

    A fetch may return usage older than an update the socket or a usage report already applied;
    newer wins per entitlement. Returns `incoming` itself when nothing needs keeping.
    """
    features = dict(incoming.features)
    credits = dict(incoming.credits)
    changed = False
    for ref, ent in incoming.features.items():
        old = current.features.get(ref)
        if old is not None and old.usage.updated_at > ent.usage.updated_at:
            features[ref] = replace(ent, usage=old.usage)
            changed = True
    for ref, credit in incoming.credits.items():
        old_credit = current.credits.get(ref)
        if old_credit is not None and old_credit.usage_updated_at > credit.usage_updated_at:
            credits[ref] = replace(
                credit,
                current_usage=old_credit.current_usage,
                usage_period_end=old_credit.usage_period_end,
                usage_updated_at=old_credit.usage_updated_at,
            )
            changed = True
    if not changed:
        return incoming
    return replace(incoming, features=features, credits=credits)
