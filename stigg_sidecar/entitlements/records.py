"""Immutable cached records: what one customer's entitlements look like in the cache.

Owns the record types (`Feature`, `FeatureEntitlement`, `CreditEntitlement`, `CustomerEntry`...),
the cache key, the parsing of the API's `entitlementsState` object into a `CustomerEntry`, and the
two ways an entry changes: a usage update (`apply_usage`) and replacement by a newer entry
(`newer_or_equal`). Records are frozen and their mappings read-only, so a handler thread can read
an entry without locks while the reactor replaces it whole (ARCHITECTURE invariants 2 and 6).

Pure: no I/O, no clock reads (`now_ms` is passed in), no globals, no logging. Enum-like values
and reasons stay Stigg's GraphQL strings; protobuf mapping lives elsewhere.
"""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Mapping
from dataclasses import FrozenInstanceError, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterator

from stigg_sidecar.entitlements.tracking import untrack as _untrack

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_METERED_TYPES = frozenset({"Fluctuating", "Incremental"})


class _Untracked:
    """A record that leaves the cyclic garbage collector's view when built: records are immutable
    trees that never form a reference cycle, so reference counting frees them (gcpolicy.untrack)."""

    __slots__ = ()

    def __post_init__(self) -> None:
        _untrack(self)


@dataclass(frozen=True, slots=True)
class Feature(_Untracked):
    id: str
    feature_type: str  # "BOOLEAN" | "NUMBER" | "ENUM"
    meter_type: str | None = None  # "None" | "Fluctuating" | "Incremental"
    units: str | None = None
    units_plural: str | None = None
    display_name: str | None = None
    description: str | None = None

    @property
    def is_metered(self) -> bool:
        return self.feature_type == "NUMBER" and self.meter_type in _METERED_TYPES


@dataclass(frozen=True, slots=True)
class Usage(_Untracked):
    """Live usage of a feature entitlement; times are epoch ms."""

    current_usage: float = 0.0
    usage_period_start: int | None = None
    usage_period_end: int | None = None
    updated_at: int = 0


@dataclass(frozen=True, slots=True)
class CreditRate(_Untracked):
    """How many units of a currency one unit of a feature's usage costs."""

    amount: float
    currency_id: str


@dataclass(frozen=True, slots=True)
class _FeatureEntitlementFields:
    """The public fields of `FeatureEntitlement`, in constructor order (see that class)."""

    feature: Feature
    usage_limit: float | None = None
    has_unlimited_usage: bool = False
    has_soft_limit: bool = False
    access_denied_reason: str | None = None
    enum_values: tuple[str, ...] = ()
    valid_until: int | None = None
    usage_period_anchor: int | None = None
    reset_period: str | None = None  # "HOUR" | "DAY" | "WEEK" | "MONTH" | "YEAR"
    credit_rate: CreditRate | None = None
    updated_at: int = 0
    usage: Usage = Usage()


_NO_USAGE = Usage()
_TERMS_FIELDS = (
    "feature", "usage_limit", "has_unlimited_usage", "has_soft_limit", "access_denied_reason",
    "enum_values", "reset_period", "credit_rate",
)  # fmt: skip

# One instance of each distinct plan-level terms tuple (see FeatureEntitlement), shared by every
# entitlement with those terms: customers of a plan repeat them. Shared terms are charged to no
# entry, so the table is bounded in bytes, and large terms (long enum values...) are never shared
# (each entry holding them is charged for them). Parsing runs on the reactor; a race elsewhere
# could only store an equal tuple twice, which is harmless.
_SHARED_TERMS: dict[tuple, tuple] = {}
_SHARED_TERMS_MAX_BYTES = 16 << 20
_SHARED_TERM_MAX_BYTES = 1024
_shared_terms_bytes = 0


def _shared_terms(terms: tuple) -> tuple:
    global _shared_terms_bytes
    existing = _SHARED_TERMS.get(terms)
    if existing is not None:
        return existing
    if _shared_terms_bytes < _SHARED_TERMS_MAX_BYTES:
        size = deep_size(terms)
        if size <= _SHARED_TERM_MAX_BYTES:
            _SHARED_TERMS[terms] = terms
            _shared_terms_bytes += size
    return terms


