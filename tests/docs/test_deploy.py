"""The deployment examples under deploy/ agree with the code: the Dockerfile, the compose file and
the emulator's command line (the Kubernetes overlays: test_kubernetes.py). Parsed as YAML, checked
against the real modules, and the sidecar overlay's probes asked of a real sidecar process."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import urllib.request
from typing import Any

import grpc
import yaml
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar import cli
from stigg_sidecar.emulator.data import load_data_file
from stigg_sidecar.settings import SPECS, Settings, load_settings
from tests.fixtures.kustomize import workload
from tests.fixtures.paths import ROOT
from tests.fixtures.processes import base_env, shared_sidecar

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SETTING_NAMES = {spec.env for spec in SPECS}
SIDECAR_IMAGE = "stigg-sidecar"

# Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}.
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def dockerfile_instructions(name: str) -> list[str]:
    """Arguments of every `NAME ...` instruction of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in dockerfile_instructions("ENV"):
        env.update(word.partition("=")[::2] for word in shlex.split(args) if "=" in word)
    return env


def sidecar_settings(env: dict[str, str]) -> Settings:
    """What the sidecar would run with: the image's ENV under the manifest's variables."""
    return load_settings({**dockerfile_env(), **env})


# -- Dockerfile -----------------------------------------------------------------------------------


