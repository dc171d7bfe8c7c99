"""The seams between the parts: plain records and the protocols they meet through.

Owns the shapes that cross from the gRPC handlers to whoever answers a read or carries a write
out (`EntitlementSource`, `Writer`; usage reports, events, acknowledgements, `WriteError`), what
Stigg's answers change in the cache (`UsageChange`), how delivery reaches the store
(`UsageStore`), and the one flag several parts read (`ApiKeyState`).
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from stigg_sidecar.entitlements.records import CustomerEntry, Usage, cache_key

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


@dataclass(frozen=True, slots=True)
class UsageChange:
    """One entitlement's usage as Stigg now counts it: `kind` "FEATURE" (ref_id a feature refId)
    or "CREDIT" (a currency id)."""

    customer_id: str
    resource_id: str | None
    kind: str
    ref_id: str
    usage: Usage

    @property
    def key(self) -> str:
        return cache_key(self.customer_id, self.resource_id)


@dataclass(frozen=True, slots=True)
class UsageResult:
    """Stigg's answer to one usage report: the acknowledgement and the usage changes it carries."""

    ack: UsageAck
    changes: tuple[UsageChange, ...]


class ApiKeyState:
    """Whether Stigg rejected the API key. The key check (on the reactor) rejects it; reads and
    writes (on any thread) read `rejected`: a bool set once, so no lock."""

    def __init__(self) -> None:
        self._rejected = False

    @property
    def rejected(self) -> bool:
        return self._rejected

    def reject(self) -> None:
        self._rejected = True


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


class Problem(enum.Enum):
    """What went wrong with a call to a remote service (Stigg), in its own terms; what that
    means for a caller (a write's gRPC status, a read's fallback) is the caller's side's to say."""

    KEY_REJECTED = "key rejected"  # HTTP 401 or GraphQL Unauthenticated
    REFUSED = "refused"  # the request's input was refused (or could not be sent as it is)
    NOT_FOUND = "not found"  # a GraphQL *NotFound code
    RATE_LIMITED = "rate limited"  # HTTP 429 or GraphQL RateLimitExceeded
    TIMED_OUT = "timed out"  # no answer within the call's budget
    UNAVAILABLE = "unavailable"  # unreachable, 5xx, a malformed answer, an open breaker...


class RemoteError(Exception):
    """A call to Stigg that failed, as the layers above the upstream client see it: what went
    wrong (`problem`) and a message safe to show the caller. `upstream.errors.UpstreamError` is
    one; the write gate turns any into a `WriteError` without knowing the client."""

    problem: Problem
    message: str


def measurement_id() -> str:
    """A random id in the style of Stigg's offline acknowledgements (21 URL-safe characters)."""
    return secrets.token_urlsafe(16)[:21]


class ReloadFailed(Exception):
    """A reload that could not reach Stigg's answer; `message` is safe to log."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EntitlementSource(Protocol):
    """Where reads get a customer's entry; called from gRPC handler threads."""

    def peek(self, customer_id: str, resource_id: str | None) -> CustomerEntry | None:
        """The entry if it is in memory and fresh: no I/O, no waiting."""

    def lookup(self, customer_id: str, resource_id: str | None, timeout: float) -> CustomerEntry | None:
        """After `peek` missed: the entry from further away, or None when the answer must come
        from fallbacks. Readers peek once, then look up only on a miss."""

    def memo_grew(self, entry: CustomerEntry, nbytes: int) -> None:
        """A reader memoized `nbytes` more on `entry`: count them against the cache's budget."""

    def now_ms(self) -> int: ...

    def reload(self, customer_id: str, resource_id: str | None, timeout: float) -> bool:
        """Refetch from Stigg: true unless the customer is gone; raises ReloadFailed."""


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


class UsageStore(Protocol):
    """What delivery changes in the cached state, through the store (reactor only): Stigg's
    answers, and usage acknowledged but not yet delivered (the spool's pending overlay)."""

    def usage_changed(self, change: UsageChange) -> None: ...

    def pending_added(self, seq: int, usage: UsageReport) -> Usage | None:
        """Count an acknowledged record; the usage the cache shows now (None: not cached)."""

    def pending_settled(self, seq: int, usage: UsageReport) -> None:
        """The record was delivered or refused: it no longer counts (shown once `pending_shown`)."""

    def pending_shown(self, usage: UsageReport) -> None:
        """Show the base plus what is still pending for the record's entitlement."""
