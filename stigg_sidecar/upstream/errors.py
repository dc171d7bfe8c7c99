"""How a call to Stigg failed, in Stigg's terms: `Problem` and `UpstreamError`.

What a failure becomes for a caller (a write's gRPC status, a read's fallback) is decided by the
caller's side (`crossing.gate`, `online.reads`), not here.
"""

from __future__ import annotations

import enum


class Problem(enum.Enum):
    """What went wrong with a call to Stigg."""

    KEY_REJECTED = "key rejected"  # HTTP 401 or GraphQL Unauthenticated
    REFUSED = "refused"  # Stigg refused the request's input (or it could not be sent as it is)
    NOT_FOUND = "not found"  # a GraphQL *NotFound code
    RATE_LIMITED = "rate limited"  # HTTP 429 or GraphQL RateLimitExceeded
    TIMED_OUT = "timed out"  # no answer within the call's budget
    UNAVAILABLE = "unavailable"  # unreachable, 5xx, a malformed answer, an open breaker...


class UpstreamError(Exception):
    """A call to Stigg failed. `message` is safe to return to a caller; `retryable` says whether
    trying again might help; `code` is the GraphQL error code when Stigg answered with one (the
    request reached Stigg and was refused); `fast_failed`: refused without trying (the
    upstream's breaker is open)."""

    def __init__(self, problem: Problem, message: str, retryable: bool = False, retry_after: float | None = None,
                 code: str | None = None, fast_failed: bool = False):
        super().__init__(message)
        self.problem = problem
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.code = code
        self.fast_failed = fast_failed
