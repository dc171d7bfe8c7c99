"""Immutable cached records: what one customer's entitlements look like in the cache.

Owns `CustomerEntry` (one cache entry) and the cache key, and names every record type an entry is
made of (defined in `values` and, stored compactly, in `compact`). Records are frozen and their
mappings read-only, so a handler thread reads an entry without locks while the reactor replaces
it whole (ARCHITECTURE invariants 2 and 6). How an entry changes is `changes`; what it costs,
`sizing`; the parsing of Stigg's JSON into entries, `upstream.wire`.

Pure: no I/O, no clock reads, no logging.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from stigg_sidecar.entitlements.compact import EMPTY_MAP, FeatureEntitlement, FrozenMap
from stigg_sidecar.entitlements.sizing import entry_bytes
from stigg_sidecar.entitlements.tracking import untrack as _untrack
from stigg_sidecar.entitlements.values import CreditEntitlement, CreditRate, Currency, Feature, Malformed, Usage

__all__ = [
    "CreditEntitlement",
    "CreditRate",
    "Currency",
    "CustomerEntry",
    "Feature",
    "FeatureEntitlement",
    "FrozenMap",
    "Malformed",
    "Usage",
    "cache_key",
    "malformed_ids",
]


@dataclass(frozen=True, slots=True)
class CustomerEntry:
    """One cache entry: a customer (or customer+resource) and all its entitlements.

    `features` is keyed by feature refId, `credits` by currency id; both are copied into read-only
    mappings on construction. `timestamp` is the upstream time the entry came from (§3.1.6).
    `size` is the entry's in-memory footprint in bytes (shared objects not counted), computed once
    here from the records' layout, without walking them.
    """

    customer_id: str
    resource_id: str | None = None
    access_denied_reason: str | None = None
    features: Mapping[str, FeatureEntitlement] = field(default_factory=dict)
    credits: Mapping[str, CreditEntitlement] = field(default_factory=dict)
    timestamp: int = 0
    # What Stigg sent malformed, one `Malformed` per entitlement left out of the maps above: a
    # read of one of them answers the fallback, not "no entitlement".
    malformed: tuple[Malformed, ...] = ()
    size: int = field(init=False, compare=False, default=0)
    # Answers computed from this entry, for whoever reads it (the gRPC layer): None until the
    # first one. Not part of the entry's value: never compared, never copied by `replace`, so a
    # changed entry starts empty.
    memo: dict | None = field(init=False, compare=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.malformed:
            object.__setattr__(self, "malformed", tuple(self.malformed))
            _untrack(self.malformed)
        # Copy so no caller keeps a mutable handle on the entry's maps (a FrozenMap is immutable).
        for name in ("features", "credits"):
            value = getattr(self, name)
            if type(value) is not FrozenMap:
                object.__setattr__(self, name, FrozenMap(value) if value else EMPTY_MAP)
        object.__setattr__(self, "memo", None)
        object.__setattr__(self, "size", entry_bytes(self))
        _untrack(self)

    @property
    def key(self) -> str:
        return cache_key(self.customer_id, self.resource_id)



def malformed_ids(entry: CustomerEntry, kind: str) -> frozenset[str]:
    """The ids of the entry's entitlements of `kind` that Stigg sent malformed."""
    return frozenset(m.ref_id for m in entry.malformed if m.kind == kind and m.ref_id is not None)


def cache_key(customer_id: str, resource_id: str | None) -> str:
    """`c_{customerId}`, or `c_{customerId}:r_{resourceId}`; an empty resource id means none."""
    if resource_id:
        return f"c_{customer_id}:r_{resource_id}"
    return f"c_{customer_id}"


