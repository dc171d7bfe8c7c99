"""Memory benchmark: the sidecar's RSS with 100,000 cached customers of ten features each.

    python bench/memory.py [--customers 100000] [--concurrency 8]

Measures, each as a real `twistd stigg-sidecar` process pinned to core 0:
1. the idle RSS of an OFFLINE=1 sidecar (no emulator, no cache);
2. an online sidecar against the emulator (seeded with --customers customers from a generated
   data file, pinned to core 1): RSS once ready, then after one GetBooleanEntitlement per customer
   (a cache miss that fetches and stores the customer; each answer is checked to be Stigg's data,
   not a fallback), and the cache's own count of entries, bytes and evictions from /metrics.
CACHE_MAX_SIZE_BYTES is set far above what the customers need (evictions are reported anyway) and
POLL_INTERVAL_SECS=0, so no background refresh of every cached customer runs while measuring.
Benchmarks are run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from processes import (
    BenchError,
    Children,
    rss_kib,
    run_with_children,
    start_emulator,
    start_sidecar,
    write_emulator_data,
)
from seed import customer_id, entitlements

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

SIDECAR_CPU = 0
EMULATOR_CPU = 1
CACHE_BUDGET = 16 << 30
CALL_TIMEOUT = 30.0
SETTLE = 2.0  # seconds to let RSS settle before reading it


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def metrics(http_port: int) -> dict[str, float]:
    """The sidecar's unlabelled Prometheus samples (name -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


class Warmer:
    """One GetBooleanEntitlement per customer, at most `concurrency` in flight; checks each answer."""

    def __init__(self, stub: SidecarServiceStub, customers: int, concurrency: int) -> None:
        self._stub = stub
        self._next = iter(range(customers))
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(concurrency)
        self._all_done = threading.Event()
        self._total = customers
        self._finished = 0
        self.errors: list[str] = []

    def run(self, timeout: float) -> None:
        started = time.monotonic()
        deadline = started + timeout
        for i in self._next:
            while not self._slots.acquire(timeout=1):
                if time.monotonic() > deadline or self.errors:
                    raise BenchError(self._why(timeout))
            if self.errors:
                raise BenchError(self._why(timeout))
            request = pb.GetBooleanEntitlementRequest(customer_id=customer_id(i), feature_id="feature-bool-0")
            self._stub.GetBooleanEntitlement.future(request, timeout=CALL_TIMEOUT).add_done_callback(
                lambda f, i=i: self._done(i, f)
            )
        if not self._all_done.wait(max(0.0, deadline - time.monotonic())) or self.errors:
            raise BenchError(self._why(timeout))

    def _why(self, timeout: float) -> str:
        if self.errors:
            return f"{len(self.errors)} wrong answers while warming, first: {self.errors[0]}"
        return f"warming did not finish within {timeout:.0f}s ({self._finished}/{self._total} done)"

    def _done(self, i: int, future: grpc.Future) -> None:
        try:
            r = future.result()
            if not r.has_access or r.is_fallback:
                self.errors.append(f"{customer_id(i)}: {r}")
        except grpc.RpcError as e:
            self.errors.append(f"{customer_id(i)}: {e.code()} {e.details()}")
        self._slots.release()
        with self._lock:
            self._finished += 1
            finished = self._finished
        if finished % 10_000 == 0 or finished == self._total:
            print(f"  warmed {finished}/{self._total}", flush=True)
        if finished == self._total:
            self._all_done.set()


def offline_idle_rss(children: Children) -> int:
    sidecar = start_sidecar(children, SIDECAR_CPU, api_url=None, extra_env={"SHUTDOWN_GRACE_SECS": "1"})
    time.sleep(SETTLE)
    rss = rss_kib(sidecar.child.pid)
    sidecar.child.stop()
    return rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100_000, help="customers to cache (default 100000)")
    parser.add_argument("--concurrency", type=int, default=8, help="warm-up calls in flight (default 8; above the sidecar's waiting slots, cold reads answer fallbacks by design)")
    parser.add_argument("--timeout", type=float, default=1200, help="bound on the warm-up, seconds (default 1200)")
    args = parser.parse_args()

    return run_with_children(bench, args)


def bench(children: Children, args: argparse.Namespace) -> int:
    offline = offline_idle_rss(children)
    print(f"offline sidecar (OFFLINE=1), idle: RSS {mib(offline)}")

    data = children.path("emulator-data.json")
    started = time.monotonic()
    write_emulator_data(data, {customer_id(i): entitlements(i) for i in range(args.customers)})
    gc.collect()
    print(
        f"data file: {args.customers} customers x 10 features, {data.stat().st_size / 2**20:.0f} MiB "
        f"({time.monotonic() - started:.1f}s)"
    )
    started = time.monotonic()
    emulator, api_url = start_emulator(children, data, cpu=EMULATOR_CPU, timeout=600)
    print(f"emulator ready in {time.monotonic() - started:.1f}s, RSS {mib(rss_kib(emulator.pid))}")

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
    started = time.monotonic()
    Warmer(stub, args.customers, args.concurrency).run(args.timeout)
    elapsed = time.monotonic() - started
    print(
        f"warmed {args.customers} customers in {elapsed:.1f}s ({args.customers / elapsed:.0f}/s), every answer "
        "granted from Stigg's data"
    )

    # A second call per sampled customer must be a hit: the cache kept everything.
    misses_before = metrics(sidecar.http_port).get("sidecar_cache_misses_total", 0.0)
    for i in range(0, args.customers, max(1, args.customers // 1000)):
        r = stub.GetBooleanEntitlement(
            pb.GetBooleanEntitlementRequest(customer_id=customer_id(i), feature_id="feature-bool-0"),
            timeout=CALL_TIMEOUT,
        )
        if not r.has_access or r.is_fallback:
            raise BenchError(f"{customer_id(i)} answered wrong after warming: {r}")
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
    print(f"online sidecar, {args.customers} customers cached: RSS {mib(after)}")
    print(f"  RSS growth {mib(after - before)}, {(after - before) * 1024 / args.customers:.0f} bytes per customer")
    if entries is not None and cache_bytes is not None:
        print(
            f"  cache's own count: {entries:.0f} entries, {cache_bytes / 2**20:.1f} MiB, "
            f"{cache_bytes / max(entries, 1):.0f} bytes per entry; {evictions:.0f} evictions; "
            f"{misses:.0f} misses re-reading {len(range(0, args.customers, max(1, args.customers // 1000)))} customers"
        )
    else:
        print("  (the sidecar's /metrics has no sidecar_cache_entries / sidecar_cache_bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
