"""Reactor pauses from cache upkeep: the longest loop delay with a full cache under eviction churn.

    python -m bench.reactor_pause [--entries 500000] [--seconds 20] [--puts-per-sec 2000]

In one process, as the sidecar runs it: a Twisted reactor owns an `EntitlementCache` filled with
`--entries` customers of ten features each (parsed from Stigg-shaped JSON by the sidecar's own
`entry_from_state`, the same path a fetch takes), its byte budget set to what they take so every
new customer evicts. Then, for `--seconds`:
- the reactor stores `--puts-per-sec` new customers a second (each a fetch's parse and `put`,
  evicting), applies as many usage updates (`update` + `apply_usage`, a socket push), and walks
  the keys by recency as the refresher does (a new walk every 5 s, 1,024 keys per 10 ms turn);
- `--readers` handler threads read random cached customers (`get`), `--reads-per-sec` each
  (paced, so the probe measures the cache's work rather than a starved GIL);
- a probe on the reactor asks to run every millisecond and records how late it ran.
Prints the longest delay, p99 and p50 of the probe; the reactor thread's own CPU time between
two probe turns (the work that blocked it, apart from waiting for a core or the GIL on a shared
machine); the cache's size and evictions; and how many of the longest delays overlapped a full
(generation 2) garbage collection.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import threading
import time
from itertools import islice

from bench.seed import customer_id, entitlements
from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.entitlements.changes import apply_usage
from stigg_sidecar.entitlements.records import cache_key
from stigg_sidecar.lifecycle import gcpolicy
from stigg_sidecar.upstream.wire import entry_from_state

NOW_MS = 1_795_000_000_000
PROBE_INTERVAL = 0.001


def state_json(i: int) -> bytes:
    """Stigg's entitlementsState for customer i: every field Stigg sends, per-customer timestamps."""
    stamp = f"2026-11-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{(i // 60) % 60:02d}.{i % 1000:03d}Z"
    items = []
    for e in entitlements(i):
        metered = e.get("currentUsage") is not None
        feature = {
            "__typename": "EntitlementFeature", "description": None, "featureUnits": None,
            "featureUnitsPlural": None, "meterType": None, **e["feature"],
        }
        items.append({
            "__typename": "FeatureEntitlement", "isGranted": e.get("isGranted"),
            "accessDeniedReason": e.get("accessDeniedReason"), "usageLimit": e.get("usageLimit"),
            "hasUnlimitedUsage": e.get("hasUnlimitedUsage", False), "hasSoftLimit": False,
            "currentUsage": e.get("currentUsage"), "enumValues": e.get("enumValues"),
            "entitlementUpdatedAt": stamp, "usageUpdatedAt": stamp if metered else None,
            "usagePeriodAnchor": "2026-01-01T00:00:00.000Z" if metered else None,
            "usagePeriodStart": "2026-11-01T00:00:00.000Z" if metered else None,
            "usagePeriodEnd": "2026-12-01T00:00:00.000Z" if metered else None,
            "resetPeriod": "MONTH" if metered else None, "resetPeriodConfiguration": None,
            "creditRate": None, "validUntil": None, "feature": feature,
        })
    return json.dumps({"__typename": "EntitlementsState", "accessDeniedReason": None, "entitlementsV2": items}).encode()


_STATES = [json.loads(state_json(i)) for i in range(1000)]


