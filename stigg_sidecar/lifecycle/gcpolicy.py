"""How Python's cyclic garbage collector treats the sidecar's heap.

A full (generation 2) collection walks every object the collector tracks, with the GIL held: while
it runs neither the reactor nor a handler thread does. Two kinds of objects would make that walk
long, and each is taken out of it in the way that is safe for it:

- **Cached records** (hundreds of thousands of customers, ~16 records each): `untrack`, called by
  every record's constructor. Records are immutable trees that never form a reference cycle, so
  reference counting alone frees them and the collector has nothing to find among them.
- **What the process holds from its start** (modules, classes, functions, the services: ~100,000
  objects, lasting as long as the process): `install()` collects once and then freezes the
  survivors (`gc.freeze()`, into the permanent generation no collection walks). This happens
  once, before the reactor runs, while nothing transient is alive.

What is left for the collector is what the running sidecar creates and drops (connections,
Deferreds, failures...), and it is collected as CPython always does, thresholds unchanged.

An earlier version froze the survivors of *every* full collection instead. That also froze
whatever was in flight at that moment (a fetch's HTTP client objects, a handler's frames and its
gRPC call during a slow upstream), and an object frozen while alive that later dies inside a
reference cycle is never collected: `bench/gc_leak.py` measured ~95,000 objects leaked per
4,000 cold reads, and during an outage the leaked gRPC calls kept their HTTP/2 streams allocated
until grpc-core refused every new stream on the connection (REFUSED_STREAM, which a client sees as
UNAVAILABLE). Freezing only at start cannot leak that way.
"""

from __future__ import annotations

import gc

from stigg_sidecar.entitlements.tracking import untrack

# `untrack` lives beside the records that call it (entitlements import nothing above them); it is
# re-exported here as part of the policy.
__all__ = ["frozen_objects", "install", "uninstall", "untrack"]

_installed = False


def install() -> None:
    """Freeze what the process holds now, once (idempotent): call at start, before serving."""
    global _installed
    if not _installed:
        gc.collect()
        gc.freeze()
        _installed = True


def uninstall() -> None:
    """Undo `install` (for tests): later collections see everything again."""
    global _installed
    if _installed:
        _installed = False
        gc.unfreeze()


def frozen_objects() -> int:
    """Objects in the permanent generation (never walked by a collection): set once at start, so
    growth would mean something else froze objects."""
    return gc.get_freeze_count()
