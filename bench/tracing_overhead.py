"""CPU per call of the SERVER-span interceptor alone, by sampler: what a cached read pays for
tracing before the servicer runs (the end-to-end cost is `grpc_load.py --variant`, see README).

    python -m bench.tracing_overhead [--calls 200000]

Each sampler runs in a child process of its own (OpenTelemetry's provider is once per process),
exporting to a closed loopback port (export happens on the SDK's thread; with every call sampled
its encoding shares the GIL and is part of the cost). Rows:

- `bare`: the handler without the interceptor (the floor: tracing off has no interceptor at all)
- `no parent, span`: parentbased_always_off, a call without traceparent still given a
  non-recording span and its context (what the interceptor did before measuring this)
- `no parent`: the same sampler as installed: no span for such a call
- `unsampled parent`: a caller's traceparent with the sampled flag off (a non-recording span)
- `sampled`: parentbased_always_on without a parent: every call recorded and exported
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Context:
    def __init__(self, metadata: tuple) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def code(self) -> None:
        return None


def child(sampler: str, calls: int, skip_unparented: bool, traceparent: str | None) -> float:
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", OTEL_TRACES_SAMPLER=sampler,
                      OTEL_EXPORTER_OTLP_TIMEOUT="0.05")
    from stigg_sidecar._proto import sidecar_pb2 as pb
    from stigg_sidecar.ops import tracing

    installed = tracing.install()
    assert installed is not None
    request = pb.GetBooleanEntitlementRequest(customer_id="customer-1", feature_id="feature-sso").SerializeToString()

    def handler(request: bytes, context: object) -> bytes:
        return b""

    metadata: tuple = (("user-agent", "grpc-python/1.85.1"),)
    if traceparent is not None:
        metadata += (("traceparent", traceparent),)
    context = _Context(metadata)
    wrapped = tracing._traced(handler, "/stigg.sidecar.v1.SidecarService/GetBooleanEntitlement", skip_unparented)
    for _ in range(1000):
        wrapped(request, context)
    started = time.process_time()
    for _ in range(calls):
        wrapped(request, context)
    return (time.process_time() - started) / calls * 1e6


def bare(calls: int) -> float:
    def handler(request: bytes, context: object) -> bytes:
        return b""

    context = _Context(())
    started = time.process_time()
    for _ in range(calls):
        handler(b"", context)
    return (time.process_time() - started) / calls * 1e6


ROWS = [
    ("no parent, span", "parentbased_always_off", False, None),
    ("no parent", "parentbased_always_off", True, None),
    ("unsampled parent", "parentbased_always_off", True, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
    ("sampled", "parentbased_always_on", False, None),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sampler, skip, traceparent = args.child
        print(f"{child(sampler, args.calls, skip == '1', traceparent or None):.2f}")
        os._exit(0)  # the SDK's exit hook would try to flush to the closed port
    print(f"{'':<18} {'us CPU/call':>11}")
    print(f"{'bare':<18} {bare(args.calls):>11.2f}")
    for name, sampler, skip, traceparent in ROWS:
        out = subprocess.run(
            [sys.executable, "-m", "bench.tracing_overhead", "--calls", str(args.calls), "--child", sampler,
             "1" if skip else "0", traceparent or ""],
            capture_output=True, text=True, check=True, timeout=600,
        )
        print(f"{name:<18} {float(out.stdout.strip().splitlines()[-1]):>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