if TYPE_CHECKING:
    # Type checkers see the dataclass whose fields and constructor the compact class keeps.
    FeatureEntitlement = _FeatureEntitlementFields
else:

    class FeatureEntitlement:
        """One feature entitlement of a customer: a frozen value with the fields (and constructor) of
        `_FeatureEntitlementFields`, stored compactly because a cache holds millions of them.

        The plan-level terms (feature, limit, flags, reason, enum values, reset period, credit rate)
        live in one tuple shared by every customer with the same terms; the instance keeps only what
        is the customer's own. Usage equal to "nothing used, as of the entitlement" is not stored
        (`usage` builds it when asked). `dataclasses.replace`, `fields`, equality and hashing behave
        as for the dataclass it replaces.
        """

        __slots__ = ("_terms", "updated_at", "_usage", "valid_until", "usage_period_anchor")
        __dataclass_fields__ = _FeatureEntitlementFields.__dataclass_fields__
        __dataclass_params__ = _FeatureEntitlementFields.__dataclass_params__
        __match_args__ = _FeatureEntitlementFields.__match_args__

        feature: Feature
        usage_limit: float | None
        has_unlimited_usage: bool
        has_soft_limit: bool
        access_denied_reason: str | None
        enum_values: tuple[str, ...]
        reset_period: str | None
        credit_rate: CreditRate | None
        updated_at: int
        valid_until: int | None
        usage_period_anchor: int | None

        def __init__(
            self,
            feature: Feature,
            usage_limit: float | None = None,
            has_unlimited_usage: bool = False,
            has_soft_limit: bool = False,
            access_denied_reason: str | None = None,
            enum_values: tuple[str, ...] = (),
            valid_until: int | None = None,
            usage_period_anchor: int | None = None,
            reset_period: str | None = None,
            credit_rate: CreditRate | None = None,
            updated_at: int = 0,
            usage: Usage = _NO_USAGE,
        ) -> None:
            terms = (
                feature, usage_limit, has_unlimited_usage, has_soft_limit, access_denied_reason,
                enum_values, reset_period, credit_rate,
            )  # fmt: skip
            put = object.__setattr__
            terms = _shared_terms(terms)
            _untrack(terms)
            put(self, "_terms", terms)
            put(self, "updated_at", updated_at)
            if usage == _NO_USAGE:
                usage = _NO_USAGE
            elif usage.current_usage == 0.0 and usage.usage_period_start is None and usage.usage_period_end is None \
                    and usage.updated_at == updated_at:  # fmt: skip
                usage = None  # the implicit usage: see the `usage` property
            put(self, "_usage", usage)
            put(self, "valid_until", valid_until)
            put(self, "usage_period_anchor", usage_period_anchor)
            _untrack(self)

        @property
        def usage(self) -> Usage:
            usage = self._usage
            return Usage(0.0, None, None, self.updated_at) if usage is None else usage

        @property
        def is_metered(self) -> bool:
            return self.feature.is_metered

        def _values(self) -> tuple:
            return (*self._terms, self.updated_at, self.usage, self.valid_until, self.usage_period_anchor)

        def __eq__(self, other: object) -> bool:
            if other.__class__ is not self.__class__:
                return NotImplemented
            return self._values() == other._values()  # type: ignore[attr-defined]

        def __hash__(self) -> int:
            return hash(self._values())

        def __repr__(self) -> str:
            inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__dataclass_fields__)
            return f"FeatureEntitlement({inner})"

        def __setattr__(self, name: str, value: object) -> None:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")

        def __delattr__(self, name: str) -> None:
            raise FrozenInstanceError(f"cannot delete field {name!r}")

        def __reduce__(self) -> tuple:
            return (FeatureEntitlement, tuple(getattr(self, name) for name in self.__dataclass_fields__))


def _term(index: int, name: str) -> property:
    def read(self: Any) -> Any:
        return self._terms[index]

    return property(read, doc=f"{name}, from the shared terms")


