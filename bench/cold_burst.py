"""Memory of a cold burst against a steady warm-up: the sidecar's RSS after caching the same
customers at different read concurrencies.

    python -m bench.cold_burst [--customers 20000] [--concurrency 4,32] [--sidecar-env K=V ...]

For each concurrency, on a fresh sidecar (pinned to core 0) against one emulator (core 1): one
GetBooleanEntitlement per customer, all cold, `--concurrency` in flight; answers that are
fallbacks are counted, not refused (with a small MAX_WAITING_READS a burst answers some at once
and fetches those customers in the background). Then waits until the cache stops growing, and
prints RSS ready, at its peak during the burst (sampled every 0.1 s), and settled after it, the
cache's entries, the fallbacks and the sidecar's threads (with `--idle-wait`, RSS and threads
again after that long idle). A burst should cost no more than a steady warm-up.
"""

from __future__ import annotations

import argparse
import sys
import threading
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
SETTLE = 2.0


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def measure(children: Children, api_url: str, args: argparse.Namespace, concurrency: int) -> None:
    env = {"SHUTDOWN_GRACE_SECS": "1", "CACHE_MAX_SIZE_BYTES": str(16 << 30), "POLL_INTERVAL_SECS": "0"}
    env.update(dict(item.split("=", 1) for item in args.sidecar_env))
    sidecar = start_sidecar(children, SIDECAR_CPU, api_url, env)
    time.sleep(SETTLE)
    ready = rss_kib(sidecar.child.pid)
    peak = [ready]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.1):
            peak[0] = max(peak[0], rss_kib(sidecar.child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    channel = grpc.insecure_channel(sidecar.target)
    started = time.monotonic()
    reads = Reads(SidecarServiceStub(channel), concurrency, 30, rpc_errors_wrong=False)
    reads.run(0, args.customers, args.timeout, "the burst")
    fallbacks, errors = reads.fallbacks, reads.rpc_errors
    elapsed = time.monotonic() - started
    # Background fetches (of reads that answered fallbacks) may still land: wait for the cache
    # to stop growing.
    last, still = -1.0, 0
    while still < 3:
        time.sleep(1)
        entries = metrics(sidecar.http_port).get("sidecar_cache_entries", 0.0)
        still = still + 1 if entries == last else 0
        last = entries
    sampling.set()
    sampler.join(5)
    channel.close()
    time.sleep(SETTLE)
    after = rss_kib(sidecar.child.pid)
    threads = thread_count(sidecar.child.pid)
    idle = ""
    if args.idle_wait:
        time.sleep(args.idle_wait)
        idle = f" {rss_kib(sidecar.child.pid) / 1024:>8.1f} {thread_count(sidecar.child.pid):>7}"
    print(
        f"{concurrency:>11} {elapsed:>7.1f} {fallbacks:>9} {errors:>6} {last:>8.0f} {ready / 1024:>9.1f} "
        f"{max(peak[0], after) / 1024:>8.1f} {after / 1024:>9.1f} {(after - ready) / args.customers:>8.2f} "
        f"{threads:>7}{idle}",
        flush=True,
    )
    sidecar.child.stop()


def bench(children: Children, args: argparse.Namespace) -> int:
    data = children.path("emulator-data.json")
    write_emulator_data(data, {customer_id(i): entitlements(i) for i in range(args.customers)})
    _, api_url = start_emulator(children, data, cpu=EMULATOR_CPU, timeout=600)
    print(f"{args.customers} cold customers of ten features; sidecar env {args.sidecar_env or '(defaults)'}")
    print(
        f"{'concurrency':>11} {'burst s':>7} {'fallbacks':>9} {'errors':>6} {'entries':>8} {'ready MiB':>9} "
        f"{'peak MiB':>8} {'after MiB':>9} {'KiB/cust':>8} {'threads':>7}"
        + (f" {'idle MiB':>8} {'threads':>7}" if args.idle_wait else "")
    )
    for concurrency in args.concurrency:
        measure(children, api_url, args, concurrency)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument(
        "--concurrency", type=lambda t: [int(x) for x in t.split(",") if x], default=[4, 32],
        help="reads in flight, comma-separated, each on a fresh sidecar (default 4,32)",
    )
    parser.add_argument("--sidecar-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument(
        "--idle-wait", type=float, default=0,
        help="seconds to stay idle after the burst before reading RSS and threads again (spare handler "
        "threads exit after a minute idle)",
    )
    return run_with_children(bench, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
