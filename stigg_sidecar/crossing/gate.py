"""WriteGate: the handler-thread side of a write, kept thin on purpose.

A write crosses to the reactor once, under the caller's deadline, and waits for its answer; every
other step (sending, spooling, updating the cache) runs on the reactor, which owns all state. The
gate refuses at once what could not be answered in time and turns every failure into a
`WriteError` whose message is safe to show the caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from stigg_sidecar.contracts import ApiKeyState, Problem, RemoteError, WriteError, WriteFailure
from stigg_sidecar.crossing.wait import BudgetExhausted, Handoff, WaitBudget, wait_on_reactor

log = Logger()

# Of a write's time budget, the share kept for the reactor to hand the answer back (so that an
# upstream timeout arrives as its own precise error), at most _HANDOFF_MAX seconds.
_HANDOFF_SHARE = 0.1
_HANDOFF_MAX = 0.25
# A write with less time than this left is refused before anything is sent: it could not be
# answered in time, and sending it anyway could record usage the caller believes failed.
MIN_WRITE_BUDGET = 0.05
# What each way a call to Stigg can fail means for a write's caller.
WRITE_FAILURES = {
    Problem.KEY_REJECTED: WriteFailure.UNAUTHENTICATED,
    Problem.REFUSED: WriteFailure.INVALID_ARGUMENT,
    Problem.NOT_FOUND: WriteFailure.NOT_FOUND,
    Problem.RATE_LIMITED: WriteFailure.RESOURCE_EXHAUSTED,
    Problem.TIMED_OUT: WriteFailure.DEADLINE_EXCEEDED,
    Problem.UNAVAILABLE: WriteFailure.UNAVAILABLE,
}


class WriteGate:
    """Runs `fn(*args, budget)` on the reactor for a handler thread and waits for its result.

    `slots` bounds how many handler threads wait on the reactor at once (MAX_WAITING_WRITES);
    `key` says whether Stigg refused the API key (then nothing is sent).
    """

    def __init__(self, reactor: IReactorThreads, slots: WaitBudget, key: ApiKeyState,
                 waiting_for: str = "Stigg") -> None:
        self._reactor = reactor
        self._waiting_for = waiting_for  # what a timeout message says did not answer
        self._slots = slots
        self._key = key

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        return self._run(fn, args, timeout, None)

    def run_acknowledged(
        self, fn: Callable[..., Any], *args: Any, timeout: float, still_wanted: Callable[[], bool] | None = None
    ) -> Any:
        """As `run`, for a write that may count only if its acknowledgement reaches the caller:
        `fn(*args, budget, handoff)` claims the `Handoff` before it makes the write count, and
        leaves no trace when the claim fails (the caller's deadline passed or `still_wanted()`
        turned false: the caller cancelled)."""
        return self._run(fn, args, timeout, still_wanted or (lambda: True))

    def _run(self, fn: Callable[..., Any], args: tuple, timeout: float, still_wanted: Callable[[], bool] | None) -> Any:
        if self._key.rejected:
            raise WriteError(WriteFailure.UNAUTHENTICATED, "Stigg rejected the API key")
        if timeout < MIN_WRITE_BUDGET:
            raise WriteError(
                WriteFailure.DEADLINE_EXCEEDED, f"the call's deadline leaves {timeout * 1000:.0f} ms: too little to reach Stigg"
            )
        budget = timeout - min(_HANDOFF_MAX, timeout * _HANDOFF_SHARE)
        handoff = None
        if still_wanted is not None:
            # Claimed only while the rest of the deadline leaves time to hand the answer back.
            handoff = Handoff(time.monotonic() + budget, still_wanted)
            fn = _with_handoff(fn, handoff)
        try:
            return wait_on_reactor(self._reactor, self._slots, fn, *args, budget, timeout=timeout, handoff=handoff)
        except BudgetExhausted:
            raise WriteError(
                WriteFailure.UNAVAILABLE,
                f"{self._slots.limit} writes already waiting on {self._waiting_for} (MAX_WAITING_WRITES); try again shortly",
            ) from None
        except TimeoutError:
            raise WriteError(WriteFailure.DEADLINE_EXCEEDED, f"{self._waiting_for} did not answer within {timeout:.3g}s") from None
        except RemoteError as e:
            raise WriteError(WRITE_FAILURES[e.problem], e.message) from None
        except WriteError:
            raise
        except Exception as e:
            log.failure("A write to Stigg failed unexpectedly")
            raise WriteError(
                WriteFailure.UNAVAILABLE, f"the write to Stigg failed ({type(e).__name__}); it may or may not have been recorded"
            ) from None


def _with_handoff(fn: Callable[..., Any], handoff: Handoff) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        return fn(*args, handoff)

    return call
