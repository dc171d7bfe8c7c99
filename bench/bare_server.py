"""A bare grpcio server: the ceiling the sidecar's gRPC throughput is measured against.

Same server as the sidecar's (stigg_sidecar/grpc/server.py `GrpcService._build`): grpcio's sync
server on a ThreadPoolExecutor of GRPC_MAX_WORKERS threads, the same channel options, the same
generated servicer base. Each check RPC returns a constant prebuilt response (by default the
serialized bytes the benchmark got from the real sidecar, so both send the same payload); there is
no cache, no decision and no Twisted. Everything else answers UNIMPLEMENTED, as the base does.

    python -m bench.bare_server --port 50051 [--response GetBooleanEntitlement=FILE ...]

Prints `bare gRPC listening on 127.0.0.1:PORT` once serving; stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from typing import Any

import grpc

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceServicer, add_SidecarServiceServicer_to_server
from stigg_sidecar.grpc.server import server_options
from stigg_sidecar.process.assembly import connection_limits
from stigg_sidecar.settings import SPECS, Settings

_DEFAULTS = {spec.env: spec.default for spec in SPECS}
MAX_WORKERS = int(_DEFAULTS["GRPC_MAX_WORKERS"] or 16)
MAX_MESSAGE_BYTES = int(_DEFAULTS["GRPC_MAX_MESSAGE_BYTES"] or 4194304)

_RESPONSE_TYPES = {
    "GetBooleanEntitlement": pb.GetBooleanEntitlementResponse,
    "GetMeteredEntitlement": pb.GetMeteredEntitlementResponse,
}


def default_responses() -> dict[str, Any]:
    feature = pb.EntitlementFeature(id="feature-0", feature_type=pb.FEATURE_TYPE_BOOLEAN, meter_type=pb.METER_TYPE_NONE)
    return {
        "GetBooleanEntitlement": pb.GetBooleanEntitlementResponse(
            has_access=True, entitlement=pb.BooleanEntitlement(feature=feature)
        ),
        "GetMeteredEntitlement": pb.GetMeteredEntitlementResponse(
            has_access=True,
            requested_usage=1,
            entitlement=pb.MeteredEntitlement(usage_limit=1000, current_usage=250),
        ),
    }


class ConstantServicer(SidecarServiceServicer):
    def __init__(self, responses: dict[str, Any]) -> None:
        self._boolean = responses["GetBooleanEntitlement"]
        self._metered = responses["GetMeteredEntitlement"]

    def GetBooleanEntitlement(self, request, context):
        return self._boolean

    def GetMeteredEntitlement(self, request, context):
        return self._metered


def build_server(responses: dict[str, Any], max_workers: int = MAX_WORKERS) -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-handler"),
        options=server_options(MAX_MESSAGE_BYTES, connection_limits(Settings())),
        maximum_concurrent_rpcs=None,
    )
    add_SidecarServiceServicer_to_server(ConstantServicer(responses), server)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=MAX_WORKERS, help=f"handler threads (default {MAX_WORKERS})")
    parser.add_argument(
        "--response",
        action="append",
        default=[],
        metavar="METHOD=FILE",
        help="serve the serialized response in FILE for METHOD (GetBooleanEntitlement, GetMeteredEntitlement)",
    )
    args = parser.parse_args()

    responses = default_responses()
    for item in args.response:
        method, _, path = item.partition("=")
        if method not in _RESPONSE_TYPES:
            parser.error(f"--response: unknown method {method!r}")
        with open(path, "rb") as f:
            responses[method] = _RESPONSE_TYPES[method].FromString(f.read())

    server = build_server(responses, args.workers)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if port == 0:
        raise SystemExit(f"bare_server: cannot listen on 127.0.0.1:{args.port}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"bare gRPC listening on 127.0.0.1:{port}", flush=True)
    while not stop.wait(1.0):
        pass
    server.stop(1).wait(5)


if __name__ == "__main__":
    main()
