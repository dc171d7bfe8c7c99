"""Metrics: the sidecar's Prometheus registry and its named metrics.

Owns metric names, labels and buckets. One registry per sidecar (not the process-global one) so
tests can build several. Hot-path counters are resolved to their labelled children once, so an
increment costs one locked add. Holds no secret and never takes one as a label value.
"""

from __future__ import annotations

import time
from typing import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        # Stigg's documented names.
        self.initialization_errors = Counter(
            "sidecar_initialization_errors", "Start-up checks of the API key that failed", registry=r
        )
        self.invalid_api_key_errors = Counter(
            "sidecar_invalid_api_key_errors", "Calls Stigg refused because of the API key", registry=r
        )
        self.network_request_errors = Counter(
            "sidecar_network_request_errors", "Calls to Stigg that failed", registry=r
        )
        self.redis_client_errors = _CountedElsewhere(
            "sidecar_redis_client_errors", "Redis calls that failed (or timed out)", registry=r
        )
        self.cache_hits = Counter("sidecar_cache_hits", "Reads answered from memory", registry=r)
        self.cache_misses = Counter("sidecar_cache_misses", "Reads that had to fetch", registry=r)
        # Ours.
        self.grpc_requests = Counter(
            "sidecar_grpc_requests", "gRPC calls by method and status code", ["method", "code"], registry=r
        )
        self.grpc_latency = Histogram(
            "sidecar_grpc_request_duration_seconds", "gRPC handling time", ["method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.upstream_latency = Histogram(
            "sidecar_upstream_request_duration_seconds",
            "Calls to Stigg by endpoint and outcome",
            ["endpoint", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter("sidecar_fallback_answers", "Reads answered with a fallback, by reason", ["reason"], registry=r)
        self.cache_entries = Gauge("sidecar_cache_entries", "Customers in the memory cache", registry=r)
        self.cache_bytes = Gauge("sidecar_cache_bytes", "Bytes held by the memory cache", registry=r)
        self.cache_evictions = Gauge("sidecar_cache_evictions", "Entries evicted for space so far", registry=r)
        self.realtime_connected = Gauge("sidecar_realtime_connected", "1 while the real-time socket is up", registry=r)
        self.realtime_update_age = Gauge(
            "sidecar_realtime_last_update_age_seconds", "Seconds since the last real-time update (-1: none yet)", registry=r
        )
        self.realtime_malformed = Gauge("sidecar_realtime_malformed_frames", "Real-time frames ignored", registry=r)
        self.ready = Gauge("sidecar_ready", "1 while readiness is UP", registry=r)
        self._method_children: dict[str, tuple] = {}

    def method(self, name: str):
        """(latency child, {code: counter child}) for one gRPC method, resolved once."""
        children = self._method_children.get(name)
        if children is None:
            children = (self.grpc_latency.labels(name), {})
            self._method_children[name] = children
        return children

    def upstream_attempt(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.upstream_latency.labels(endpoint, outcome).observe(seconds)
        if outcome != "ok":
            self.network_request_errors.inc()
            if outcome in ("401", "403"):
                self.invalid_api_key_errors.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CountedElsewhere:
    """A counter whose value another part keeps (read at scrape time), exposed as `<name>_total`."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._read: Callable[[], float] = lambda: 0
        registry.register(self)

    def count_from(self, read: Callable[[], float]) -> None:
        self._read = read

    def collect(self):
        family = CounterMetricFamily(self._name, self._documentation)
        family.add_metric([], self._read())
        yield family


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every unary call; wrapped handlers are cached per method."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._timed(handler.unary_unary, method.rsplit("/", 1)[-1]),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._handlers[method] = wrapped
        return wrapped

    def _timed(self, behaviour: Callable, name: str) -> Callable:
        latency, codes = self._metrics.method(name)
        requests = self._metrics.grpc_requests
        clock = time.perf_counter

        def count(code: str) -> None:
            child = codes.get(code)
            if child is None:
                child = codes[code] = requests.labels(name, code)
            child.inc()

        def timed(request, context):
            started = clock()
            try:
                response = behaviour(request, context)
            except BaseException:
                status = context.code() if hasattr(context, "code") else None
                count(status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN")
                latency.observe(clock() - started)
                raise
            count("OK")
            latency.observe(clock() - started)
            return response

        return timed