class DockerfileTests(SynchronousTestCase):
    def test_exposed_ports_are_the_default_ports(self):
        exposed = {int(p.split("/")[0]) for args in dockerfile_instructions("EXPOSE") for p in args.split()}
        defaults = load_settings({"OFFLINE": "1"})
        image = sidecar_settings({"OFFLINE": "1"})
        self.assertEqual(exposed, {defaults.port, defaults.http_port})
        self.assertEqual(exposed, {image.port, image.http_port})

    def test_entrypoint_is_the_sidecar_plugin(self):
        (entrypoint,) = dockerfile_instructions("ENTRYPOINT")
        argv = json.loads(entrypoint)  # exec form
        self.assertEqual(argv[0], "twistd")
        options = ServerOptions()
        options.parseOptions(argv[1:])
        self.assertEqual(options.subCommand, "stigg-sidecar")

    def test_user_is_numeric_and_the_one_created(self):
        # runAsNonRoot can only verify a numeric user.
        (user,) = dockerfile_instructions("USER")
        (uid,) = re.findall(r"--uid (\d+)", DOCKERFILE.read_text())
        self.assertEqual(user, f"{uid}:{uid}")

    def test_healthcheck_is_exec_form_and_follows_the_settings(self):
        (healthcheck,) = dockerfile_instructions("HEALTHCHECK")
        argv = json.loads(healthcheck.split("CMD", 1)[1])
        self.assertEqual(argv, ["python", "-m", "stigg_sidecar.healthcheck"])

    def test_dependencies_come_from_the_lock(self):
        (build,) = [args for args in dockerfile_instructions("RUN") if "pip wheel" in args]
        self.assertIn("-r requirements.lock", build)
        self.assertIn("--no-deps --wheel-dir /wheels .", build)
        (install,) = [args for args in dockerfile_instructions("RUN") if "pip install" in args]
        self.assertIn("--no-index --no-deps", install)
        pinned = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and line[0].isalnum()]
        self.assertTrue(pinned)
        self.assertTrue(all("==" in line for line in pinned), pinned)

    def test_build_context_has_what_the_dockerfile_copies(self):
        for args in dockerfile_instructions("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _ = args.split()
            for source in sources:
                self.assertTrue((ROOT / source).exists(), f"COPY {source}: missing from the build context")


# -- Compose --------------------------------------------------------------------------------------


def interpolate(value: Any) -> tuple[str, list[str]]:
    """Compose's interpolation with an empty environment: (value with defaults, variables used)."""
    text = str(value)
    used: list[str] = []

    def substitute(m: re.Match) -> str:
        used.append(m.group(1))
        return m.group(3) if m.group(2) in (":-", "-") else ""

    return _INTERPOLATION.sub(substitute, text).replace("$$", "$"), used


class ComposeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.text = COMPOSE.read_text()
        self.services = yaml.safe_load(self.text)["services"]
        self.sidecar = self.services["sidecar"]
        self.emulator = self.services["emulator"]
        self.raw_env = {k: str(v) for k, v in self.sidecar["environment"].items()}
        self.env = {k: interpolate(v)[0] for k, v in self.raw_env.items()}

    def emulator_options(self) -> ServerOptions:
        argv = list(self.emulator["entrypoint"]) + list(self.emulator.get("command") or [])
        self.assertEqual(argv[0], "twistd")
        options = ServerOptions()
        options.parseOptions(argv[1:])  # the emulator's own Options parse and validate the rest
        return options

    def test_every_sidecar_variable_is_a_real_setting(self):
        self.assertLessEqual(set(self.env), SETTING_NAMES)

    def test_the_environment_validates_as_settings(self):
        settings = sidecar_settings(self.env)
        self.assertFalse(settings.offline)
        self.assertTrue(settings.ws_enabled)
        self.assertEqual(settings.ws_url, "ws://emulator:8090", "real-time updates come from the emulator too")
        self.assertTrue(settings.redis_enabled)

    def test_api_key_comes_from_the_environment_never_a_literal(self):
        secrets = [spec.env for spec in SPECS if spec.secret and spec.env in self.raw_env]
        self.assertIn("SERVER_API_KEY", secrets)
        for name in secrets:
            whole = _INTERPOLATION.fullmatch(self.raw_env[name].strip())
            self.assertIsNotNone(whole, f"{name} must be ${{VAR}} or ${{VAR:-default}}")

    def test_default_key_is_one_the_emulator_accepts(self):
        (mount,) = [v for v in self.emulator["volumes"] if v.split(":")[1] == "/data/emulator-data.json"]
        data = load_data_file(str((DEPLOY / mount.split(":")[0]).resolve()))
        self.assertIn(self.env["SERVER_API_KEY"], data.api_keys)

    def test_emulator_command_parses_with_the_emulator_options(self):
        options = self.emulator_options()
        self.assertEqual(options.subCommand, "stigg-emulator")
        self.assertTrue(options["nodaemon"])
        emulator = options.subOptions
        self.assertEqual(emulator["interface"], "0.0.0.0", "reachable from the sidecar's container")
        mounted = {v.split(":")[1]: v.split(":")[0] for v in self.emulator["volumes"]}
        self.assertIn(emulator["data"], mounted)
        self.assertTrue((DEPLOY / mounted[emulator["data"]]).is_file())

    def test_sidecar_talks_to_the_emulator_port(self):
        port = self.emulator_options().subOptions["port"]
        settings = sidecar_settings(self.env)
        self.assertEqual(settings.api_url, f"http://emulator:{port}")
        self.assertEqual(settings.edge_api_url, f"http://emulator:{port}")
        self.assertIn(f":{port}/", " ".join(self.emulator["healthcheck"]["test"]))

    def test_sidecar_talks_to_the_redis_service(self):
        settings = sidecar_settings(self.env)
        self.assertIn(settings.redis_host, self.services)
        self.assertEqual(settings.redis_port, 6379)

    def test_published_ports_are_the_settings_ports(self):
        settings = sidecar_settings(self.env)
        container_ports = {int(str(p).rsplit(":", 1)[-1]) for p in self.sidecar["ports"]}
        self.assertEqual(container_ports, {settings.port, settings.http_port})

    def test_healthcheck_asks_readiness_on_the_http_port(self):
        argv = self.sidecar["healthcheck"]["test"]
        self.assertEqual(argv[:4], ["CMD", "python", "-m", "stigg_sidecar.cli"])
        args = cli.build_parser().parse_args(argv[4:])
        settings = sidecar_settings(self.env)
        self.assertEqual(args.command, "health")
        self.assertEqual(args.http, f"127.0.0.1:{settings.http_port}")
        self.assertEqual(args.target, f"127.0.0.1:{settings.port}")
        self.assertEqual((args.health_path, args.ready_path), (settings.health_endpoint_url, settings.ready_endpoint_url))

    def test_sidecar_waits_for_healthy_dependencies(self):
        depends = self.sidecar["depends_on"]
        for name in ("emulator", "redis"):
            self.assertEqual(depends[name]["condition"], "service_healthy")
            self.assertIn("healthcheck", self.services[name])

    def test_one_image_built_from_the_repository(self):
        for service in (self.sidecar, self.emulator):
            self.assertEqual(interpolate(service["image"])[0].split(":")[0], SIDECAR_IMAGE)
            self.assertEqual((DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve(), DOCKERFILE)


# -- the probes, asked of a real sidecar ----------------------------------------------------------


class ProbesAgainstTheSidecarTests(SynchronousTestCase):
    """What the kubelet and compose would ask, asked of `twistd -n stigg-sidecar` (offline)."""

    def setUp(self) -> None:
        self.sidecar = shared_sidecar("deploy-offline", base_env(OFFLINE="1"))
        self.container = workload("sidecar").sidecar

    def test_liveness_and_readiness_paths_answer_200(self):
        for probe in ("livenessProbe", "readinessProbe"):
            path = self.container[probe]["httpGet"]["path"]
            with urllib.request.urlopen(f"http://127.0.0.1:{self.sidecar.http_port}{path}", timeout=5) as response:
                self.assertEqual(response.status, 200, probe)

    def test_image_healthcheck_module_answers_0_and_1(self):
        env = base_env(BIND_ADDRESS="0.0.0.0", HTTP_PORT=str(self.sidecar.http_port))
        run = [sys.executable, "-m", "stigg_sidecar.healthcheck"]
        result = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        result = subprocess.run(run, env=dict(env, HEALTH_ENDPOINT_URL="nope"), cwd=ROOT, capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, f"stigg-sidecar healthcheck: http://127.0.0.1:{self.sidecar.http_port}/nope: HTTP 404\n")

    def test_grpc_probe_is_answered_serving(self):
        # grpc.health.v1.Health/Check with service "" (what a `grpc:` probe sends): an empty request;
        # the answer HealthCheckResponse{status: SERVING} encodes as b"\x08\x01".
        with grpc.insecure_channel(f"127.0.0.1:{self.sidecar.grpc_port}") as channel:
            check: grpc.UnaryUnaryMultiCallable = channel.unary_unary("/grpc.health.v1.Health/Check")
            self.assertEqual(check(b"", timeout=5), b"\x08\x01")