for _index, _name in enumerate(_TERMS_FIELDS):
    setattr(FeatureEntitlement, _name, _term(_index, _name))
del _index, _name


@dataclass(frozen=True, slots=True)
class Currency(_Untracked):
    currency_id: str
    display_name: str | None = None
    description: str | None = None
    unit_singular: str | None = None
    unit_plural: str | None = None
    # Deep-frozen JSON (read-only mappings, tuples); `thaw_json` gives plain dicts and lists back.
    additional_meta_data: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CreditEntitlement(_Untracked):
    currency: Currency
    usage_limit: float = 0.0
    current_usage: float = 0.0
    has_soft_limit: bool = False
    access_denied_reason: str | None = None
    usage_period_end: int | None = None
    valid_until: int | None = None
    updated_at: int = 0
    usage_updated_at: int = 0

    @property
    def remaining(self) -> float:
        return self.usage_limit - self.current_usage


class FrozenMap(Mapping):
    """A read-only mapping for an entry's entitlements: a tuple of values and a key -> position
    index shared by every map with the same keys in the same order (customers of a plan have the
    same features), so each entry pays for a tuple, not a dict."""

    __slots__ = ("_index", "_values")
    _index: dict[str, int]
    _values: tuple

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        items = items or {}
        keys = tuple(items)
        values = tuple(items[k] for k in keys)
        object.__setattr__(self, "_index", _shared_index(keys))
        object.__setattr__(self, "_values", values)
        _untrack(values)
        _untrack(self)

    def __getitem__(self, key: str) -> Any:
        return self._values[self._index[key]]

    def get(self, key: str, default: Any = None) -> Any:
        position = self._index.get(key)
        return default if position is None else self._values[position]

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._values)

    def values(self) -> Any:
        return self._values

    def replacing(self, key: str, value: Any) -> FrozenMap:
        """A copy with the existing `key` mapped to `value` (same index, one new tuple)."""
        position = self._index[key]
        copy = object.__new__(FrozenMap)
        values = (*self._values[:position], value, *self._values[position + 1:])
        object.__setattr__(copy, "_index", self._index)
        object.__setattr__(copy, "_values", values)
        _untrack(values)
        _untrack(copy)
        return copy

    def own_bytes(self) -> int:
        """What this map holds beyond its values and a shared index."""
        size = sys.getsizeof(self) + sys.getsizeof(self._values)
        return size if _SHARED_INDEXES.get(tuple(self._index)) is self._index else size + sys.getsizeof(self._index)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("FrozenMap is read-only")

    def __reduce__(self) -> tuple:
        return (FrozenMap, (dict(zip(self._index, self._values, strict=True)),))

    def __repr__(self) -> str:
        return f"FrozenMap({dict(zip(self._index, self._values, strict=True))!r})"


_SHARED_INDEXES: dict[tuple[str, ...], dict[str, int]] = {}
_SHARED_INDEXES_MAX = 10_000


def _shared_index(keys: tuple[str, ...]) -> dict[str, int]:
    index = _SHARED_INDEXES.get(keys)
    if index is None:
        index = {k: i for i, k in enumerate(keys)}
        if len(_SHARED_INDEXES) < _SHARED_INDEXES_MAX:
            _SHARED_INDEXES[keys] = index
    return index


_EMPTY_MAP = FrozenMap()


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
                object.__setattr__(self, name, FrozenMap(value) if value else _EMPTY_MAP)
        object.__setattr__(self, "memo", None)
        object.__setattr__(self, "size", entry_bytes(self))
        _untrack(self)

    @property
    def key(self) -> str:
        return cache_key(self.customer_id, self.resource_id)


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


@dataclass(frozen=True, slots=True)
class Malformed(_Untracked):
    """An entitlement Stigg sent with a field this code cannot use (a non-finite usage, a wrong
    type...): `kind` is "FEATURE" or "CREDIT", `ref_id` the feature refId or currency id (None
    when even that was unreadable), `problem` the place and what is wrong with it."""

    kind: str
    ref_id: str | None
    problem: str


