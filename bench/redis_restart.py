"""Redis restart benchmark: failed reads while Redis dies, and restart -> first Redis-served read.

    python -m bench.redis_restart [--trials 5] [--down-secs 3] [--api-fault down|http400]
                                  [--cached 20] [--load-interval-ms 2] [--no-pin]

Starts a real redis-server (tests/fixtures/redis.py, with an append-only file fsynced on every
write so that what the sidecars wrote survives `kill -9`), the emulator, and two sidecars with
the same REDIS_ENVIRONMENT_PREFIX and WS_ENABLED=0: A, measured, and B, a peer that puts
customers into Redis that A has never read. Warms --cached customers through A. Then per trial:

1. B reads customer Z (new each trial): Z is in Redis (checked), never read by A.
2. A load thread reads A (GetMeteredEntitlement, alternating a cached customer and one A has
   never read), counting failed reads (a gRPC error, or an `is_fallback` answer) per phase.
3. `kill -9` redis-server; the load goes on for --down-secs (phase "redis down").
4. The emulator's fault --api-fault is switched on (`down`: connections dropped, as Stigg
   unreachable; `http400`: every call answered 400, which fails at once without retries), so
   that only Redis can answer Z; the load reads cached customers only from here on.
5. A prober starts asking A for Z every --probe-interval-ms, and redis-server is started again
   on the same port (phase "restart"). The first non-fallback answer for Z, carrying Z's own
   usage, is the first read served from Redis. The load runs on for a second (phase "after"),
   then the fault is cleared.

Prints per trial: reads and failed reads per phase, time from the restart (the redis-server
spawn) to redis answering PING, to A's command link reconnecting (its JSON log line "reachable
again") and to the first Redis-served read of Z; then min/median/max over the trials, and
`sidecar_redis_client_errors_total` from A's /metrics before and after each trial. The sidecars
are pinned to core 0, everything else to core 1 (--no-pin to leave scheduling alone).
Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc

from bench.harness import (
    BenchError,
    Children,
    exit_status,
    start_emulator,
    start_sidecar,
    wait_until,
    write_emulator_data,
)
from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from stigg_sidecar.cache.redis.format import EntryKeys
from tests.fixtures.redis import RedisServer

REPO = Path(__file__).resolve().parent.parent

SIDECAR_CPU = 0
OTHER_CPU = 1
PREFIX = "bench-restart"
FEATURE = "feature-api-calls"
CALL_TIMEOUT = 5.0
SLOW = 0.05  # a load read slower than this is listed with its time
FAULTS = {"down": ({"down": True}, {"down": False}), "http400": ({"error_status": 400}, {"error_status": 0})}


def cached_id(i: int) -> str:
    return f"rr-cached-{i}"


def uncached_id(i: int) -> str:
    return f"rr-uncached-{i}"


def peer_id(t: int) -> str:
    return f"rr-peer-{t}"


def entitlements(usage: float) -> list[dict]:
    """A metered feature whose usage tells the customer apart, and a boolean."""
    return [
        {
            "isGranted": True,
            "usageLimit": 100000,
            "currentUsage": usage,
            "feature": {
                "refId": FEATURE,
                "displayName": "API calls",
                "featureType": "NUMBER",
                "meterType": "Incremental",
            },
        },
        {
            "isGranted": True,
            "feature": {"refId": "feature-sso", "displayName": "SSO", "featureType": "BOOLEAN", "meterType": "None"},
        },
    ]


def usage_of(customer: str) -> float:
    """Each customer's distinct usage (stable, from its id)."""
    kind, n = customer.rsplit("-", 1)
    base = {"rr-cached": 10000, "rr-uncached": 20000, "rr-peer": 90000}[kind]
    return float(base + int(n))


def metered(customer: str) -> pb.GetMeteredEntitlementRequest:
    return pb.GetMeteredEntitlementRequest(customer_id=customer, feature_id=FEATURE)


def served_from_data(r: pb.GetMeteredEntitlementResponse, customer: str) -> bool:
    return not r.is_fallback and r.entitlement.current_usage == usage_of(customer)


# -- HTTP helpers -----------------------------------------------------------------------------


