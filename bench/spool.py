"""Spooled vs direct writes: acknowledged ReportUsage per second, acknowledgement latency (p50,
p99), and the upstream calls Stigg receives per 1,000 writes, with Stigg 100 ms away.

    python -m bench.spool [--seconds 10] [--concurrency 16] [--latency-ms 100]

For each mode it starts the emulator (with `latency_ms` injected) and a sidecar as real
processes, runs `--concurrency` client threads calling ReportUsage in a loop for `--seconds`,
then (spooled) waits until the spool is empty. It checks that Stigg counted every acknowledged
write exactly once (the emulator's usage log against the acknowledged idempotency keys) and
reports the emulator's ReportUsage + ReportUsageBulk request count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from collections import Counter

import grpc

from bench.harness import (
    BenchError,
    Children,
    run_with_children,
    start_emulator,
    start_sidecar,
    wait_until,
    write_emulator_data,
)
from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

CUSTOMERS = 20
FEATURE = "feature-api-calls"


def admin(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/_emulator/{path}", data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def metric(http_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise BenchError(f"no metric {name}")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def load(target: str, seconds: float, concurrency: int) -> tuple[list[float], list[str], Counter]:
    """Client threads writing for `seconds`: latencies of acknowledged writes, their measurement
    ids, and failures by status code."""
    latencies: list[float] = []
    acked: list[str] = []
    failures: Counter = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(n: int) -> None:
        channel = grpc.insecure_channel(target)
        stub = SidecarServiceStub(channel)
        i = 0
        mine: list[tuple[float, str]] = []
        errors: Counter = Counter()
        while time.monotonic() < stop_at:
            request = pb.ReportUsageRequest(customer_id=f"bench-customer-{(n + i) % CUSTOMERS}", feature_id=FEATURE,
                                            value=1)
            i += 1
            started = time.perf_counter()
            try:
                ack = stub.ReportUsage(request, timeout=10)
            except grpc.RpcError as e:
                errors[e.code().name] += 1
                continue
            mine.append((time.perf_counter() - started, ack.measurement_id))
        channel.close()
        with lock:
            latencies.extend(t for t, _ in mine)
            acked.extend(m for _, m in mine)
            failures.update(errors)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return latencies, acked, failures


def measure(children: Children, mode: str, args: argparse.Namespace) -> dict:
    data_path = children.path(f"emulator-{mode}.json")
    customers = {f"bench-customer-{i}": [{"isGranted": True, "usageLimit": 10**9, "currentUsage": 0,
                                          "feature": {"refId": FEATURE, "featureType": "NUMBER",
                                                      "meterType": "Incremental"}}] for i in range(CUSTOMERS)}
    write_emulator_data(data_path, customers)
    emulator, url = start_emulator(children, data_path, cpu=None)
    extra = {"GRPC_MAX_WORKERS": "16"}
    if mode == "spooled":
        extra.update(STATE_DIR=str(children.path(f"state-{mode}")), SPOOL_WRITES="1")
    sidecar = start_sidecar(children, cpu=None, api_url=url, extra_env=extra)
    admin(url, "faults", {"latency_ms": args.latency_ms})
    admin(url, "requests/reset", {})

    started = time.monotonic()
    latencies, acked, failures = load(sidecar.target, args.seconds, args.concurrency)
    elapsed = time.monotonic() - started
    if mode == "spooled":
        wait_until(lambda: metric(sidecar.http_port, "sidecar_spool_records") == 0, 120,
                   "waiting for the spool to drain", sidecar.child)
    counts = admin(url, "requests")
    calls = counts.get("ReportUsage", 0) + counts.get("ReportUsageBulk", 0)
    logged = Counter(u["idempotencyKey"] for u in admin(url, "usage"))
    if mode == "spooled":
        missing = [m for m in acked if m not in logged]
        twice = [k for k, n in logged.items() if n > 1]
        if missing or twice:
            raise BenchError(f"{len(missing)} acknowledged writes not delivered, {len(twice)} delivered twice")
    elif len(logged) < len(acked):
        raise BenchError(f"Stigg logged {len(logged)} writes, {len(acked)} were acknowledged")
    sidecar.child.stop()
    emulator.stop()
    return {
        "mode": mode,
        "acked": len(acked),
        "per_second": len(acked) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "mean_ms": (statistics.fmean(latencies) * 1000) if latencies else float("nan"),
        "failures": dict(failures),
        "calls": calls,
        "calls_per_1000": calls * 1000 / max(1, len(acked)),
    }


def bench(children: Children, args: argparse.Namespace) -> int:
    results = [measure(children, mode, args) for mode in ("direct", "spooled")]
    print(f"\nReportUsage, {args.concurrency} client threads for {args.seconds:.0f}s, Stigg latency {args.latency_ms} ms")
    print(f"{'mode':<8} {'acked':>7} {'acked/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'upstream calls':>15} "
          f"{'calls/1000 writes':>18}  failures")
    for r in results:
        print(f"{r['mode']:<8} {r['acked']:>7} {r['per_second']:>9.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['calls']:>15} {r['calls_per_1000']:>18.1f}  {r['failures'] or '-'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=int, default=100)
    return run_with_children(bench, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
