"""The assembly: settings in, the service tree out, built in phases (the only module that imports
every package).

    SidecarService                readiness DOWN the moment stopping begins
    ├── edge       trace export; HttpService: liveness, readiness, metrics          stops last
    ├── sources    Redis mirror, key check, poller, real-time socket, snapshot      (online only)
    ├── delivery   the spool, when SPOOL_WRITES (direct writes need no service)    (online only)
    └── serving    TLS file watchers; GrpcService: SidecarService on PORT          stops first, draining

Phases start in that order and stop in reverse, one at a time, and so do the parts inside each:
the stop order is this structure. The whole stop shares one deadline, SHUTDOWN_GRACE_SECS
(`StopBudget`), handed to every part whose stop takes time. Each phase is built by one function below; the parts get what
they use in their constructors, and the assembly hands back `Parts` for whoever must reach one
(tests, tools), instead of hanging them on the service tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import IO

import stigg_sidecar
from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.cache.redis import RedisMirror
from stigg_sidecar.contracts import ApiKeyState, EntitlementSource, Writer
from stigg_sidecar.crossing.gate import WriteGate
from stigg_sidecar.crossing.wait import WaitBudget
from stigg_sidecar.delivery.direct import DirectDelivery
from stigg_sidecar.delivery.spool import SpoolFile
from stigg_sidecar.delivery.spooled import SpooledDelivery
from stigg_sidecar.delivery.upstream import UpstreamWrites
from stigg_sidecar.grpc.health import add_health_and_reflection
from stigg_sidecar.grpc.intake import add_sidecar_service
from stigg_sidecar.grpc.server import ConnectionLimits, GrpcService
from stigg_sidecar.grpc.servicer import SidecarServicer
from stigg_sidecar.lifecycle.reactor import IReactor, default_reactor
from stigg_sidecar.lifecycle.stopping import StopBudget
from stigg_sidecar.offline import OfflineSidecar
from stigg_sidecar.online.fetcher import Fetcher
from stigg_sidecar.online.key_check import KeyCheck
from stigg_sidecar.online.malformed import MalformedEntitlements
from stigg_sidecar.online.pending import PendingUsage
from stigg_sidecar.online.reads import ReadCounters, Reads
from stigg_sidecar.online.refresh import Poller, Refresher
from stigg_sidecar.online.store import EntitlementStore
from stigg_sidecar.online.updates import RealtimeUpdates
from stigg_sidecar.ops import tracing as tracing_setup
from stigg_sidecar.ops.metrics import Metrics
from stigg_sidecar.ops.readiness import Readiness
from stigg_sidecar.ops.web import HttpService, health_app
from stigg_sidecar.process import descriptors
from stigg_sidecar.process.access import grpc_access
from stigg_sidecar.process.logs import make_observer
from stigg_sidecar.process.service import Phase, SidecarService
from stigg_sidecar.settings import Settings
from stigg_sidecar.state.directory import StateDirectory
from stigg_sidecar.state.snapshot import FILE_NAME as SNAPSHOT_FILE
from stigg_sidecar.state.snapshot import SnapshotService
from stigg_sidecar.upstream.api import StiggApi
from stigg_sidecar.upstream.breaker import CircuitBreaker
from stigg_sidecar.upstream.realtime import RealtimeService
from stigg_sidecar.upstream.stigg_time import ClockSkewCheck

PHASES = ("edge", "sources", "delivery", "serving")


@dataclass(frozen=True)
class Online:
    """The parts of an online sidecar that several phases share."""

    api: StiggApi
    key: ApiKeyState
    cache: EntitlementCache  # read by gauges (and tests); changed only through `store`
    store: EntitlementStore
    fetcher: Fetcher
    reads: Reads
    malformed: MalformedEntitlements
    mirror: RedisMirror | None
    refresher: Refresher
    poller: Poller
    realtime: RealtimeService | None
    # Handler threads waiting on Stigg, reads and writes apart so neither takes the other's places.
    waiting_reads: WaitBudget
    waiting_writes: WaitBudget


@dataclass(frozen=True)
class Parts:
    readiness: Readiness
    metrics: Metrics | None
    http: HttpService
    grpc: GrpcService
    source: EntitlementSource
    writer: Writer
    online: Online | None  # None: offline


@dataclass(frozen=True)
class Sidecar:
    service: SidecarService
    parts: Parts


def assemble(settings: Settings, reactor: IReactor | None = None, tracing: tracing_setup.Tracing | None = None,
             log_stream: IO[str] | None = None) -> Sidecar:
    """The service tree for `settings`; its log goes to `log_stream` (standard output if None)."""
    if reactor is None:
        reactor = default_reactor()
    readiness = Readiness()
    readiness.block("grpc", "gRPC server is not serving yet")
    # One deadline for the whole stop: gRPC drain, spool delivery and the last snapshot share it.
    budget = StopBudget(settings.shutdown_grace_secs, reactor)
    top = SidecarService(readiness, make_observer(settings.log_level, settings.log_format, log_stream), budget)
    metrics = _metrics(settings, readiness)
    edge, http = _edge(settings, reactor, readiness, metrics, tracing, budget)
    state_dir = StateDirectory(settings.state_dir).lock() if settings.state_dir else None
    sources, delivery = Phase("sources"), Phase("delivery")
    online: Online | None = None
    source: EntitlementSource
    writer: Writer
    if settings.offline:
        source = writer = OfflineSidecar()
    else:
        online = _online(settings, reactor, metrics)
        source = online.reads
        _sources(settings, reactor, online, state_dir, readiness, metrics, budget, sources)
        writer = _delivery(settings, reactor, online, state_dir, readiness, metrics, budget, delivery)
    serving, grpc = _serving(settings, reactor, readiness, metrics, budget, tracing, source, writer)
    for phase in (edge, sources, delivery, serving):
        phase.setServiceParent(top)
    return Sidecar(top, Parts(readiness, metrics, http, grpc, source, writer, online))


def _metrics(settings: Settings, readiness: Readiness) -> Metrics | None:
    if not settings.metrics_enabled:
        return None
    metrics = Metrics()
    readiness.subscribe(lambda ready: metrics.ready.set(1 if ready else 0))
    metrics.info.labels(
        version=stigg_sidecar.__version__,
        mode="offline" if settings.offline else "online",
        realtime="on" if settings.ws_enabled and not settings.offline else "off",
        redis="on" if settings.redis_enabled and not settings.offline else "off",
        spool="on" if settings.spool_writes else "off",
    ).set(1)
    return metrics


def _edge(settings: Settings, reactor: IReactor, readiness: Readiness, metrics: Metrics | None,
          tracing: tracing_setup.Tracing | None, budget: StopBudget) -> tuple[Phase, HttpService]:
    edge = Phase("edge")
    if tracing is not None:
        # First in, so it stops last and flushes the last spans, within what the stop has left.
        tracing.service(reactor, budget.remaining_for_last_step).setServiceParent(edge)
    http = HttpService(
        health_app(settings.health_endpoint_url, settings.ready_endpoint_url, readiness, metrics,
                   settings.metrics_max_age_ms / 1000),
        settings.http_bind_address,
        settings.http_port,
        reactor,
        idle_timeout=settings.http_idle_timeout_secs,
        header_timeout=settings.http_header_timeout_secs,
        address_setting="BIND_ADDRESS" if settings.http_bind_address == settings.bind_address else "HTTP_BIND_ADDRESS",
    )
    http.setServiceParent(edge)
    return edge, http


def _online(settings: Settings, reactor: IReactor, metrics: Metrics | None) -> Online:
    """The cache, its one writer, and the parts that fill it; services are children of `sources`."""
    assert settings.server_api_key is not None
    api = StiggApi(reactor, api_key=settings.server_api_key, api_url=settings.api_url,
                   edge_api_url=settings.edge_api_url, edge_enabled=settings.edge_enabled,
                   on_attempt=metrics.upstream_attempt if metrics is not None else None)
    store: EntitlementStore  # bound below: a peer's change reaches the store the mirror serves
    mirror = None
    if settings.redis_enabled:
        # Stigg's rule that a resource entry needs its customer's entry beside it is off: this
        # sidecar keeps entries per key, so a resource entry stands on its own.
        mirror = RedisMirror.from_settings(
            reactor, settings, on_peer_change=lambda key, kind: store.peer_changed(key, kind),
            require_customer_entry=False,
            max_reconnect_delay=2.0,  # a Redis back from an outage is used within ~2 s
            now_ms=api.stigg_clock.now_ms,  # future #timestamps judged on Stigg's time
        )
    cache = EntitlementCache(settings.cache_max_size_bytes)
    store = EntitlementStore(cache, mirror, PendingUsage() if settings.spool_writes else None)
    malformed = MalformedEntitlements(reactor)
    waiting_reads = WaitBudget(settings.max_waiting_reads, "reads")
    fetch_timeout = settings.entitlements_timeout_ms / 1000
    # Decisions and expiries on Stigg's time when the local clock is off (each response's Date).
    now_ms = api.stigg_clock.now_ms
    fetcher = Fetcher(api, store, malformed, fetch_timeout, fleet=mirror, background_limit=waiting_reads.limit,
                      now_ms=now_ms, clock=reactor, redis_budget=settings.redis_timeout_ms / 1000)
    key = ApiKeyState()
    reads = Reads(reactor, store, fetcher, key, waiting_reads, _read_counters(metrics), now_ms=now_ms)
    refresher = Refresher(reactor, store, fetcher.fetch)

    def retry_failed(source: str) -> None:
        refresher.retry_failed()  # Stigg answers again: the customers whose refetch failed, at once

    api.recovery.subscribe(retry_failed)
    poller = Poller(reactor, refresher, settings.poll_interval_secs, active=True)
    realtime = None
    if settings.ws_enabled:
        updates = RealtimeUpdates(store, fetcher, malformed, poller, refresher, now_ms=now_ms)
        # Stigg acknowledging the socket closes the breakers (StiggRecovery).
        realtime = RealtimeService(reactor, settings.ws_url, api.socket_headers(), updates, recovery=api.recovery)
    online = Online(api, key, cache, store, fetcher, reads, malformed, mirror, refresher, poller, realtime,
                    waiting_reads, WaitBudget(settings.max_waiting_writes, "writes"))
    if metrics is not None:
        _observe_online(metrics, reactor, online)
    return online


def _read_counters(metrics: Metrics | None) -> ReadCounters:
    if metrics is None:
        return ReadCounters()
    fast_failed = {reason: metrics.fast_failed_reads.labels(reason) for reason in ("overloaded", "upstream_down")}
    return ReadCounters(metrics.hot.count_hit, metrics.cache_miss, lambda reason: fast_failed[reason].inc())


def _sources(settings: Settings, reactor: IReactor, online: Online, state_dir: StateDirectory | None,
             readiness: Readiness, metrics: Metrics | None, budget: StopBudget, sources: Phase) -> None:
    """`sources`' children, in stop order from the bottom: the snapshot stops first (after the
    spool: the last snapshot has its results), the key check closes Stigg's connection pools after
    the socket and poller stopped, and the mirror goes last."""
    if online.mirror is not None:
        online.mirror.setServiceParent(sources)
    KeyCheck(
        reactor, online.api, online.key, readiness, settings.entitlements_timeout_ms / 1000,
        on_init_error=metrics.initialization_errors.inc if metrics is not None else (lambda: None),
        budget=budget,
    ).setServiceParent(sources)
    online.poller.setServiceParent(sources)
    if online.realtime is not None:
        online.realtime.setServiceParent(sources)
    if state_dir is not None:
        SnapshotService(
            reactor, state_dir.file(SNAPSHOT_FILE), online.store, settings.snapshot_interval_secs,
            refresh=online.refresher.refresh, readiness=readiness,
            on_loaded_age=metrics.snapshot_loaded_age.set if metrics is not None else (lambda age: None),
            budget=budget,
        ).setServiceParent(sources)
    ClockSkewCheck(online.api.stigg_clock, reactor).setServiceParent(sources)  # warns while the local clock is off


def _delivery(settings: Settings, reactor: IReactor, online: Online, state_dir: StateDirectory | None,
              readiness: Readiness, metrics: Metrics | None, budget: StopBudget, phase: Phase) -> Writer:
    """The one write path: direct (no service), or the spool as `phase`'s child."""
    writes = UpstreamWrites(online.api, online.store)
    if not settings.spool_writes:
        return DirectDelivery(WriteGate(reactor, online.waiting_writes, online.key), writes)
    assert state_dir is not None
    spooled = SpooledDelivery(
        reactor,
        WriteGate(reactor, online.waiting_writes, online.key, waiting_for="the write spool"),
        writes,
        SpoolFile(reactor, state_dir.file("spool.sqlite3")),
        online.store,
        max_bytes=settings.spool_max_bytes,
        batch_size=settings.spool_batch_size,
        flush_interval=settings.spool_flush_ms / 1000,
        send_timeout=settings.entitlements_timeout_ms / 1000,
        budget=budget,
        readiness=readiness,
        metrics=metrics,
    )
    online.api.recovery.subscribe(spooled.resume)  # Stigg answers again: spooled records go at once
    spooled.setServiceParent(phase)
    if metrics is not None:
        metrics.spool_records.set_function(lambda: spooled.records)
        metrics.spool_bytes.set_function(lambda: spooled.bytes)
        metrics.spool_oldest_age.set_function(spooled.oldest_age)
    return spooled


