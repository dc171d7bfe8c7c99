"""The cache snapshot at scale: write time, the longest reactor pause while writing, file size,
and load time (read, decode, store in slices) at 100,000 customers.

    python -m bench.snapshot [--customers 100000]

Runs the sidecar's own SnapshotService on a real reactor in this process, over a cache filled
with entries built from the benchmark seed (ten entitlements each, as the emulator answers them:
no network needed to fill it). A 1 ms LoopingCall stands in for the reactor's other work and
records the longest gap between its runs: that is how long anything on the reactor (a cache
miss's answer, a socket push) could have waited because of the snapshot.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred

from bench import seed
from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.emulator.data import parse_data
from stigg_sidecar.emulator.state import EmulatorState
from stigg_sidecar.lifecycle import gcpolicy
from stigg_sidecar.online.store import EntitlementStore
from stigg_sidecar.ops.readiness import Readiness
from stigg_sidecar.state.snapshot import FILE_NAME, SnapshotService
from stigg_sidecar.upstream.wire import entry_from_state


class PauseMeter:
    """The longest time the reactor went without running a 1 ms timer (minus the 1 ms), and the
    longest collection of Python's cyclic garbage collector meanwhile (it stops every thread)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.longest_gc = 0.0
        self._gc_started = 0.0
        self._last = time.perf_counter()
        self._loop = task.LoopingCall(self._tick)
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._loop.running:
            self.longest_gc = max(self.longest_gc, time.perf_counter() - self._gc_started)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.longest = max(self.longest, now - self._last - 0.001)
        self._last = now

    def start(self) -> None:
        self.longest = 0.0
        self.longest_gc = 0.0
        self._last = time.perf_counter()
        self._loop.start(0.001)

    def stop(self) -> float:
        self._loop.stop()
        return self.longest


def fill(customers: int) -> EntitlementStore:
    template = {"apiKeys": ["k"], "customers": {"c": {"accessDeniedReason": None, "entitlements": seed.entitlements(0)}}}
    state = EmulatorState(parse_data(template), clock=task.Clock())
    raw = state.entitlements_state("c")
    cache = EntitlementCache(64 << 30)
    backend = EntitlementStore(cache)
    for i in range(customers):
        cache.put(entry_from_state(seed.customer_id(i), None, raw, 1_000))
    return backend


async def run(customers: int, directory: str) -> None:
    started = time.perf_counter()
    backend = fill(customers)
    print(f"filled {len(backend):,} customers in {time.perf_counter() - started:.1f}s", flush=True)
    path = os.path.join(directory, FILE_NAME)
    # What the machine alone costs the reactor (other processes, the OS): the floor of a pause.
    meter = PauseMeter()
    meter.start()
    await task.deferLater(reactor, 5, lambda: None)
    print(f"idle:   longest reactor pause over 5s with nothing to do {meter.stop() * 1000:.1f} ms (the machine's floor)")

    writer = SnapshotService(reactor, path, backend, interval=3600)
    meter.start()
    started = time.perf_counter()
    size = await writer.write()
    write_s = time.perf_counter() - started
    write_pause = meter.stop()
    print(f"write:  {write_s:.2f}s for {customers:,} customers, {size / 1e6:.1f} MB "
          f"({size / customers:.0f} B/customer); longest reactor pause {write_pause * 1000:.1f} ms"
          f" (longest GC {meter.longest_gc * 1000:.1f} ms)", flush=True)

    fresh = EntitlementStore(EntitlementCache(64 << 30))
    readiness = Readiness()
    loader = SnapshotService(reactor, path, fresh, interval=3600, readiness=readiness)
    meter.start()
    started = time.perf_counter()
    loader.startService()
    while not readiness.ready:
        await task.deferLater(reactor, 0.01, lambda: None)
    load_s = time.perf_counter() - started
    load_pause = meter.stop()
    await loader.stopService()
    assert len(fresh) == customers, (len(fresh), customers)
    print(f"load:   {load_s:.2f}s to readiness with {len(fresh):,} customers; "
          f"longest reactor pause {load_pause * 1000:.1f} ms (longest GC {meter.longest_gc * 1000:.1f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--gc-policy", choices=("on", "off"), default="on",
                        help="the sidecar's garbage-collector policy (stigg_sidecar.lifecycle.gcpolicy), as twistd runs it")
    args = parser.parse_args()
    if args.gc_policy == "on":
        gcpolicy.install()
    directory = tempfile.mkdtemp(prefix="stigg-bench-snapshot-")
    reactor.suggestThreadPoolSize(4)
    failures: list[BaseException] = []

    def done(result):
        if isinstance(result, Exception) or hasattr(result, "value"):
            failures.append(getattr(result, "value", result))
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(run(args.customers, directory)).addBoth(done))
    try:
        reactor.run()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if failures:
        print(f"error: {failures[0]!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
