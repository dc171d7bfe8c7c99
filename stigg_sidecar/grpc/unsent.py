"""UnsentAnswers: a call whose client does not take its answer within a bound is cancelled.

A client may open a connection with an HTTP/2 flow-control window of 0 and never read. Each of its
calls is then answered but never sent: grpc-core keeps the call (its arena, its HTTP/2 stream, the
answer) and grpcio its Python state, about 10-25 KB a call, until the connection closes. Capped
only by GRPC_MAX_CONCURRENT_STREAMS per connection, 60 such connections pinned hundreds of MB.

So every unary handler is wrapped (where it is registered, as `timing.TimedServer` does: no
interceptor) to note each call whose handler has returned, and grpc-core's end of the call
(`add_callback`) forgets it. A well-behaved client takes its answers as they come (its library
reads and opens the window whatever the application does). A connection with more than
`per_connection` answers unsent for over `grace` seconds, that took no answer in that time, is not
being read: `sweep` cancels those calls (RST_STREAM), which frees them. What one connection can pin
is then `per_connection` answers plus those of the last `grace` seconds, not its streams for the
connection's lifetime. After a sweep that freed many calls, glibc is asked to give the freed heap
back to the system (`malloc_trim`), else RSS never comes down.

Owns the bookkeeping and the cancelling. The sweeps run on a thread of their own that exists only
while answers wait (a server that is stopped or idle has none), so they need neither the reactor
nor a stop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from stigg_sidecar.grpc.timing import Behaviour

# An answer not taken within this many seconds after its handler returned is unsent...
UNSENT_ANSWER_SECS = 2.0
# ...and a connection with more unsent answers than this, that took none for as long, has them
# cancelled. A sequential client, however slow the sidecar, never has more than one waiting.
UNSENT_PER_CONNECTION = 16
# Sweeps run this often (so an unsent answer lives at most grace + this).
SWEEP_SECS = 0.25
# A sweep that cancelled at least this many calls gives freed memory back to the system.
TRIM_AFTER = 256


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or nothing where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def run() -> None:
        trim(0)

    return run


class UnsentAnswers:
    """Remembers answered-but-unfinished unary calls; `sweep` cancels those older than `grace`."""

    def __init__(self, grace: float = UNSENT_ANSWER_SECS, per_connection: int = UNSENT_PER_CONNECTION,
                 clock: Callable[[], float] = time.monotonic, trim: Callable[[], None] | None = None,
                 background: bool = True) -> None:
        """`background`: sweep on a thread every SWEEP_SECS (off: only when `sweep` is called)."""
        self.grace = grace
        self.per_connection = per_connection
        self._background = background
        self._sweeper: threading.Thread | None = None
        self._clock = clock
        self._trim = trim if trim is not None else _malloc_trim()
        self._lock = threading.Lock()
        self._keys = itertools.count()
        # key -> (when the handler returned, the call's connection, its context); in time order.
        self._waiting: dict[int, tuple[float, str, grpc.ServicerContext]] = {}
        # connection (the peer's address) -> when it last took an answer, within the last `grace`.
        self._taken: dict[str, float] = {}
        self.cancelled = 0  # calls cancelled since start

    def __len__(self) -> int:
        return len(self._waiting)

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        """`behaviour` (a unary handler), its answered calls watched (a `timing.Timed`)."""

        def watched(request: Any, context: grpc.ServicerContext) -> Any:
            response = behaviour(request, context)
            self._answered(context)
            return response

        return watched

    def _answered(self, context: grpc.ServicerContext) -> None:
        """The handler returned; grpcio sends the answer next. Remember the call until it ends."""
        key = next(self._keys)
        peer = context.peer()
        start = None
        with self._lock:
            self._waiting[key] = (self._clock(), peer, context)
            if self._background and self._sweeper is None:
                start = self._sweeper = threading.Thread(target=self._sweeping, name="grpc-unsent-sweep", daemon=True)
        if start is not None:
            start.start()
        # The callback runs when grpc-core ends the call: answer sent, or the call cancelled.
        if not context.add_callback(lambda: self._ended(key)):
            self._ended(key)  # already over

    def _ended(self, key: int) -> None:
        with self._lock:
            entry = self._waiting.pop(key, None)
            if entry is not None:  # not cancelled here: its connection is taking answers
                self._taken[entry[1]] = self._clock()

    def _sweeping(self) -> None:
        """The sweeper thread: sweeps until no answer waits."""
        while True:
            time.sleep(SWEEP_SECS)
            self.sweep()
            with self._lock:
                if not self._waiting:
                    self._sweeper = None
                    return

    def sweep(self) -> int:
        """Cancel the calls whose answers waited longer than `grace` on each connection that has more
        than `per_connection` of them and took no answer for as long; how many were.

        A connection that is read, however slowly the process runs, keeps taking answers, and a
        client calling one call at a time never has more than one waiting: their calls are spared,
        so an overloaded sidecar does not cancel well-behaved clients' calls."""
        stale: list[grpc.ServicerContext] = []
        limit = self._clock() - self.grace
        with self._lock:
            by_peer: dict[str, list[int]] = {}
            for key, (since, peer, _) in self._waiting.items():
                if since > limit:
                    break
                if self._taken.get(peer, limit) <= limit:
                    by_peer.setdefault(peer, []).append(key)
            for keys in by_peer.values():
                if len(keys) > self.per_connection:
                    for key in keys:
                        stale.append(self._waiting.pop(key)[2])
            for peer in [peer for peer, taken in self._taken.items() if taken <= limit]:
                del self._taken[peer]  # older than the grace: it spares nothing now
        for context in stale:
            context.cancel()  # RST_STREAM: grpc-core frees the call and its stream
        self.cancelled += len(stale)
        if len(stale) >= TRIM_AFTER:
            self._trim()
        return len(stale)
