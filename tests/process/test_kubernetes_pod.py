"""The sidecar overlay's pod, run with `podman kube play`: the app container asks the sidecar beside
it on localhost over gRPC, the sidecar reading its key from the Secret's file, with the emulator
this test runs on 127.0.0.1 standing in for Stigg.

The pod is the overlay's, rendered by `kubectl kustomize` through a test overlay on top of it that
changes only what running here needs: the image built from the Dockerfile (tests/fixtures/
containers.py) for both containers, the app container sleeping (it is the place calls come from),
the emulator's URL and key, one replica, the host's network with free ports (so the emulator stays
on loopback), and a name suffix so runs in parallel do not meet. Where podman 4.3 differs from a
kubelet the test works around it and says so below.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from pathlib import Path

import grpc
import yaml
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from tests.fixtures.containers import AdminedEmulator, Engine, free_ports, http_status, require_tools, wait_until
from tests.fixtures.kustomize import OVERLAYS, render

KEY = "local-dev-key"  # accepted by examples/emulator-data.json
_runs = itertools.count()

TEST_OVERLAY = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
nameSuffix: "{suffix}"
resources:
  - {overlay}
images:
  - name: stigg-sidecar
    newName: {image_name}
    newTag: "{image_tag}"
  - name: my-app
    newName: {image_name}
    newTag: "{image_tag}"
patches:
  - patch: |-
      apiVersion: v1
      kind: Secret
      metadata:
        name: stigg-sidecar
      stringData:
        server-api-key: {key}
  - patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: my-app
      spec:
        replicas: 1
        template:
          spec:
            hostNetwork: true
            containers:
              - name: app
                command: ["sleep", "infinity"]
                env:
                  - name: STIGG_SIDECAR_TARGET
                    value: "localhost:{grpc_port}"
                  - name: STIGG_SIDECAR_HTTP
                    value: "localhost:{http_port}"
              - name: stigg-sidecar
                env:
                  - name: PORT
                    value: "{grpc_port}"
                  - name: HTTP_PORT
                    value: "{http_port}"
                  - name: API_URL
                    value: "{url}"
                  - name: EDGE_API_URL
                    value: "{url}"
                  - name: WS_URL
                    value: "{ws_url}"
            volumes:
              # podman 4.3 dereferences `optional` unset (a nil pointer: it panics); false is the default.
              - name: stigg-server-key
                secret:
                  optional: false
  # On the host's network podman 4.3 refuses containerPorts ("PortMappings can only be used with
  # Bridge or slirp4netns networking"), so the probes name the port numbers instead.
  - target:
      kind: Deployment
    patch: |-
      - op: test
        path: /spec/template/spec/containers/1/name
        value: stigg-sidecar
      - op: remove
        path: /spec/template/spec/containers/1/ports
      - op: replace
        path: /spec/template/spec/containers/1/startupProbe/grpc/port
        value: {grpc_port}
      - op: replace
        path: /spec/template/spec/containers/1/livenessProbe/httpGet/port
        value: {http_port}
      - op: replace
        path: /spec/template/spec/containers/1/readinessProbe/httpGet/port
        value: {http_port}
"""


class SidecarOverlayPodTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_tools("catatonit")  # the pods' pause process
        self.engine = Engine()
        self.image = self.engine.sidecar_image()
        self.emulator = AdminedEmulator()
        self.addCleanup(self.emulator.stop)
        self.grpc_port, self.http_port = free_ports(2)
        self.suffix = f"-t{os.getpid()}-{next(_runs)}"
        directory = Path(tempfile.mkdtemp(prefix="kube-play-"))
        image_name, image_tag = self.image.rsplit(":", 1)
        (directory / "kustomization.yaml").write_text(TEST_OVERLAY.format(
            suffix=self.suffix, overlay=os.path.relpath(OVERLAYS / "sidecar", directory),
            image_name=image_name, image_tag=image_tag, key=KEY, grpc_port=self.grpc_port, http_port=self.http_port,
            url=self.emulator.url, ws_url=self.emulator.url.replace("http://", "ws://"),
        ))
        docs = [d for d in yaml.safe_load_all(render(directory)) if d]
        self.secrets = [d for d in docs if d["kind"] == "Secret"]
        self.kube = directory / "pod.yaml"
        self.kube.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"]))
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        self.pod = f"{deployment['metadata']['name']}-pod-0"

    def play(self) -> None:
        for secret in self.secrets:
            # podman 4.3 plays no Secret objects: a secret volume reads a podman secret holding the
            # Secret as YAML, and writes each `data` value into the file verbatim (not base64-decoded).
            name = secret["metadata"]["name"]
            podman_secret = self.kube.parent / f"{name}.yaml"
            podman_secret.write_text(yaml.safe_dump({**{k: v for k, v in secret.items() if k != "stringData"},
                                                     "data": secret["stringData"]}))
            self.engine.podman("secret", "create", name, str(podman_secret))
            self.addCleanup(self.engine.podman, "secret", "rm", name, check=False)
            self.addCleanup(self.engine.podman, "volume", "rm", "--force", name, check=False)
        self.addCleanup(self.engine.podman, "pod", "rm", "--force", self.pod, check=False, timeout=60)
        self.addCleanup(self.engine.podman, "kube", "down", str(self.kube), check=False, timeout=60)
        # first (cleanups run last first): the containers with their anonymous volumes
        self.addCleanup(self.engine.remove_containers, self.container("app"), self.container("stigg-sidecar"))
        self.engine.podman("kube", "play", str(self.kube), timeout=120)

    def container(self, name: str) -> str:
        return f"{self.pod}-{name}"

    def logs(self) -> str:
        result = self.engine.podman("logs", self.container("stigg-sidecar"), check=False)
        return result.stdout + result.stderr

    def test_the_app_asks_the_sidecar_beside_it_which_answers_stiggs_data(self):
        self.play()
        try:
            wait_until(lambda: http_status(f"http://127.0.0.1:{self.http_port}/readyz") == 200, 60, "readiness")
        except AssertionError:
            raise AssertionError(f"not ready; sidecar log:\n{self.logs()}") from None

        # From the app container, as the app would: localhost, the sidecar's gRPC port.
        check = self.engine.podman("exec", self.container("app"), "stigg-sidecar-cli", "--json", "check",
                                   "customer-acme", "feature-sso", check=False)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr + self.logs())
        answer = json.loads(check.stdout)["entitlement"]
        self.assertEqual((answer["has_access"], answer["is_fallback"]), (True, False), check.stdout)

        # The startup probe's question, and a metered check, from outside the pod.
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            health: grpc.UnaryUnaryMultiCallable = channel.unary_unary("/grpc.health.v1.Health/Check")
            self.assertEqual(health(b"", timeout=5), b"\x08\x01")  # SERVING
            metered = SidecarServiceStub(channel).GetEntitlement(
                pb.GetEntitlementRequest(customer_id="customer-acme", feature_id="feature-api-calls"), timeout=10)
        self.assertEqual((metered.has_access, metered.is_fallback, metered.metered.usage_limit), (True, False, 10000))

        # Run as the manifest says: the image's user, a read-only root, no capabilities, the key a file.
        sidecar = self.container("stigg-sidecar")
        self.assertEqual(self.engine.podman("exec", sidecar, "id", "-u").stdout.strip(), "10001")
        self.assertEqual(self.engine.podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", sidecar).stdout.strip(), "true")
        status = self.engine.podman("exec", sidecar, "grep", "^CapEff", "/proc/1/status").stdout
        self.assertEqual(status.split(), ["CapEff:", "0000000000000000"])
        environment = self.engine.podman("exec", sidecar, "env").stdout
        self.assertNotIn(KEY, environment)
        self.assertIn("SERVER_API_KEY_FILE=/etc/stigg-sidecar/key/server-api-key", environment.splitlines())