def malformed_ids(entry: CustomerEntry, kind: str) -> frozenset[str]:
    """The ids of the entry's entitlements of `kind` that Stigg sent malformed."""
    return frozenset(m.ref_id for m in entry.malformed if m.kind == kind and m.ref_id is not None)


def cache_key(customer_id: str, resource_id: str | None) -> str:
    """`c_{customerId}`, or `c_{customerId}:r_{resourceId}`; an empty resource id means none."""
    if resource_id:
        return f"c_{customer_id}:r_{resource_id}"
    return f"c_{customer_id}"


# One instance per distinct feature definition, shared by every customer entry that has it: a
# plan's features repeat across thousands of customers, and their strings were half of an entry's
# memory. Bounded; past the bound new definitions are simply not shared. Parsing runs on the
# reactor; a race elsewhere could only store an equal instance twice, which is harmless.
_SHARED_FEATURES: dict[Feature, Feature] = {}
_SHARED_FEATURES_MAX = 100_000


def shared_feature(feature: Feature) -> Feature:
    """The shared instance equal to `feature` (which becomes it, if it is the first)."""
    existing = _SHARED_FEATURES.get(feature)
    if existing is not None:
        return existing
    if len(_SHARED_FEATURES) < _SHARED_FEATURES_MAX:
        _SHARED_FEATURES[feature] = feature
    return feature


def _shared(obj: object) -> bool:
    return type(obj) is Feature and _SHARED_FEATURES.get(obj) is obj


def deep_size(root: object) -> int:
    """Bytes held by `root` and everything it references, each object counted once.

    Follows `gc.get_referents`, which also sees through `MappingProxyType` to its dict. Classes,
    the None/True/False singletons and shared feature definitions belong to the whole process,
    not to one entry, so they are not counted.
    """
    return _deep_size(root, set())


def _deep_size(root: object, seen: set[int]) -> int:
    total = 0
    pending: list[object] = [root]
    while pending:
        fresh = []
        for obj in pending:
            if id(obj) in seen or isinstance(obj, type) or obj is None or obj is True or obj is False or _shared(obj):
                continue
            seen.add(id(obj))
            total += sys.getsizeof(obj)
            fresh.append(obj)
        pending = gc.get_referents(*fresh)
    return total


def _number_bytes(value: object, seen: set[int]) -> int:
    """A number or string field's bytes, unless counted already or a cached small int."""
    if value is None or id(value) in seen:
        return 0
    if type(value) is int and (-5 <= value <= 256 or _Times._SHARED.get(value) is value):
        return 0  # a cached small int, or a time shared by the process (see _Times)
    seen.add(id(value))
    return sys.getsizeof(value)


def _usage_bytes(usage: Usage | None) -> int:
    """What an entitlement's own usage record holds (the implicit and the default usage: nothing)."""
    if usage is None or usage is _NO_USAGE:
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
    size = _FEATURE_ENTITLEMENT_BYTES + _usage_bytes(ent._usage)  # type: ignore[attr-defined]
    if _SHARED_TERMS.get(terms) is not terms:
        size += _deep_size(terms, seen)
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
        size += _deep_size(entry.malformed, seen)
    for mapping in (entry.features, entry.credits):
        if isinstance(mapping, FrozenMap) and mapping is not _EMPTY_MAP:
            size += mapping.own_bytes()
    for ent in entry.features.values():
        size += _feature_entitlement_bytes(ent, seen)
    for credit in entry.credits.values():
        size += _deep_size(credit, seen)
    return size


# --------------------------------------------------------------------------- parsing


class MalformedState(ValueError):
    """The API's entitlementsState is not the shape Stigg documents; the message names the place."""