def _serving(settings: Settings, reactor: IReactor, readiness: Readiness, metrics: Metrics | None, budget: StopBudget,
             tracing: tracing_setup.Tracing | None, source: EntitlementSource,
             writer: Writer) -> tuple[Phase, GrpcService]:
    timeout = settings.entitlements_timeout_ms / 1000
    servicer = SidecarServicer(
        source=source,
        writer=writer,
        fallbacks=settings.entitlements_fallback,
        read_timeout=timeout,
        write_timeout=timeout,
        on_fallback=metrics.fallback_answered if metrics else (lambda reason: None),
    )
    serving = Phase("serving")
    # TLS and caller tokens (the standalone service); nothing at all when their settings are unset.
    access = grpc_access(settings, reactor, metrics.hot.count_caller if metrics is not None else None)
    for watcher in access.watchers:
        watcher.setServiceParent(serving)  # before the server: they stop after it
    grpc = GrpcService(
        [
            lambda server: add_sidecar_service(servicer, server),
            lambda server: add_health_and_reflection(server, readiness.subscribe),
        ],
        address=settings.bind_address,
        port=settings.port,
        max_workers=settings.grpc_max_workers,
        max_message_bytes=settings.grpc_max_message_bytes,
        grace=settings.shutdown_grace_secs,
        budget=budget,
        reactor=reactor,
        on_serving=lambda port: readiness.unblock("grpc"),
        # Tracing outermost (off, no interceptor at all), so a refused token is a span too; then the
        # token check. Metrics are no interceptor: the handlers are counted and timed where they
        # are registered, so by default a call runs no interceptor pipeline at all.
        interceptors=[
            *([tracing.interceptor()] if tracing is not None else []),
            *access.interceptors,
        ],
        timed=metrics.hot.timed if metrics is not None else None,
        limits=connection_limits(settings),
        credentials=access.credentials,
    )
    grpc.setServiceParent(serving)
    return serving, grpc


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The gRPC server's connection limits, from the settings (grpc/ never reads settings itself)."""
    return ConnectionLimits(
        keepalive_secs=settings.grpc_keepalive_secs,
        keepalive_timeout_secs=settings.grpc_keepalive_timeout_secs,
        max_connection_idle_secs=settings.grpc_max_connection_idle_secs,
        max_concurrent_streams=settings.grpc_max_concurrent_streams,
        max_connections=descriptors.grpc_connection_cap(settings.grpc_max_connections, descriptors.open_files_limit()),
    )


def _breaker_state(breaker: CircuitBreaker) -> int:
    return 1 if breaker.is_open else 0


def _observe_online(metrics: Metrics, reactor: IReactor, online: Online) -> None:
    """Gauges read at scrape time from the parts they describe."""
    cache = online.cache
    metrics.clock_skew.set_function(online.api.stigg_clock.skew)
    for upstream, breaker in online.api.breakers.items():
        metrics.upstream_breaker_open.labels(upstream).set_function(partial(_breaker_state, breaker))
    metrics.cache_entries.set_function(lambda: len(cache))
    metrics.cache_bytes.set_function(lambda: cache.bytes)
    metrics.cache_evictions.set_function(lambda: cache.evictions)
    metrics.upstream_malformed.count_from(lambda: online.malformed.count)
    mirror, realtime = online.mirror, online.realtime
    if mirror is not None:
        metrics.redis_client_errors.count_from(lambda: mirror.errors)
    if realtime is not None:
        metrics.realtime_connected.set_function(lambda: 1 if realtime.is_connected else 0)
        metrics.realtime_update_age.set_function(
            lambda: -1 if realtime.last_update is None else reactor.seconds() - realtime.last_update
        )
        metrics.realtime_malformed.set_function(lambda: realtime.malformed)
