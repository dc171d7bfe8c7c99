"""Clients that never read cost bounded memory (issue 20, finding 2), on a real sidecar process.

Raw HTTP/2 connections on loopback announce a flow-control window of 0 and send as many calls as
the sidecar allows (GRPC_MAX_CONCURRENT_STREAMS, 784 by default), then never read a byte: every
answer is computed and can never be sent. Before unsent answers were cancelled, grpc-core and
grpcio kept each such call until its connection closed, ~9 MiB of RSS per connection (24
connections: +249 MiB; `python -m bench.unread_calls`, 60 connections: +388 MiB). Now a connection
with more than 16 answers untaken for 2 s has those calls cancelled, and their memory given back.

RSS is the process's own (/proc/PID/status), read once it stopped growing; nothing is timed.
A well-behaved client, meanwhile, is answered on its own connection.
"""

from __future__ import annotations

import socket
import time

import grpc
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from bench.unread_calls import CALLS_PER_CONNECTION, unread_connection
from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from tests.fixtures.processes import SidecarProcess, base_env

CONNECTIONS = 24
# The sidecar's RSS may grow by this much while CONNECTIONS never read (thread arenas, grpc's
# buffers). Before the fix: +249 MiB.
RSS_GROWTH_LIMIT_KIB = 96 * 1024
SETTLE_MAX = 60.0  # seconds at most for RSS to stop growing


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def settled_rss(pid: int) -> int:
    """RSS (KiB) once it changed by less than 1 MiB over 3 s, or after SETTLE_MAX."""
    deadline = time.monotonic() + SETTLE_MAX
    readings = [rss_kib(pid)]
    while time.monotonic() < deadline:
        time.sleep(1.0)
        readings.append(rss_kib(pid))
        if len(readings) > 3 and abs(readings[-1] - readings[-4]) < 1024:
            break
    return readings[-1]


class UnreadCallsMemoryTests(TestCase):
    timeout = 240

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp returns
        self.sidecar = await deferToThread(SidecarProcess, base_env(OFFLINE="1"))
        self.addCleanup(deferToThread, self.sidecar.stop)

    def ask(self) -> pb.GetBooleanEntitlementResponse:
        with grpc.insecure_channel(f"127.0.0.1:{self.sidecar.grpc_port}") as channel:
            return SidecarServiceStub(channel).GetBooleanEntitlement(
                pb.GetBooleanEntitlementRequest(customer_id="customer", feature_id="feature"), timeout=30)

    def flood(self) -> tuple[int, int, pb.GetBooleanEntitlementResponse]:
        pid = self.sidecar.process.pid
        self.ask()  # the first call's one-time costs (threads, grpc's buffers) are not the test's
        before = settled_rss(pid)
        held: list[socket.socket] = []
        try:
            for _ in range(CONNECTIONS):
                held.append(unread_connection(self.sidecar.grpc_port, CALLS_PER_CONNECTION))
            after = settled_rss(pid)
            answer = self.ask()  # while the never-reading connections are open
        finally:
            for sock in held:
                sock.close()
        return before, after, answer

    async def test_connections_that_never_read_hold_bounded_memory(self):
        before, after, answer = await deferToThread(self.flood)
        self.assertTrue(answer.is_fallback)  # offline: answered, from the fallbacks
        self.assertLess(
            after - before, RSS_GROWTH_LIMIT_KIB,
            f"RSS {before // 1024} -> {after // 1024} MiB with {CONNECTIONS} connections that never read",
        )