def entry_from_state(customer_id: str, resource_id: str | None, state: Mapping[str, Any], now_ms: int) -> CustomerEntry:
    """Build a `CustomerEntry` from the API's `entitlementsState` object (STIGG_REFERENCE §2.4).

    Items whose feature has no refId (or credits without a currencyId) are skipped; items of an
    unknown `__typename` are skipped too, so a new union member does not break old sidecars.
    A later item for the same id replaces an earlier one. An item with a malformed field (a
    non-finite number, a wrong type...) is left out and listed in the entry's `malformed`: one
    bad entitlement never costs the customer's others. Only a malformed whole (the state or its
    list not of the documented type) raises MalformedState.
    """
    where = "entitlementsState"
    if not isinstance(state, Mapping):
        raise MalformedState(f"{where}: must be an object")
    items = state.get("entitlementsV2")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise MalformedState(f"{where}.entitlementsV2: must be a list")
    reason = _string(state, "accessDeniedReason", where)
    times = _Times()
    timestamp = times.local(_entry_timestamp(items, now_ms))

    features: dict[str, FeatureEntitlement] = {}
    credits: dict[str, CreditEntitlement] = {}
    malformed: list[Malformed] = []
    for index, item in enumerate(items):
        item_where = f"{where}.entitlementsV2[{index}]"
        if not isinstance(item, Mapping):
            malformed.append(Malformed("FEATURE", None, f"{item_where}: must be an object"))
            continue
        typename = item.get("__typename") or ("CreditEntitlement" if "currency" in item else "FeatureEntitlement")
        try:
            if typename == "FeatureEntitlement":
                entitlement = _feature_entitlement(item, item_where, timestamp, times)
                if entitlement is not None:
                    features[entitlement.feature.id] = entitlement
            elif typename == "CreditEntitlement":
                credit = _credit_entitlement(item, item_where, timestamp)
                if credit is not None:
                    credits[credit.currency.currency_id] = credit
        except MalformedState as e:
            kind = "CREDIT" if typename == "CreditEntitlement" else "FEATURE"
            malformed.append(Malformed(kind, _readable_id(item, kind), str(e)))
    if malformed:
        # A later good item for an id wins over an earlier bad one, as any later item does.
        malformed = [m for m in malformed if m.ref_id not in (features if m.kind == "FEATURE" else credits)]
    return CustomerEntry(
        customer_id=customer_id,
        resource_id=resource_id,
        access_denied_reason=reason,
        features=features,
        credits=credits,
        timestamp=timestamp,
        malformed=tuple(malformed),
    )


def _readable_id(item: Mapping[str, Any], kind: str) -> str | None:
    """The malformed item's feature refId or currency id, if that much is readable."""
    holder, key = ("currency", "currencyId") if kind == "CREDIT" else ("feature", "refId")
    inner = item.get(holder)
    ref_id = inner.get(key) if isinstance(inner, Mapping) else None
    return ref_id if isinstance(ref_id, str) and ref_id else None


def _entry_timestamp(items: list[Any], now_ms: int) -> int:
    """§3.1.6: the first valid entitlementUpdatedAt; an empty list is epoch 0; none valid is now."""
    if not items:
        return 0
    for item in items:
        if isinstance(item, Mapping):
            updated_at = parse_time(item.get("entitlementUpdatedAt"))
            if updated_at is not None:
                return updated_at
    return now_ms


class _Times:
    """One parse's times as shared int objects: the same instant repeats in an entry (each
    entitlement's update time), and period bounds repeat across customers (month starts), so
    the latter are shared process-wide (a bounded table; past the bound, per entry only)."""

    _SHARED: dict[int, int] = {}
    _SHARED_MAX = 50_000

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def local(self, value: int) -> int:
        return self._seen.setdefault(value, value)

    def shared(self, value: int | None) -> int | None:
        if value is None:
            return None
        table = _Times._SHARED
        existing = table.get(value)
        if existing is not None:
            return existing
        if len(table) < _Times._SHARED_MAX:
            table[value] = value
        return self.local(value)


