"""gRPC load benchmark: cached entitlement checks on the sidecar against a bare grpcio server and
against Stigg's Node SDK behind grpc-js.

    python -m bench.grpc_load [--duration 10] [--warm-up 2] [--connections 1,4,8] [--streams 1,10]
                              [--rpc boolean,metered] [--customers 4] [--no-node]
                              [--variant NAME:ENV=VALUE,...]... [--tls] [--token]

`--variant` adds another sidecar with extra environment to the same run (the tracing overhead:
`--variant 'nopar:OTEL_EXPORTER_OTLP_ENDPOINT={otlp},OTEL_TRACES_SAMPLER=parentbased_always_off'
--variant 'sampled:OTEL_EXPORTER_OTLP_ENDPOINT={otlp}'`, exporting to a sink run by this script).
`SIDECAR_SOURCE=DIR` in a variant runs another checkout's code (an A/B of two trees in one run:
`--variant 'before:SIDECAR_SOURCE=../stigg-sidecar-main'`).

Starts the emulator seeded with a few customers of ten features each, the sidecar as a real
`twistd stigg-sidecar` process (online, against the emulator), bench/bare_server.py and the Node
reference (bench/node/server.js: `@stigg/node-server-sdk` 3.95.0 with its in-memory cache and
real-time updates, against the same emulator; its packages are installed with `npm ci` when
missing), all three pinned to core 0 with taskset; h2load runs pinned to core 1, as does this
script. Warms the sidecar's and the Node SDK's caches (one call per customer), checks a sample of
answers on both with a real grpcio client and aborts if any is wrong or if the Node SDK's answer to
a load call differs from the sidecar's, then runs the identical h2load command (a unary gRPC call
is an HTTP/2 POST with a 5-byte-framed protobuf body) against each server for every
connections x streams setting.
h2load counts any HTTP 200 as a success whatever the grpc-status trailer says, so while it runs a
sampler thread checks a real call every 0.5 s against the reference answer.

Prints, per setting: req/s, p50/p99 latency (from h2load's per-request log), the server's CPU use,
the sidecar/bare and sidecar/Node ratios (of req/s, of requests per CPU-second, and of p99); then
the headline (the setting where the bare server is fastest) beside Stigg's published figure for
its own sidecar, and the RSS of each server. Benchmarks are run by hand, never in CI.

`--tls` and `--token` add sidecars locked down as a standalone service (README "Running as a
standalone service"), started like the first one and measured in the same run, alternating with
it: `--tls` one serving TLS (a trustme CA's certificate; h2load over https), `--token` one
checking caller tokens (h2load sends `authorization: Bearer`), over TLS when `--tls` is given too.
Their rows give the plaintext sidecar's ratio to them; a closing section gives each one's
throughput as a fraction of the plaintext sidecar's, per setting.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from bench.harness import (
    BenchError,
    Children,
    cpu_seconds,
    rss_kib,
    run_with_children,
    start_bare_server,
    start_emulator,
    start_node_reference,
    start_sidecar,
    write_emulator_data,
)
from bench.seed import METERED_LIMIT, current_usage, customer_id, entitlements
from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

SERVER_CPU = 0  # the sidecar, the bare server and the Node reference
LOAD_CPU = 1  # h2load, this script, the emulator
SERVICE = "/stigg.sidecar.v1.SidecarService"
CALL_TIMEOUT = 5.0
# Stigg's published throughput for its own sidecar (Node, on 1 vCPU), from Stigg's sidecar docs.
STIGG_PUBLISHED_RPS = 1200


# -- correctness ------------------------------------------------------------------------------


def expect(ok: bool, what: str, response: Any) -> None:
    if not ok:
        raise BenchError(f"wrong answer: {what}; got:\n{response}")


def check_customer(stub: SidecarServiceStub, i: int) -> None:
    """Cached answers for customer i are Stigg's data, not fallbacks."""
    cid = customer_id(i)
    state = stub.GetEntitlementsStateV2(pb.GetEntitlementsStateV2Request(customer_id=cid), timeout=CALL_TIMEOUT)
    expect(len(state.entitlements) == 10, f"{cid}: 10 entitlements in the state", state)
    expect(not any(e.is_fallback for e in state.entitlements), f"{cid}: no fallback in the state", state)

    r = stub.GetBooleanEntitlement(
        pb.GetBooleanEntitlementRequest(customer_id=cid, feature_id="feature-bool-0"), timeout=CALL_TIMEOUT
    )
    expect(
        r.has_access and not r.is_fallback and r.entitlement.feature.id == "feature-bool-0",
        f"{cid}: feature-bool-0 granted",
        r,
    )
    r = stub.GetBooleanEntitlement(
        pb.GetBooleanEntitlementRequest(customer_id=cid, feature_id="feature-revoked"), timeout=CALL_TIMEOUT
    )
    expect(
        not r.has_access and not r.is_fallback and r.access_denied_reason == pb.ACCESS_DENIED_REASON_REVOKED,
        f"{cid}: feature-revoked denied as REVOKED",
        r,
    )
    r = stub.GetBooleanEntitlement(
        pb.GetBooleanEntitlementRequest(customer_id=cid, feature_id="feature-none"), timeout=CALL_TIMEOUT
    )
    expect(
        not r.has_access
        and not r.is_fallback
        and r.access_denied_reason == pb.ACCESS_DENIED_REASON_NO_FEATURE_ENTITLEMENT_IN_SUBSCRIPTION,
        f"{cid}: unknown feature denied as NO_FEATURE_ENTITLEMENT_IN_SUBSCRIPTION",
        r,
    )

    within = metered_request(i, 10)
    r = stub.GetMeteredEntitlement(within, timeout=CALL_TIMEOUT)
    expect(
        r.has_access
        and not r.is_fallback
        and r.requested_usage == 10
        and r.entitlement.usage_limit == METERED_LIMIT
        and r.entitlement.current_usage == current_usage(i),
        f"{cid}: 10 more api calls granted at {current_usage(i)}/{METERED_LIMIT}",
        r,
    )
    over = metered_request(i, METERED_LIMIT - current_usage(i) + 1)
    r = stub.GetMeteredEntitlement(over, timeout=CALL_TIMEOUT)
    expect(
        not r.has_access
        and not r.is_fallback
        and r.access_denied_reason == pb.ACCESS_DENIED_REASON_REQUESTED_USAGE_EXCEEDING_LIMIT,
        f"{cid}: usage past the limit denied as REQUESTED_USAGE_EXCEEDING_LIMIT",
        r,
    )


