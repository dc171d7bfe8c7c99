"""Cold-fill benchmark: customers fetched and cached per second at 64 concurrent cold reads, the
sidecar beside Stigg's Node SDK, from a fast upstream.

    python -m bench.cold_fill [--customers 10000] [--concurrency 64] [--repeat 3] [--no-node]

The upstream is bench/node/upstream.js serving the emulator's own answers (computed here by the
emulator's code from a generated data file of --customers customers of ten features) from memory,
pinned to core 1 with this script; the emulator itself, Python on one core, would be slower than
the servers it feeds and measure itself. For each repeat, a fresh sidecar (`twistd stigg-sidecar`,
its cache budget far above the customers' needs, POLL_INTERVAL_SECS=0) and then a fresh Node
reference (bench/node/server.js: `@stigg/node-server-sdk` 3.95.0 with its in-memory cache and
real-time updates, behind grpc-js), each pinned to core 0, get one GetBooleanEntitlement per
customer, every customer cold, --concurrency of them in flight at once. Each answer must be Stigg's
data (granted) or a fallback, which is counted; any error or wrong answer aborts.

Prints per server and repeat: the seconds from the first read to the last answer, the answers from
Stigg's data and the fallbacks; the customers the server holds in its cache (the sidecar's
sidecar_cache_entries, the SDK's own entry count, polled every 0.25 s: a server that answered
fallbacks may still be fetching) and the seconds from the first read until it held them all (or
held no more for 15 s); the fill rate (cached / those seconds), the upstream's fetches, and the
CPU use of the server and of the upstream over the fill (an upstream near 100% would mean it is
the limit), and the rate per CPU-second of the server (steadier on a shared machine). Then the
median rates of each and sidecar / Node. Benchmarks are run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from twisted.internet.task import Clock

from bench.harness import (
    API_KEY,
    Children,
    Reads,
    cpu_seconds,
    ensure_node_reference,
    metrics,
    rss_kib,
    run_with_children,
    start_fast_upstream,
    start_node_reference,
    start_sidecar,
    write_emulator_data,
)
from bench.seed import customer_id, entitlements
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from stigg_sidecar.emulator.data import load_data_file
from stigg_sidecar.emulator.graphql import SDK_CONFIGURATION
from stigg_sidecar.emulator.state import EmulatorState

SERVER_CPU = 0  # the sidecar and the Node reference
LOAD_CPU = 1  # the upstream and this script
CACHE_BUDGET = 16 << 30
CALL_TIMEOUT = 30.0
STATS_TIMEOUT = 60.0  # a server busy filling its cache may answer its stats slowly
POLL_INTERVAL = 0.25
STALLED = 15.0  # seconds without a new cached customer after the last answer: the fill is over


# -- the upstream's answers -------------------------------------------------------------------


def record_answers(data_path: Path, customers: int, out: Path) -> None:
    """The emulator's Edge answers for every customer (what `stigg-emulator` would serve for this
    data file), written for bench/node/upstream.js."""
    clock = Clock()
    clock.advance(time.time())
    state = EmulatorState(load_data_file(str(data_path)), clock=clock)
    responses: dict[str, object] = {
        "/v1/config/server-sdk-configuration.json": {"data": {"sdkConfiguration": dict(SDK_CONFIGURATION)}}
    }
    for i in range(customers):
        cid = customer_id(i)
        # Stigg's sidecar and this one read entitlements-state.json; Node SDK 3.95 entitlements.json.
        responses[f"/v1/c/{cid}/entitlements-state.json"] = {"data": {"entitlementsState": state.entitlements_state(cid)}}
        responses[f"/v1/c/{cid}/entitlements.json"] = {"data": {"entitlements": state.entitlements_v1(cid)}}
    with open(out, "w") as f:
        json.dump({"apiKey": API_KEY, "responses": responses}, f, separators=(",", ":"))


def sidecar_fetch_outcomes(http_port: int) -> str:
    """The sidecar's customer fetches by outcome, from its /metrics: "ok 9000, timeout 1000"."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=STATS_TIMEOUT) as r:
        text = r.read().decode()
    outcomes: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sidecar_upstream_request_duration_seconds_count{") and "/v1/c/" in line:
            labels, value = line.rsplit(" ", 1)
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            outcomes[outcome] = outcomes.get(outcome, 0) + float(value)
    return ", ".join(f"{name} {count:.0f}" for name, count in sorted(outcomes.items()))


def upstream_fetches(base_url: str) -> int:
    """Customer answers the upstream has served so far (both Edge paths)."""
    with urllib.request.urlopen(f"{base_url}/_upstream/requests", timeout=10) as r:
        counts = json.loads(r.read())
    return sum(n for kind, n in counts.items() if kind.startswith("/v1/c/"))


# -- the cold reads ---------------------------------------------------------------------------


def wait_cached(cached: Callable[[], int], customers: int, started: float, deadline: float) -> tuple[int, float]:
    """(customers cached, seconds from `started` until that many were): polls until every customer
    is cached, or none was added for STALLED seconds, or `deadline`. A server that answered
    fallbacks may still be fetching after its last answer."""
    count, when, last_growth = 0, time.monotonic(), time.monotonic()
    while True:
        now_count = cached()
        now = time.monotonic()
        if now_count != count:
            count, when, last_growth = now_count, now, now
        if count >= customers or now - last_growth > STALLED or now > deadline:
            return count, when - started
        time.sleep(POLL_INTERVAL)


@dataclass
class Fill:
    server: str
    answered: float  # seconds from the first read to the last answer
    seconds: float  # seconds from the first read until the cache held `cached` customers
    granted: int
    fallbacks: int
    cached: int
    fetches: int
    server_cpu: float  # percent of one core over the fill
    upstream_cpu: float
    rss_kib: int

    @property
    def rate(self) -> float:
        """Customers fetched and cached per second."""
        return self.cached / self.seconds

    @property
    def per_cpu_second(self) -> float:
        """Customers fetched and cached per CPU-second of the server: steadier on a shared machine."""
        return self.rate / max(self.server_cpu / 100, 1e-9)


def fill(
    server: str,
    pid: int,
    target: str,
    cached: Callable[[], int],
    upstream_pid: int,
    upstream_url: str,
    args: argparse.Namespace,
) -> Fill:
    channel = grpc.insecure_channel(target)
    try:
        reads = Reads(SidecarServiceStub(channel), args.concurrency, CALL_TIMEOUT)
        fetched_before = upstream_fetches(upstream_url)
        cpu_before, upstream_before, wall_before = cpu_seconds(pid), cpu_seconds(upstream_pid), time.monotonic()
        answered = reads.run(0, args.customers, args.timeout, "the cold reads")
        held, seconds = wait_cached(cached, args.customers, reads.started, reads.started + args.timeout)
        wall = time.monotonic() - wall_before
        server_cpu = 100 * (cpu_seconds(pid) - cpu_before) / wall
        upstream_cpu = 100 * (cpu_seconds(upstream_pid) - upstream_before) / wall
        return Fill(
            server,
            answered,
            seconds,
            reads.granted,
            reads.fallbacks,
            held,
            upstream_fetches(upstream_url) - fetched_before,
            server_cpu,
            upstream_cpu,
            rss_kib(pid),
        )
    finally:
        channel.close()


def show(f: Fill, customers: int) -> None:
    print(
        f"  {f.server:<8} answered in {f.answered:6.2f}s: {f.granted:>6} granted {f.fallbacks:>6} fallbacks; "
        f"{f.cached:>6} cached in {f.seconds:6.2f}s, {f.rate:5.0f}/s; {f.fetches:>6} fetches  "
        f"cpu {f.server_cpu:3.0f}% (upstream {f.upstream_cpu:3.0f}%), {f.per_cpu_second:5.0f}/cpu-s  "
        f"RSS {f.rss_kib / 1024:.0f} MiB",
        flush=True,
    )
    if f.cached < customers:
        print(f"  warning: {f.server} holds {f.cached} of the {customers} customers it was asked for")


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=10_000, help="cold customers per fill (default 10000)")
    parser.add_argument("--concurrency", type=int, default=64, help="cold reads in flight (default 64)")
    parser.add_argument("--repeat", type=int, default=1, help="fills per server on fresh servers, alternating (default 1)")
    parser.add_argument("--timeout", type=float, default=600, help="bound on each fill, seconds (default 600)")
    parser.add_argument(
        "--no-node", action="store_true", help="leave out the Node reference (Stigg's Node SDK behind grpc-js)"
    )
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("cold_fill: needs cores 0 and 1 (servers on one, upstream and reads on the other)")
    os.sched_setaffinity(0, {LOAD_CPU})
    return run_with_children(bench, args)