def _feature_entitlement(
    item: Mapping[str, Any], where: str, default_time: int, times: _Times
) -> FeatureEntitlement | None:
    raw_feature = item.get("feature")
    if raw_feature is None:
        return None
    if not isinstance(raw_feature, Mapping):
        raise MalformedState(f"{where}.feature: must be an object")
    feature_where = f"{where}.feature"
    ref_id = _string(raw_feature, "refId", feature_where)
    if not ref_id:
        return None
    feature = shared_feature(Feature(
        id=ref_id,
        feature_type=_string(raw_feature, "featureType", feature_where) or "",
        meter_type=_string(raw_feature, "meterType", feature_where),
        units=_string(raw_feature, "featureUnits", feature_where),
        units_plural=_string(raw_feature, "featureUnitsPlural", feature_where),
        display_name=_string(raw_feature, "displayName", feature_where),
        description=_string(raw_feature, "description", feature_where),
    ))
    updated_at = parse_time(item.get("entitlementUpdatedAt"))
    updated_at = default_time if updated_at is None else times.local(updated_at)
    usage_updated_at = parse_time(item.get("usageUpdatedAt"))
    if usage_updated_at is not None:
        usage_updated_at = times.local(usage_updated_at)
    return FeatureEntitlement(
        feature=feature,
        usage_limit=_number(item, "usageLimit", where),
        has_unlimited_usage=_flag(item, "hasUnlimitedUsage", where),
        has_soft_limit=_flag(item, "hasSoftLimit", where),
        access_denied_reason=_string(item, "accessDeniedReason", where),
        enum_values=_strings(item, "enumValues", where),
        valid_until=times.shared(_time(item, "validUntil", where)),
        usage_period_anchor=times.shared(_time(item, "usagePeriodAnchor", where)),
        reset_period=_string(item, "resetPeriod", where),
        credit_rate=_credit_rate(item.get("creditRate"), f"{where}.creditRate"),
        updated_at=updated_at,
        usage=Usage(
            current_usage=_number(item, "currentUsage", where) or 0.0,
            usage_period_start=times.shared(_time(item, "usagePeriodStart", where)),
            usage_period_end=times.shared(_time(item, "usagePeriodEnd", where)),
            # Without its own stamp, fetched usage is as recent as the entitlement it came with.
            updated_at=updated_at if usage_updated_at is None else usage_updated_at,
        ),
    )


def _credit_rate(raw: Any, where: str) -> CreditRate | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise MalformedState(f"{where}: must be an object")
    currency_id = _string(raw, "currencyId", where)
    if not currency_id:
        return None
    return CreditRate(amount=_number(raw, "amount", where) or 0.0, currency_id=currency_id)


def _credit_entitlement(item: Mapping[str, Any], where: str, default_time: int) -> CreditEntitlement | None:
    raw_currency = item.get("currency")
    if raw_currency is None:
        return None
    currency_where = f"{where}.currency"
    if not isinstance(raw_currency, Mapping):
        raise MalformedState(f"{currency_where}: must be an object")
    currency_id = _string(raw_currency, "currencyId", currency_where)
    if not currency_id:
        return None
    meta = raw_currency.get("additionalMetaData")
    if meta is not None and not isinstance(meta, Mapping):
        raise MalformedState(f"{currency_where}.additionalMetaData: must be an object or null")
    currency = Currency(
        currency_id=currency_id,
        display_name=_string(raw_currency, "displayName", currency_where),
        description=_string(raw_currency, "description", currency_where),
        unit_singular=_string(raw_currency, "unitSingular", currency_where),
        unit_plural=_string(raw_currency, "unitPlural", currency_where),
        additional_meta_data=None if meta is None else freeze_json(meta),
    )
    updated_at = parse_time(item.get("entitlementUpdatedAt"))
    if updated_at is None:
        updated_at = default_time
    usage_updated_at = parse_time(item.get("usageUpdatedAt"))
    return CreditEntitlement(
        currency=currency,
        usage_limit=_number(item, "usageLimit", where) or 0.0,
        current_usage=_number(item, "currentUsage", where) or 0.0,
        has_soft_limit=_flag(item, "hasSoftLimit", where),
        access_denied_reason=_string(item, "accessDeniedReason", where),
        usage_period_end=_time(item, "usagePeriodEnd", where),
        valid_until=_time(item, "validUntil", where),
        updated_at=updated_at,
        usage_updated_at=updated_at if usage_updated_at is None else usage_updated_at,
    )


