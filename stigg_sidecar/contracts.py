"""Writes as plain records: usage reports, raw events and their acknowledgements.

Owns the shapes that cross from the gRPC handlers to whoever carries a write out (offline
acknowledger or the upstream API), and `WriteError`, the one way a write says it failed.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

from stigg_sidecar.entitlements.records import CustomerEntry

DimensionValue = str | float | bool


@dataclass(frozen=True, slots=True)
class UsageReport:
    customer_id: str
    feature_id: str
    value: float
    resource_id: str | None = None
    update_behavior: str | None = None  # "DELTA" | "SET"
    dimensions: Mapping[str, DimensionValue] = field(default_factory=dict)
    timestamp: int | None = None  # epoch ms


@dataclass(frozen=True, slots=True)
class UsageAck:
    measurement_id: str
    customer_id: str
    feature_id: str
    resource_id: str | None = None
    current_usage: float | None = None
    usage_period_start: int | None = None
    usage_period_end: int | None = None


@dataclass(frozen=True, slots=True)
class EventReport:
    event_name: str
    customer_id: str
    idempotency_key: str
    resource_id: str | None = None
    dimensions: Mapping[str, DimensionValue] = field(default_factory=dict)
    timestamp: int | None = None


class WriteFailure(enum.Enum):
    """Why a write failed, in the terms of the gRPC status it becomes."""

    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"


class WriteError(Exception):
    """A write that did not happen (or may not have), with a message safe to show the caller."""

    def __init__(self, failure: WriteFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


class RemoteError(Exception):
    """A call to Stigg that failed, as the layers above the upstream client see it: the gRPC status
    a write turns it into (`failure`) and a message safe to show the caller. `upstream.api`'s
    `UpstreamError` is one; the write gate turns any into a `WriteError` without knowing the client."""

    failure: WriteFailure
    message: str


def measurement_id() -> str:
    """A random id in the style of Stigg's offline acknowledgements (21 URL-safe characters)."""
    return secrets.token_urlsafe(16)[:21]


class EntitlementSource(Protocol):
    """Where reads get a customer's entry; called from gRPC handler threads."""

    def peek(self, customer_id: str, resource_id: str | None) -> CustomerEntry | None:
        """The entry if it is in memory and fresh: no I/O, no waiting."""

    def lookup(self, customer_id: str, resource_id: str | None, timeout: float) -> CustomerEntry | None:
        """The entry, or None when the answer must come from fallbacks."""

    def memo_grew(self, entry: CustomerEntry, nbytes: int) -> None:
        """A reader memoized `nbytes` more on `entry`: count them against the cache's budget."""

    def now_ms(self) -> int: ...


class Writer(Protocol):
    """Carries writes out; called from gRPC handler threads; raises WriteError.

    `still_wanted` says whether the caller still waits (False once it cancelled the call): a
    writer that can still take a write back (the spool, before it acknowledges) drops one whose
    caller is gone, so a write counts only if its caller saw it acknowledged."""

    def report_usage(
        self, usages: Sequence[UsageReport], timeout: float, still_wanted: Callable[[], bool] | None = None
    ) -> Sequence[UsageAck]: ...

    def report_events(
        self, events: Sequence[EventReport], timeout: float, still_wanted: Callable[[], bool] | None = None
    ) -> None: ...

    def reload(self, customer_id: str, resource_id: str | None, timeout: float) -> bool: ...
