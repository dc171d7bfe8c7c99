"""deploy/kubernetes's overlays, as `kubectl kustomize` renders them, agree with the code and pass
`kubernetes-validate --strict`: settings, ports, probes, secrets as files, security, grace period,
and for the standalone service its Services, disruption budget, autoscaler, NetworkPolicies, TLS,
caller tokens, Redis (or Sentinel) and monitoring.

Objects of custom resources (cert-manager's Certificate, the Prometheus Operator's ServiceMonitor
and PrometheusRule) have no schema in kubernetes-validate: their fields are checked here."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.grpc.callers import CallerTokensError, parse_callers
from stigg_sidecar.ops import tracing
from stigg_sidecar.settings import SPECS, Settings
from tests.docs.test_deploy import DOCKERFILE, SETTING_NAMES, dockerfile_instructions, sidecar_settings
from tests.fixtures.kustomize import KUBERNETES, OVERLAYS, overlays, render, rendered, workload
from tests.fixtures.paths import ROOT

SECRET_SPECS = {spec.env: spec for spec in SPECS if spec.secret}
CUSTOM_KINDS = {"Certificate", "ServiceMonitor", "PrometheusRule"}
# The oldest Kubernetes each overlay is for: native sidecars need 1.29.
OLDEST = {"sidecar": "1.27.0", "sidecar-native": "1.29.0", "standalone": "1.27.0", "standalone-sentinel-monitoring": "1.27.0"}
# `- name: FOO` lines that are commented out: optional settings shown to the reader.
_COMMENTED_ENV = re.compile(r"^\s*#\s*-\s*name:\s*([A-Z][A-Z0-9_]*)\s*$", re.MULTILINE)


def secret_value(docs: list[dict], name: str, key: str) -> str:
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    if key in secret.get("stringData", {}):
        return secret["stringData"][key]
    return base64.b64decode(secret["data"][key]).decode()


class RenderAndValidateTests(SynchronousTestCase):
    def test_the_four_overlays_exist(self):
        self.assertEqual(overlays(), sorted(OLDEST))
        self.assertFalse((KUBERNETES / "deployment.yaml").exists())

    def test_every_overlay_validates_strictly_against_the_oldest_and_newest_kubernetes(self):
        for overlay in overlays():
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
                file.write(render(OVERLAYS / overlay))
                file.flush()
                for version in (OLDEST[overlay], None):
                    argv = [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", file.name]
                    if version:
                        argv[1:1] = ["-k", version]
                    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
                    self.assertEqual(result.returncode, 0, f"{overlay} {version or 'latest'}:\n{result.stdout}{result.stderr}")
                    # Warnings only for the custom resources, which have no schema there.
                    for line in (result.stdout + result.stderr).splitlines():
                        self.assertRegex(line, r"Couldn't find schema for kind (Certificate|ServiceMonitor|PrometheusRule) ")

    def test_rendered_kinds(self):
        kinds = {overlay: sorted({d["kind"] for d in rendered(overlay)}) for overlay in overlays()}
        self.assertEqual(kinds["sidecar"], ["Deployment", "Secret"])
        self.assertEqual(kinds["sidecar-native"], ["Deployment", "Secret"])
        standalone = ["Certificate", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget", "Secret", "Service"]
        self.assertEqual(kinds["standalone"], standalone)
        self.assertEqual(kinds["standalone-sentinel-monitoring"], sorted(standalone + ["PrometheusRule", "ServiceMonitor"]))

    def test_prometheus_rule_holds_exactly_the_alert_rules(self):
        alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
        rule = workload("standalone-sentinel-monitoring").named("PrometheusRule", "stigg-sidecar")
        self.assertEqual(rule["spec"]["groups"], alerts["groups"])
        # and the committed file is what make_rule.py writes
        script = KUBERNETES / "components" / "monitoring" / "make_rule.py"
        namespace: dict = {"__name__": "make_rule", "__file__": str(script)}
        exec(compile(script.read_text(), str(script), "exec"), namespace)
        self.assertEqual((script.parent / "prometheus-rule.yaml").read_text(), namespace["render"]())


# The checks are mixins (trial would run a TestCase base on its own); mypy sees their TestCase.
if TYPE_CHECKING:
    _Checks = SynchronousTestCase
else:
    _Checks = object


class _ShapeChecks(_Checks):
    """What every shape must hold; a subclass per overlay."""

    overlay: str

    def setUp(self) -> None:
        self.w = workload(self.overlay)
        self.env = self.w.env

    def settings(self) -> Settings:
        """What the sidecar would run with: its variables, the secret files written where they
        would be mounted (the Secrets' placeholders)."""
        values: dict[str, str] = {}
        directory = Path(tempfile.mkdtemp())
        for name, e in self.env.items():
            value = e["value"]
            if name.endswith("_FILE") and name[: -len("_FILE")] in SECRET_SPECS:
                volume, key = self.w.mounted_file(value)
                secret = volume["secret"]
                (item,) = [i for i in secret["items"] if i["path"] == key]
                value = str(directory / name)
                Path(value).write_text(secret_value(self.w.docs, secret["secretName"], item["key"]))
            values[name] = value
        return sidecar_settings(values)

    def port(self, port: int | str) -> int:
        if isinstance(port, int):
            return port
        (number,) = [p["containerPort"] for p in self.w.sidecar["ports"] if p.get("name") == port]
        return number

    def test_every_sidecar_variable_is_a_real_setting(self):
        # Besides the settings: OpenTelemetry's own variables (the tracing component), checked below.
        self.assertEqual({name for name in self.env if not name.startswith("OTEL_")} - SETTING_NAMES, set())

    def test_traces_go_to_the_collector_in_the_cluster(self):
        otel = {name: e["value"] for name, e in self.env.items() if name.startswith("OTEL_")}
        self.assertEqual(otel["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://otel-collector.observability:4318")
        self.assertEqual(otel["OTEL_SERVICE_NAME"], "stigg-sidecar")
        self.assertTrue(tracing.wanted(otel))
        tracing.check(otel)  # the values a start would refuse with one line

    def test_values_are_strings_as_kubernetes_requires(self):
        for container in [self.w.sidecar, *self.w.apps]:
            for e in container.get("env", []):
                self.assertIn("value", e, f"{e['name']}: secrets come as files, not valueFrom")
                self.assertIsInstance(e["value"], str, e["name"])

    def test_api_key_is_a_file_from_the_secret_in_the_manifest(self):
        self.assertNotIn("SERVER_API_KEY", self.env)
        volume, key = self.w.mounted_file(self.env["SERVER_API_KEY_FILE"]["value"])
        (item,) = [i for i in volume["secret"]["items"] if i["path"] == key]
        self.assertTrue(secret_value(self.w.docs, volume["secret"]["secretName"], item["key"]))
        self.assertEqual(self.settings().server_api_key, secret_value(self.w.docs, volume["secret"]["secretName"], item["key"]))

    def test_secret_settings_never_in_the_environment(self):
        for name in SECRET_SPECS:
            self.assertNotIn(name, self.env)

    def test_secret_volumes_are_readable_by_the_sidecars_group_only(self):
        self.assertEqual(self.w.pod["securityContext"]["fsGroup"], 10001)
        for volume in self.w.pod["volumes"]:
            if "secret" in volume:
                self.assertEqual(volume["secret"]["defaultMode"], 0o440, volume["name"])

    def test_the_environment_validates_as_settings(self):
        settings = self.settings()
        self.assertFalse(settings.offline)
        self.assertNotIn(settings.bind_address, ("127.0.0.1", "localhost", "::1"), "the kubelet probes the pod IP")

    def test_container_ports_are_the_settings_ports(self):
        settings = self.settings()
        ports = {p["name"]: p["containerPort"] for p in self.w.sidecar["ports"]}
        self.assertEqual(ports, {"grpc": settings.port, "http": settings.http_port})
        self.assertEqual((settings.port, settings.http_port), (8443, 8080))

    def test_http_probes_use_the_health_and_ready_paths(self):
        settings = self.settings()
        live, ready = self.w.sidecar["livenessProbe"]["httpGet"], self.w.sidecar["readinessProbe"]["httpGet"]
        self.assertEqual(live["path"], f"/{settings.health_endpoint_url}")
        self.assertEqual(ready["path"], f"/{settings.ready_endpoint_url}")
        self.assertEqual(self.port(live["port"]), settings.http_port)
        self.assertEqual(self.port(ready["port"]), settings.http_port)

    def test_resources_have_requests_and_limits(self):
        resources = self.w.sidecar["resources"]
        for part in ("requests", "limits"):
            self.assertEqual(set(resources[part]), {"cpu", "memory"}, part)

    def test_grace_period_outlasts_the_whole_stop_which_is_set_explicitly(self):
        self.assertIn("SHUTDOWN_GRACE_SECS", self.env)
        self.assertEqual(self.w.pod["terminationGracePeriodSeconds"], 10)
        self.assertGreater(self.w.pod["terminationGracePeriodSeconds"], self.settings().shutdown_grace_secs)

    def test_state_dir_is_a_mounted_volume_and_the_image_volume(self):
        settings = self.settings()
        self.assertTrue(settings.spool_writes)
        mounts = {m["mountPath"]: m["name"] for m in self.w.sidecar["volumeMounts"]}
        self.assertIn(settings.state_dir, mounts)
        self.assertIn(mounts[settings.state_dir], {v["name"] for v in self.w.pod["volumes"]})
        self.assertIn(settings.state_dir, dockerfile_instructions("VOLUME"))

    def test_locked_down_as_the_image_allows(self):
        (uid,) = re.findall(r"--uid (\d+)", DOCKERFILE.read_text())
        context = self.w.sidecar["securityContext"]
        self.assertEqual(context["runAsUser"], int(uid))
        self.assertIs(context["runAsNonRoot"], True)
        self.assertIs(context["readOnlyRootFilesystem"], True)
        self.assertIs(context["allowPrivilegeEscalation"], False)
        self.assertEqual(context["capabilities"]["drop"], ["ALL"])
        self.assertEqual(context["seccompProfile"]["type"], "RuntimeDefault")
        self.assertEqual(self.w.pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault")
        # a read-only root: the sidecar's /tmp (its working directory) is a volume
        self.assertIn("/tmp", {m["mountPath"] for m in self.w.sidecar["volumeMounts"]})


class _InTheAppsPod(_ShapeChecks):
    def test_grpc_startup_probe_targets_the_grpc_port(self):
        kinds = ("startupProbe", "livenessProbe", "readinessProbe")
        probes = [k for k in kinds if "grpc" in self.w.sidecar.get(k, {})]
        self.assertEqual(probes, ["startupProbe"])
        self.assertEqual(self.port(self.w.sidecar["startupProbe"]["grpc"]["port"]), self.settings().port)

    def test_app_is_pointed_at_the_sidecar_grpc_port(self):
        self.assertTrue(self.w.apps, "an application container beside the sidecar")
        app_env = {e["name"]: e.get("value") for c in self.w.apps for e in c.get("env", [])}
        port = self.settings().port
        self.assertEqual(app_env["STIGG_SIDECAR_TARGET"], f"localhost:{port}")
        self.assertEqual(app_env["STIGG_SIDECAR_PORT"], str(port))
        self.assertEqual(app_env["STIGG_SIDECAR_HOST"], "localhost")

    def test_commented_out_variables_are_real_settings_too(self):
        commented = set(_COMMENTED_ENV.findall((KUBERNETES / "base" / "sidecar" / "deployment.yaml").read_text()))
        self.assertIn("REDIS_ENVIRONMENT_PREFIX", commented)
        self.assertLessEqual(commented, SETTING_NAMES)


class SidecarOverlayTests(_InTheAppsPod, SynchronousTestCase):
    overlay = "sidecar"

    def test_the_sidecar_is_a_regular_container(self):
        self.assertFalse(self.w.native)
        self.assertNotIn("initContainers", self.w.pod)


class NativeSidecarOverlayTests(_InTheAppsPod, SynchronousTestCase):
    overlay = "sidecar-native"

    def test_the_sidecar_is_an_init_container_restarted_always(self):
        self.assertTrue(self.w.native)
        (init,) = self.w.pod["initContainers"]
        self.assertEqual((init["name"], init["restartPolicy"]), ("stigg-sidecar", "Always"))
        self.assertEqual([c["name"] for c in self.w.pod["containers"]], ["app"])

    def test_same_container_as_the_sidecar_overlay_but_for_its_restart_policy(self):
        regular = workload("sidecar").sidecar
        self.assertEqual({k: v for k, v in self.w.sidecar.items() if k != "restartPolicy"}, regular)


class _Standalone(_ShapeChecks):
    def test_three_replicas_spread_across_nodes_and_rolled_one_at_a_time(self):
        spec = self.w.deployment["spec"]
        self.assertEqual(spec["replicas"], 3)
        self.assertEqual(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0)
        (by_node,) = [c for c in self.w.pod["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname"]
        self.assertEqual((by_node["maxSkew"], by_node["whenUnsatisfiable"]), (1, "DoNotSchedule"))
        self.assertEqual(by_node["labelSelector"]["matchLabels"], spec["selector"]["matchLabels"])
        self.assertEqual([c["name"] for c in self.w.pod["containers"]], ["stigg-sidecar"])

    def selects_the_replicas(self, selector: dict) -> None:
        labels = self.w.deployment["spec"]["template"]["metadata"]["labels"]
        self.assertTrue(selector)
        self.assertLessEqual(selector.items(), labels.items())

    def test_a_service_and_a_headless_service_for_client_side_round_robin(self):
        service = self.w.named("Service", "stigg-sidecar")
        headless = self.w.named("Service", "stigg-sidecar-headless")
        self.assertNotIn("clusterIP", service["spec"])
        self.assertEqual(headless["spec"]["clusterIP"], "None")
        for svc in (service, headless):
            self.selects_the_replicas(svc["spec"]["selector"])
            grpc_ports = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
            self.assertEqual([(p["port"], self.port(p["targetPort"])) for p in grpc_ports], [(8443, 8443)])

    def test_disruption_budget_and_autoscaler(self):
        budget = self.w.named("PodDisruptionBudget", "stigg-sidecar")
        self.assertEqual(budget["spec"]["maxUnavailable"], 1)
        self.selects_the_replicas(budget["spec"]["selector"]["matchLabels"])
        hpa = self.w.named("HorizontalPodAutoscaler", "stigg-sidecar")
        target = hpa["spec"]["scaleTargetRef"]
        self.assertEqual((target["kind"], target["name"]), ("Deployment", self.w.deployment["metadata"]["name"]))
        self.assertEqual(hpa["spec"]["minReplicas"], self.w.deployment["spec"]["replicas"])
        self.assertGreater(hpa["spec"]["maxReplicas"], hpa["spec"]["minReplicas"])
        (metric,) = hpa["spec"]["metrics"]
        self.assertEqual(metric["resource"]["name"], "cpu")

    def test_network_policies_let_only_labelled_clients_reach_grpc_and_monitoring_reach_http(self):
        policies = {p["metadata"]["name"]: p["spec"] for p in self.w.of_kind("NetworkPolicy")}
        self.assertEqual(set(policies), {"stigg-sidecar-grpc", "stigg-sidecar-http"})
        reached = {}
        for spec in policies.values():
            self.selects_the_replicas(spec["podSelector"]["matchLabels"])
            self.assertEqual(spec["policyTypes"], ["Ingress"])
            (rule,) = spec["ingress"]
            ((port,),) = [rule["ports"]]
            reached[self.port(port["port"])] = rule["from"]
        self.assertEqual(reached[8443], [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"stigg-sidecar-client": "true"}}}])
        self.assertEqual(reached[8080], [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}])

    def test_tls_from_the_cert_manager_certificate_and_caller_tokens_as_files(self):
        certificate = self.w.named("Certificate", "stigg-sidecar")
        self.assertEqual(certificate["apiVersion"], "cert-manager.io/v1")
        self.assertEqual({"stigg-sidecar", "stigg-sidecar-headless"} - set(certificate["spec"]["dnsNames"]), set())
        files = {
            "TLS_CERT_FILE": "/etc/stigg-sidecar/tls/tls.crt",
            "TLS_KEY_FILE": "/etc/stigg-sidecar/tls/tls.key",
            "CALLER_TOKENS_FILE": "/etc/stigg-sidecar/callers/tokens",
        }
        self.assertEqual({name: self.env[name]["value"] for name in files}, files)
        tls, cert_key = self.w.mounted_file(files["TLS_CERT_FILE"])
        self.assertEqual((tls["secret"]["secretName"], cert_key), (certificate["spec"]["secretName"], "tls.crt"))
        self.assertNotIn("items", tls["secret"], "tls.crt, tls.key and ca.crt all mounted")
        self.assertEqual(self.w.mounted_file(files["TLS_KEY_FILE"]), (tls, "tls.key"))
        callers, key = self.w.mounted_file(files["CALLER_TOKENS_FILE"])
        (item,) = callers["secret"]["items"]
        self.assertEqual(key, item["path"])
        # As shipped the Secret lists no caller: a sidecar started from it unchanged refuses to
        # start rather than accept a token published here. Its example line, filled in, parses.
        shipped = secret_value(self.w.docs, callers["secret"]["secretName"], item["key"])
        with self.assertRaisesRegex(CallerTokensError, "has no callers"):
            parse_callers(shipped, "the Secret")
        filled = shipped.replace("# ", "", 1).replace("<a random token of at least 16 characters>", "0" * 64)
        self.assertEqual(len(parse_callers(filled, "the Secret").entries), 1)
        settings = self.settings()
        self.assertEqual((settings.tls_cert_file, settings.caller_tokens_file), (files["TLS_CERT_FILE"], files["CALLER_TOKENS_FILE"]))

    def test_http_startup_probe_since_the_kubelets_grpc_probe_speaks_no_tls(self):
        startup = self.w.sidecar["startupProbe"]
        self.assertNotIn("grpc", startup)
        self.assertEqual(startup["httpGet"]["path"], f"/{self.settings().ready_endpoint_url}")

    def test_every_replica_shares_redis(self):
        settings = self.settings()
        self.assertTrue(settings.redis_enabled)
        self.assertEqual(settings.redis_password, secret_value(self.w.docs, "stigg-sidecar-redis", "password"))


class StandaloneOverlayTests(_Standalone, SynchronousTestCase):
    overlay = "standalone"

    def test_redis_by_host(self):
        settings = self.settings()
        self.assertEqual((settings.redis_host, settings.redis_port, settings.redis_sentinels), ("redis", 6379, ()))


class StandaloneSentinelMonitoringOverlayTests(_Standalone, SynchronousTestCase):
    overlay = "standalone-sentinel-monitoring"

    def test_redis_through_sentinel(self):
        settings = self.settings()
        self.assertEqual(len(settings.redis_sentinels), 3)
        self.assertNotIn("REDIS_HOST", self.env)

    def test_service_monitor_scrapes_the_metrics_port_of_the_service(self):
        monitor = self.w.named("ServiceMonitor", "stigg-sidecar")
        service = self.w.named("Service", "stigg-sidecar")
        self.assertLessEqual(monitor["spec"]["selector"]["matchLabels"].items(), service["metadata"]["labels"].items())
        (endpoint,) = monitor["spec"]["endpoints"]
        self.assertIn(endpoint["port"], {p["name"] for p in service["spec"]["ports"]})
        self.assertEqual(endpoint["path"], "/metrics")
        self.assertTrue(self.settings().metrics_enabled)
