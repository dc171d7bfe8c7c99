"""Does the sidecar leak through the garbage collector? Frozen objects and RSS of a real sidecar
through passes of eviction churn, usage reports and an outage of Stigg.

    python -m bench.gc_leak [--customers 4000] [--cache-entries 1000] [--passes 6]

An object the collector never walks (frozen by `gc.freeze()`, or untracked) that ends up inside a
reference cycle is never freed. `stigg_sidecar.lifecycle.gcpolicy` freezes the heap once at start and
untracks only cache records, which never form cycles; its first version froze the survivors of
every full collection, and with them whatever was in flight (a fetch's HTTP client objects, a
handler's frames and gRPC call during an outage). This runs the real thing to show which:

1. The emulator (core 1) with --customers customers of ten features (bench/seed.py), and a sidecar
   (core 0) whose cache holds about --cache-entries of them (CACHE_MAX_SIZE_BYTES from the
   per-entry size a first, short-lived sidecar measures), POLL_INTERVAL_SECS=0.
2. Each pass reads every customer once, 64 calls in flight on one channel (almost every read a
   miss, as the cache holds a quarter of them: each pass fetches, stores and evicts every
   customer), and reports usage for every tenth customer (ReportUsage, direct to the emulator).
3. On pass --outage-pass the emulator is stopped (SIGSTOP: Stigg's calls hang until the caller's
   deadline) for the first half of the reads, which answer fallbacks and open the breaker, and
   the usage reports fail; then it is resumed (SIGCONT) and the pass ends as the others.
4. After each pass: frozen objects (`sidecar_gc_frozen_objects`), cache entries, RSS.

A leak shows as frozen objects or RSS growing pass after pass while the cache's size stays the
same. Any read answered with an error aborts the run: with the first policy, gRPC calls leaked in
the outage kept their HTTP/2 streams allocated until grpc-core refused every new stream on the
connection (RST_STREAM REFUSED_STREAM, UNAVAILABLE to the client). Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import grpc

from bench.harness import (
    Children,
    Reads,
    metrics,
    rss_kib,
    run_with_children,
    start_emulator,
    start_sidecar,
    write_emulator_data,
)
from bench.seed import customer_id, entitlements
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

SIDECAR_CPU = 0
EMULATOR_CPU = 1
CONCURRENCY = 64
READ_TIMEOUT = 3.0  # the caller's deadline: in the outage, reads answer the fallback before it
PASS_TIMEOUT = 600.0


def bench(children: Children, args: argparse.Namespace) -> int:
    data = children.path("data.json")
    write_emulator_data(data, {customer_id(i): entitlements(i) for i in range(args.customers)})
    emulator, api_url = start_emulator(children, data, cpu=EMULATOR_CPU, timeout=300)

    # The first sidecar measures what an entry costs, so the second's budget holds --cache-entries.
    probe = start_sidecar(children, SIDECAR_CPU, api_url, {"POLL_INTERVAL_SECS": "0", "SHUTDOWN_GRACE_SECS": "1"})
    with grpc.insecure_channel(probe.target) as channel:
        Reads(SidecarServiceStub(channel), CONCURRENCY, READ_TIMEOUT, report_every=10).run(0, 200, PASS_TIMEOUT, "a pass")
    sample = metrics(probe.http_port)
    per_entry = sample["sidecar_cache_bytes"] / max(1.0, sample["sidecar_cache_entries"])
    probe.child.stop()
    budget = int(per_entry * args.cache_entries)

    sidecar = start_sidecar(children, SIDECAR_CPU, api_url, {
        "POLL_INTERVAL_SECS": "0",
        "SHUTDOWN_GRACE_SECS": "1",
        "CACHE_MAX_SIZE_BYTES": str(budget),
    })
    print(f"sidecar pid {sidecar.child.pid} on core {SIDECAR_CPU}; cache budget {budget:,} bytes "
          f"(~{args.cache_entries:,} entries of {per_entry:,.0f} bytes); {args.customers:,} customers; "
          f"emulator pid {emulator.pid} on core {EMULATOR_CPU}")
    print(f"{'pass':>4} {'granted':>8} {'fallbacks':>9} {'reports ok/failed':>17} {'cache':>6} "
          f"{'frozen':>10} {'frozen/entry':>12} {'RSS MiB':>8}")
    rows = []
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = SidecarServiceStub(channel)
        for n in range(1, args.passes + 1):
            run = Reads(stub, CONCURRENCY, READ_TIMEOUT, report_every=10)
            deadline = time.monotonic() + PASS_TIMEOUT
            if n == args.outage_pass:
                half = args.customers // 2
                os.kill(emulator.pid, signal.SIGSTOP)
                try:
                    run.run(0, half, deadline - time.monotonic(), "a pass")
                finally:
                    os.kill(emulator.pid, signal.SIGCONT)
                run.run(half, args.customers, deadline - time.monotonic(), "a pass")
            else:
                run.run(0, args.customers, deadline - time.monotonic(), "a pass")
            time.sleep(1.0)  # in-flight background fetches settle
            m = metrics(sidecar.http_port)
            frozen, entries = m["sidecar_gc_frozen_objects"], m["sidecar_cache_entries"]
            rows.append((frozen, rss_kib(sidecar.child.pid) / 1024))
            label = f"{n}{'*' if n == args.outage_pass else ''}"
            print(f"{label:>4} {run.granted:>8,} {run.fallbacks:>9,} {f'{run.reported:,}/{run.report_errors:,}':>17} "
                  f"{entries:>6,.0f} {frozen:>10,.0f} {frozen / max(1.0, entries):>12.1f} "
                  f"{rows[-1][1]:>8.1f}", flush=True)
    after_outage = rows[args.outage_pass:] if args.outage_pass < len(rows) else []
    print("* the outage pass (emulator stopped for the first half of its reads)")
    if len(after_outage) >= 2:
        (frozen_first, rss_first), (frozen_last, rss_last) = after_outage[0], after_outage[-1]
        passes = len(after_outage) - 1
        print(f"after the outage, per pass of {args.customers:,} reads: frozen objects "
              f"{(frozen_last - frozen_first) / passes:+,.0f} ({frozen_first:,.0f} -> {frozen_last:,.0f}), "
              f"RSS {(rss_last - rss_first) / passes:+.2f} MiB ({rss_first:.1f} -> {rss_last:.1f})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=4000)
    parser.add_argument("--cache-entries", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--outage-pass", type=int, default=3, help="the pass run with Stigg stopped half-way")
    args = parser.parse_args()
    if not 1 <= args.outage_pass <= args.passes or args.cache_entries >= args.customers:
        parser.error("--outage-pass must be one of the passes, and --cache-entries below --customers")
    return run_with_children(bench, args)


if __name__ == "__main__":
    sys.exit(main())
