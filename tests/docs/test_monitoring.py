"""Monitoring that agrees with the code: deploy/prometheus's alert rules pass `promtool check rules`
and their unit tests (`promtool test rules`); every metric the rules and the Grafana dashboard name
is exported by running sidecars (one online against the emulator, with the spool; one offline); and
the metrics' label values follow one style."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import urllib.request

import grpc
import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from stigg_sidecar.ops.metrics import reason_label
from tests.fixtures.paths import ROOT
from tests.fixtures.processes import SidecarProcess, base_env, shared_emulator

PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yaml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "stigg-sidecar.json"

# A metric name in PromQL: ours (sidecar_*) and the process collector's (process_*).
_METRIC = re.compile(r"\b((?:sidecar|process)_[a-z0-9_]+)\b")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        # .ci/run installs Debian's prometheus package (and sets CI, so a missing one fails there);
        # a developer machine may lack it.
        if os.environ.get("CI"):
            raise AssertionError("promtool is not on PATH: install Debian's prometheus package (.ci/run does)")
        raise SkipTest("promtool is not installed (apt-get install prometheus)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def metric_names(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in _METRIC.findall(expr)}


def scrape(sidecar: SidecarProcess) -> set[str]:
    """The names a sidecar's /metrics exports: its samples' (counters with _total, histograms'
    _bucket...), and a labelled counter's even before its first sample (declared by HELP/TYPE)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "gauge":
            names.add(family.name)
    return names


class _Exported:
    """The union of what an online sidecar (emulator upstream, socket, spool) and an offline one
    export after a few calls, computed once for the run."""

    names: set[str] | None = None

    @classmethod
    def get(cls, testcase: SynchronousTestCase) -> set[str]:
        if cls.names is None:
            url = shared_emulator()
            state_dir = os.path.abspath(testcase.mktemp())
            online = SidecarProcess(base_env(
                SERVER_API_KEY="local-dev-key", API_URL=url, EDGE_API_URL=url, WS_URL=url.replace("http", "ws", 1),
                STATE_DIR=state_dir, SPOOL_WRITES="1",
            ))
            offline = SidecarProcess(base_env(OFFLINE="1"))
            try:
                names: set[str] = set()
                for sidecar in (online, offline):
                    with grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
                        stub = SidecarServiceStub(channel)
                        # A known customer (online: fetched from the emulator) and an unknown one.
                        for customer in ("customer-acme", "nobody"):
                            stub.GetBooleanEntitlement(
                                pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="feature-sso"), timeout=15
                            )
                    names |= scrape(sidecar)
            finally:
                online.stop()
                offline.stop()
            cls.names = names
        return cls.names


class AlertRuleTests(SynchronousTestCase):
    def test_rules_pass_promtool_check(self):
        result = run_promtool("check", "rules", ALERTS.name)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout)

    def test_rule_unit_tests_pass(self):
        result = run_promtool("test", "rules", ALERT_TESTS.name)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout)

    def test_every_alert_has_a_unit_test_and_a_severity(self):
        alerts = {rule["alert"]: rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
        tested = {
            case["alertname"]
            for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
            for case in test.get("alert_rule_test", [])
            if case["exp_alerts"]
        }
        self.assertEqual(set(alerts) - tested, set(), "alerts never shown firing in alerts.test.yaml")
        for name, rule in alerts.items():
            self.assertIn(rule["labels"]["severity"], ("page", "warning"), name)

    def test_stigg_recommended_alerts_are_there(self):
        exprs = " ".join(rule_expressions())
        for metric in ("sidecar_initialization_errors_total", "sidecar_network_request_errors_total",
                       "sidecar_redis_client_errors_total"):
            self.assertIn(metric, exprs)

    def test_every_metric_the_rules_name_is_exported(self):
        named = metric_names(rule_expressions())
        self.assertGreater(len(named), 8)
        self.assertEqual(named - _Exported.get(self), set())


class DashboardTests(SynchronousTestCase):
    def test_dashboard_is_grafana_json_with_prometheus_panels(self):
        dashboard = json.loads(DASHBOARD.read_text())
        self.assertEqual(dashboard["title"], "Stigg sidecar")
        self.assertTrue(dashboard["panels"])
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                self.assertTrue(panel["targets"], panel["title"])
                self.assertEqual(panel["datasource"]["uid"], "${datasource}", panel["title"])
        self.assertEqual(len({p["id"] for p in dashboard["panels"]}), len(dashboard["panels"]))

    def test_dashboard_is_what_its_script_makes(self):
        made = runpy.run_path(str(DASHBOARD.with_name("make_dashboard.py")))["dashboard"]
        self.assertEqual(json.loads(DASHBOARD.read_text()), made, "run python deploy/grafana/make_dashboard.py")

    def test_every_metric_the_dashboard_queries_is_exported(self):
        named = metric_names(dashboard_expressions())
        self.assertGreater(len(named), 15)
        self.assertEqual(named - _Exported.get(self), set())


class LabelStyleTests(SynchronousTestCase):
    def test_reason_labels_are_snake_case(self):
        self.assertEqual(
            [reason_label(r) for r in ("Unknown", "granted", "error", "FeatureTypeMismatch", "NoActiveSubscription")],
            ["unknown", "granted", "error", "feature_type_mismatch", "no_active_subscription"],
        )
