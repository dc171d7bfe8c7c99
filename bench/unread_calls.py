"""Memory pinned by clients that never read their answers (issue 20, finding 2).

    python -m bench.unread_calls [--connections 60] [--env NAME=VALUE ...]

Starts an OFFLINE sidecar (pinned to core 0), reads its RSS, then opens --connections HTTP/2
connections that announce a flow-control window of 0, send as many GetBooleanEntitlement calls as
the sidecar allows on each (784 attempted) and never read a byte. Prints the RSS growth, per
connection, after the calls settle, and a well-behaved client's p99 latency before, while the
connections open (their calls being answered) and once they are all open. --env passes settings to the sidecar, e.g.
`--env MAX_WAITING_READS=40 --env MAX_WAITING_WRITES=16 --env GRPC_MAX_WORKERS=8` (which makes
GRPC_MAX_CONCURRENT_STREAMS 64). Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time

import grpc
import h2.config
import h2.connection
import h2.settings

from bench.harness import Children, rss_kib, run_with_children, start_sidecar
from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

SIDECAR_CPU = 0
CALLS_PER_CONNECTION = 784
SETTLE_MAX = 90.0  # seconds at most for RSS to stop growing
WELL_BEHAVED_CALLS = 300


def settled_rss(pid: int) -> int:
    """RSS (KiB) once it grew by less than 1 MiB over 3 s (the sidecar has served every call)."""
    deadline = time.monotonic() + SETTLE_MAX
    readings = [rss_kib(pid)]
    while time.monotonic() < deadline:
        time.sleep(1.0)
        readings.append(rss_kib(pid))
        if len(readings) > 3 and readings[-1] - readings[-4] < 1024:
            break
    return readings[-1]


def well_behaved(port: int) -> tuple[float, dict[str, int]]:
    """WELL_BEHAVED_CALLS sequential GetBooleanEntitlement calls on one grpcio channel: the p99 of
    the answered ones in ms, and how many failed, by status."""
    request = pb.GetBooleanEntitlementRequest(customer_id="customer", feature_id="feature")
    times: list[float] = []
    failed: dict[str, int] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = SidecarServiceStub(channel)
        stub.GetBooleanEntitlement(request, timeout=30)
        for _ in range(WELL_BEHAVED_CALLS):
            started = time.perf_counter()
            try:
                stub.GetBooleanEntitlement(request, timeout=30)
            except grpc.RpcError as e:
                failed[e.code().name] = failed.get(e.code().name, 0) + 1
                continue
            times.append(time.perf_counter() - started)
    times.sort()
    return (times[max(0, int(len(times) * 0.99) - 1)] * 1000 if times else float("nan")), failed


def _said(result: tuple[float, dict[str, int]]) -> str:
    p99, failed = result
    return f"{p99:.2f} ms" + (f" ({', '.join(f'{n} {code}' for code, n in failed.items())})" if failed else "")


def unread_connection(port: int, calls: int) -> socket.socket:
    """A connection whose client never reads: window 0, `calls` requests, then silence."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    sock.sendall(conn.data_to_send())
    body = pb.GetBooleanEntitlementRequest(customer_id="customer", feature_id="feature").SerializeToString()
    message = b"\0" + len(body).to_bytes(4, "big") + body
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "sidecar"),
               (":path", "/stigg.sidecar.v1.SidecarService/GetBooleanEntitlement"),
               ("content-type", "application/grpc"), ("te", "trailers")]
    for _ in range(calls):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers)
        conn.send_data(stream, message, end_stream=True)
        sock.sendall(conn.data_to_send())  # one call at a time, as a client's calls come
    return sock


def bench(children: Children, connections: int, env: dict[str, str]) -> int:
    sidecar = start_sidecar(children, SIDECAR_CPU, None, env)
    time.sleep(1.0)
    baseline = well_behaved(sidecar.grpc_port)
    before = rss_kib(sidecar.child.popen.pid)
    flooding: list[tuple[float, dict[str, int]]] = []
    meanwhile = threading.Thread(target=lambda: flooding.append(well_behaved(sidecar.grpc_port)), daemon=True)
    meanwhile.start()  # a well-behaved client while the connections open and their calls are answered
    held = [unread_connection(sidecar.grpc_port, CALLS_PER_CONNECTION) for _ in range(connections)]
    meanwhile.join(120)
    after = settled_rss(sidecar.child.popen.pid)
    during = well_behaved(sidecar.grpc_port)
    grown = after - before
    print(f"settings {env or '(defaults)'}: {connections} connections never reading")
    print(f"RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB: +{grown / 1024:.0f} MiB, "
          f"{grown / connections / 1024:.1f} MiB per connection")
    print(f"well-behaved client, {WELL_BEHAVED_CALLS} calls: p99 {_said(baseline)} before, "
          f"{_said(flooding[0]) if flooding else '(unfinished)'} while the connections open, "
          f"{_said(during)} with them open")
    for sock in held:
        sock.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=60)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the sidecar")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    return run_with_children(bench, args.connections, env)


if __name__ == "__main__":
    sys.exit(main())
