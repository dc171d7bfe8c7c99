"""The container image, built from the unchanged Dockerfile and run as an orchestrator runs it.

`podman run` with a read-only root, every capability dropped, no-new-privileges, a named volume at
/var/lib/stigg-sidecar with STATE_DIR and SPOOL_WRITES on, and the host's network, so that the
emulator this test runs on 127.0.0.1 stands in for Stigg. The engine's settings and storage are
the test fixture's own (tests/fixtures/containers.py), never the machine's.

Where `python:3.11-slim` cannot be pulled, the image is built on a stand-in made with mmdebstrap
(Debian's Python 3.11.2 in /usr/bin and pip 23): it differs from the official base, so this checks
the Dockerfile and the sidecar in a container, not the official base image itself.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import urllib.request

import grpc
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from tests.fixtures.containers import AdminedEmulator, Engine, free_ports, http_status, wait_until

KEY = "local-dev-key"  # accepted by examples/emulator-data.json
CUSTOMER, METERED, BOOLEAN = "customer-acme", "feature-api-calls", "feature-sso"
STATE_DIR = "/var/lib/stigg-sidecar"
ENGINE_STOP_TIMEOUT = 10  # podman's and Docker's default
WRITES = 12
_names = itertools.count()


class ImageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.engine = Engine()
        self.image = self.engine.sidecar_image()
        self.emulator = AdminedEmulator()
        self.addCleanup(self.emulator.stop)
        self.name = f"stigg-sidecar-test-{os.getpid()}-{next(_names)}"
        self.volume = f"{self.name}-state"
        self.engine.podman("volume", "create", self.volume)
        self.addCleanup(self.engine.podman, "volume", "rm", "--force", self.volume, check=False)
        self.addCleanup(self.engine.remove_containers, self.name)
        self.grpc_port, self.http_port = free_ports(2)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.addCleanup(self.channel.close)
        self.stub = SidecarServiceStub(self.channel)

    def run_sidecar(self) -> float:
        """`podman run` as an orchestrator would; returns the seconds from the command to ready."""
        started = time.monotonic()
        self.engine.podman(
            "run", "--detach", "--name", self.name,
            "--network", "host", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--volume", f"{self.volume}:{STATE_DIR}",
            "--env", f"STATE_DIR={STATE_DIR}", "--env", "SPOOL_WRITES=1",
            "--env", f"SERVER_API_KEY={KEY}",
            "--env", f"API_URL={self.emulator.url}", "--env", f"EDGE_API_URL={self.emulator.url}",
            "--env", f"WS_URL={self.emulator.url.replace('http://', 'ws://')}",
            "--env", "BIND_ADDRESS=127.0.0.1",
            "--env", f"PORT={self.grpc_port}", "--env", f"HTTP_PORT={self.http_port}",
            "--env", "ENTITLEMENTS_TIMEOUT_MS=2000",
            self.image,
        )
        return self.until_ready(started)

    def until_ready(self, started: float) -> float:
        ready = f"http://127.0.0.1:{self.http_port}/readyz"
        try:
            wait_until(lambda: http_status(ready) == 200, 60, "the container's readiness")
        except AssertionError:
            raise AssertionError(f"not ready; log:\n{self.logs()}") from None
        return time.monotonic() - started

    def logs(self) -> str:
        result = self.engine.podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def state(self, key: str) -> str:
        return self.engine.podman("inspect", "--format", "{{.State." + key + "}}", self.name).stdout.strip()

    def check(self, feature: str = METERED) -> pb.GetEntitlementResponse:
        return self.stub.GetEntitlement(pb.GetEntitlementRequest(customer_id=CUSTOMER, feature_id=feature), timeout=10)

    def report(self, n: int) -> pb.ReportUsageResponse:
        request = pb.ReportUsageRequest(customer_id=CUSTOMER, feature_id=METERED, value=1)
        request.dimensions["n"].string_value = str(n)
        return self.stub.ReportUsage(request, timeout=10)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        (value,) = re.findall(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(value)

    def spool_writes_with_stigg_down(self) -> set[str]:
        """Cache the customer, take Stigg down, then write: every write acknowledged from the spool."""
        self.assertFalse(self.check().is_fallback)
        self.emulator.down(True)
        for n in range(WRITES):
            self.report(n)
        self.assertEqual(self.metric("sidecar_spool_records"), WRITES)
        self.assertEqual(self.emulator.usage_log(), [])
        return {str(n) for n in range(WRITES)}

    # -- the tests --------------------------------------------------------------------------------

    def test_runs_as_user_10001_read_only_without_capabilities_healthy_and_answers_stiggs_data(self):
        self.run_sidecar()
        self.assertEqual(self.engine.podman("exec", self.name, "id", "-u").stdout.strip(), "10001")
        status = self.engine.podman("exec", self.name, "grep", "^CapEff", "/proc/1/status").stdout
        self.assertEqual(status.split(), ["CapEff:", "0000000000000000"])
        readonly = self.engine.podman("exec", self.name, "touch", "/usr/local/x", check=False)
        self.assertNotEqual(readonly.returncode, 0)
        self.assertIn("Read-only file system", readonly.stderr)
        # No systemd here to run it on a timer: run the image's HEALTHCHECK by hand.
        self.assertEqual(self.engine.podman("healthcheck", "run", self.name, check=False).returncode, 0)
        metered, boolean = self.check(METERED), self.check(BOOLEAN)
        self.assertEqual((metered.has_access, metered.is_fallback, metered.metered.usage_limit), (True, False, 10000))
        self.assertEqual((boolean.has_access, boolean.is_fallback), (True, False))

    def test_engine_stop_with_undelivered_records_exits_0_within_the_default_timeout(self):
        self.run_sidecar()
        self.spool_writes_with_stigg_down()
        started = time.monotonic()
        self.engine.podman("stop", self.name, timeout=ENGINE_STOP_TIMEOUT + 30)  # the engine's default timeout
        took = time.monotonic() - started
        self.assertEqual(
            self.state("ExitCode"), "0", f"exit after {took:.1f}s, over the engine's {ENGINE_STOP_TIMEOUT}s "
            f"(a SIGKILL is 137); log:\n{self.logs()}"
        )
        self.assertLess(took, ENGINE_STOP_TIMEOUT)
        self.assertEqual(self.emulator.usage_log(), [])

    def test_restart_with_stigg_down_serves_the_snapshot_then_delivers_every_spooled_write_once(self):
        self.run_sidecar()
        written = self.spool_writes_with_stigg_down()
        # Long enough for any stop to finish on its own: this test is about what the restart finds.
        self.engine.podman("stop", "--time", "60", self.name, timeout=90)
        self.assertEqual(self.state("ExitCode"), "0", self.logs())

        self.engine.podman("start", self.name)
        self.until_ready(time.monotonic())
        cached = self.check()
        self.assertFalse(cached.is_fallback, "answered from the snapshot while Stigg is down")
        self.assertEqual((cached.has_access, cached.metered.usage_limit), (True, 10000))
        self.assertEqual(self.emulator.usage_log(), [])

        self.emulator.down(False)

        def delivered() -> list[str]:
            return [str(u["dimensions"]["n"]) for u in self.emulator.usage_log()]

        wait_until(lambda: written <= set(delivered()), 60, "every spooled write delivered")
        wait_until(lambda: self.metric("sidecar_spool_records") == 0, 10, "the spool emptied")
        time.sleep(1)  # a second delivery would show by now
        self.assertEqual(sorted(delivered(), key=int), sorted(written, key=int), "each write exactly once")
