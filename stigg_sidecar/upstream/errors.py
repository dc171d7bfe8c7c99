"""How a call to Stigg failed: `UpstreamError`, with its `Problem` (defined with `RemoteError` in
`contracts`, so the layers above see failures without knowing this client).

What a failure becomes for a caller (a write's gRPC status, a read's fallback) is decided by the
caller's side (`crossing.gate`, `online.reads`), not here.
"""

from __future__ import annotations

from stigg_sidecar.contracts import Problem, RemoteError

__all__ = ["Problem", "UpstreamError"]


class UpstreamError(RemoteError):
    """A call to Stigg failed. `message` is safe to return to a caller; `retryable` says whether
    trying again might help; `code` is the GraphQL error code when Stigg answered with one (the
    request reached Stigg and was refused); `fast_failed`: refused without trying (the
    upstream's breaker is open); `local`: the sidecar could not even send it (no file descriptor),
    which says nothing of Stigg."""

    def __init__(self, problem: Problem, message: str, retryable: bool = False, retry_after: float | None = None,
                 code: str | None = None, fast_failed: bool = False, local: bool = False):
        super().__init__(message)
        self.local = local
        self.problem = problem
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.code = code
        self.fast_failed = fast_failed
