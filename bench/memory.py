"""Memory benchmark: RSS per cached customer of ten features, the sidecar beside Stigg's Node SDK.

    python -m bench.memory [--customers 20000,100000] [--concurrency 8] [--no-node]

Measures, each as a real process pinned to core 0:
1. the idle RSS of an OFFLINE=1 sidecar (no emulator, no cache);
2. for each --customers count, one after the other against one emulator (seeded with the largest
   count from a generated data file, pinned to core 1):
   - a fresh online sidecar (`twistd stigg-sidecar`): RSS once ready, then after one
     GetBooleanEntitlement per customer (a cache miss that fetches and stores the customer; each
     answer is checked to be Stigg's data, not a fallback), and the cache's own count of entries,
     bytes and evictions from /metrics;
   - a fresh Node reference (bench/node/server.js: `@stigg/node-server-sdk` 3.95.0 with its
     in-memory cache and real-time updates, behind grpc-js), warmed and checked the same way, its
     cached entries and hit/miss counts from its /stats.
   A second read of a sample of customers must be a cache hit on both.
Prints KiB of RSS growth per customer for each, and Node / sidecar. CACHE_MAX_SIZE_BYTES (and the
SDK's memoryCacheMaxSizeBytes) is set far above what the customers need (evictions are reported
anyway) and POLL_INTERVAL_SECS=0, so no background refresh of every cached customer runs while
measuring. Benchmarks are run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass

import grpc

from bench.harness import (
    BenchError,
    Children,
    Reads,
    ensure_node_reference,
    metrics,
    rss_kib,
    run_with_children,
    start_emulator,
    start_node_reference,
    start_sidecar,
    write_emulator_data,
)
from bench.seed import customer_id, entitlements
from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

SIDECAR_CPU = 0  # and the Node reference
EMULATOR_CPU = 1
CACHE_BUDGET = 16 << 30
CALL_TIMEOUT = 30.0
SETTLE = 2.0  # seconds to let RSS settle before reading it


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def offline_idle_rss(children: Children) -> int:
    sidecar = start_sidecar(children, SIDECAR_CPU, api_url=None, extra_env={"SHUTDOWN_GRACE_SECS": "1"})
    time.sleep(SETTLE)
    rss = rss_kib(sidecar.child.pid)
    sidecar.child.stop()
    return rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--customers",
        type=lambda text: sorted(int(x) for x in text.split(",") if x),
        default=[20_000, 100_000],
        help="customer counts to cache, comma-separated, each on fresh servers (default 20000,100000)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="warm-up calls in flight (default 8; above the sidecar's waiting slots, cold reads answer "
        "fallbacks by design)",
    )
    parser.add_argument("--timeout", type=float, default=1200, help="bound on each warm-up, seconds (default 1200)")
    parser.add_argument(
        "--no-node", action="store_true", help="leave out the Node reference (Stigg's Node SDK behind grpc-js)"
    )
    args = parser.parse_args()

    return run_with_children(bench, args)


@dataclass
class Measured:
    server: str
    customers: int
    ready_kib: int
    warm_kib: int
    seconds: float  # the warm-up

    @property
    def kib_per_customer(self) -> float:
        return (self.warm_kib - self.ready_kib) / self.customers


def sample(customers: int) -> range:
    return range(0, customers, max(1, customers // 1000))


def reread_sample(stub: SidecarServiceStub, customers: int) -> None:
    for i in sample(customers):
        r = stub.GetBooleanEntitlement(
            pb.GetBooleanEntitlementRequest(customer_id=customer_id(i), feature_id="feature-bool-0"),
            timeout=CALL_TIMEOUT,
        )
        if not r.has_access or r.is_fallback:
            raise BenchError(f"{customer_id(i)} answered wrong after warming: {r}")


def warm(stub: SidecarServiceStub, customers: int, args: argparse.Namespace, what: str) -> float:
    started = time.monotonic()
    Reads(stub, args.concurrency, CALL_TIMEOUT, fallbacks_wrong=True, progress_every=10_000).run(
        0, customers, args.timeout, "warming"
    )
    elapsed = time.monotonic() - started
    print(
        f"  warmed {customers} customers in {elapsed:.1f}s ({customers / elapsed:.0f}/s) on the {what}, every "
        "answer granted from Stigg's data"
    )
    return elapsed


def measure_sidecar(children: Children, api_url: str, customers: int, args: argparse.Namespace) -> Measured:
    sidecar = start_sidecar(
        children,
        SIDECAR_CPU,
        api_url,
        {"SHUTDOWN_GRACE_SECS": "1", "CACHE_MAX_SIZE_BYTES": str(CACHE_BUDGET), "POLL_INTERVAL_SECS": "0"},
    )
    time.sleep(SETTLE)
    before = rss_kib(sidecar.child.pid)
    print(f"online sidecar, ready, empty cache: RSS {mib(before)}")

    channel = grpc.insecure_channel(sidecar.target)
    stub = SidecarServiceStub(channel)
    elapsed = warm(stub, customers, args, "sidecar")
    # A second call per sampled customer must be a hit: the cache kept everything.
    misses_before = metrics(sidecar.http_port).get("sidecar_cache_misses_total", 0.0)
    reread_sample(stub, customers)
    m = metrics(sidecar.http_port)
    misses = m.get("sidecar_cache_misses_total", 0.0) - misses_before
    channel.close()
    time.sleep(SETTLE)
    after = rss_kib(sidecar.child.pid)

    entries, cache_bytes, evictions = (
        m.get("sidecar_cache_entries"),
        m.get("sidecar_cache_bytes"),
        m.get("sidecar_cache_evictions"),
    )
    print(f"online sidecar, {customers} customers cached: RSS {mib(after)}")
    print(f"  RSS growth {mib(after - before)}, {(after - before) * 1024 / customers:.0f} bytes per customer")
    if entries is not None and cache_bytes is not None:
        print(
            f"  cache's own count: {entries:.0f} entries, {cache_bytes / 2**20:.1f} MiB, "
            f"{cache_bytes / max(entries, 1):.0f} bytes per entry; {evictions:.0f} evictions; "
            f"{misses:.0f} misses re-reading {len(sample(customers))} customers"
        )
    else:
        print("  (the sidecar's /metrics has no sidecar_cache_entries / sidecar_cache_bytes)")
    sidecar.child.stop()
    return Measured("sidecar", customers, before, after, elapsed)


def measure_node(children: Children, api_url: str, customers: int, args: argparse.Namespace) -> Measured:
    node = start_node_reference(children, SIDECAR_CPU, api_url, {"CACHE_MAX_SIZE_BYTES": str(CACHE_BUDGET)})
    time.sleep(SETTLE)
    before = rss_kib(node.child.pid)
    heap_before = node.stats()["heapUsed"]
    print(
        f"Node reference (@stigg/node-server-sdk 3.95.0, grpc-js), ready, empty cache: RSS {mib(before)}, "
        f"V8 heap in use {heap_before / 2**20:.1f} MiB"
    )

    channel = grpc.insecure_channel(node.target)
    stub = SidecarServiceStub(channel)
    elapsed = warm(stub, customers, args, "Node reference")
    misses_before = node.stats()["misses"]
    reread_sample(stub, customers)
    stats = node.stats()
    channel.close()
    time.sleep(SETTLE)
    after = rss_kib(node.child.pid)
    if stats["cacheEntries"] != customers or stats["misses"] != misses_before:
        raise BenchError(
            f"the Node SDK's cache did not keep every customer: {stats['cacheEntries']} entries of {customers}, "
            f"{stats['misses'] - misses_before} misses re-reading {len(sample(customers))} customers"
        )
    print(f"Node reference, {customers} customers cached: RSS {mib(after)}")
    print(f"  RSS growth {mib(after - before)}, {(after - before) * 1024 / customers:.0f} bytes per customer")
    heap_growth = stats["heapUsed"] - heap_before
    print(
        f"  SDK's cache: {stats['cacheEntries']} entries; V8 heap in use {stats['heapUsed'] / 2**20:.1f} MiB, "
        f"{heap_growth / customers:.0f} bytes per customer (RSS also holds heap V8 has not given back); "
        f"0 misses re-reading {len(sample(customers))} customers"
    )
    node.child.stop()
    return Measured("node", customers, before, after, elapsed)


def bench(children: Children, args: argparse.Namespace) -> int:
    if not args.no_node:
        ensure_node_reference()  # before the long parts: a missing node stops the run at once
    offline = offline_idle_rss(children)
    print(f"offline sidecar (OFFLINE=1), idle: RSS {mib(offline)}")

    most = max(args.customers)
    data = children.path("emulator-data.json")
    started = time.monotonic()
    write_emulator_data(data, {customer_id(i): entitlements(i) for i in range(most)})
    gc.collect()
    print(
        f"data file: {most} customers x 10 features, {data.stat().st_size / 2**20:.0f} MiB "
        f"({time.monotonic() - started:.1f}s)"
    )
    started = time.monotonic()
    emulator, api_url = start_emulator(children, data, cpu=EMULATOR_CPU, timeout=600)
    print(f"emulator ready in {time.monotonic() - started:.1f}s, RSS {mib(rss_kib(emulator.pid))}")

    results: list[Measured] = []
    for customers in args.customers:
        print(f"\n== {customers} customers")
        results.append(measure_sidecar(children, api_url, customers, args))
        if not args.no_node:
            results.append(measure_node(children, api_url, customers, args))

    print("\n== KiB of RSS per cached customer (growth from ready to warm, ten features each)")
    print(f"{'customers':>9}  {'server':<8} {'ready MiB':>9} {'warm MiB':>9} {'KiB/cust':>8} {'warm-up/s':>9}")
    for r in results:
        print(
            f"{r.customers:>9}  {r.server:<8} {r.ready_kib / 1024:>9.1f} {r.warm_kib / 1024:>9.1f} "
            f"{r.kib_per_customer:>8.2f} {r.customers / r.seconds:>9.0f}"
        )
    for customers in args.customers:
        pair = {r.server: r for r in results if r.customers == customers}
        if "node" in pair:
            side, node = pair["sidecar"], pair["node"]
            print(
                f"at {customers}: Node / sidecar {node.kib_per_customer / side.kib_per_customer:.1f}x per customer, "
                f"{node.warm_kib / side.warm_kib:.1f}x in total RSS"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