def bench(children: Children, args: argparse.Namespace) -> int:
    ensure_node_reference()  # the upstream is Node too
    data = children.path("emulator-data.json")
    write_emulator_data(data, {customer_id(i): entitlements(i) for i in range(args.customers)})
    answers = children.path("upstream-answers.json")
    record_answers(data, args.customers, answers)
    upstream, upstream_url = start_fast_upstream(children, LOAD_CPU, answers)
    print(f"fast upstream pid {upstream.pid} on core {LOAD_CPU}, {upstream_url}: the emulator's answers for {args.customers} customers")
    print(
        f"{args.customers} cold customers per fill, {args.concurrency} reads in flight; servers on core {SERVER_CPU}\n"
        "cached: customers in the server's cache afterwards; /s: cached per second of the fill; fetches: the\n"
        "upstream's customer answers; cpu: of the server over the fill (100 = its core), and of the upstream"
    )
    fills: dict[str, list[Fill]] = {"sidecar": [], "node": []}
    for attempt in range(args.repeat):
        print(f"== fill {attempt + 1} of {args.repeat}")
        sidecar = start_sidecar(
            children,
            SERVER_CPU,
            upstream_url,
            {"SHUTDOWN_GRACE_SECS": "1", "CACHE_MAX_SIZE_BYTES": str(CACHE_BUDGET), "POLL_INTERVAL_SECS": "0"},
        )
        f = fill(
            "sidecar",
            sidecar.child.pid,
            sidecar.target,
            lambda port=sidecar.http_port: int(metrics(port, STATS_TIMEOUT).get("sidecar_cache_entries", 0)),
            upstream.pid,
            upstream_url,
            args,
        )
        show(f, args.customers)
        print(f"  sidecar's fetches by outcome: {sidecar_fetch_outcomes(sidecar.http_port)}")
        fills["sidecar"].append(f)
        sidecar.child.stop()
        if args.no_node:
            continue
        node = start_node_reference(children, SERVER_CPU, upstream_url, {"CACHE_MAX_SIZE_BYTES": str(CACHE_BUDGET)})
        f = fill(
            "node",
            node.child.pid,
            node.target,
            lambda node=node: int(node.stats(STATS_TIMEOUT)["cacheEntries"]),
            upstream.pid,
            upstream_url,
            args,
        )
        show(f, args.customers)
        fills["node"].append(f)
        node.child.stop()

    print(f"\n== median of {args.repeat}: customers fetched and cached per second at {args.concurrency} cold reads")
    medians = {name: statistics.median(f.rate for f in runs) for name, runs in fills.items() if runs}
    per_cpu = {name: statistics.median(f.per_cpu_second for f in runs) for name, runs in fills.items() if runs}
    for name, rate in medians.items():
        rates = ", ".join(f"{f.rate:.0f}" for f in fills[name])
        fallbacks = sum(f.fallbacks for f in fills[name])
        print(
            f"  {name:<8} {rate:7.0f}/s, {per_cpu[name]:5.0f} per CPU-second  "
            f"(fills: {rates}; {fallbacks} fallbacks in all)"
        )
    if "node" in medians:
        print(
            f"  sidecar / Node {medians['sidecar'] / medians['node']:.2f} per second, "
            f"{per_cpu['sidecar'] / per_cpu['node']:.2f} per CPU-second"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
