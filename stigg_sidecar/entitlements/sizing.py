"""What a cached entry costs in bytes, worked out from the records' layout without walking them.

Objects shared with other entries (interned feature definitions, plan terms, map indexes, period
instants, small ints) are charged to no entry. Pure.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from stigg_sidecar.entitlements.compact import EMPTY_MAP, NO_USAGE, FeatureEntitlement, FrozenMap
from stigg_sidecar.entitlements.interning import deep_size_unseen, is_shared_terms, is_shared_time
from stigg_sidecar.entitlements.values import Feature, Usage

if TYPE_CHECKING:
    from stigg_sidecar.entitlements.records import CustomerEntry


def _number_bytes(value: object, seen: set[int]) -> int:
    """A number or string field's bytes, unless counted already or a cached small int."""
    if value is None or id(value) in seen:
        return 0
    if type(value) is int and (-5 <= value <= 256 or is_shared_time(value)):
        return 0  # a cached small int, or a time shared by the process (see interning)
    seen.add(id(value))
    return sys.getsizeof(value)


def usage_bytes(usage: Usage | None) -> int:
    """What an entitlement's own usage record holds (the implicit and the default usage: nothing)."""
    if usage is None or usage is NO_USAGE:
        return 0
    seen: set[int] = set()
    return (
        sys.getsizeof(usage)
        + _number_bytes(usage.current_usage, seen)
        + _number_bytes(usage.usage_period_start, seen)
        + _number_bytes(usage.usage_period_end, seen)
        + _number_bytes(usage.updated_at, seen)
    )


_FEATURE_ENTITLEMENT_BYTES = sys.getsizeof(FeatureEntitlement(Feature("", "")))


def _feature_entitlement_bytes(ent: FeatureEntitlement, seen: set[int]) -> int:
    terms = ent._terms  # type: ignore[attr-defined]
    size = _FEATURE_ENTITLEMENT_BYTES + usage_bytes(ent._usage)  # type: ignore[attr-defined]
    if not is_shared_terms(terms):
        size += deep_size_unseen(terms, seen)
    for number in (ent.updated_at, ent.valid_until, ent.usage_period_anchor):
        size += _number_bytes(number, seen)
    return size


def entry_bytes(entry: CustomerEntry) -> int:
    """The entry's own footprint in bytes, including its cache key; objects shared with other
    entries (feature definitions, plan terms, map indexes) are not counted."""
    seen: set[int] = set()
    size = sys.getsizeof(entry) + sys.getsizeof(entry.key)
    for text in (entry.customer_id, entry.resource_id, entry.access_denied_reason, entry.timestamp):
        size += _number_bytes(text, seen)
    if entry.malformed:
        size += deep_size_unseen(entry.malformed, seen)
    for mapping in (entry.features, entry.credits):
        if isinstance(mapping, FrozenMap) and mapping is not EMPTY_MAP:
            size += mapping.own_bytes()
    for ent in entry.features.values():
        size += _feature_entitlement_bytes(ent, seen)
    for credit in entry.credits.values():
        size += deep_size_unseen(credit, seen)
    return size

