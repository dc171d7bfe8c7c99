"""deploy/compose.yaml run under `podman-compose`, unchanged: the emulator standing in for Stigg, Redis
and the sidecar on the compose network, the sidecar's ports published on 127.0.0.1.

The image is the one tests/fixtures/containers.py builds from the Dockerfile, named through
STIGG_SIDECAR_IMAGE (the compose file's own knob), and the published ports are free ones
(STIGG_SIDECAR_GRPC_PORT, STIGG_SIDECAR_HTTP_PORT). `redis:7-alpine` cannot be pulled here either:
a stand-in (Debian's redis-server 7.0, not Alpine's build) carries its name. podman-compose 1.0 does
not wait for `condition: service_healthy` (the sidecar retries until the emulator and Redis answer)
and, without systemd, healthchecks run only when asked: the test asks each one.
"""

from __future__ import annotations

import itertools
import os

import grpc
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from tests.fixtures.containers import REDIS_BASE, Engine, free_ports, http_status, require_tools, wait_until
from tests.fixtures.paths import ROOT

COMPOSE = ROOT / "deploy" / "compose.yaml"
SERVICES = ("emulator", "redis", "sidecar")
_runs = itertools.count()


class ComposeTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_tools("podman-compose")
        self.engine = Engine()
        self.engine.require_service_names()
        image = self.engine.sidecar_image()
        self.engine.base_image(REDIS_BASE)
        self.project = f"stigg-compose-test-{os.getpid()}-{next(_runs)}"
        self.grpc_port, self.http_port = free_ports(2)
        self.env = dict(self.engine.env, STIGG_SIDECAR_IMAGE=image,
                        STIGG_SIDECAR_GRPC_PORT=str(self.grpc_port), STIGG_SIDECAR_HTTP_PORT=str(self.http_port))

    def compose(self, *args: str, timeout: float = 180, check: bool = True):
        return self.engine.command(["podman-compose", "-p", self.project, "-f", str(COMPOSE), *args],
                                   timeout=timeout, check=check, env=self.env)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def healthy(self, service: str) -> bool:
        return self.engine.podman("healthcheck", "run", self.container(service), check=False).returncode == 0

    def test_compose_file_runs_the_sidecar_on_redis_against_the_emulator(self):
        # Cleanups run last first: the containers with their anonymous volumes, then what is left.
        self.addCleanup(self.engine.podman, "network", "rm", "--force", f"{self.project}_default", check=False)
        self.addCleanup(self.compose, "down", check=False, timeout=120)
        self.addCleanup(self.engine.remove_containers, *map(self.container, SERVICES))
        self.compose("up", "-d", "--no-build")
        try:
            wait_until(lambda: http_status(f"http://127.0.0.1:{self.http_port}/readyz") == 200, 90, "the sidecar's readiness")
        except AssertionError:
            logs = self.engine.podman("logs", self.container("sidecar"), check=False)
            raise AssertionError(f"not ready; sidecar log:\n{logs.stdout}{logs.stderr}") from None

        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            answer = SidecarServiceStub(channel).GetEntitlement(
                pb.GetEntitlementRequest(customer_id="customer-acme", feature_id="feature-api-calls"), timeout=10)
        self.assertEqual((answer.has_access, answer.is_fallback, answer.metered.usage_limit), (True, False, 10000))

        # The sidecar mirrored what it fetched into the compose file's Redis, under its prefix.
        keys = self.engine.podman("exec", self.container("redis"), "redis-cli", "--scan", "--pattern",
                                  "development:c_customer-acme*").stdout.split()
        self.assertIn("development:c_customer-acme#timestamp", keys)

        # Each service's healthcheck, as the compose file writes it, passes.
        for service in SERVICES:
            wait_until(lambda service=service: self.healthy(service), 30, f"{service}'s healthcheck")
