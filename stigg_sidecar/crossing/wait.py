"""Handler threads waiting on the reactor: the one way a gRPC handler asks the reactor for work.

Owns the crossing (`call_on_reactor`: callFromThread, then wait under a deadline), the in-flight
budgets that bound how many handler threads wait at once (`WaitBudget`, one for reads and one for
writes, so neither takes the other's capacity), and `wait_on_reactor`, which puts the two
together inside the handler pool's `blocking()` so a waiting thread hands its runner role to
another and cached reads keep being served. Never touches state: `fn` runs on the reactor.

The caller's context (`contextvars`: the current trace span among them) crosses with the call:
`fn` runs on the reactor inside a copy of the handler thread's context, so the spans it starts
are children of the caller's, and so are those of the inlineCallbacks it starts (Twisted runs
each in a copy of the context it was called in).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from stigg_sidecar.crossing.pool import blocking


class BudgetExhausted(Exception):
    """Every place in a `WaitBudget` is taken; nothing was started."""

    def __init__(self, budget: WaitBudget) -> None:
        super().__init__(f"{budget.limit} {budget.what} already waiting on Stigg")
        self.budget = budget


class WaitBudget:
    """At most `limit` handler threads waiting at once for one kind of call ("reads", "writes").
    Entering never waits: a full budget is an answer (a fallback, UNAVAILABLE), not a queue."""

    def __init__(self, limit: int, what: str) -> None:
        if limit < 1:
            raise ValueError("a wait budget needs at least one place")
        self.limit = limit
        self.what = what
        self._lock = threading.Lock()
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    def try_enter(self) -> bool:
        with self._lock:
            if self._in_use >= self.limit:
                return False
            self._in_use += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._in_use -= 1


class Handoff:
    """Whether a write's answer still reaches its caller: decided once, by whichever side comes first.

    The reactor `claim()`s it just before it makes a write count (acknowledges a spooled record):
    that fails once the caller's handler gave up waiting (`abandon()`, its deadline passed), once
    `answer_by` (time.monotonic()) has passed (too late for the answer to travel back), or once
    `still_wanted()` says the call is over (the caller cancelled it). After a failed claim the
    write must leave no trace; after a successful one the handler waits for the answer, even a
    moment past its deadline. Thread-safe: a handler thread and the reactor both call it.
    """

    def __init__(self, answer_by: float, still_wanted: Callable[[], bool] | None = None) -> None:
        self._answer_by = answer_by
        self._still_wanted = still_wanted
        self._lock = threading.Lock()
        self._state = "waiting"  # -> "claimed" | "abandoned"

    def claim(self) -> bool:
        """On the reactor: True if the caller will get this answer (and the write may count)."""
        wanted = self._still_wanted is None or self._still_wanted()
        with self._lock:
            if self._state == "waiting":
                self._state = "claimed" if wanted and time.monotonic() < self._answer_by else "abandoned"
            return self._state == "claimed"

    def abandon(self) -> bool:
        """On the handler thread, past its deadline: True if the answer will never be claimed."""
        with self._lock:
            if self._state == "waiting":
                self._state = "abandoned"
            return self._state == "abandoned"


# How long a handler whose answer was claimed at its deadline waits for it (it is being handed over).
_CLAIMED_ANSWER_WAIT = 5.0


def call_on_reactor(reactor: IReactorFromThreads, fn: Callable[..., Any], *args: Any, timeout: float, handoff: Handoff | None = None) -> Any:
    """Run `fn(*args)` on the reactor thread and wait up to `timeout` seconds for its result
    (a Deferred is waited for), in a copy of this thread's context. Raises TimeoutError past the
    deadline, or what `fn` raised. With a `handoff`, the deadline abandons it, unless the reactor
    claimed it first: then the answer it claimed is returned."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    context = contextvars.copy_context()

    def failed(failure: Failure) -> None:
        future.set_exception(failure.value)

    def run() -> None:
        context.run(maybeDeferred, fn, *args).addCallbacks(future.set_result, failed)

    reactor.callFromThread(run)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        if handoff is None or handoff.abandon():
            raise
        return future.result(_CLAIMED_ANSWER_WAIT)


def wait_on_reactor(
    reactor: IReactorFromThreads,
    budget: WaitBudget,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float,
    handoff: Handoff | None = None,
) -> Any:
    """From a handler thread: run `fn(*args)` on the reactor and wait for its result, holding one
    place of `budget` (BudgetExhausted at once when there is none) and no runner role (the
    handler pool serves other calls meanwhile), for at most `timeout` seconds from now
    (TimeoutError).

    The deadline is fixed on entry: handing the runner role on can start a thread, which on a
    CPU-starved machine takes a while, and that time comes out of the wait, not on top of it.
    """
    deadline = time.monotonic() + timeout
    if not budget.try_enter():
        raise BudgetExhausted(budget)
    try:
        with blocking():
            return call_on_reactor(reactor, fn, *args, timeout=max(0.0, deadline - time.monotonic()), handoff=handoff)
    finally:
        budget.leave()
