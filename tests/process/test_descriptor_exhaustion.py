"""Thousands of silent gRPC connections cannot take the descriptors the sidecar needs for Stigg
and its probes (issue 20, finding 3; grpc-core's output: finding 11).

A real sidecar process under `prlimit` (util-linux) against a real emulator process; the silent
clients are plain TCP connections from this process to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.request
from collections.abc import Mapping

import grpc
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from tests.fixtures.processes import EXAMPLES, DrainedProcess, EmulatorProcess, base_env, twistd_command
from tests.fixtures.tools import require_tool


class LimitedSidecar(DrainedProcess):
    """`twistd -n stigg-sidecar` started with the open-files limit `nofile` ("soft:hard")."""

    def __init__(self, env: Mapping[str, str], nofile: str) -> None:
        super().__init__(["prlimit", f"--nofile={nofile}", "--", *twistd_command("stigg-sidecar")], env)
        self.wait_for("stigg-sidecar running", 30)
        self.grpc_port = int(self.wait_for(r"gRPC listening on [^ ]+:(\d+)", 0).group(1))
        self.http_port = int(self.wait_for(r"HTTP listening on [^ ]+:(\d+)", 0).group(1))

    def _waited_in_vain(self) -> None:
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        self._collect()

    def limits(self) -> tuple[int, int]:
        with open(f"/proc/{self.process.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max open files"))
        soft, hard = line.split()[3:5]
        return int(soft), int(hard)

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/{path}", timeout=2) as response:
            return response.status, response.read().decode()


class DescriptorTests(TestCase):
    timeout = 120

    def setUp(self):
        require_tool("prlimit")
        self.emulator = EmulatorProcess(base_env(), "--port", "0", "--data", str(EXAMPLES / "emulator-data.json"))
        self.addCleanup(self.emulator.kill)

    def start(self, nofile: str, **env: str) -> LimitedSidecar:
        sidecar = LimitedSidecar(base_env(SERVER_API_KEY="local-dev-key", API_URL=self.emulator.url,
                                          EDGE_API_URL=self.emulator.url, WS_ENABLED="0", **env), nofile)
        self.addCleanup(sidecar.kill)
        channel = grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}")
        self.addCleanup(channel.close)
        self.stub = SidecarServiceStub(channel)
        # This client's connection is open before the flood: it is one of the sidecar's clients.
        self.assertFalse(self.read("customer-acme").is_fallback)
        return sidecar

    def read(self, customer: str) -> pb.GetBooleanEntitlementResponse:
        return self.stub.GetBooleanEntitlement(
            pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="feature-sso"), timeout=5)

    def flood(self, port: int, n: int) -> list[socket.socket]:
        """`n` connections that never send a byte (as many as this process can open)."""
        silent = []
        for _ in range(n):
            try:
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        for s in silent:
            self.addCleanup(s.close)
        time.sleep(2)  # grpc-core has accepted (and refused) what it will
        return silent

    def test_the_soft_open_files_limit_is_raised_to_the_hard_one(self):
        sidecar = self.start("300:700")
        self.assertEqual(sidecar.limits(), (700, 700))

    def test_silent_connections_past_the_cap_leave_stigg_and_the_probes_their_descriptors(self):
        sidecar = self.start("700:700")
        self.flood(sidecar.grpc_port, 800)
        self.assertEqual(sidecar.get("livez")[0], 200)
        status, metrics = sidecar.get("metrics")
        self.assertEqual(status, 200)
        answer = self.read("customer-archived")  # a miss: needs a new connection to Stigg
        self.assertFalse(answer.is_fallback)
        self.assertNotIn('sidecar_upstream_breaker_open{upstream="edge"} 1.0', sidecar.get("metrics")[1])
        self.assertLessEqual(len(os.listdir(f"/proc/{sidecar.process.pid}/fd")), 700 - 100)

    def test_exhausted_descriptors_never_open_a_breaker_and_grpc_core_speaks_in_the_log(self):
        # Explicitly past what the limit allows: the process does run out of descriptors.
        sidecar = self.start("200:200", GRPC_MAX_CONNECTIONS="100000", LOG_FORMAT="json")
        silent = self.flood(sidecar.grpc_port, 400)
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{sidecar.process.pid}/fd")) < 200 and time.monotonic() < deadline:
            time.sleep(0.1)  # grpc-core takes every descriptor left
        # Misses at once: each needs a new connection to Stigg, and there is no descriptor for it.
        calls = [self.stub.GetBooleanEntitlement.future(
            pb.GetBooleanEntitlementRequest(customer_id=f"customer-{i}", feature_id="feature-sso"), timeout=5)
            for i in range(20)]
        for call in calls:
            try:
                call.result()  # Stigg's answer once a descriptor is free again, or a fallback
            except grpc.RpcError:
                pass
        for s in silent:
            s.close()
        time.sleep(2)
        local = re.findall(r'sidecar_upstream_request_duration_seconds_count\{.*outcome="local"\} (\S+)',
                           sidecar.get("metrics")[1])
        self.assertGreater(sum(map(float, local)), 0)  # attempts did find no descriptor
        self.assertFalse(self.read("customer-archived").is_fallback)  # no breaker backoff to wait out
        self.assertEqual(sidecar.get("livez")[0], 200)
        sidecar.kill()
        lines = [line for line in sidecar.output if line.strip()]
        records = [json.loads(line) for line in lines]  # every line in LOG_FORMAT, grpc-core's too
        core = [r for r in records if r["namespace"] == "stigg_sidecar.grpc_core"]
        self.assertTrue(any("File descriptor limit reached" in r["message"] for r in core), lines[-20:])
        self.assertLessEqual(len(core), 3)  # once, not once a second
        self.assertFalse([r for r in records if "in a row" in r["message"]])
        self.assertFalse([line for line in lines if re.match(r"^[EWI]\d{4} ", line)])
