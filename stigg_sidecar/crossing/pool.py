"""HandlerPool: grpcio's handler threads, elastic around calls that block on Stigg.

Owns the threads that run gRPC handlers. At most `runners` of them hold a *runner role* at a
time: only role holders take calls from the queue, so no more than `runners` threads compete for
the GIL on the fast path (as in a fixed ThreadPoolExecutor of that size). A handler about to wait
on something slow (a cache miss crossing to the reactor, a write waiting for Stigg) enters
`blocking()`, which gives its role up: a parked spare thread, or a new one, takes it when there
is a call to serve, so cached reads never queue behind waiting misses. A thread leaving
`blocking()` finishes its call without asking for a role back (its answer is never delayed by
cached load), then takes a role if one is free or parks as a spare. Spares exit after
`idle_timeout` seconds parked; role holders wait for calls for as long as the pool lives.

The fast path costs less than a ThreadPoolExecutor's: no lock and no Future (a lock-free `Call`
instead); `submit` puts the call on a C-level `SimpleQueue`, and adds a role holder only when
none is waiting for a call (an idle holder leaves a token in a deque while it waits; deque append
and pop are atomic). The lock is taken only when roles change hands: a thread starting, blocking,
coming back, parking, retiring.

The idea is Java's ForkJoinPool.ManagedBlocker, or Go's scheduler handing off its P on a
blocking syscall. The pool bounds nothing about blocked threads: their number is bounded by
whoever enters `blocking()` (the in-flight budgets of `stigg_sidecar.crossing.wait`). Knows nothing
of gRPC or Stigg.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Executor
from typing import Any

_log = logging.getLogger("concurrent.futures")  # where a Future logs a failing callback
_current = threading.local()  # .pool (HandlerPool) and .role (bool) on the pool's own threads


_PENDING, _RUNNING, _CANCELLED, _FINISHED = range(4)


class Call:
    """One submitted call and its outcome: what callers use of a `concurrent.futures.Future`
    (add_done_callback, result, exception, done, cancel, cancelled, running) without the
    Condition and RLock a Future creates for every call and takes four times (grpcio's serving
    thread adds a done callback to each call, the handler thread starts it, sets its result and
    runs the callback). That was ~2 us of every call, more than the sidecar's own handler.

    Lock-free under the GIL: running and cancelling each claim the call by popping a one-item
    list (atomic; one of them wins), and callbacks are claimed by popping the list of callbacks,
    so each runs exactly once, whether the thread that ends the call or a thread adding a
    callback to an ended call runs it. Not a Future: `concurrent.futures.wait` does not take it.
    """

    __slots__ = ("_fn", "_args", "_kwargs", "_claim", "_state", "_result", "_exception", "_callbacks")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self._fn: Callable[..., Any] | None = fn
        self._args = args
        self._kwargs = kwargs
        self._claim = [None]
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[Call], object]] = []

    def run(self) -> None:
        try:
            self._claim.pop()
        except IndexError:
            return  # cancelled first
        self._state = _RUNNING
        fn, args, kwargs = self._fn, self._args, self._kwargs
        self._fn = self._args = self._kwargs = None  # type: ignore[assignment]  # the call's references go with it
        assert fn is not None
        try:
            self._result = fn(*args, **kwargs)
        except BaseException as e:
            self._exception = e
        del fn, args, kwargs
        self._state = _FINISHED
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        callbacks = self._callbacks
        while callbacks:
            try:
                callback = callbacks.pop(0)
            except IndexError:
                return  # another thread took the last one
            try:
                callback(self)
            except Exception:
                _log.exception("exception calling callback for %r", self)

    def add_done_callback(self, fn: Callable[[Call], object]) -> None:
        self._callbacks.append(fn)
        if self._state >= _CANCELLED:  # ended already (or meanwhile): run it here
            self._run_callbacks()

    def cancel(self) -> bool:
        try:
            self._claim.pop()
        except IndexError:
            return self._state == _CANCELLED
        self._fn = self._args = self._kwargs = None  # type: ignore[assignment]
        self._state = _CANCELLED
        self._run_callbacks()
        return True

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def running(self) -> bool:
        return self._state == _RUNNING

    def done(self) -> bool:
        return self._state >= _CANCELLED

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._exception

    def _wait(self, timeout: float | None) -> None:
        if self._state < _CANCELLED:
            ended = threading.Event()
            self.add_done_callback(lambda _: ended.set())
            if not ended.wait(timeout):
                raise TimeoutError()
        if self._state == _CANCELLED:
            raise CancelledError()


class HandlerPool(Executor):
    def __init__(self, runners: int, idle_timeout: float = 60.0, thread_name_prefix: str = "grpc-handler") -> None:
        if runners < 1:
            raise ValueError("runners must be at least 1")
        self.runners = runners
        self._idle_timeout = idle_timeout
        self._prefix = thread_name_prefix
        self._calls: queue.SimpleQueue[Call | None] = queue.SimpleQueue()  # None: a holder exits
        self._idle: collections.deque[None] = collections.deque()  # a token per holder awaiting a call
        self._lock = threading.Lock()
        self._held = 0  # runner roles held, by busy and idle holders alike
        self._threads = 0
        self._blocked = 0  # threads inside blocking()
        self._spares: list[threading.Event] = []  # parked threads without a role; newest last
        self._serial = 0
        self._shutdown = False
        # Calls submitted so far: a stopping server watches it to see calls stop arriving. Only
        # grpcio's serving thread submits, so the increment needs no lock.
        self.submitted = 0

    # -- what tests and metrics read ----------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """A snapshot: threads, roles held by running calls, blocked, parked spares, queued calls."""
        with self._lock:
            return {
                "threads": self._threads,
                "held": self._held - len(self._idle),
                "blocked": self._blocked,
                "parked": len(self._spares),
                "queued": self._calls.qsize(),
            }

    def wait_until(self, predicate: Callable[[dict[str, int]], bool], timeout: float) -> bool:
        """Wait (up to `timeout` s) until `predicate(counts)` holds; true if it did. Polls: the
        fast path notifies nobody, and only tests and diagnostics wait on counts."""
        deadline = time.monotonic() + timeout
        while not predicate(self.counts()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    # -- Executor -----------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Call:  # type: ignore[override]
        """The call, queued; a `Call` (a Future's interface without its locks) for its outcome."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new calls after shutdown")
        call = Call(fn, args, kwargs)
        self.submitted += 1
        self._calls.put(call)
        if not self._idle:
            # No holder is waiting for a call; a holder that took one after leaving its token is
            # either done soon or will see this call when it enters blocking().
            self._add_holder()
        return call

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; spares exit, holders exit once the calls queued before now have run
        (unless `cancel_futures`), blocked threads after their call."""
        with self._lock:
            if not self._shutdown:
                self._shutdown = True
                if cancel_futures:
                    while True:
                        try:
                            item = self._calls.get_nowait()
                        except queue.Empty:
                            break
                        if item is not None:
                            item.cancel()
                for _ in range(self._held):
                    self._calls.put(None)
                for spare in self._spares:
                    spare.set()
                self._spares.clear()
        if wait and not self._on_own_thread():
            self.wait_until(lambda c: c["threads"] == 0, float("inf"))

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
        with self._lock:
            _current.role = False
            self._held -= 1
            self._blocked += 1
            # Calls already queued get a holder now; later ones find no idle token and add one.
            serial = self._take_role_locked() if self._calls.qsize() > 0 else 0
        if serial:
            self._start_thread(serial)
        try:
            yield
        finally:
            with self._lock:
                self._blocked -= 1

    # -- the threads --------------------------------------------------------------------------------

    def _add_holder(self) -> None:
        with self._lock:
            serial = self._take_role_locked()
        if serial:
            self._start_thread(serial)

    def _take_role_locked(self) -> int:
        """Count a new role holder if a role is free: a parked spare takes it (0), or the caller
        must start a thread for it, numbered as returned, once the lock is released."""
        if self._held >= self.runners or self._shutdown:
            return 0
        self._held += 1
        if self._spares:
            self._spares.pop().set()
            return 0
        self._threads += 1
        self._serial += 1
        return self._serial

    def _start_thread(self, serial: int) -> None:
        # Outside the lock: Thread.start waits for the thread to run, which on a CPU-starved
        # machine takes a while, and nothing should wait for the pool's lock meanwhile.
        threading.Thread(target=self._work, name=f"{self._prefix}-{serial}", daemon=True).start()

    def _work(self) -> None:
        _current.pool = self
        _current.role = True
        try:
            while self._serve():
                pass
        finally:
            with self._lock:
                self._threads -= 1

    def _serve(self) -> bool:
        """Run one call as a holder, or park as a spare until a role is free; False: exit."""
        if _current.role:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                self._idle.append(None)
                item = self._calls.get()
                self._idle.pop()
            if item is None:  # shut down
                with self._lock:
                    self._held -= 1
                return False
            item.run()
            del item  # drop the call's references before waiting for the next
            if _current.role:
                return True
        # Back from blocking(): take a free role, else park as a spare.
        with self._lock:
            if self._shutdown:
                return False
            if self._held < self.runners:
                self._held += 1
                _current.role = True
                return True
            spare = threading.Event()
            self._spares.append(spare)
        spare.wait(self._idle_timeout)
        with self._lock:
            if spare.is_set() and not self._shutdown:
                _current.role = True  # the waker counted it in _held (a wake racing the timeout too)
                return True
            if spare in self._spares:
                self._spares.remove(spare)
            return False


def blocking() -> contextlib.AbstractContextManager[None]:
    """`HandlerPool.blocking()` of the pool running this thread; does nothing elsewhere (the
    reactor, tests calling a backend directly)."""
    pool = getattr(_current, "pool", None)
    if pool is None:
        return contextlib.nullcontext()
    return pool.blocking()
