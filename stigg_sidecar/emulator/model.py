"""What the emulator's state is told and what it announces: validated inputs (`UsageReport`,
`UsageEvent`), the errors Stigg's API reports (`StiggError`), the `StateChange` records sent to
listeners, and the fault settings (`Faults`). Plain data; `state.EmulatorState` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from random import Random
from typing import Any


class StiggError(Exception):
    """An error Stigg's API reports in a GraphQL ``errors`` item, with ``extensions.code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class UsageReport:
    """One validated ``ReportUsageInput``."""

    customer_id: str
    feature_id: str
    value: float
    resource_id: str | None = None
    update_behavior: str = "DELTA"
    created_at: datetime | None = None
    dimensions: Mapping[str, Any] | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class UsageEvent:
    """One validated ``UsageEventReportInput``."""

    event_name: str
    customer_id: str
    idempotency_key: str
    resource_id: str | None = None
    dimensions: Mapping[str, Any] | None = None
    timestamp: datetime | None = None


@dataclass(frozen=True)
class EntitlementsChanged:
    """A customer's (or resource's) entitlements were replaced; ``state`` is what Edge now
    answers for it (`EmulatorState.entitlements_state`)."""

    customer_id: str
    resource_id: str | None
    state: dict[str, Any]


@dataclass(frozen=True)
class UsageChanged:
    """A metered entitlement's usage changed (``reference_type`` is FEATURE or CREDIT)."""

    customer_id: str
    resource_id: str | None
    reference_id: str
    reference_type: str
    current_usage: float
    usage_updated_at: str | None
    usage_period_start: str | None
    usage_period_end: str | None
    # The V1 `Entitlement` after the change (usageUpdated carries it); None for credits.
    entitlement: dict[str, Any] | None = None


@dataclass(frozen=True)
class PackagePublished:
    """A plan or add-on version was published (``migration_type`` is one of MIGRATION_TYPES)."""

    account_id: str
    environment_id: str
    package_type: str
    package_ref_id: str
    package_version: int
    migration_type: str


@dataclass(frozen=True)
class FaultsChanged:
    """The fault settings changed; ``faults`` is `Faults.as_json` after the change."""

    faults: dict[str, Any]


StateChange = EntitlementsChanged | UsageChanged | PackagePublished | FaultsChanged
Listener = Callable[[StateChange], None]


@dataclass
class Faults:
    """Misbehaviour applied to the Stigg endpoints (never to the admin API) until switched off.

    - ``latency_ms``: delay every answer.
    - ``error_status``: answer every request with this HTTP status (when ``error_rate`` is 0).
    - ``error_rate``: answer this fraction of requests (0..1) with ``error_status`` or else 500.
    - ``malformed``: answer 200 with a body that is not JSON.
    - ``down``: drop the connection without answering.
    """

    latency_ms: float = 0.0
    error_status: int = 0
    error_rate: float = 0.0
    malformed: bool = False
    down: bool = False

    def __post_init__(self) -> None:
        self._observers: list[Callable[[Faults], None]] = []  # not a field: not a setting

    def observe(self, observer: Callable[[Faults], None]) -> None:
        """Call ``observer(self)`` after every successful `update`."""
        self._observers.append(observer)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply some settings; raise ValueError (changing nothing) if any is invalid."""
        known = {f.name for f in fields(self)}
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"{name}: unknown fault (known: {', '.join(sorted(known))})")
            if name in ("malformed", "down"):
                if not isinstance(value, bool) and value not in (0, 1):
                    raise ValueError(f"{name}: must be true or false")
                checked[name] = bool(value)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: must be a number")
            if name == "latency_ms" and not (math.isfinite(value) and value >= 0):
                raise ValueError("latency_ms: must be a finite number >= 0")
            if name == "error_rate" and not 0 <= value <= 1:
                raise ValueError("error_rate: must be between 0 and 1")
            if (
                name == "error_status"
                and value != 0
                and not (value == int(value) and 400 <= value <= 599)
            ):
                raise ValueError("error_status: must be 0 (off) or an HTTP status 400..599")
            checked[name] = int(value) if name == "error_status" else float(value)
        for name, value in checked.items():
            setattr(self, name, value)
        for observer in list(self._observers):
            observer(self)

    def as_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def error_to_inject(self, random: Random) -> int | None:
        """The HTTP status to answer this request with, or None to answer it normally."""
        if self.error_rate > 0:
            return (self.error_status or 500) if random.random() < self.error_rate else None
        return self.error_status or None