class FieldReader:
    """Typed reads of a decoded JSON object's optional fields; a bad value raises `error` with a
    message naming the place (`<where>.<key>: must be ...`). Shared by every JSON boundary."""

    def __init__(self, error: type[Exception]) -> None:
        self._error = error

    def string(self, obj: Mapping[str, Any], key: str, where: str) -> str | None:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise self._error(f"{where}.{key}: must be a string or null")
        return value

    def flag(self, obj: Mapping[str, Any], key: str, where: str) -> bool:
        value = obj.get(key)
        if value is not None and not isinstance(value, bool):
            raise self._error(f"{where}.{key}: must be true, false or null")
        return bool(value)

    def number(self, obj: Mapping[str, Any], key: str, where: str) -> float | None:
        value = obj.get(key)
        if value is None:
            return None
        number = _finite(value)
        if number is None:
            raise self._error(f"{where}.{key}: must be a finite number or null")
        return number


_fields = FieldReader(MalformedState)
_string = _fields.string
_flag = _fields.flag
_number = _fields.number


def _strings(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedState(f"{where}.{key}: must be a list of strings or null")
    return tuple(value)


def _time(obj: Mapping[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    parsed = parse_time(value)
    if parsed is None:
        raise MalformedState(f"{where}.{key}: must be an ISO-8601 date-time or null")
    return parsed


def parse_time(value: Any) -> int | None:
    """An ISO-8601 string (naive means UTC) or a number of epoch ms, as epoch ms; else None."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return (moment - _EPOCH) // _ONE_MS
    number = _finite(value)
    return None if number is None else int(number)


def _finite(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (booleans, NaN, 1e999, 10**400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def freeze_json(value: Any) -> Any:
    """A read-only copy of parsed JSON: objects become read-only mappings, lists tuples."""
    if isinstance(value, Mapping):
        # The proxy stays tracked: its type's deallocation expects it to be (see gcpolicy.untrack).
        inner = {str(k): freeze_json(v) for k, v in value.items()}
        _untrack(inner)
        return MappingProxyType(inner)
    if isinstance(value, (list, tuple)):
        frozen = tuple(freeze_json(v) for v in value)
        _untrack(frozen)
        return frozen
    return value


def thaw_json(value: Any) -> Any:
    """Plain dicts and lists again (e.g. for a protobuf Struct), from `freeze_json`'s output."""
    if isinstance(value, Mapping):
        return {k: thaw_json(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw_json(v) for v in value]
    return value


# --------------------------------------------------------------------------- changes


def apply_usage(
    entry: CustomerEntry,
    kind: str,
    ref_id: str,
    current_usage: float,
    usage_period_start: int | None,
    usage_period_end: int | None,
    updated_at: int,
) -> CustomerEntry | None:
    """A copy of `entry` with one entitlement's usage replaced, or None when nothing applies.

    `kind` is "FEATURE" (ref_id is a feature refId) or "CREDIT" (a currency id; credits have no
    period start, so `usage_period_start` is ignored). None when the entitlement is not in the
    entry, the kind is unknown, or the stored usage is newer than `updated_at`; equal applies.
    """
    if kind == "FEATURE":
        feature = entry.features.get(ref_id)
        if feature is None or feature.usage.updated_at > updated_at:
            return None
        changed = replace(feature, usage=Usage(current_usage, usage_period_start, usage_period_end, updated_at))
        size = entry.size - _usage_bytes(feature._usage) + _usage_bytes(changed._usage)  # type: ignore[attr-defined]
        features = entry.features
        assert isinstance(features, FrozenMap)  # __post_init__ makes it one
        return _derived(entry, size, features=features.replacing(ref_id, changed))
    if kind == "CREDIT":
        credit = entry.credits.get(ref_id)
        if credit is None or credit.usage_updated_at > updated_at:
            return None
        changed_credit = replace(
            credit, current_usage=current_usage, usage_period_end=usage_period_end, usage_updated_at=updated_at
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
