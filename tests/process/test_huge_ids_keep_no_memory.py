"""Huge ids cost no memory that stays (issue 10, finding 6), measured on a real sidecar process.

The sidecar runs as `twistd stigg-sidecar`, online against the emulator (in this reactor); the
calls come from worker threads. Before the input limits, 60 reads with 1 MiB customer ids each
took ~1.8 s of retried Edge calls and left RSS 232 MiB higher; 8 concurrent clients reached 1.27 GB.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from stigg_sidecar.crossing.gate import WRITE_FAILURES
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from stigg_sidecar.upstream.api import MAX_URL_LENGTH, StiggApi
from stigg_sidecar.upstream.errors import Problem, UpstreamError
from tests.fixtures import data
from tests.fixtures.processes import SidecarProcess, base_env
from tests.fixtures.reactor import reactor

MIB = 1 << 20
# Generous: once grpc's buffers and the allocator's per-thread arenas exist (the warm-up round),
# further rounds measured +0..3 MiB; before the limits, 60 such reads alone added 232 MiB.
RSS_GROWTH_LIMIT_KIB = 24 * 1024


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def huge_requests(n: int) -> list[tuple[str, object]]:
    """`n` requests across the RPCs, each with a 1 MiB id in a different field."""
    kinds = [
        ("GetBooleanEntitlement", lambda i: pb.GetBooleanEntitlementRequest(customer_id=f"{i}" + "c" * MIB, feature_id="sso")),
        ("GetEntitlementsStateV2", lambda i: pb.GetEntitlementsStateV2Request(customer_id="acme", resource_id=f"{i}" + "r" * MIB)),
        ("GetMeteredEntitlement", lambda i: pb.GetMeteredEntitlementRequest(customer_id="acme", feature_id=f"{i}" + "f" * MIB)),
        ("ReportUsage", lambda i: pb.ReportUsageRequest(customer_id=f"{i}" + "c" * MIB, feature_id="api-calls", value=1)),
        ("ReportEvents", lambda i: pb.ReportEventsRequest(
            events=[pb.Event(event_name="e", customer_id="acme", idempotency_key=f"{i}" + "k" * MIB)])),
    ]
    return [(kinds[i % len(kinds)][0], kinds[i % len(kinds)][1](i)) for i in range(n)]


class HugeIdMemoryTests(TestCase):
    timeout = 120

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.emulator = await start_emulator(reactor, data.SEED)
        self.addCleanup(stop_emulator, self.emulator)
        env = base_env(
            SERVER_API_KEY="test-key", API_URL=self.emulator.url, EDGE_API_URL=self.emulator.url, WS_ENABLED="0",
        )
        self.sidecar = await deferToThread(SidecarProcess, env)
        self.addCleanup(deferToThread, self.sidecar.stop)

    def call_all(self, requests, clients: int) -> list:
        """Send `requests` over `clients` concurrent channels; the status code of each."""
        codes: list = []
        lock = threading.Lock()

        def client(share):
            with grpc.insecure_channel(f"127.0.0.1:{self.sidecar.grpc_port}") as channel:
                stub = SidecarServiceStub(channel)
                for method, request in share:
                    try:
                        getattr(stub, method)(request, timeout=10)
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as e:
                        code = e.code()
                    with lock:
                        codes.append(code)

        threads = [threading.Thread(target=client, args=(requests[i::clients],)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return codes

    async def test_rss_returns_after_a_stream_of_huge_ids(self):
        pid = self.sidecar.process.pid
        # A warm-up round: grpc's buffers and the allocator's arenas for 8 concurrent clients, once.
        warm = await deferToThread(self.call_all, huge_requests(20), 1)
        warm += await deferToThread(self.call_all, huge_requests(64), 8)
        self.assertEqual(set(warm), {grpc.StatusCode.INVALID_ARGUMENT})
        before = rss_kib(pid)
        asked = sum(self.emulator.state.request_counts().values())
        codes = []
        for _ in range(2):
            codes += await deferToThread(self.call_all, huge_requests(60), 1)
            codes += await deferToThread(self.call_all, huge_requests(64), 8)
        after = rss_kib(pid)
        self.assertEqual(codes, [grpc.StatusCode.INVALID_ARGUMENT] * 248)
        self.assertEqual(sum(self.emulator.state.request_counts().values()), asked)  # Stigg never asked
        self.assertLess(after - before, RSS_GROWTH_LIMIT_KIB, f"RSS {before} KiB -> {after} KiB")
        # and it still answers from Stigg
        def read():
            with grpc.insecure_channel(f"127.0.0.1:{self.sidecar.grpc_port}") as channel:
                return SidecarServiceStub(channel).GetBooleanEntitlement(
                    pb.GetBooleanEntitlementRequest(customer_id="acme", feature_id="sso"), timeout=10
                )
        r = await deferToThread(read)
        self.assertEqual((r.has_access, r.is_fallback), (True, False))


class UnsendableRequestTests(TestCase):
    """The upstream client never retries a request that cannot succeed."""

    async def upstream(self) -> tuple[Any, StiggApi, list[tuple]]:
        """An emulator, a client of it, and the attempts the client reports."""
        emulator = await start_emulator(reactor, data.SEED)
        self.addCleanup(stop_emulator, emulator)
        attempts: list[tuple] = []
        api = StiggApi(reactor, "test-key", emulator.url, emulator.url, edge_enabled=True,
                       on_attempt=lambda *a: attempts.append(a))
        self.addCleanup(api.close)
        return emulator, api, attempts

    async def test_an_edge_url_too_long_fails_at_once_without_a_request(self):
        emulator, api, attempts = await self.upstream()
        with self.assertRaises(UpstreamError) as caught:
            await api.fetch_state("c" * MAX_URL_LENGTH, None, timeout=5)
        self.assertIs(caught.exception.problem, Problem.REFUSED)
        self.assertEqual(WRITE_FAILURES[caught.exception.problem].value, "INVALID_ARGUMENT")  # what a write says
        self.assertFalse(caught.exception.retryable)
        self.assertEqual(attempts, [])
        self.assertEqual(emulator.state.request_counts(), {})
        # an id at the input limit, percent-encoded three times over, still fits and is fetched
        state = await api.fetch_state("é" * 512, "é" * 512, timeout=5)
        self.assertEqual(state["accessDeniedReason"], "CustomerNotFound")

    async def test_a_request_stigg_refuses_as_too_large_is_not_retried(self):
        emulator, api, attempts = await self.upstream()
        for status in (413, 414, 431):
            emulator.state.faults.update({"error_status": status})
            del attempts[:]
            with self.assertRaises(UpstreamError) as caught:
                await api.fetch_state("acme", None, timeout=5)
            self.assertFalse(caught.exception.retryable)
            self.assertEqual([a[1] for a in attempts], [str(status)])
