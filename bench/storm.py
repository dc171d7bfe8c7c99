"""Storm benchmark: the read path under bursts, a slow Stigg and an outage (issue 10).

    python -m bench.storm [--cold 256] [--storm 64] [--latency-ms 3000] [--samples 2000]

Starts the emulator (`twistd stigg-emulator`, one `sso` boolean per customer) pinned to core 1
and the sidecar (`twistd stigg-sidecar`, online, WS_ENABLED=0, default settings otherwise) pinned
to core 0, then measures with real grpcio clients from this script (core 1):

1. burst: --cold concurrent GetBooleanEntitlement reads of uncached customers (10 s deadlines) on
   a healthy upstream: answers from Stigg's data, fallbacks, errors, and the time to the last.
2. cached p50/p99 unloaded: --samples reads of one cached customer from 4 client threads.
3. storm: Stigg answers in --latency-ms; --storm concurrent cold reads (10 s deadlines) in flight
   while the same cached sampling runs and 8 ReportUsage calls (10 s deadlines) are made: cached
   p50/p99 during the storm (and its ratio to unloaded), writes that succeeded, and the storm's
   answers (data / fallbacks / errors).
4. breaker: Stigg down; one cold read notices the outage (its retries open the Edge breaker),
   then 50 cold reads one after another: their p50/p99 latency and fallbacks, and
   sidecar_upstream_breaker_open / sidecar_fast_failed_reads_total from /metrics.

Run by hand, never in CI. Every wait is bounded; children are stopped on any exit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc

from bench.harness import (
    BenchError,
    Children,
    exit_status,
    run_with_children,
    start_emulator,
    start_sidecar,
    write_emulator_data,
)
from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

SSO = [{"isGranted": True, "feature": {"refId": "sso", "displayName": "sso", "featureType": "BOOLEAN", "meterType": "None"}}]
HOT = [*SSO, {"isGranted": True, "usageLimit": 1_000_000, "currentUsage": 0,
              "feature": {"refId": "api-calls", "displayName": "api calls", "featureType": "NUMBER", "meterType": "Incremental"}}]
DEADLINE = 10.0


def faults(url: str, **settings: object) -> None:
    request = urllib.request.Request(f"{url}/_emulator/faults", data=json.dumps(settings).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        if response.status != 200:
            raise BenchError(f"setting faults {settings} answered {response.status}")


def metrics(http_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("sidecar_upstream_breaker_open", "sidecar_fast_failed_reads_total")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def read(stub: SidecarServiceStub, customer: str, timeout: float = DEADLINE):
    return stub.GetBooleanEntitlement(pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso"), timeout=timeout)


def concurrent_reads(stub: SidecarServiceStub, customers: list[str]) -> tuple[int, int, int, float]:
    """All at once (futures on one channel): (data answers, fallbacks, errors, seconds to the last)."""
    started = time.monotonic()
    futures = [
        stub.GetBooleanEntitlement.future(pb.GetBooleanEntitlementRequest(customer_id=c, feature_id="sso"), timeout=DEADLINE)
        for c in customers
    ]
    data = fallbacks = errors = 0
    for future in futures:
        try:
            answer = future.result(DEADLINE + 5)
        except grpc.RpcError:
            errors += 1
            continue
        if answer.is_fallback:
            fallbacks += 1
        elif answer.has_access:
            data += 1
        else:
            raise BenchError(f"a cold read answered no access without a fallback: {answer}")
    return data, fallbacks, errors, time.monotonic() - started


def cached_latencies(stub: SidecarServiceStub, samples: int, threads: int = 4) -> list[float]:
    """`samples` reads of the cached customer "hot" from `threads` threads; seconds each."""
    per_thread = samples // threads
    results: list[list[float]] = [[] for _ in range(threads)]

    def sample(into: list[float]) -> None:
        for _ in range(per_thread):
            t0 = time.perf_counter()
            answer = read(stub, "hot", 2.0)
            into.append(time.perf_counter() - t0)
            if answer.is_fallback:
                raise BenchError("the cached customer answered a fallback")

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(sample, r) for r in results]:
            f.result(120)
    return [x for r in results for x in r]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000 if len(values) > 1 else values[0] * 1000


def bench(children: Children, args: argparse.Namespace) -> int:
    customers = {f"cold{i}": SSO for i in range(args.cold)}
    customers.update({f"storm{i}": SSO for i in range(args.storm)})
    customers.update({f"down{i}": SSO for i in range(51)})
    customers["hot"] = HOT
    data_path = children.path("data.json")
    write_emulator_data(data_path, customers)
    _, url = start_emulator(children, data_path, cpu=1)
    sidecar = start_sidecar(children, cpu=0, api_url=url)
    print(f"sidecar pid {sidecar.child.pid} (core 0), emulator and clients on core 1", flush=True)
    channel = grpc.insecure_channel(sidecar.target)
    stub = SidecarServiceStub(channel)
    if read(stub, "hot").is_fallback:
        raise BenchError("the warm-up read answered a fallback")

    data, fallbacks, errors, seconds = concurrent_reads(stub, [f"cold{i}" for i in range(args.cold)])
    print(f"1. burst: {args.cold} concurrent cold reads, healthy Stigg: {data} data, {fallbacks} fallbacks, "
          f"{errors} errors, last answer after {seconds:.2f}s")

    unloaded = cached_latencies(stub, args.samples)
    print(f"2. cached reads unloaded: p50 {pct(unloaded, 50):.2f} ms, p99 {pct(unloaded, 99):.2f} ms ({len(unloaded)} reads)")

    faults(url, latency_ms=args.latency_ms)
    storm_result: list[tuple[int, int, int, float]] = []
    storm = threading.Thread(target=lambda: storm_result.append(
        concurrent_reads(stub, [f"storm{i}" for i in range(args.storm)])))
    storm.start()
    time.sleep(0.2)  # the storm's reads are in flight (Stigg holds each for --latency-ms)
    usage = pb.ReportUsageRequest(customer_id="hot", feature_id="api-calls", value=1)
    writes = [stub.ReportUsage.future(usage, timeout=DEADLINE) for _ in range(8)]
    during = cached_latencies(stub, args.samples)
    written = 0
    write_errors = []
    for w in writes:
        try:
            w.result(DEADLINE + 5)
            written += 1
        except grpc.RpcError as e:
            write_errors.append(f"{e.code().name}: {e.details()}")
    storm.join(DEADLINE + 10)
    if not storm_result:
        raise BenchError("the storm did not finish")
    data, fallbacks, errors, seconds = storm_result[0]
    print(f"3. storm: {args.storm} cold reads on a {args.latency_ms} ms Stigg: {data} data, {fallbacks} fallbacks, "
          f"{errors} errors, last after {seconds:.2f}s")
    print(f"   cached reads during it: p50 {pct(during, 50):.2f} ms, p99 {pct(during, 99):.2f} ms "
          f"({pct(during, 99) / pct(unloaded, 99):.2f}x unloaded p99)")
    print(f"   ReportUsage during it: {written} of {len(writes)} succeeded" + (f" ({write_errors[0]})" if write_errors else ""))

    faults(url, latency_ms=0, down=True)
    t0 = time.perf_counter()
    first = read(stub, "down50")
    print(f"4. Stigg down: the first cold read answered {'a fallback' if first.is_fallback else 'data'} "
          f"after {(time.perf_counter() - t0) * 1000:.0f} ms (its retries open the breaker)")
    latencies, fell_back = [], 0
    for i in range(50):
        t0 = time.perf_counter()
        answer = read(stub, f"down{i}")
        latencies.append(time.perf_counter() - t0)
        fell_back += answer.is_fallback
    print(f"   50 cold reads with the breaker open: p50 {pct(latencies, 50):.2f} ms, p99 {pct(latencies, 99):.2f} ms, "
          f"{fell_back} fallbacks")
    for name, value in sorted(metrics(sidecar.http_port).items()):
        print(f"   {name} {value:g}")
    faults(url, down=False)
    channel.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold", type=int, default=256, help="concurrent cold reads in the burst")
    parser.add_argument("--storm", type=int, default=64, help="concurrent cold reads in the storm")
    parser.add_argument("--latency-ms", type=int, default=3000, help="Stigg's latency during the storm")
    parser.add_argument("--samples", type=int, default=2000, help="cached reads sampled per phase")
    args = parser.parse_args()
    return run_with_children(bench, args)


if __name__ == "__main__":
    sys.exit(exit_status(main))