def metered_request(i: int, requested: float) -> pb.GetMeteredEntitlementRequest:
    return pb.GetMeteredEntitlementRequest(
        customer_id=customer_id(i),
        feature_id="feature-api-calls",
        options=pb.MeteredEntitlementOptions(requested_usage=requested),
    )


@dataclass(frozen=True)
class LoadCall:
    """The one request h2load repeats, and how to make it with a stub."""

    name: str
    method: str
    request: Any

    def call(self, stub: SidecarServiceStub) -> Any:
        return getattr(stub, self.method)(self.request, timeout=CALL_TIMEOUT)

    def grpc_frame(self) -> bytes:
        body = self.request.SerializeToString()
        return b"\x00" + struct.pack(">I", len(body)) + body


LOAD_CALLS = {
    "boolean": LoadCall(
        "boolean",
        "GetBooleanEntitlement",
        pb.GetBooleanEntitlementRequest(customer_id=customer_id(0), feature_id="feature-bool-0"),
    ),
    "metered": LoadCall("metered", "GetMeteredEntitlement", metered_request(0, 1)),
}


class Sampler(threading.Thread):
    """While h2load runs, one real call every `interval` s must equal the reference answer."""

    def __init__(self, stub: SidecarServiceStub, call: LoadCall, reference: Any, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self._stub, self._call, self._reference, self._interval = stub, call, reference, interval
        self._done = threading.Event()
        self.checked = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self._done.wait(self._interval):
            try:
                got = self._call.call(self._stub)
                if got != self._reference:
                    self.errors.append(f"answer differs from the reference:\n{got}")
            except grpc.RpcError as e:
                self.errors.append(f"{e.code()}: {e.details()}")
            self.checked += 1

    def stop(self) -> None:
        self._done.set()
        self.join(CALL_TIMEOUT + 2)


# -- the servers measured ----------------------------------------------------------------------


@dataclass
class Target:
    """A server h2load is pointed at, and a stub to check its answers with."""

    pid: int
    port: int
    stub: SidecarServiceStub
    scheme: str = "http"
    headers: tuple[str, ...] = field(default_factory=tuple)  # extra h2load -H values


class _Bearer(grpc.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (the sampler's, the checks')."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        details = client_call_details._replace(metadata=(*(client_call_details.metadata or ()), *self._metadata))
        return continuation(details, request)


@dataclass
class Lockdown:
    """Files a locked-down sidecar reads: a TLS pair from a test CA, a caller tokens file."""

    tls_env: dict[str, str]
    ca_pem: bytes
    token: str
    tokens_env: dict[str, str]

    @classmethod
    def make(cls, children: Children) -> Lockdown:
        import secrets

        import trustme  # a test dependency (requirements-dev.lock): benchmarks run from the dev environment

        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        cert, key, tokens = children.path("tls.crt"), children.path("tls.key"), children.path("tokens")
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        token = secrets.token_urlsafe(32)
        tokens.write_text(f"bench read {token}\n")
        return cls({"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}, ca.cert_pem.bytes(), token,
                   {"CALLER_TOKENS_FILE": str(tokens)})

    def channel(self, target: str, tls: bool, token: bool) -> grpc.Channel:
        if tls:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=self.ca_pem))
        else:
            channel = grpc.insecure_channel(target)
        return grpc.intercept_channel(channel, _Bearer(self.token)) if token else channel


# -- h2load -----------------------------------------------------------------------------------


@dataclass
class Run:
    server: str
    connections: int
    streams: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    cpu_percent: float  # the server's CPU use over the measured window (100 = one core)
    other_percent: float  # CPU used by anything but the server and h2load meanwhile (noise)
    samples: int

    @property
    def per_cpu_second(self) -> float:
        """Requests per CPU-second of the server: less sensitive to other load on the machine."""
        return self.rps / max(self.cpu_percent / 100, 1e-9)


def machine_busy_seconds() -> float:
    """CPU-seconds all cores have spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: list[int], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def run_h2load(
    server: str,
    pid: int,
    port: int,
    call: LoadCall,
    body: Path,
    log: Path,
    connections: int,
    streams: int,
    duration: int,
    warm_up: int,
    sampler: Sampler,
    scheme: str = "http",
    headers: tuple[str, ...] = (),
) -> Run:
    argv = [
        "taskset",
        "-c",
        str(LOAD_CPU),
        "h2load",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        *(arg for header in headers for arg in ("-H", header)),
        "-c",
        str(connections),
        "-m",
        str(streams),
        "-t",
        "1",
        "-D",
        str(duration),
        "--warm-up-time",
        str(warm_up),
        "--log-file",
        str(log),
        f"{scheme}://127.0.0.1:{port}{SERVICE}/{call.method}",
    ]
    log.unlink(missing_ok=True)  # h2load appends to an existing log
    h2load_cpu_before, h2load_started = children_cpu_seconds(), time.monotonic()
    h2load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler.start()
    try:
        time.sleep(warm_up)  # CPU is read over h2load's measured window only
        cpu_before, busy_before, wall_before = cpu_seconds(pid), machine_busy_seconds(), time.monotonic()
        out, err = h2load.communicate(timeout=duration + 60)
        wall = time.monotonic() - wall_before
        cpu = 100 * (cpu_seconds(pid) - cpu_before) / wall
        busy = 100 * (machine_busy_seconds() - busy_before) / wall
        # h2load's own share, averaged over its whole run (warm-up included).
        h2load_cpu = 100 * (children_cpu_seconds() - h2load_cpu_before) / (time.monotonic() - h2load_started)
    finally:
        sampler.stop()
        if h2load.poll() is None:
            h2load.kill()
            h2load.wait(5)
    if h2load.returncode != 0:
        raise BenchError(f"h2load exited {h2load.returncode}:\n{out}\n{err}")
    if sampler.errors:
        raise BenchError(f"{server}: {len(sampler.errors)} wrong answers under load, first: {sampler.errors[0]}")
    rps = requests = None
    for line in out.splitlines():
        if line.startswith("finished in"):
            rps = float(line.split(",")[1].split()[0])
        elif line.startswith("requests:"):
            counts = {w: int(n) for n, w in (p.split()[:2] for p in line.split(":", 1)[1].split(","))}
            if counts["failed"] or counts["errored"] or counts["timeout"]:
                raise BenchError(f"h2load saw failures against {server}:\n{out}")
            requests = counts["succeeded"]
    if rps is None or not requests:
        raise BenchError(f"cannot read h2load's output:\n{out}")
    times = []
    at_warm_up_end = 0
    with open(log) as f:
        for line in f:
            _start, status, micros = line.split("\t")
            if status == "0" and at_warm_up_end < connections * streams:
                # A stream in flight as the warm-up ended whose response headers came before the end:
                # h2load logs it with status 0 (and counts it succeeded). grpc-js sends the headers
                # ahead of the message, so it happens against the Node reference.
                at_warm_up_end += 1
            elif status != "200":
                raise BenchError(f"{server}: HTTP status {status} in h2load's log")
            times.append(int(micros))
    if len(times) != requests:
        raise BenchError(f"{server}: h2load logged {len(times)} requests but counted {requests}")
    times.sort()
    return Run(
        server,
        connections,
        streams,
        rps,
        percentile(times, 0.5) / 1000,
        percentile(times, 0.99) / 1000,
        requests,
        cpu,
        max(0.0, busy - cpu - h2load_cpu),
        sampler.checked,
    )


def median_run(runs: list[Run]) -> Run:
    """The run with the median throughput (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.rps)
    return replace(ordered[(len(ordered) - 1) // 2], samples=sum(r.samples for r in runs))


class OtlpSink:
    """An OTLP/HTTP endpoint on 127.0.0.1 that takes every export (200, body read and counted,
    not decoded): the traced variants export to a collector that keeps up."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        sink = self
        self.requests = 0
        self.bytes = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.requests += 1
                sink.bytes += len(body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- main -------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per h2load run (default 10)")
    parser.add_argument("--warm-up", type=int, default=2, help="h2load warm-up seconds per run (default 2)")
    parser.add_argument("--connections", type=int_list, default=[1, 4, 8], help="h2load -c values (default 1,4,8)")
    parser.add_argument("--streams", type=int_list, default=[1, 10], help="h2load -m values (default 1,10)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per server and setting, alternating; each run and the median are shown (default 1)",
    )
    parser.add_argument("--rpc", default="boolean", help="boolean, metered or both comma-separated (default boolean)")
    parser.add_argument("--customers", type=int, default=4, help="seeded customers, all checked (default 4)")
    parser.add_argument(
        "--sidecar-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the sidecar, repeatable (e.g. METRICS_ENABLED=0)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:NAME=VALUE[,NAME=VALUE]",
        help="another sidecar in the same run, with this extra environment (repeatable; NAME up to 8 characters;"
        " {otlp} in a value is the URL of an OTLP/HTTP sink this script runs), e.g."
        " 'sampled:OTEL_EXPORTER_OTLP_ENDPOINT={otlp},OTEL_TRACES_SAMPLER=always_on'",
    )
    parser.add_argument(
        "--no-node", action="store_true", help="leave out the Node reference (Stigg's Node SDK behind grpc-js)"
    )
    parser.add_argument("--tls", action="store_true", help="add a sidecar serving TLS (TLS_CERT_FILE, TLS_KEY_FILE)")
    parser.add_argument(
        "--token", action="store_true", help="add a sidecar checking caller tokens (CALLER_TOKENS_FILE); over TLS with --tls"
    )
    args = parser.parse_args()
    calls = [LOAD_CALLS[name] for name in args.rpc.split(",")]
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("grpc_load: needs cores 0 and 1 (server on one, h2load on the other)")
    os.sched_setaffinity(0, {LOAD_CPU})

    return run_with_children(bench, args, calls)


def bench(children: Children, args: argparse.Namespace, calls: list[LoadCall]) -> int:
    data = children.path("emulator-data.json")
    write_emulator_data(data, {customer_id(i): entitlements(i) for i in range(args.customers)})
    _, api_url = start_emulator(children, data, cpu=LOAD_CPU)
    extra = dict(item.split("=", 1) for item in args.sidecar_env)
    sidecar = start_sidecar(children, SERVER_CPU, api_url, {"SHUTDOWN_GRACE_SECS": "1", **extra})
    print(
        f"sidecar pid {sidecar.child.pid} on core {SERVER_CPU}, gRPC {sidecar.target}; emulator {api_url}"
        + (f"; sidecar env {extra}" if extra else "")
    )
    rss_started = rss_kib(sidecar.child.pid)

    channel = grpc.insecure_channel(sidecar.target)
    stub = SidecarServiceStub(channel)
    for i in range(args.customers):  # the first call per customer fills the cache
        stub.GetEntitlementsStateV2(pb.GetEntitlementsStateV2Request(customer_id=customer_id(i)), timeout=15)
    for i in range(args.customers):
        check_customer(stub, i)
    print(f"correctness: {args.customers} customers x 6 checks OK (cached, not fallbacks)")

    references = {call.name: call.call(stub) for call in calls}
    response_files = {}
    for call in calls:
        path = children.path(f"{call.method}.response.bin")
        path.write_bytes(references[call.name].SerializeToString())
        response_files[call.method] = path
    bare, bare_port = start_bare_server(children, SERVER_CPU, response_files)
    bare_channel = grpc.insecure_channel(f"127.0.0.1:{bare_port}")
    bare_stub = SidecarServiceStub(bare_channel)
    for call in calls:
        if call.call(bare_stub) != references[call.name]:
            raise BenchError(f"the bare server's {call.method} answer differs from the sidecar's")
    print(f"bare server pid {bare.pid} on core {SERVER_CPU}, gRPC 127.0.0.1:{bare_port}, same answers")
    rss_warm = rss_kib(sidecar.child.pid)

    servers = {"sidecar": Target(sidecar.child.pid, sidecar.grpc_port, stub), "bare": Target(bare.pid, bare_port, bare_stub)}
    lockdown_channels = []
    if args.tls or args.token:
        lockdown = Lockdown.make(children)
        variants = [("tls", True, False)] if args.tls else []
        if args.token:
            variants.append(("tls+token", True, True) if args.tls else ("token", False, True))
        for name, tls, token in variants:
            env = {"SHUTDOWN_GRACE_SECS": "1", **extra, **(lockdown.tls_env if tls else {}),
                   **(lockdown.tokens_env if token else {})}
            locked = start_sidecar(children, SERVER_CPU, api_url, env)
            locked_channel = lockdown.channel(locked.target, tls, token)
            lockdown_channels.append(locked_channel)
            locked_stub = SidecarServiceStub(locked_channel)
            for i in range(args.customers):
                locked_stub.GetEntitlementsStateV2(pb.GetEntitlementsStateV2Request(customer_id=customer_id(i)), timeout=15)
            for i in range(args.customers):
                check_customer(locked_stub, i)
            for call in calls:
                if call.call(locked_stub) != references[call.name]:
                    raise BenchError(f"the {name} sidecar's {call.method} answer differs from the plaintext one's")
            servers[name] = Target(
                locked.child.pid, locked.grpc_port, locked_stub, "https" if tls else "http",
                (f"authorization: Bearer {lockdown.token}",) if token else (),
            )
            print(f"{name} sidecar pid {locked.child.pid} on core {SERVER_CPU}, gRPC {locked.target}, same answers")
    variant_channels = []
    sink = OtlpSink() if any("{otlp}" in v for v in args.variant) else None
    for spec in args.variant:
        name, _, settings = spec.partition(":")
        env = {k: v.replace("{otlp}", sink.url if sink else "") for k, v in
               (item.split("=", 1) for item in settings.split(",") if item)}
        variant = start_sidecar(children, SERVER_CPU, api_url, {"SHUTDOWN_GRACE_SECS": "1", **extra, **env})
        variant_channel = grpc.insecure_channel(variant.target)
        variant_channels.append(variant_channel)
        variant_stub = SidecarServiceStub(variant_channel)
        for i in range(args.customers):
            variant_stub.GetEntitlementsStateV2(pb.GetEntitlementsStateV2Request(customer_id=customer_id(i)), timeout=15)
        for i in range(args.customers):
            check_customer(variant_stub, i)
        for call in calls:
            if call.call(variant_stub) != references[call.name]:
                raise BenchError(f"the {name} sidecar's {call.method} answer differs from the sidecar's")
        print(f"{name} sidecar pid {variant.child.pid} on core {SERVER_CPU}, gRPC {variant.target}, env {env}:"
              " same answers")
        servers[name] = Target(variant.child.pid, variant.grpc_port, variant_stub)
    node_channel = None
    if not args.no_node:
        node = start_node_reference(children, SERVER_CPU, api_url)
        node_channel = grpc.insecure_channel(node.target)
        node_stub = SidecarServiceStub(node_channel)
        for i in range(args.customers):
            node_stub.GetEntitlementsStateV2(pb.GetEntitlementsStateV2Request(customer_id=customer_id(i)), timeout=15)
        for i in range(args.customers):
            check_customer(node_stub, i)
        for call in calls:
            got = call.call(node_stub)
            if got != references[call.name]:
                raise BenchError(
                    f"the Node reference's {call.method} answer differs from the sidecar's:\n"
                    f"sidecar:\n{references[call.name]}\nNode:\n{got}"
                )
        stats = node.stats()
        if stats["cacheEntries"] < args.customers:
            raise BenchError(f"the Node SDK cached {stats['cacheEntries']} of {args.customers} customers: {stats}")
        print(
            f"Node reference pid {node.child.pid} on core {SERVER_CPU}, gRPC {node.target} "
            f"(@stigg/node-server-sdk 3.95.0, grpc-js): {args.customers} customers x 6 checks OK, "
            "same answers as the sidecar"
        )
        servers["node"] = Target(node.child.pid, node.grpc_port, node_stub)

    settings = list(itertools.product(args.connections, args.streams))
    per_run = args.duration + args.warm_up
    count = len(calls) * len(settings) * len(servers) * args.repeat
    print(f"h2load on core {LOAD_CPU}: {count} runs of {per_run}s (~{count * (per_run + 1) / 60:.1f} min)")
    print(
        "cpu%: the server's CPU use (100 = its one core); other%: CPU used meanwhile by anything but the\n"
        "server and h2load (above ~10, other work on the machine skews the run); req/cpu-s: requests per\n"
        "CPU-second of the server, steadier than req/s when the machine is busy; on the bare and node rows,\n"
        "sidecar/that server: ratio (req/s), per-cpu (req/cpu-s) and p99 (sidecar's p99 / its p99)\n"
    )
    results: dict[str, list[dict[str, Run]]] = {}
    for call in calls:
        body = children.path(f"{call.name}.body")
        body.write_bytes(call.grpc_frame())
        print(
            f"== {call.method} ({len(call.grpc_frame())}-byte request, "
            f"{references[call.name].ByteSize()}-byte response)"
            + (f", median of {args.repeat}" if args.repeat > 1 else "")
        )
        print(
            f"{'-c':>3} {'-m':>3}  {'server':<9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'cpu%':>5} "
            f"{'other%':>6} {'req/cpu-s':>9}  {'ratio':>5} {'per-cpu':>7} {'p99':>5}"
        )
        rows = results[call.name] = []
        for connections, streams in settings:
            runs: dict[str, list[Run]] = {name: [] for name in servers}
            for attempt in range(args.repeat):
                for name, target in servers.items():
                    log = children.path(f"h2load-{call.name}-{name}-c{connections}-m{streams}-{attempt}.log")
                    runs[name].append(
                        run_h2load(
                            name,
                            target.pid,
                            target.port,
                            call,
                            body,
                            log,
                            connections,
                            streams,
                            args.duration,
                            args.warm_up,
                            Sampler(target.stub, call, references[call.name]),
                            target.scheme,
                            target.headers,
                        )
                    )
                    log.unlink()
                    if args.repeat > 1:  # each run too: on a shared machine the spread is the story
                        one = runs[name][-1]
                        print(f"   run {attempt + 1}/{args.repeat} {name:<9} {one.rps:8.0f} req/s, {one.cpu_percent:3.0f}% CPU"
                              f" (other {one.other_percent:3.0f}%), {one.per_cpu_second:6.0f} req/cpu-s, p99 {one.p99_ms:.2f} ms",
                              flush=True)
            medians = {name: median_run(server_runs) for name, server_runs in runs.items()}
            side = medians["sidecar"]
            for run in medians.values():
                ratios = ""
                if run is not side:
                    ratios = (
                        f"{side.rps / run.rps:5.2f} {side.per_cpu_second / run.per_cpu_second:7.2f} "
                        f"{side.p99_ms / run.p99_ms:5.2f}"
                    )
                print(
                    f"{connections:>3} {streams:>3}  {run.server:<9} {run.rps:>8.0f} {run.p50_ms:>7.2f} "
                    f"{run.p99_ms:>7.2f} {run.cpu_percent:>5.0f} {run.other_percent:>6.0f} "
                    f"{run.per_cpu_second:>9.0f}  {ratios}",
                    flush=True,
                )
            rows.append(medians)
        print()

    rss_after = rss_kib(sidecar.child.pid)
    for i in range(args.customers):  # still right after everything
        for name, target in servers.items():
            if name != "bare":
                check_customer(target.stub, i)
    channel.close()
    for locked_channel in lockdown_channels:
        locked_channel.close()
    bare_channel.close()
    for variant_channel in variant_channels:
        variant_channel.close()
    if sink is not None:
        print(f"OTLP sink: {sink.requests} exports, {sink.bytes / 1e6:.1f} MB received")
        sink.stop()
    if node_channel is not None:
        node_channel.close()

    locked_names = [name for name in ("tls", "token", "tls+token") if name in servers]
    if locked_names:
        print("== the standalone service's cost on cached reads (same run, alternating; fraction of plaintext)")
        for call in calls:
            for row in results[call.name]:
                plain = row["sidecar"]
                parts = [
                    f"{name} {row[name].rps / plain.rps:.2f} req/s, {row[name].per_cpu_second / plain.per_cpu_second:.2f}"
                    f" per CPU-s, p99 x{row[name].p99_ms / plain.p99_ms:.2f}"
                    for name in locked_names
                ]
                print(f"  {call.method} -c {plain.connections} -m {plain.streams}: plaintext {plain.rps:.0f} req/s; "
                      + "; ".join(parts))
        print()

    print("== headline (the setting where the bare server is fastest)")
    for call in calls:
        best_bare = max(results[call.name], key=lambda row: row["bare"].rps)
        side = best_bare["sidecar"]
        samples = sum(run.samples for row in results[call.name] for run in row.values())
        print(f"{call.method} at h2load -c {side.connections} -m {side.streams}, {args.duration}s:")
        for name, run in best_bare.items():
            print(
                f"  {name:<7} {run.rps:8.0f} req/s  p50 {run.p50_ms:.2f} ms  p99 {run.p99_ms:.2f} ms  "
                f"({run.cpu_percent:.0f}% CPU, {run.per_cpu_second:.0f} req/cpu-s)"
            )
        for name, run in best_bare.items():
            if run is not side:
                print(
                    f"  ratio sidecar/{name} {side.rps / run.rps:.2f} in req/s, "
                    f"{side.per_cpu_second / run.per_cpu_second:.2f} per CPU-second, "
                    f"{side.p99_ms / run.p99_ms:.2f} in p99"
                )
        print(
            f"  Stigg publishes {STIGG_PUBLISHED_RPS} req/s on 1 vCPU for its own sidecar (with Redis, p95 < 10 ms):"
            f" sidecar/that {side.rps / STIGG_PUBLISHED_RPS:.1f}"
            + (
                f", Node reference/that {best_bare['node'].rps / STIGG_PUBLISHED_RPS:.1f}"
                if "node" in best_bare
                else ""
            )
        )
        best = max(results[call.name], key=lambda row: row["sidecar"].rps)["sidecar"]
        print(
            f"  sidecar's best: {best.rps:.0f} req/s at -c {best.connections} -m {best.streams}; "
            f"{samples} answers sampled under load, all correct"
        )
        for name in servers:
            if name != "sidecar":
                worst = max(row["sidecar"].p99_ms / row[name].p99_ms for row in results[call.name])
                least = min(row["sidecar"].rps / row[name].rps for row in results[call.name])
                print(f"  across the matrix: sidecar/{name} req/s >= {least:.2f}, p99 ratio <= {worst:.2f}")
    noisy = [r for rows in results.values() for row in rows for r in row.values() if r.other_percent > 10]
    if noisy:
        print(f"warning: {len(noisy)} runs had more than 10% CPU used by other processes; rerun on a quiet machine")
    print(
        f"sidecar RSS: {rss_started / 1024:.1f} MiB started, {rss_warm / 1024:.1f} MiB warm, "
        f"{rss_after / 1024:.1f} MiB after the load; bare server {rss_kib(bare.pid) / 1024:.1f} MiB"
        + (f"; Node reference {rss_kib(servers['node'].pid) / 1024:.1f} MiB" if "node" in servers else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
