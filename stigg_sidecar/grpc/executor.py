"""HandlerPool: grpcio's handler threads, elastic around calls that block on Stigg.

Owns the threads that run gRPC handlers. At most `runners` of them hold a *runner role* at a
time: only role holders take calls from the queue, so no more than `runners` threads compete for
the GIL on the fast path (as in a fixed ThreadPoolExecutor of that size). A handler about to wait
on something slow (a cache miss crossing to the reactor, a write waiting for Stigg) enters
`blocking()`, which gives its role up: a parked thread, or a new one, takes it and keeps serving
the queue, so cached reads never queue behind waiting misses. A thread leaving `blocking()`
finishes its call without asking for a role back (its answer is never delayed by cached load),
then takes a role if one is free or parks. Parked threads beyond `runners` exit after
`idle_timeout` seconds.

The idea is Java's ForkJoinPool.ManagedBlocker, or Go's scheduler handing off its P on a
blocking syscall. The pool bounds nothing about blocked threads: their number is bounded by
whoever enters `blocking()` (the in-flight budgets of `stigg_sidecar.crossing`). Knows nothing
of gRPC or Stigg.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from concurrent.futures import Executor, Future
from typing import Any, Callable, Iterator

_current = threading.local()  # .pool (HandlerPool) and .role (bool) on the pool's own threads


class _WorkItem:
    __slots__ = ("future", "fn", "args", "kwargs")

    def __init__(self, future: Future, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as e:
            self.future.set_exception(e)
        else:
            self.future.set_result(result)


class _Parked:
    """A parked thread's mailbox: the submitter hands it a call (and its role) directly."""

    __slots__ = ("wake", "item")

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.item: _WorkItem | None = None


class HandlerPool(Executor):
    def __init__(self, runners: int, idle_timeout: float = 60.0, thread_name_prefix: str = "grpc-handler") -> None:
        if runners < 1:
            raise ValueError("runners must be at least 1")
        self.runners = runners
        self._idle_timeout = idle_timeout
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever the counts change
        self._queue: collections.deque[_WorkItem] = collections.deque()
        self._parked: list[_Parked] = []  # a stack: the most recently parked is woken first
        self._held = 0  # runner roles held
        self._threads = 0
        self._blocked = 0  # threads inside blocking()
        self._serial = 0
        self._shutdown = False

    # -- what tests and metrics read ----------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """A consistent snapshot: threads, roles held, blocked, parked, queued."""
        with self._lock:
            return {
                "threads": self._threads,
                "held": self._held,
                "blocked": self._blocked,
                "parked": len(self._parked),
                "queued": len(self._queue),
            }

    def wait_until(self, predicate: Callable[[dict[str, int]], bool], timeout: float) -> bool:
        """Wait (up to `timeout` s) until `predicate(counts)` holds; true if it did."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._counts_locked()), timeout)

    def _counts_locked(self) -> dict[str, int]:
        return {
            "threads": self._threads,
            "held": self._held,
            "blocked": self._blocked,
            "parked": len(self._parked),
            "queued": len(self._queue),
        }

    # -- Executor -----------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        item = _WorkItem(future, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.append(item)
            self._dispatch_locked()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; parked threads exit, running ones exit after their call.
        Queued calls still run unless `cancel_futures`."""
        with self._changed:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft().future.cancel()
            for parked in self._parked:
                parked.wake.set()
            self._parked.clear()
            self._changed.notify_all()
            if wait:
                self._changed.wait_for(lambda: self._threads == 0 or self._on_own_thread())

    def _on_own_thread(self) -> bool:
        return getattr(_current, "pool", None) is self

    # -- managed blocking ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def blocking(self) -> Iterator[None]:
        """Around a wait that holds this thread without using the CPU: the thread's runner role
        goes to another thread for the duration (on any other thread this does nothing)."""
        if not (self._on_own_thread() and _current.role):
            yield
            return
        with self._changed:
            _current.role = False
            self._held -= 1
            self._blocked += 1
            self._dispatch_locked()
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._blocked -= 1
                self._changed.notify_all()

    # -- the threads --------------------------------------------------------------------------------

    def _dispatch_locked(self) -> None:
        """Give queued calls to free roles: a parked thread's, else a new thread's."""
        while self._queue and self._held < self.runners:
            item = self._queue.popleft()
            self._held += 1
            if self._parked:
                parked = self._parked.pop()
                parked.item = item
                parked.wake.set()
            else:
                self._threads += 1
                self._serial += 1
                thread = threading.Thread(
                    target=self._work, args=(item,), name=f"{self._prefix}-{self._serial}", daemon=True
                )
                thread.start()
        self._changed.notify_all()

    def _work(self, item: _WorkItem | None) -> None:
        _current.pool = self
        _current.role = True
        try:
            while item is not None:
                item.run()
                del item  # drop the call's references before parking
                item = self._next()
        finally:
            with self._changed:
                self._threads -= 1
                self._changed.notify_all()

    def _next(self) -> _WorkItem | None:
        """After a call: the next call to run (with a role), or None to exit."""
        with self._changed:
            if not _current.role and self._held < self.runners:
                _current.role = True
                self._held += 1
            if _current.role and self._queue:
                return self._queue.popleft()
            if _current.role:
                _current.role = False
                self._held -= 1
            # Parked in the same step as the role is given up, so a call submitted meanwhile
            # finds this thread rather than starting another.
            mailbox = self._park_locked()
        while mailbox is not None:
            woken = mailbox.wake.wait(self._idle_timeout)
            with self._changed:
                if mailbox.item is not None:
                    _current.role = True  # the submitter counted it in _held
                    return mailbox.item
                if woken or mailbox not in self._parked:
                    return None  # shutdown
                self._parked.remove(mailbox)
                if self._threads > self.runners:
                    return None  # a spare, idle for idle_timeout: retire
                mailbox = self._park_locked()  # one of the core threads: stay
        return None

    def _park_locked(self) -> _Parked | None:
        self._changed.notify_all()
        if self._shutdown:
            return None
        mailbox = _Parked()
        self._parked.append(mailbox)
        return mailbox


def blocking() -> contextlib.AbstractContextManager[None]:
    """`HandlerPool.blocking()` of the pool running this thread; does nothing elsewhere (the
    reactor, tests calling a backend directly)."""
    pool = getattr(_current, "pool", None)
    if pool is None:
        return contextlib.nullcontext()
    return pool.blocking()
