"""The reactor's clock made monotonic, so that a wall clock that steps freezes no timer.

Twisted's reactors read `time.time` for `seconds()`: every `callLater`, `LoopingCall`,
`ClientService` backoff and timeout (the poller, the snapshot, the spool's flush and backoff, the
breakers' probes, the socket's reconnect) is due at a wall-clock moment. Step the clock back two
hours (NTP, a VM resumed, an operator) and every timer waits two hours more; step it forward and
they all fire at once. On `time.monotonic` they run on elapsed time, whatever the wall clock does.

What needs the date itself (a record's creation time, a decision's `now_ms`) reads a wall clock
passed in explicitly, never `reactor.seconds()`.
"""

from __future__ import annotations

import time
from typing import Any


def use_monotonic_time(reactor: Any) -> None:
    """Make `reactor.seconds()` (and so every timer of it) monotonic.

    Called before the reactor runs; calls already scheduled keep their delays (they are moved onto
    the monotonic clock by the same offset, which keeps the reactor's heap of them in order).
    """
    if getattr(reactor, "seconds", None) is time.monotonic:
        return
    shift = time.monotonic() - reactor.seconds()
    for call in reactor.getDelayedCalls():
        call.time += shift
        call.seconds = time.monotonic
    reactor.seconds = time.monotonic
