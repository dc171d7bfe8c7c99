"""Taking cached records out of the cyclic garbage collector's view (`untrack`).

A leaf the records' constructors call, so `entitlements` needs nothing above it; the process's
collector policy as a whole (what is frozen at start, and why) is `lifecycle/gcpolicy.py`.
"""

from __future__ import annotations

from collections.abc import Callable


def _gc_untracker() -> Callable[[object], None]:
    """CPython's `PyObject_GC_UnTrack`, or nothing elsewhere than CPython."""
    try:
        import ctypes  # noqa: PLC0415 - inside the try: a Python without it untracks nothing

        untrack = ctypes.pythonapi.PyObject_GC_UnTrack
    except (ImportError, AttributeError):  # pragma: no cover - not CPython
        return lambda obj: None
    untrack.argtypes = (ctypes.py_object,)
    untrack.restype = None
    return untrack


# untrack(obj): take `obj` out of the cyclic collector's view; reference counting still frees it.
# Only for objects that can never be part of a reference cycle (the cache's immutable records,
# and containers holding only those and atomic values): an untracked object inside a cycle would
# keep that cycle alive for ever. A tracked container may hold untracked objects (they count as
# references from outside the collector's view, so what they hold stays alive, as it must).
# Idempotent, ~0.3 us; the GIL must be held (ctypes' `pythonapi` keeps it during the call).
# Only for tuples, dicts and instances of classes defined in Python: their deallocation checks
# whether the object is tracked. Some built-in types' deallocation assumes it is and crashes the
# process otherwise (types.MappingProxyType does, in CPython 3.11).
untrack: Callable[[object], None] = _gc_untracker()
