"""Metrics: the sidecar's Prometheus registry and its named metrics.

Owns metric names, labels and buckets. One registry per sidecar (not the process-global one) so
tests can build several. Hot-path counters are resolved to their labelled children once, so an
increment costs one locked add. Holds no secret and never takes one as a label value.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from stigg_sidecar.lifecycle import gcpolicy

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class CachedPage:
    """The exposition rendered at most once per `max_age` seconds; scrapes in between get the same
    bytes. Rendering walks every metric on the reactor (milliseconds); without this, clients
    scraping in a loop take the whole reactor and probes and cache misses wait behind them.
    `max_age` 0 renders every scrape. `clock` is monotonic: a wall-clock step changes nothing."""

    def __init__(self, render: Callable[[], bytes], max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._render = render
        self._max_age = max_age
        self._clock = clock
        self._page: bytes | None = None
        self._rendered_at = 0.0
        self.renders = 0

    def page(self) -> bytes:
        now = self._clock()
        if self._page is None or self._max_age <= 0 or now - self._rendered_at >= self._max_age:
            self._page = self._render()
            self._rendered_at = now
            self.renders += 1
        return self._page


def reason_label(reason: str) -> str:
    """One style for every `reason` label value: snake_case ("Unknown" -> "unknown",
    "FeatureTypeMismatch" -> "feature_type_mismatch"; "granted" stays)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", reason).lower()


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
        # The hot path (every gRPC call) counts into per-thread tallies, summed at scrape time.
        self.hot = HotPathTally(registry=r)
        self.upstream_latency = Histogram(
            "sidecar_upstream_request_duration_seconds",
            "Calls to Stigg by endpoint and outcome",
            ["endpoint", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter("sidecar_fallback_answers", "Reads answered with a fallback, by reason", ["reason"], registry=r)
        self.fast_failed_reads = Counter(
            "sidecar_fast_failed_reads",
            "Cache misses answered at once without waiting on Stigg: upstream_down (its circuit breaker"
            " is open) or overloaded (MAX_WAITING_READS reads already wait)",
            ["reason"],
            registry=r,
        )
        self.upstream_breaker_open = Gauge(
            "sidecar_upstream_breaker_open",
            "1 while calls to that upstream (edge, graphql) fail at once after consecutive failures",
            ["upstream"],
            registry=r,
        )
        self.cache_entries = Gauge("sidecar_cache_entries", "Customers in the memory cache", registry=r)
        self.cache_bytes = Gauge("sidecar_cache_bytes", "Bytes held by the memory cache", registry=r)
        self.cache_evictions = Gauge("sidecar_cache_evictions", "Entries evicted for space so far", registry=r)
        self.gc_frozen_objects = Gauge(
            "sidecar_gc_frozen_objects",
            "Objects frozen out of the garbage collector's walks at start (gcpolicy); constant while running",
            registry=r,
        )
        self.gc_frozen_objects.set_function(gcpolicy.frozen_objects)
        self.clock_skew = Gauge(
            "sidecar_clock_skew_seconds",
            "The local wall clock minus Stigg's (from its responses' Date); past 5 s decisions use Stigg's time",
            registry=r,
        )
        self.realtime_connected = Gauge("sidecar_realtime_connected", "1 while the real-time socket is up", registry=r)
        self.realtime_update_age = Gauge(
            "sidecar_realtime_last_update_age_seconds", "Seconds since the last real-time update (-1: none yet)", registry=r
        )
        self.realtime_malformed = Gauge("sidecar_realtime_malformed_frames", "Real-time frames ignored", registry=r)
        self.upstream_malformed = _CountedElsewhere(
            "sidecar_upstream_malformed_entitlements",
            "Entitlements Stigg sent with a malformed field, each left out of its customer (answered by fallbacks)",
            registry=r,
        )
        self.ready = Gauge("sidecar_ready", "1 while readiness is UP", registry=r)
        # Alert rules join on it: a socket that is off by configuration is not "down", and an offline
        # sidecar answers fallbacks by design.
        self.info = Gauge(
            "sidecar_info", "Always 1; the labels say the version and the mode",
            ["version", "mode", "realtime", "redis", "spool"], registry=r,
        )
        # The write spool (SPOOL_WRITES) and the cache snapshot (STATE_DIR).
        self.spool_records = Gauge("sidecar_spool_records", "Acknowledged writes waiting for delivery", registry=r)
        self.spool_bytes = Gauge("sidecar_spool_bytes", "Bytes of the records waiting for delivery", registry=r)
        self.spool_oldest_age = Gauge(
            "sidecar_spool_oldest_age_seconds", "Age of the oldest record waiting for delivery (0: none)", registry=r
        )
        self.spool_delivered = Counter("sidecar_spool_delivered", "Spooled records Stigg accepted", registry=r)
        self.spool_dead_letters = Counter(
            "sidecar_spool_dead_letters", "Spooled records Stigg refused for good (moved to the dead letters)", registry=r
        )
        self.spool_batch_size = Histogram(
            "sidecar_spool_batch_size", "Records per delivery call to Stigg",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r,
        )
        self.snapshot_loaded_age = Gauge(
            "sidecar_snapshot_loaded_age_seconds", "Age of the cache snapshot loaded at start (-1: none loaded)", registry=r
        )
        self.snapshot_loaded_age.set(-1)

    def cache_hit(self) -> None:
        self.hot.count_hit()

    def cache_miss(self) -> None:
        self.hot.mine().misses += 1

    def fallback_answered(self, reason: str) -> None:
        """A read answered with a fallback; `reason` is Stigg's (CamelCase) or ours ("granted", "error")."""
        self.fallbacks.labels(reason_label(reason)).inc()

    def upstream_attempt(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.upstream_latency.labels(endpoint, outcome).observe(seconds)
        if outcome not in ("ok", "local"):  # "local": never left the process (no file descriptor)
            self.network_request_errors.inc()
            if outcome in ("401", "403"):
                self.invalid_api_key_errors.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ThreadTally:
    """What one thread counted. Only its own thread writes it, so `+=` needs no lock; the
    scrape reads it from another thread and may see it a few calls behind, never torn.

    `methods[method]` is one list per method: [calls answered OK, sum of seconds, then the count
    per latency bucket (the last one past every bound)]; `calls` counts the other outcomes."""

    __slots__ = ("hits", "misses", "calls", "methods", "callers")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.calls: dict[tuple[str, str], int] = {}
        self.callers: dict[tuple[str, str], int] = {}
        self.methods: dict[str, list] = {}

    def method(self, name: str) -> list:
        slot = self.methods.get(name)
        if slot is None:
            slot = self.methods[name] = [0, 0.0] + [0] * (len(LATENCY_BUCKETS) + 1)
        return slot


class HotPathTally:
    """Lock-free counting for every gRPC call: cache hits and misses, calls by method and code,
    and a latency histogram by method, exposed with the names prometheus_client would give them.
    prometheus_client's own metrics take a lock per update, which cost ~7% of throughput here."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._local = threading.local()  # .tally, and .methods (its `methods`, one lookup nearer)
        self._tallies: list[_ThreadTally] = []
        self._lock = threading.Lock()  # only when a thread counts for the first time
        registry.register(self)

    def mine(self) -> _ThreadTally:
        try:
            return self._local.tally
        except AttributeError:
            tally = self._local.tally = _ThreadTally()
            self._local.methods = tally.methods
            with self._lock:
                self._tallies.append(tally)
            return tally

    def count_hit(self) -> None:
        """A read answered from memory (every cached read: one call, no lock)."""
        try:
            self._local.tally.hits += 1
        except AttributeError:
            self.mine().hits += 1

    def count_caller(self, caller: str, outcome: str) -> None:
        """A call checked against CALLER_TOKENS_FILE: the caller's name (never a token) and the outcome."""
        callers = self.mine().callers
        key = (caller, outcome)
        callers[key] = callers.get(key, 0) + 1

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        tally = self.mine()
        slot = tally.method(method)
        if code == "OK":
            slot[0] += 1
        else:
            calls = tally.calls
            key = (method, code)
            calls[key] = calls.get(key, 0) + 1
        slot[1] += seconds
        slot[2 + bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def timed(self, method: str, behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """`behaviour` (a unary gRPC handler's) counted and timed as `method`. A call answered
        costs two clock reads and three list updates in this thread's own tally, no lock and no
        call of ours besides the handler (see grpc/timing.py for where it is installed)."""
        local = self._local
        mine = self.mine
        observe = self.observe_call
        clock = time.perf_counter
        bounds = LATENCY_BUCKETS
        bucket = bisect.bisect_left

        def timed(request: Any, context: Any) -> Any:
            started = clock()
            try:
                response = behaviour(request, context)
            except BaseException:
                status = context.code() if hasattr(context, "code") else None
                observe(method, status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN", clock() - started)
                raise
            seconds = clock() - started
            try:
                slot = local.methods[method]
            except (AttributeError, KeyError):
                slot = mine().method(method)
            slot[0] += 1
            slot[1] += seconds
            slot[2 + bucket(bounds, seconds)] += 1
            return response

        timed.__name__ = getattr(behaviour, "__name__", method)
        return timed

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            tallies = list(self._tallies)
        hits = CounterMetricFamily("sidecar_cache_hits", "Reads answered from memory")
        hits.add_metric([], sum(t.hits for t in tallies))
        misses = CounterMetricFamily("sidecar_cache_misses", "Reads that had to fetch")
        misses.add_metric([], sum(t.misses for t in tallies))
        calls: dict[tuple[str, str], int] = {}
        callers: dict[tuple[str, str], int] = {}
        sums: dict[str, float] = {}
        buckets: dict[str, list[int]] = {}
        for t in tallies:
            for key, n in list(t.calls.items()):
                calls[key] = calls.get(key, 0) + n
            for key, n in list(t.callers.items()):
                callers[key] = callers.get(key, 0) + n
            for method, slot in list(t.methods.items()):
                slot = list(slot)  # one copy: its count, sum and buckets from the same moment or so
                if slot[0]:
                    calls[(method, "OK")] = calls.get((method, "OK"), 0) + slot[0]
                sums[method] = sums.get(method, 0.0) + slot[1]
                total = buckets.setdefault(method, [0] * (len(slot) - 2))
                for i, n in enumerate(slot[2:]):
                    total[i] += n
        requests = CounterMetricFamily("sidecar_grpc_requests", "gRPC calls by method and status code", labels=["method", "code"])
        for (method, code), n in sorted(calls.items()):
            requests.add_metric([method, code], n)
        latency = HistogramMetricFamily(
            "sidecar_grpc_request_duration_seconds", "gRPC handling time", labels=["method"]
        )
        for method, counts in sorted(buckets.items()):
            cumulative, running = [], 0
            for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                running += n
                cumulative.append((bound, running))
            latency.add_metric([method], cumulative, sums[method])
        by_caller = CounterMetricFamily(
            "sidecar_grpc_caller_requests",
            "gRPC calls checked against CALLER_TOKENS_FILE by caller name and outcome (ok, unauthenticated:"
            " no valid token, caller \"(none)\"; permission_denied: a read token on a write)",
            labels=["caller", "outcome"],
        )
        for (caller, outcome), n in sorted(callers.items()):
            by_caller.add_metric([caller, outcome], n)
        yield from (hits, misses, requests, latency, by_caller)


class _CountedElsewhere:
    """A counter whose value another part keeps (read at scrape time), exposed as `<name>_total`."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._read: Callable[[], float] = lambda: 0
        registry.register(self)

    def count_from(self, read: Callable[[], float]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation)
        family.add_metric([], self._read())
        yield family
