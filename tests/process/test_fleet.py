"""A fleet: three `twistd stigg-sidecar` processes sharing one real redis-server, the emulator as
Stigg, and a grpcio client balancing over the three with `round_robin`, gRPC health checking and a
retry policy for UNAVAILABLE, as deploy/README.md tells clients to.

Under load, a rolling restart (SIGTERM one, start it again on the same port once it exited,
then the next) loses no call and answers no fallback, in repeated runs; a change made in Stigg
reaches every replica; a customer missed by the whole fleet at once is fetched from Stigg once.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from stigg_sidecar.emulator.data import parse_customer
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from tests.fixtures import data
from tests.fixtures.clients import grpc_deferred, run_async
from tests.fixtures.paths import ROOT
from tests.fixtures.processes import SidecarProcess, base_env, until_ready
from tests.fixtures.redis import RedisServer

KEY = "fleet-test-key-0123456789"
PREFIX = "fleet"
WARM = [f"warm-{i}" for i in range(20)]
EDGE_FETCH = "/v1/c/{customerId}/entitlements-state.json"


def documented_service_config() -> dict:
    """The grpcio service config deploy/README.md gives clients: its first JSON block after the
    heading on balancing a fleet (round_robin, gRPC health checking, retry on UNAVAILABLE)."""
    text = (ROOT / "deploy" / "README.md").read_text()
    section = text[text.index("## Balancing calls over a fleet"):]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block is not None, "no JSON service config in deploy/README.md's fleet section"
    return json.loads(block.group(1))


SERVICE_CONFIG = documented_service_config()


def balanced_channel(ports: list[int]) -> grpc.Channel:
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    return grpc.insecure_channel(target, options=[("grpc.service_config", json.dumps(SERVICE_CONFIG))])


@dataclass
class LoadFigures:
    calls: int = 0
    fallbacks: int = 0
    errors: Counter = field(default_factory=Counter)


class Load:
    """`threads` client threads calling GetMeteredEntitlement for warm customers until stopped."""

    def __init__(self, stub: SidecarServiceStub, threads: int = 4) -> None:
        self._stub = stub
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.figures = LoadFigures()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _run(self, n: int) -> None:
        i = n
        while not self._stopping.is_set():
            customer = WARM[i % len(WARM)]
            i += 1
            try:
                answer = self._stub.GetMeteredEntitlement(
                    pb.GetMeteredEntitlementRequest(customer_id=customer, feature_id="api-calls")
                )
            except grpc.RpcError as e:
                with self._lock:
                    self.figures.calls += 1
                    self.figures.errors[f"{e.code().name}: {e.details()}"] += 1
                continue
            with self._lock:
                self.figures.calls += 1
                if answer.is_fallback:
                    self.figures.fallbacks += 1

    def stop(self) -> LoadFigures:
        self._stopping.set()
        for t in self._threads:
            t.join(timeout=30)
        return self.figures


class Fleet:
    def __init__(self, testcase: TestCase, emulator, redis: RedisServer) -> None:
        self.testcase = testcase
        self.emulator = emulator
        self.redis = redis
        self.members: list[SidecarProcess] = []
        self.ports: list[int] = []
        self.stopped: list[SidecarProcess] = []

    def env(self, port: int = 0) -> dict[str, str]:
        return base_env(
            SERVER_API_KEY=KEY,
            API_URL=self.emulator.url,
            EDGE_API_URL=self.emulator.url,
            WS_URL=self.emulator.url.replace("http://", "ws://"),
            PORT=str(port),
            REDIS_ENVIRONMENT_PREFIX=PREFIX,
            REDIS_HOST="127.0.0.1",
            REDIS_PORT=str(self.redis.port),
            # A loaded machine: Redis and Stigg get room, so a slow answer is not a fallback.
            REDIS_TIMEOUT_MS="2000",
            ENTITLEMENTS_TIMEOUT_MS="5000",
            SHUTDOWN_GRACE_SECS="8",
            METRICS_ENABLED="0",
        )

    def start_member(self, port: int = 0) -> SidecarProcess:
        member = SidecarProcess(self.env(port))
        self.testcase.addCleanup(member.kill)
        return member

    async def start(self, size: int = 3) -> Fleet:
        self.members = list(await gatherResults([deferToThread(self.start_member) for _ in range(size)]))
        self.ports = [m.grpc_port for m in self.members]
        for member in self.members:
            await until_ready(member)
        return self

    async def restart(self, index: int) -> float:
        """SIGTERM member `index`, wait for its exit (0), start it again on the same port, wait
        until ready; the seconds from SIGTERM to exit."""
        member = self.members[index]
        began = time.monotonic()
        code = await deferToThread(member.stop)
        stopped_in = time.monotonic() - began
        self.testcase.assertEqual(code, 0, member.text)
        # Its own account: the whole stop (drain included) within SHUTDOWN_GRACE_SECS.
        stopped = re.search(r"stigg-sidecar stopped in ([0-9.]+)s \(SHUTDOWN_GRACE_SECS ([0-9.]+)s\)", member.text)
        self.testcase.assertIsNotNone(stopped, member.text)
        assert stopped is not None
        self.testcase.assertLessEqual(float(stopped.group(1)), float(stopped.group(2)))
        self.stopped.append(member)
        fresh = await deferToThread(self.start_member, self.ports[index])
        self.testcase.assertEqual(fresh.grpc_port, self.ports[index])
        self.members[index] = fresh
        await until_ready(fresh)
        return stopped_in


class FleetTests(TestCase):
    timeout = 300

    async def asyncSetUp(self) -> Fleet:
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        customers = {name: data.ACME for name in WARM}
        customers.update({f"cold-{i}": data.ACME for i in range(10)})
        self.emulator = await start_emulator(reactor, {"apiKeys": [KEY], "customers": customers})
        self.addCleanup(stop_emulator, self.emulator)
        fleet = await Fleet(self, self.emulator, self.redis).start()
        self.channel = balanced_channel(fleet.ports)
        self.addCleanup(self.channel.close)
        self.stub = SidecarServiceStub(self.channel)
        return fleet

    async def test_rolling_restart_under_load_loses_no_call(self):
        fleet = await self.asyncSetUp()
        runs = []
        for run in range(2):
            load = Load(self.stub).start()
            await deferLater(reactor, 1.0, lambda: None)
            stop_times = [await fleet.restart(i) for i in range(len(fleet.members))]
            await deferLater(reactor, 1.0, lambda: None)
            figures = await deferToThread(load.stop)
            runs.append((figures, stop_times))
            print(f"run {run}: {figures.calls} calls, errors {dict(figures.errors)}, "
                  f"{figures.fallbacks} fallbacks; stops {[round(s, 2) for s in stop_times]} s")
        for figures, _ in runs:
            self.assertGreater(figures.calls, 0)
            self.assertEqual(dict(figures.errors), {})
            self.assertEqual(figures.fallbacks, 0)

    async def test_a_cold_customer_missed_by_the_whole_fleet_is_fetched_once(self):
        fleet = await self.asyncSetUp()
        direct = []
        for port in fleet.ports:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            self.addCleanup(channel.close)
            direct.append(SidecarServiceStub(channel))
        fetches = []
        for run in range(6):
            customer = f"cold-{run}"
            self.emulator.state.reset_request_counts()
            calls = [
                grpc_deferred(reactor, stub.GetBooleanEntitlement.future(
                    pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso"), timeout=10))
                for stub in direct for _ in range(2)
            ]
            answers = await gatherResults(calls)
            self.assertEqual([(a.has_access, a.is_fallback) for a in answers], [(True, False)] * len(calls))
            fetches.append(self.emulator.state.request_counts().get(EDGE_FETCH, 0))
        print(f"fetches of a cold customer per run: {fetches}")
        self.assertEqual(fetches, [1] * len(fetches))

    async def test_a_change_in_stigg_reaches_every_replica(self):
        fleet = await self.asyncSetUp()
        direct = []
        for port in fleet.ports:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            self.addCleanup(channel.close)
            direct.append(SidecarServiceStub(channel))

        def usage_limits() -> list[float]:
            request = pb.GetMeteredEntitlementRequest(customer_id=WARM[0], feature_id="api-calls")
            return [stub.GetMeteredEntitlement(request, timeout=5).entitlement.usage_limit for stub in direct]

        self.assertEqual(await deferToThread(usage_limits), [100] * 3)
        changed = data.customer(data.metered("api-calls", 5000, 90))
        self.emulator.state.replace(WARM[0], None, parse_customer(changed).state)
        began = time.monotonic()
        seen: list[Any] = []

        async def everywhere() -> bool:
            seen[:] = await deferToThread(usage_limits)
            return seen == [5000] * 3

        deadline = began + 20
        while not await everywhere():
            self.assertLess(time.monotonic(), deadline, f"the change reached {seen}")
            await deferLater(reactor, 0.01, lambda: None)
        print(f"a change in Stigg reached all three replicas in {1000 * (time.monotonic() - began):.0f} ms")


class OfficialClientAcrossARestartTests(SynchronousTestCase):
    """What deploy/README.md says of Stigg's official Python client behind a Service: one
    connection, kept until its replica stops; the next call after that connects again."""

    def test_the_official_client_connects_again_after_its_replica_restarted(self):
        import stigg_sidecar_sdk as sdk

        env = base_env(OFFLINE="1", ENTITLEMENTS_FALLBACK=json.dumps({"sso": {"hasAccess": True}}))
        first = SidecarProcess(env)
        self.addCleanup(first.kill)
        request = sdk.GetBooleanEntitlementRequest(customer_id="c1", feature_id="sso")

        async def calls() -> list[bool]:
            client = sdk.Stigg(sdk.ApiConfig(api_key="unused-offline"), remote_sidecar_host="127.0.0.1",
                               remote_sidecar_port=first.grpc_port)
            try:
                answers = [(await client.get_boolean_entitlement(request)).has_access]
                self.assertEqual(first.stop(), 0)
                await asyncio.sleep(0.2)  # the client's loop sees the connection close (stop() blocked it)
                second = SidecarProcess(dict(env, PORT=str(first.grpc_port)))
                self.addCleanup(second.kill)
                answers.append((await client.get_boolean_entitlement(request)).has_access)
                return answers
            finally:
                client.close()

        self.assertEqual(run_async(calls(), timeout=60), [True, True])
