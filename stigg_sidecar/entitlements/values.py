"""The leaf records of a cached entry: feature definitions, usage, credits, malformed items.

Frozen dataclasses that leave the garbage collector's view when built (records never form a
reference cycle; see gcpolicy.untrack). Enum-like values and reasons stay Stigg's GraphQL strings.
Pure: no I/O, no clock reads, no logging.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stigg_sidecar.entitlements.tracking import untrack as _untrack

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



@dataclass(frozen=True, slots=True)
class Malformed(_Untracked):
    """An entitlement Stigg sent with a field this code cannot use (a non-finite usage, a wrong
    type...): `kind` is "FEATURE" or "CREDIT", `ref_id` the feature refId or currency id (None
    when even that was unreadable), `problem` the place and what is wrong with it."""

    kind: str
    ref_id: str | None
    problem: str

