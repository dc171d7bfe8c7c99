"""How Python's cyclic garbage collector treats the sidecar's long-lived heap.

The cache holds hundreds of thousands of immutable entries, each ~16 objects the collector tracks
(frozen record instances with `__slots__` are always tracked). A full (generation 2) collection
walks every tracked object with the GIL held: at 500,000 entries that is 8 million objects and
seconds during which neither the reactor nor a handler thread runs. CPython starts one whenever
what was promoted to the oldest generation since the last one exceeds a quarter of it, so a
growing cache (a fill from Stigg, a snapshot load) meets them at every 25% of growth, and eviction
churn meets one every few minutes.

`install()` makes each full collection the last to see what it found alive: right after one ends,
`gc.freeze()` moves every surviving object to the permanent generation, which no collection walks.
The next full collection then walks only what was promoted since the previous one, whatever the
cache's size: ~90,000-100,000 objects both at 40,000 and at 500,000 entries (9-17 ms of CPU at
40,000, against 97-109 ms walking all 665,000 objects without the policy; bench/README.md has
the runs). With the heap frozen, what a full collection walks is set by how many young
collections run between two full ones (CPython's third threshold, 10); `install` lowers it to 1:
a full collection follows every second young one and walks ~10,000 objects once the cache is filled,
the same total work in the smallest pieces (bench/reactor_pause.py at 500,000 entries on a quiet
machine: longest reactor pause 26.1 ms with 3, 12.8 ms with 1, where full collections were the
longest pauses both times).

The price: an object frozen while alive that later becomes garbage *inside a reference cycle* is
never collected. Cache entries are trees without cycles and leave by reference counting when
replaced or evicted (freezing does not stop reference counting), so the cache leaks nothing.
What can leak is a long-lived cycle of other objects discarded later; Twisted breaks the
transport-protocol cycle when a connection closes, and the sidecar's other long-lived objects
(services, clients, the cache itself) live as long as the process. `frozen_objects()` reports the
permanent generation's size for the metrics, so a leak would show as steady growth.
"""

from __future__ import annotations

import gc

_installed = False
# Young (generation 1) collections between two full ones: 1 instead of CPython's 10 (see above).
_FULL_EVERY = 1
_saved_threshold: tuple[int, int, int] | None = None


def _freeze_after_full_collection(phase: str, info: dict) -> None:
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


def install() -> None:
    """Freeze the survivors of every full collection and run full collections more often
    (idempotent; once per process, at start)."""
    global _installed, _saved_threshold
    if not _installed:
        gc.callbacks.append(_freeze_after_full_collection)
        _saved_threshold = gc.get_threshold()
        gc.set_threshold(_saved_threshold[0], _saved_threshold[1], _FULL_EVERY)
        _installed = True


def uninstall() -> None:
    """Undo `install` (for tests): later collections see everything again."""
    global _installed
    if _installed:
        gc.callbacks.remove(_freeze_after_full_collection)
        if _saved_threshold is not None:
            gc.set_threshold(*_saved_threshold)
        _installed = False
        gc.unfreeze()


def frozen_objects() -> int:
    """Objects in the permanent generation (never walked by a collection)."""
    return gc.get_freeze_count()
