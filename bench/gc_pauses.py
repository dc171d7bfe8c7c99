"""Full garbage collections with a big cache, with and without the sidecar's gc policy.

    python -m bench.gc_pauses [--entries 40000] [--gc-policy on|off]

Fills an `EntitlementCache` with `--entries` customers (bench/reactor_pause.py's parse: Stigg-shaped
answers through `entry_from_state`), budgets it to full, stores half as many new customers
(evicting), and times every full (generation 2) collection on the way from `gc.callbacks` with
the thread's CPU time; then times one explicit `gc.collect()` and counts the objects the
collector walks and those frozen out of its view.
"""

from __future__ import annotations

import argparse
import gc
import time

from bench.reactor_pause import parse
from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.lifecycle import gcpolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=40_000)
    parser.add_argument("--gc-policy", choices=("on", "off"), default="on")
    args = parser.parse_args()
    cache = EntitlementCache(1 << 62)
    if args.gc_policy == "on":
        gcpolicy.install()  # as twistd runs it: after the services (and the cache's containers) are built
    full: list[float] = []
    started = [0.0]

    def timing(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started[0] = time.thread_time()
            else:
                full.append(time.thread_time() - started[0])

    gc.callbacks.append(timing)
    for i in range(args.entries):
        cache.put(parse(i))
    cache.max_bytes = cache.bytes
    cache._low_water_bytes = int(cache.max_bytes * 0.9)
    during_fill = len(full)
    for i in range(args.entries, args.entries + args.entries // 2):
        cache.put(parse(i))
    in_view = len(gc.get_objects())
    clock = time.thread_time()
    gc.collect()
    explicit = time.thread_time() - clock
    print(f"gc policy {args.gc_policy}, {args.entries:,} entries: full collections {during_fill} while filling, "
          f"{len(full) - during_fill} while replacing; longest {max(full, default=0) * 1000:.1f} ms CPU, last three "
          f"{', '.join(f'{x * 1000:.1f}' for x in full[-3:])} ms; a gc.collect() after: {explicit * 1000:.1f} ms CPU "
          f"over {in_view:,} objects in view ({gcpolicy.frozen_objects():,} frozen)")


if __name__ == "__main__":
    main()