def http_json(verb: str, url: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=verb, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as r:
        return json.loads(r.read())


def redis_errors_metric(http_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("sidecar_redis_client_errors_total "):
                return float(line.split()[1])
    raise BenchError("no sidecar_redis_client_errors_total in /metrics")


def reconnects_after(log_path: Path, since: float) -> float | None:
    """Wall-clock time of A's first 'reachable again' line logged after `since` (JSON log)."""
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        stamp = record.get("timestamp")
        if isinstance(stamp, (int, float)) and stamp >= since and "reachable again" in str(record.get("message")):
            return float(stamp)
    return None


# -- load and probe ---------------------------------------------------------------------------


class Load(threading.Thread):
    """Reads A in a loop: a cached customer, then (while `uncached` is set) one A never read."""

    def __init__(self, stub: SidecarServiceStub, cached: list[str], pool: list[str], interval: float) -> None:
        super().__init__(daemon=True)
        self.stub = stub
        self.cached = cached
        self.pool = pool
        self.next_uncached = 0
        self.interval = interval
        self.phase = "before"
        self.uncached = True
        self.stop_event = threading.Event()
        # (phase, kind) -> [reads, grpc errors, fallbacks, max seconds]
        self.counts: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
        self.failures: list[str] = []
        self.slow: list[tuple[float, str, str, float]] = []  # (wall clock at start, phase, kind, seconds)
        self.exhausted = False
        self.rng = random.Random(7)
        self.started_calls = 0  # calls begun so far

    def cached_only(self) -> None:
        """Read cached customers only from now on; returns once no uncached read is in flight,
        so that a fault switched on next meets none."""
        self.uncached = False
        seen = self.started_calls
        deadline = time.monotonic() + CALL_TIMEOUT + 5
        # Two calls begun: the second chose its customer after the flag changed.
        while self.started_calls < seen + 2 and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)

    def run(self) -> None:
        turn = 0
        while not self.stop_event.is_set():
            turn += 1
            kind = "cached"
            if turn % 2 == 0 and self.uncached:
                if self.next_uncached < len(self.pool):
                    kind = "uncached"
                else:
                    self.exhausted = True
            if kind == "cached":
                customer = self.rng.choice(self.cached)
            else:
                customer = self.pool[self.next_uncached]
                self.next_uncached += 1
            phase = self.phase
            self.started_calls += 1
            row = self.counts[(phase, kind)]
            started = time.monotonic()
            wall = time.time()
            try:
                r = self.stub.GetMeteredEntitlement(metered(customer), timeout=CALL_TIMEOUT)
                failure = None if served_from_data(r, customer) else ("fallback" if r.is_fallback else "wrong answer")
            except grpc.RpcError as e:
                failure = f"gRPC {e.code().name}"
            took = time.monotonic() - started
            row[0] += 1
            row[3] = max(row[3], took)
            if took > SLOW and len(self.slow) < 100:
                self.slow.append((wall, phase, kind, took))
            if failure is not None:
                row[1 if failure.startswith("gRPC") else 2] += 1
                if len(self.failures) < 20:
                    self.failures.append(f"{phase}/{kind} {customer}: {failure} after {1000 * took:.0f} ms")
            if self.interval > 0:
                time.sleep(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(CALL_TIMEOUT + 5)


class Prober(threading.Thread):
    """Asks A for `customer` until an answer carries its data; records when it arrived."""

    def __init__(self, stub: SidecarServiceStub, customer: str, interval: float, deadline: float, limit: float) -> None:
        super().__init__(daemon=True)
        self.stub = stub
        self.customer = customer
        self.interval = interval
        self.deadline = deadline  # per call
        self.limit = limit  # overall, seconds
        self.served_at: float | None = None  # wall clock
        self.calls = 0
        self.fallbacks = 0
        self.errors = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        give_up = time.monotonic() + self.limit
        while not self.stop_event.is_set() and time.monotonic() < give_up:
            self.calls += 1
            try:
                r = self.stub.GetMeteredEntitlement(metered(self.customer), timeout=self.deadline)
            except grpc.RpcError:
                self.errors += 1
            else:
                if served_from_data(r, self.customer):
                    self.served_at = time.time()
                    return
                self.fallbacks += 1
            time.sleep(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(self.deadline + 5)


# -- the run ----------------------------------------------------------------------------------


def warm(stub: SidecarServiceStub, customer: str, who: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        r = stub.GetMeteredEntitlement(metered(customer), timeout=CALL_TIMEOUT)
        if served_from_data(r, customer):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{who} did not serve {customer} within 30s; last answer:\n{r}")
        time.sleep(0.1)


def in_redis(redis: RedisServer, customer: str) -> bool:
    return redis.command("EXISTS", EntryKeys(PREFIX, customer).entitlements) == 1


PHASES = ("before", "redis down", "restart", "after")


def run_trial(t: int, args, redis: RedisServer, emulator_url: str, a, b, stub_a, stub_b, load: Load) -> dict:
    z = peer_id(t)
    warm(stub_b, z, "sidecar B")
    wait_until(lambda: in_redis(redis, z), 10, f"waiting for B to write {z} to Redis")
    errors_before = redis_errors_metric(a.http_port)
    load.phase = "before"
    load.uncached = True
    time.sleep(0.5)

    load.phase = "redis down"
    killed = time.monotonic()
    redis.kill9()
    time.sleep(args.down_secs)

    fault_on, fault_off = FAULTS[args.api_fault]
    load.cached_only()  # with Stigg faulted, a never-read customer can only be a fallback
    http_json("POST", f"{emulator_url}/_emulator/faults", fault_on)
    load.phase = "restart"
    prober = Prober(stub_a, z, args.probe_interval_ms / 1000, args.probe_deadline_ms / 1000, args.bound)
    prober.start()
    spawned = time.time()
    spawned_mono = time.monotonic()
    redis.start()
    answering = time.time()
    prober.join(args.bound + 5)
    prober.stop()
    load.phase = "after"
    time.sleep(1.0)
    http_json("POST", f"{emulator_url}/_emulator/faults", fault_off)
    load.phase = "between"
    load.uncached = True
    survived = in_redis(redis, z)
    time.sleep(0.5)  # let a last error or two land in the counter
    errors_after = redis_errors_metric(a.http_port)
    reconnected = reconnects_after(a.child.log_path, spawned - 0.05)
    return {
        "trial": t,
        "spawned": spawned,
        "killed_wall": spawned - (spawned_mono - killed),
        "down_secs": spawned_mono - killed,
        "to_answering": answering - spawned,
        "to_reconnect": None if reconnected is None else reconnected - spawned,
        "to_first_read": None if prober.served_at is None else prober.served_at - spawned,
        "probe": (prober.calls, prober.fallbacks, prober.errors),
        "z_in_redis_after_restart": survived,
        "redis_errors": (errors_before, errors_after),
    }


def fmt_ms(v: float | None) -> str:
    return "   n/a" if v is None else f"{1000 * v:7.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--down-secs", type=float, default=3.0, help="how long redis-server stays dead")
    parser.add_argument(
        "--api-fault",
        choices=sorted(FAULTS),
        default="down",
        help="emulator fault while Redis restarts (default: down)",
    )
    parser.add_argument("--cached", type=int, default=20, help="customers warmed in A before the trials")
    parser.add_argument("--load-interval-ms", type=float, default=2.0, help="pause between two load reads")
    parser.add_argument("--probe-interval-ms", type=float, default=1.0, help="pause between two probes of Z")
    parser.add_argument("--probe-deadline-ms", type=float, default=200.0, help="gRPC deadline of one probe")
    parser.add_argument("--bound", type=float, default=60.0, help="seconds to wait for the first Redis-served read")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--keep-logs", action="store_true", help="keep the child logs")
    args = parser.parse_args()
    if args.trials < 1:
        parser.error("--trials must be at least 1")

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    if not args.no_pin:
        os.sched_setaffinity(0, {OTHER_CPU})  # redis-server inherits it
    sidecar_cpu = None if args.no_pin else SIDECAR_CPU
    # Reads of never-read customers: about one per 2 load intervals for the whole run.
    pool_size = int((args.trials * (args.down_secs + 4) + 10) * 1000 / max(1.0, 2 * args.load_interval_ms + 2)) + 100
    results = []
    with Children() as children:
        children.keep = args.keep_logs
        redis = RedisServer(extra_config=("appendonly yes", "appendfsync always"))
        try:
            redis.start()
            data = children.path("emulator-data.json")
            customers = {}
            for i in range(args.cached):
                customers[cached_id(i)] = entitlements(usage_of(cached_id(i)))
            for i in range(pool_size):
                customers[uncached_id(i)] = entitlements(usage_of(uncached_id(i)))
            for t in range(args.trials):
                customers[peer_id(t)] = entitlements(usage_of(peer_id(t)))
            write_emulator_data(data, customers)
            _, url = start_emulator(children, data, None if args.no_pin else OTHER_CPU)
            common = {
                "REDIS_ENVIRONMENT_PREFIX": PREFIX,
                "REDIS_HOST": "127.0.0.1",
                "REDIS_PORT": str(redis.port),
                "LOG_LEVEL": "info",
            }
            a = start_sidecar(children, sidecar_cpu, url, {**common, "LOG_FORMAT": "json"})
            b = start_sidecar(children, sidecar_cpu, url, common)
            channel_a = grpc.insecure_channel(a.target)
            channel_b = grpc.insecure_channel(b.target)
            stub_a, stub_b = SidecarServiceStub(channel_a), SidecarServiceStub(channel_b)
            cached = [cached_id(i) for i in range(args.cached)]
            for customer in cached:
                warm(stub_a, customer, "sidecar A")
            wait_until(lambda: all(in_redis(redis, c) for c in cached), 10, "waiting for A's customers in Redis")
            print(
                f"redis-server on 127.0.0.1:{redis.port} (AOF, fsync always); sidecar A {a.target}, "
                f"B {b.target}; {args.cached} customers warm in A, {pool_size} never-read ones for the load; "
                f"Redis down {args.down_secs:g}s per trial; Stigg fault while it restarts: {args.api_fault}",
                flush=True,
            )

            load = Load(stub_a, cached, [uncached_id(i) for i in range(pool_size)], args.load_interval_ms / 1000)
            load.start()
            try:
                for t in range(args.trials):
                    result = run_trial(t, args, redis, url, a, b, stub_a, stub_b, load)
                    results.append(result)
                    before, after = result["redis_errors"]
                    print(
                        f"trial {t}: down {result['down_secs']:.2f}s; from restart: PING ok {fmt_ms(result['to_answering'])} ms,"
                        f" A reconnected {fmt_ms(result['to_reconnect'])} ms, first Redis-served read"
                        f" {fmt_ms(result['to_first_read'])} ms (probes {result['probe'][0]}, fallbacks"
                        f" {result['probe'][1]}, errors {result['probe'][2]}); Z in Redis after restart:"
                        f" {result['z_in_redis_after_restart']}; sidecar_redis_client_errors_total {before:g} -> {after:g}",
                        flush=True,
                    )
            finally:
                load.stop()
            channel_a.close()
            channel_b.close()
        finally:
            redis.cleanup()

    print()
    print("reads of A by phase (all trials): reads / gRPC errors / fallbacks / slowest")
    for phase in (*PHASES, "between"):
        for kind in ("cached", "uncached"):
            row = load.counts.get((phase, kind))
            if row:
                print(
                    f"  {phase:<11} {kind:<9} {int(row[0]):6d} / {int(row[1])} / {int(row[2])} / {1000 * row[3]:.0f} ms"
                )
    window = [load.counts.get((p, k)) for p in ("redis down", "restart", "after") for k in ("cached", "uncached")]
    failed = sum(int(r[1] + r[2]) for r in window if r)
    total = sum(int(r[0]) for r in window if r)
    print(f"failed reads in the kill/restart windows: {failed} of {total}")
    if load.failures:
        print("first failures:\n  " + "\n  ".join(load.failures))
    if load.slow:
        print(f"load reads slower than {1000 * SLOW:.0f} ms (time from that trial's kill / restart):")
        for wall, phase, kind, took in load.slow:
            trial = max((r for r in results if r["killed_wall"] - 1 <= wall), key=lambda r: r["trial"], default=None)
            where = (
                ""
                if trial is None
                else (
                    f"trial {trial['trial']}, kill {wall - trial['killed_wall']:+.3f}s,"
                    f" restart {wall - trial['spawned']:+.3f}s"
                )
            )
            print(f"  {phase}/{kind}: {1000 * took:.0f} ms ({where})")
    if load.exhausted:
        print("note: the never-read pool ran out; later 'uncached' turns read cached customers")
    print()
    for key, label in (
        ("to_answering", "restart -> redis answers PING"),
        ("to_reconnect", "restart -> A's Redis link reconnected"),
        ("to_first_read", "restart -> first Redis-served read"),
    ):
        values = [r[key] for r in results if r[key] is not None]
        missing = len(results) - len(values)
        if values:
            print(
                f"{label:<40} min {fmt_ms(min(values))}  median {fmt_ms(statistics.median(values))}"
                f"  max {fmt_ms(max(values))} ms  (n={len(values)}{f', {missing} missing' if missing else ''})"
            )
        else:
            print(f"{label:<40} none observed")
    print(
        f"sidecar_redis_client_errors_total: {results[0]['redis_errors'][0]:g} before the first trial,"
        f" {results[-1]['redis_errors'][1]:g} after the last"
    )
    return 0 if all(r["to_first_read"] is not None for r in results) else 1


if __name__ == "__main__":
    sys.exit(exit_status(main))
