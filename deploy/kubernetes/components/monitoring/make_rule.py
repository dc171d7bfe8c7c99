"""Write prometheus-rule.yaml: deploy/prometheus/alerts.yaml's groups as a PrometheusRule.

    python deploy/kubernetes/components/monitoring/make_rule.py

The rules stay in one place (alerts.yaml, with its promtool unit tests); the test suite checks that
the committed PrometheusRule holds exactly those groups.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parents[2] / "prometheus" / "alerts.yaml"
RULE = HERE / "prometheus-rule.yaml"

HEADER = """\
# Generated from deploy/prometheus/alerts.yaml by make_rule.py in this directory: edit the alerts
# there and run `python deploy/kubernetes/components/monitoring/make_rule.py`.
"""


def prometheus_rule() -> dict:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "stigg-sidecar"},
        "spec": {"groups": groups},
    }


def render() -> str:
    return HEADER + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=120, allow_unicode=True)


if __name__ == "__main__":
    RULE.write_text(render())
