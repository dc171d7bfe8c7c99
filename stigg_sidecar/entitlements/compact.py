"""Compact storage for what a cache holds millions of: feature entitlements and entitlement maps.

`FeatureEntitlement` behaves as a frozen dataclass but keeps the plan-level terms in one tuple
shared by every customer with the same terms (see `interning`), and no usage at all when it is
"nothing used, as of the entitlement". `FrozenMap` is a read-only mapping stored as a tuple of
values and a key index shared by every map with the same keys. Pure: no I/O, no clock, no logging.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import FrozenInstanceError, dataclass
from typing import TYPE_CHECKING, Any

from stigg_sidecar.entitlements.interning import is_shared_index, shared_index, shared_terms
from stigg_sidecar.entitlements.tracking import untrack as _untrack
from stigg_sidecar.entitlements.values import CreditRate, Feature, Usage


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


NO_USAGE = Usage()
_TERMS_FIELDS = (
    "feature", "usage_limit", "has_unlimited_usage", "has_soft_limit", "access_denied_reason",
    "enum_values", "reset_period", "credit_rate",
)  # fmt: skip

# One instance of each distinct plan-level terms tuple (see FeatureEntitlement), shared by every
# entitlement with those terms: customers of a plan repeat them. Shared terms are charged to no
# entry, so the table is bounded in bytes, and large terms (long enum values...) are never shared
# (each entry holding them is charged for them). Parsing runs on the reactor; a race elsewhere


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
            usage: Usage = NO_USAGE,
        ) -> None:
            terms = (
                feature, usage_limit, has_unlimited_usage, has_soft_limit, access_denied_reason,
                enum_values, reset_period, credit_rate,
            )  # fmt: skip
            put = object.__setattr__
            terms = shared_terms(terms)
            _untrack(terms)
            put(self, "_terms", terms)
            put(self, "updated_at", updated_at)
            if usage == NO_USAGE:
                usage = NO_USAGE
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
        object.__setattr__(self, "_index", shared_index(keys))
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
        return size if is_shared_index(tuple(self._index), self._index) else size + sys.getsizeof(self._index)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("FrozenMap is read-only")

    def __reduce__(self) -> tuple:
        return (FrozenMap, (dict(zip(self._index, self._values, strict=True)),))

    def __repr__(self) -> str:
        return f"FrozenMap({dict(zip(self._index, self._values, strict=True))!r})"



EMPTY_MAP = FrozenMap()
