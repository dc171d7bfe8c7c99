"""Writes deploy/grafana/stigg-sidecar.json, the Grafana dashboard of the sidecar's metrics.

Run `python deploy/grafana/make_dashboard.py` after changing a panel here; tests/docs/test_monitoring.py
checks that the JSON is this script's output and that every metric it queries is exported.
"""

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}
panels: list[dict] = []
y = 0  # the next free grid row


def row(title: str) -> None:
    global y
    panels.append({"type": "row", "id": len(panels) + 1, "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1


def line(items: list[tuple[str, list[tuple[str, str]], str, str]]) -> None:
    """One grid row of equal-width panels: (title, [(expr, legend)], unit or "stat", description)."""
    global y
    width = 24 // len(items)
    for i, (title, targets, unit, description) in enumerate(items):
        stat = unit == "stat"
        panels.append({
            "type": "stat" if stat else "timeseries",
            "id": len(panels) + 1,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": 8, "w": width, "x": i * width, "y": y},
            "fieldConfig": {"defaults": {"unit": "none" if stat else unit}, "overrides": []},
            "options": (
                {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value", "graphMode": "none"}
                if stat else {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
            ),
            "targets": [
                {"refId": chr(ord("A") + j), "datasource": DS, "expr": expr, "legendFormat": legend}
                for j, (expr, legend) in enumerate(targets)
            ],
        })
    y += 8


def m(name: str) -> str:
    """A metric selected by the dashboard's job and instance variables."""
    return f'{name}{{job=~"$job", instance=~"$instance"}}'


row("Overview")
line([
    ("Ready", [(m("sidecar_ready"), "{{instance}}")], "stat", "1 while readiness is UP (GET /readyz)."),
    ("Version and mode", [(m("sidecar_info"), "{{instance}} {{version}} {{mode}} socket={{realtime}} redis={{redis}} spool={{spool}}")], "stat", "sidecar_info's labels: version, offline/online, socket, Redis, spool."),
    ("Real-time socket", [(m("sidecar_realtime_connected"), "{{instance}}")], "stat", "1 while the WebSocket to Stigg is up."),
    ("Memory (RSS)", [(m("process_resident_memory_bytes"), "{{instance}}")], "bytes", "Resident memory of the sidecar process."),
])
row("gRPC (what your application sees)")
line([
    ("Calls per second by method and code", [(f'sum by (method, code) (rate({m("sidecar_grpc_requests_total")}[$__rate_interval]))', "{{method}} {{code}}")], "reqps", "gRPC calls answered, by method and status code."),
    ("Latency p50 / p99 by method", [
        (f'histogram_quantile(0.5, sum by (le, method) (rate({m("sidecar_grpc_request_duration_seconds_bucket")}[$__rate_interval])))', "p50 {{method}}"),
        (f'histogram_quantile(0.99, sum by (le, method) (rate({m("sidecar_grpc_request_duration_seconds_bucket")}[$__rate_interval])))', "p99 {{method}}"),
    ], "s", "Time spent handling each call in the sidecar."),
])
line([
    ("Mean latency by method", [(f'sum by (method) (rate({m("sidecar_grpc_request_duration_seconds_sum")}[$__rate_interval])) / sum by (method) (rate({m("sidecar_grpc_request_duration_seconds_count")}[$__rate_interval]))', "{{method}}")], "s", "Average handling time."),
    ("Fallback answers by reason", [(f'sum by (reason) (rate({m("sidecar_fallback_answers_total")}[$__rate_interval]))', "{{reason}}")], "reqps", "Reads answered with fallback values (Stigg unreachable, slow, or the customer unknown)."),
    ("Reads answered without waiting, by reason", [(f'sum by (reason) (rate({m("sidecar_fast_failed_reads_total")}[$__rate_interval]))', "{{reason}}")], "reqps", "Cache misses answered at once: upstream_down (circuit breaker open) or overloaded (too many reads already wait)."),
])
row("Cache")
line([
    ("Hit ratio", [(f'sum(rate({m("sidecar_cache_hits_total")}[$__rate_interval])) / (sum(rate({m("sidecar_cache_hits_total")}[$__rate_interval])) + sum(rate({m("sidecar_cache_misses_total")}[$__rate_interval])))', "hit ratio")], "percentunit", "Reads answered from memory, of all reads."),
    ("Customers cached", [(m("sidecar_cache_entries"), "{{instance}}")], "short", "Entries in the memory cache."),
    ("Cache bytes", [(m("sidecar_cache_bytes"), "{{instance}}")], "bytes", "Memory held by the cache (bounded by CACHE_MAX_SIZE_BYTES)."),
    ("Evictions per 5 minutes", [(f'delta({m("sidecar_cache_evictions")}[5m])', "{{instance}}")], "short", "Entries evicted for space (a running count)."),
])
row("Stigg (upstream)")
line([
    ("Stigg call latency p99 by endpoint", [(f'histogram_quantile(0.99, sum by (le, endpoint) (rate({m("sidecar_upstream_request_duration_seconds_bucket")}[$__rate_interval])))', "{{endpoint}}")], "s", "Calls to Stigg's Edge and GraphQL APIs."),
    ("Stigg calls by outcome", [(f'sum by (endpoint, outcome) (rate({m("sidecar_upstream_request_duration_seconds_count")}[$__rate_interval]))', "{{endpoint}} {{outcome}}")], "reqps", "Every attempt, by endpoint and outcome (ok, an HTTP status, timeout, ...)."),
    ("Circuit breaker open", [(f'max by (upstream) ({m("sidecar_upstream_breaker_open")})', "{{upstream}}")], "short", "1 while calls to that Stigg API fail at once after an outage was noticed."),
    ("Errors (Stigg's recommended metrics)", [
        (f'increase({m("sidecar_network_request_errors_total")}[5m])', "network errors {{instance}}"),
        (f'increase({m("sidecar_invalid_api_key_errors_total")}[5m])', "invalid API key {{instance}}"),
        (f'increase({m("sidecar_initialization_errors_total")}[5m])', "initialization {{instance}}"),
        (f'increase({m("sidecar_redis_client_errors_total")}[5m])', "Redis {{instance}}"),
    ], "short", "Errors per 5 minutes; the alert rules in deploy/prometheus/alerts.yaml fire on these."),
])
line([
    ("Age of the last real-time update", [(m("sidecar_realtime_last_update_age_seconds"), "{{instance}}")], "s", "-1: none received yet."),
    ("Malformed real-time frames", [(m("sidecar_realtime_malformed_frames"), "{{instance}}")], "short", "Frames from Stigg's socket that were ignored."),
    ("Malformed entitlements from Stigg", [(f'increase({m("sidecar_upstream_malformed_entitlements_total")}[5m])', "{{instance}}")], "short", "Entitlements left out because a field was malformed (answered by fallbacks), per 5 minutes."),
    ("Snapshot age at start", [(m("sidecar_snapshot_loaded_age_seconds"), "{{instance}}")], "s", "Age of the cache snapshot loaded from STATE_DIR at start (-1: none)."),
])
row("Write spool (SPOOL_WRITES=1)")
line([
    ("Records waiting", [(m("sidecar_spool_records"), "{{instance}}")], "short", "Acknowledged writes not yet delivered to Stigg."),
    ("Spool bytes", [(m("sidecar_spool_bytes"), "{{instance}}")], "bytes", "Bytes waiting; writes are refused past SPOOL_MAX_BYTES."),
    ("Oldest waiting", [(m("sidecar_spool_oldest_age_seconds"), "{{instance}}")], "s", "Age of the oldest undelivered write."),
])
line([
    ("Delivered and dead-lettered", [
        (f'rate({m("sidecar_spool_delivered_total")}[$__rate_interval])', "delivered {{instance}}"),
        (f'rate({m("sidecar_spool_dead_letters_total")}[$__rate_interval])', "dead letters {{instance}}"),
    ], "ops", "Spooled records Stigg accepted, and those it refused for good."),
    ("Records per delivery call", [(f'sum(rate({m("sidecar_spool_batch_size_sum")}[$__rate_interval])) / sum(rate({m("sidecar_spool_batch_size_count")}[$__rate_interval]))', "mean batch")], "short", "How full the batches sent to Stigg are."),
    ("CPU", [(f'rate({m("process_cpu_seconds_total")}[$__rate_interval])', "{{instance}}")], "percentunit", "CPU seconds per second used by the sidecar."),
])

dashboard = {
    "title": "Stigg sidecar",
    "uid": "stigg-sidecar",
    "description": "stigg-sidecar's metrics (GET /metrics on HTTP_PORT). Alerts: deploy/prometheus/alerts.yaml.",
    "tags": ["stigg", "sidecar"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source", "current": {}},
        {"name": "job", "type": "query", "datasource": DS, "query": "label_values(sidecar_ready, job)", "refresh": 2, "includeAll": True, "multi": True, "current": {}, "label": "Job"},
        {"name": "instance", "type": "query", "datasource": DS, "query": 'label_values(sidecar_ready{job=~"$job"}, instance)', "refresh": 2, "includeAll": True, "multi": True, "current": {}, "label": "Instance"},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
if __name__ == "__main__":
    Path(__file__).with_name("stigg-sidecar.json").write_text(json.dumps(dashboard, indent=2) + "\n")