def parse(i: int):
    """Customer i's entry, parsed from a decoded answer (one of 1,000 distinct ones)."""
    return entry_from_state(customer_id(i), None, _STATES[i % len(_STATES)], NOW_MS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--puts-per-sec", type=int, default=500)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--reads-per-sec", type=int, default=2000, help="per reader thread")
    parser.add_argument("--gc-policy", choices=("on", "off"), default="on",
                        help="the sidecar's garbage-collector policy (stigg_sidecar.lifecycle.gcpolicy), as twistd runs it")
    args = parser.parse_args()

    from twisted.internet import reactor, task

    started = time.monotonic()
    cache = EntitlementCache(max_bytes=1 << 62)
    if args.gc_policy == "on":
        gcpolicy.install()  # as twistd runs it: after the services (and the cache's containers) are built
    for i in range(args.entries):
        cache.put(parse(i))
    cache.max_bytes = cache.bytes  # full: every new customer evicts
    cache._low_water_bytes = int(cache.max_bytes * 0.9)  # the default low water, as in the sidecar
    print(f"filled {len(cache):,} entries ({cache.bytes / 2**20:.0f} MiB counted) in {time.monotonic() - started:.0f} s")

    delays: list[float] = []
    full_collections: list[tuple[float, float]] = []  # (start, end) monotonic
    gc_started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if info.get("generation") == 2:
            if phase == "start":
                gc_started[0] = time.monotonic()
            else:
                full_collections.append((gc_started[0], time.monotonic()))

    gc.callbacks.append(on_gc)
    stop = threading.Event()
    reads = [0]

    def reader() -> None:
        rng = random.Random()
        n = 0
        pause = 1.0 / args.reads_per_sec
        while not stop.is_set():
            cache.get(cache_key(customer_id(rng.randrange(next_id[0])), None))
            n += 1
            time.sleep(pause)  # a handler thread between calls: it gives the GIL back
        reads[0] += n

    next_id = [args.entries]
    expected = [0.0]
    cpu_at = [0.0]
    busy: list[float] = []  # the reactor thread's own CPU time between two probe turns

    def probe() -> None:
        now = time.monotonic()
        cpu = time.thread_time()
        if expected[0]:
            delays.append((now - expected[0], now))
            busy.append(cpu - cpu_at[0])
        expected[0] = now + PROBE_INTERVAL
        cpu_at[0] = cpu
        reactor.callLater(PROBE_INTERVAL, probe)

    batch = max(1, args.puts_per_sec // 100)

    def churn() -> None:
        for _ in range(batch):
            cache.put(parse(next_id[0]))
            next_id[0] += 1
            i = random.randrange(next_id[0])
            stamp = NOW_MS + next_id[0]
            cache.update(
                cache_key(customer_id(i), None),
                lambda e, stamp=stamp: apply_usage(e, "FEATURE", "feature-api-calls", 7.0, None, None, stamp),
            )

    walk = [iter(())]

    def refresh_order() -> None:
        # The refresher's walk, consumed far faster than a refresh does (a slice of keys and
        # their lookups per 10 ms turn): a new walk starts when one ends, or every 5 s.
        for key in islice(walk[0], 1024):
            cache.get_entry(key)

    def new_walk() -> None:
        walk[0] = cache.keys_by_recency()

    task_worst: dict[str, float] = {}

    def timed(name: str, fn):
        def run() -> None:
            started = time.thread_time()
            fn()
            task_worst[name] = max(task_worst.get(name, 0.0), time.thread_time() - started)

        return run

    churn = timed("stores, updates and evictions (10 ms of them)", churn)
    refresh_order = timed("refresh walk (1,024 keys)", refresh_order)
    new_walk = timed("a walk's start (hot keys)", new_walk)
    threads = [threading.Thread(target=reader, daemon=True) for _ in range(args.readers)]
    for t in threads:
        t.start()
    loops = [task.LoopingCall(churn), task.LoopingCall(refresh_order), task.LoopingCall(new_walk)]
    reactor.callWhenRunning(loops[0].start, 0.01)
    reactor.callWhenRunning(loops[1].start, 0.01)
    reactor.callWhenRunning(loops[2].start, 5.0)
    reactor.callWhenRunning(probe)
    reactor.callLater(args.seconds, reactor.stop)
    reactor.run()
    stop.set()
    for t in threads:
        t.join(5)

    values = sorted(d for d, _ in delays)
    worst = sorted(delays, reverse=True)[:10]
    in_gc = sum(1 for d, end in worst if any(s - 0.001 <= end - d and end - d <= e + 0.001 for s, e in full_collections))
    print(f"probe ran {len(values):,} times; reactor loop delay: max {values[-1] * 1000:.1f} ms, "
          f"p99 {values[int(len(values) * 0.99)] * 1000:.2f} ms, p50 {values[len(values) // 2] * 1000:.2f} ms")
    busy.sort()
    print(f"reactor thread CPU between probe turns (its own work, without waits for the CPU or the "
          f"GIL): max {busy[-1] * 1000:.1f} ms, p99 {busy[int(len(busy) * 0.99)] * 1000:.2f} ms")
    print(f"ten longest (ms): {', '.join(f'{d * 1000:.1f}' for d, _ in worst)}; "
          f"{in_gc} of them overlapped a full GC ({len(full_collections)} full GCs, longest "
          f"{max((e - s for s, e in full_collections), default=0) * 1000:.1f} ms)")
    print("longest reactor CPU per task: " + "; ".join(f"{k} {v * 1000:.1f} ms" for k, v in task_worst.items()))
    view = len(gc.get_objects())
    started = time.perf_counter()
    gc.collect()
    print(f"a full collection now: {(time.perf_counter() - started) * 1000:.0f} ms over {view:,} objects in the "
          f"collector's view ({gcpolicy.frozen_objects():,} frozen, never walked; gc policy {args.gc_policy})")
    print(f"cache: {len(cache):,} entries, {cache.evictions:,} evictions, {next_id[0] - args.entries:,} puts, "
          f"{reads[0]:,} reads by {args.readers} threads")


if __name__ == "__main__":
    main()
