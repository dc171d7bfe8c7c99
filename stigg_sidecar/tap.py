"""twistd entry point: `twistd -n stigg-sidecar` options and the assembly of the service tree.

`Options` has one option per setting, each defaulting to its environment variable; `makeService`
validates them into Settings (exiting with one clear line on a bad value) and builds the tree:

    SidecarService
    ├── HttpService      liveness, readiness on HTTP_PORT (stops last)
    ├── UpstreamService  API key check, Stigg connection pools (online only)
    ├── RedisMirror      the cache mirrored to Redis (online, REDIS_ENVIRONMENT_PREFIX set)
    ├── Poller           refreshes cached entries while the socket is down or disabled (online only)
    ├── RealtimeService  Stigg's GraphQL WebSocket, kept alive by ClientService (online, WS_ENABLED)
    ├── SnapshotService  the cache written to STATE_DIR and loaded at start (online, STATE_DIR)
    ├── SpooledDelivery  writes durable in STATE_DIR, delivered in batches (online, SPOOL_WRITES)
    └── GrpcService      stigg.sidecar.v1.SidecarService on PORT (stops first, draining)
"""

from __future__ import annotations

import os
import sys
import traceback
from functools import partial
from typing import IO, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer
from grpc_reflection.v1alpha import reflection
from twisted.logger import Logger
from twisted.python import usage

import stigg_sidecar
from stigg_sidecar._proto import sidecar_pb2
from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.cache.redis import RedisMirror
from stigg_sidecar.crossing.gate import WriteGate
from stigg_sidecar.delivery.direct import DirectDelivery
from stigg_sidecar.delivery.pending import PendingUsage
from stigg_sidecar.delivery.spool import SpoolFile
from stigg_sidecar.delivery.spooled import SpooledDelivery
from stigg_sidecar.delivery.upstream import UpstreamWrites
from stigg_sidecar.grpc.callers import CallerTokensError
from stigg_sidecar.grpc.intake import add_sidecar_service
from stigg_sidecar.grpc.server import ConnectionLimits, GrpcService
from stigg_sidecar.grpc.servicer import SidecarServicer
from stigg_sidecar.grpc.tls import TlsError
from stigg_sidecar.offline import OfflineSidecar
from stigg_sidecar.online.sidecar import CacheUpdates, OnlineSidecar
from stigg_sidecar.ops import tracing as tracing_setup
from stigg_sidecar.ops.metrics import Metrics, MetricsInterceptor
from stigg_sidecar.ops.readiness import Readiness
from stigg_sidecar.ops.web import HttpService, health_app
from stigg_sidecar.process import descriptors, gcpolicy
from stigg_sidecar.process.access import grpc_access
from stigg_sidecar.process.logs import make_observer
from stigg_sidecar.process.native_output import route_native_output
from stigg_sidecar.process.reactor import default_reactor
from stigg_sidecar.process.service import SidecarService
from stigg_sidecar.process.startup import exit_with, starting_line, version_text
from stigg_sidecar.process.stopping import StopBudget
from stigg_sidecar.settings import SPECS, Settings, SettingsError, load_settings, parse_bool
from stigg_sidecar.state.directory import StateDirectory, StateDirectoryError
from stigg_sidecar.state.snapshot import FILE_NAME as SNAPSHOT_FILE
from stigg_sidecar.state.snapshot import SnapshotService
from stigg_sidecar.upstream.api import StiggApi
from stigg_sidecar.upstream.breaker import CircuitBreaker
from stigg_sidecar.upstream.poller import Poller, Refresher
from stigg_sidecar.upstream.realtime import RealtimeService
from stigg_sidecar.upstream.service import UpstreamService

log = Logger()


_COMPUTED_DEFAULTS = {
    "CACHE_MAX_SIZE_BYTES": "half the available memory",
    "GRPC_MAX_CONCURRENT_STREAMS": "MAX_WAITING_READS + MAX_WAITING_WRITES + GRPC_MAX_WORKERS",
    "HTTP_BIND_ADDRESS": "BIND_ADDRESS",
}


def _help(spec) -> str:
    default = _COMPUTED_DEFAULTS.get(spec.env, spec.default)
    shown = "none" if default in (None, "") else default
    flag = f"; a flag: --{spec.option} or --no-{spec.option}" if spec.parse is parse_bool else ""
    return f"{spec.help} [env {spec.env}; default: {shown}{flag}]"


_BOOLEAN_OPTIONS = frozenset(spec.option for spec in SPECS if spec.parse is parse_bool)


def flags_as_values(args: Sequence[str]) -> list[str]:
    """Boolean options given as flags (`--offline`, `--no-offline`) rewritten as `--offline=1`/`=0`.

    `--offline=0` and `--offline 0` still work: the options take no positional arguments, so a
    word after a boolean option can only be its value.
    """
    rewritten: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        name, has_value, _ = arg.partition("=")
        negated = name.startswith("--no-") and name[5:] in _BOOLEAN_OPTIONS
        if not has_value and (negated or (name.startswith("--") and name[2:] in _BOOLEAN_OPTIONS)):
            if negated:
                arg = f"--{name[5:]}=0"
            elif rest and not rest[0].startswith("-"):
                arg = f"{name}={rest.pop(0)}"
            else:
                arg = f"{name}=1"
        rewritten.append(arg)
    return rewritten


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Answer Stigg entitlement checks over gRPC from a local cache. Every option can also be set by the environment variable named in its help; an option wins over the variable."
    optParameters = [[spec.option, None, None, _help(spec)] for spec in SPECS]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        super().parseOptions(flags_as_values(sys.argv[1:] if options is None else options))

    def opt_version(self) -> None:
        """Display the sidecar's version (and grpcio's, Twisted's, Python's) and exit."""
        print(version_text())
        sys.exit(0)

    def overrides(self) -> Mapping[str, str | None]:
        return {spec.env: self[spec.option] for spec in SPECS}


def _grpc_health_and_reflection(server: grpc.Server, readiness: Readiness) -> None:
    """grpc.health.v1 following readiness (for Kubernetes gRPC probes), and server reflection."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    service = sidecar_pb2.DESCRIPTOR.services_by_name["SidecarService"].full_name

    def follow(ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", service):
            health.set(name, status)

    readiness.subscribe(follow)
    reflection.enable_server_reflection((service, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The gRPC server's connection limits, from the settings (grpc/ never reads settings itself)."""
    return ConnectionLimits(
        keepalive_secs=settings.grpc_keepalive_secs,
        keepalive_timeout_secs=settings.grpc_keepalive_timeout_secs,
        max_connection_idle_secs=settings.grpc_max_connection_idle_secs,
        max_concurrent_streams=settings.grpc_max_concurrent_streams,
        max_connections=descriptors.grpc_connection_cap(settings.grpc_max_connections, descriptors.open_files_limit()),
    )


def build_sidecar(
    settings: Settings, reactor=None, tracing: tracing_setup.Tracing | None = None, log_stream: IO[str] | None = None
) -> SidecarService:
    """The service tree for `settings`; its log goes to `log_stream` (standard output if None)."""
    if reactor is None:
        reactor = default_reactor()
    readiness = Readiness()
    readiness.block("grpc", "gRPC server is not serving yet")
    # One deadline for the whole stop: gRPC drain, spool delivery and the last snapshot share it.
    budget = StopBudget(settings.shutdown_grace_secs, reactor)
    top = SidecarService(readiness, make_observer(settings.log_level, settings.log_format, log_stream), budget)
    if tracing is not None:
        tracing.service(reactor).setServiceParent(top)  # first in, stops last: flushes the last spans
    fetch_timeout = settings.entitlements_timeout_ms / 1000
    metrics = Metrics() if settings.metrics_enabled else None
    if metrics is not None:
        readiness.subscribe(lambda ready: metrics.ready.set(1 if ready else 0))
    top.metrics = metrics
    if metrics is not None:
        metrics.info.labels(
            version=stigg_sidecar.__version__,
            mode="offline" if settings.offline else "online",
            realtime="on" if settings.ws_enabled and not settings.offline else "off",
            redis="on" if settings.redis_enabled and not settings.offline else "off",
            spool="on" if settings.spool_writes else "off",
        ).set(1)

    HttpService(
        health_app(settings.health_endpoint_url, settings.ready_endpoint_url, readiness, metrics,
                   settings.metrics_max_age_ms / 1000),
        settings.http_bind_address,
        settings.http_port,
        reactor,
        idle_timeout=settings.http_idle_timeout_secs,
        header_timeout=settings.http_header_timeout_secs,
        address_setting="BIND_ADDRESS" if settings.http_bind_address == settings.bind_address else "HTTP_BIND_ADDRESS",
    ).setServiceParent(top)
    # TLS and caller tokens (the standalone service); nothing at all when their settings are unset.
    access = grpc_access(settings, reactor, metrics.hot.count_caller if metrics is not None else None)
    for watcher in access.watchers:
        watcher.setServiceParent(top)

    backend: OfflineSidecar | OnlineSidecar
    writer: OfflineSidecar | DirectDelivery | SpooledDelivery
    state_dir = StateDirectory(settings.state_dir).lock() if settings.state_dir else None
    if settings.offline:
        backend = writer = OfflineSidecar()
    else:
        assert settings.server_api_key is not None
        api = StiggApi(
            reactor,
            api_key=settings.server_api_key,
            api_url=settings.api_url,
            edge_api_url=settings.edge_api_url,
            edge_enabled=settings.edge_enabled,
        )
        cache = EntitlementCache(settings.cache_max_size_bytes)
        backend = OnlineSidecar(
            reactor, api, cache, fetch_timeout,
            max_waiting_reads=settings.max_waiting_reads, max_waiting_writes=settings.max_waiting_writes,
        )
        if settings.redis_enabled:
            # Stigg's rule that a resource entry needs its customer's entry beside it is off: this
            # sidecar keeps entries per key, so a resource entry stands on its own.
            backend.mirror = RedisMirror.from_settings(
                reactor, settings, on_peer_change=backend.peer_changed, require_customer_entry=False,
                max_reconnect_delay=2.0,  # a Redis back from an outage is used within ~2 s
            )
            backend.mirror.setServiceParent(top)
        UpstreamService(
            reactor, api, backend, readiness, fetch_timeout,
            on_init_error=metrics.initialization_errors.inc if metrics else (lambda: None),
            budget=budget,
        ).setServiceParent(top)
        refresher = Refresher(reactor, backend)
        poller = Poller(reactor, refresher, settings.poll_interval_secs, active=True)
        poller.setServiceParent(top)
        realtime = None
        if settings.ws_enabled:
            realtime = RealtimeService(
                reactor, settings.ws_url, api.socket_headers(), CacheUpdates(backend, poller, refresher)
            )
            realtime.setServiceParent(top)
        online = backend
        if state_dir is not None:
            # Before the spool in the tree: stops after it, so the last snapshot has its results.
            SnapshotService(
                reactor, state_dir.file(SNAPSHOT_FILE), online, settings.snapshot_interval_secs,
                refresh=refresher.refresh, readiness=readiness,
                on_loaded_age=metrics.snapshot_loaded_age.set if metrics is not None else (lambda age: None),
                budget=budget,
            ).setServiceParent(top)
        writer = DirectDelivery(
            WriteGate(reactor, online.waiting_writes, lambda: online.key_rejected), UpstreamWrites(api, online), online
        )
        if settings.spool_writes:
            assert state_dir is not None
            online.pending = PendingUsage(cache)
            writer = SpooledDelivery(
                reactor,
                WriteGate(reactor, online.waiting_writes, lambda: online.key_rejected, waiting_for="the write spool"),
                UpstreamWrites(api, online),
                SpoolFile(reactor, state_dir.file("spool.sqlite3")),
                online.pending,
                reloads=writer,
                max_bytes=settings.spool_max_bytes,
                batch_size=settings.spool_batch_size,
                flush_interval=settings.spool_flush_ms / 1000,
                send_timeout=fetch_timeout,
                budget=budget,
                readiness=readiness,
                metrics=metrics,
            )
            writer.setServiceParent(top)  # after Stigg's client: stops (flushing) before it closes
            if metrics is not None:
                _observe_spool(metrics, writer)
        if metrics is not None:
            _observe_online(metrics, reactor, api, backend, cache, realtime)
    top.backend = backend

    servicer = SidecarServicer(
        source=backend,
        writer=writer,
        fallbacks=settings.entitlements_fallback,
        read_timeout=fetch_timeout,
        write_timeout=fetch_timeout,
        on_fallback=metrics.fallback_answered if metrics else (lambda reason: None),
    )
    GrpcService(
        [
            lambda server: add_sidecar_service(servicer, server),
            lambda server: _grpc_health_and_reflection(server, readiness),
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
        # token check: MetricsInterceptor answers cached handlers without asking further in.
        interceptors=[
            *([tracing.interceptor()] if tracing is not None else []),
            *access.interceptors,
            *([MetricsInterceptor(metrics)] if metrics else []),
        ],
        limits=connection_limits(settings),
        credentials=access.credentials,
    ).setServiceParent(top)
    return top


def _breaker_state(breaker: CircuitBreaker) -> int:
    return 1 if breaker.is_open else 0


def _observe_online(metrics: Metrics, reactor, api: StiggApi, backend: OnlineSidecar, cache: EntitlementCache,
                    realtime: RealtimeService | None) -> None:
    """Point the metrics at the parts they describe; gauges are read at scrape time."""
    api.on_attempt = metrics.upstream_attempt
    fast_failed = {reason: metrics.fast_failed_reads.labels(reason) for reason in ("overloaded", "upstream_down")}
    backend.set_counters(metrics.cache_hit, metrics.cache_miss, lambda reason: fast_failed[reason].inc())
    for upstream, breaker in api.breakers.items():
        metrics.upstream_breaker_open.labels(upstream).set_function(partial(_breaker_state, breaker))
    metrics.cache_entries.set_function(lambda: len(cache))
    metrics.cache_bytes.set_function(lambda: cache.bytes)
    metrics.cache_evictions.set_function(lambda: cache.evictions)
    metrics.upstream_malformed.count_from(lambda: backend.malformed_entitlements)
    mirror = backend.mirror
    if mirror is not None:
        metrics.redis_client_errors.count_from(lambda: mirror.errors)
    if realtime is not None:
        metrics.realtime_connected.set_function(lambda: 1 if realtime.is_connected else 0)
        metrics.realtime_update_age.set_function(
            lambda: -1 if realtime.last_update is None else reactor.seconds() - realtime.last_update
        )
        metrics.realtime_malformed.set_function(lambda: realtime.malformed)


def _observe_spool(metrics: Metrics, spool: SpooledDelivery) -> None:
    metrics.spool_records.set_function(lambda: spool.records)
    metrics.spool_bytes.set_function(lambda: spool.bytes)
    metrics.spool_oldest_age.set_function(spool.oldest_age)


def _log_stream(options: Options) -> IO[str] | None:
    """Where the log goes: twistd's --logfile when given (`-` is standard output); else, when
    twistd daemonizes (no -n), `twistd.log` as twistd's own log would (standard output is gone
    then); else standard output. Opened now: the file stays open across the daemon's fork."""
    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    path = parent.get("logfile") or (None if parent.get("nodaemon") else "twistd.log")
    if path in (None, "-"):
        return None
    try:
        return open(path, "a", buffering=1, encoding="utf-8")
    except OSError as e:
        exit_with(f"--logfile: {path}: {e.strerror}")


def makeService(options: Options) -> SidecarService:
    try:
        settings = load_settings(os.environ, options.overrides())
    except SettingsError as e:
        exit_with(str(e))
    log_stream = _log_stream(options)
    # Logged before twistd starts logging: the log replays it first, ahead of twistd's own lines.
    log.info("{line}", line=starting_line(settings))
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("nodaemon"):
        # grpc-core's lines in this log, in LOG_FORMAT. A daemon's descriptor 2 is /dev/null (and
        # must not keep its starter's stderr open), so there they are silenced instead.
        route_native_output(default_reactor())
    before, limit = descriptors.raise_open_files_limit()
    cap = descriptors.grpc_connection_cap(settings.grpc_max_connections, limit)
    log.debug("Open files: limit {limit} (was {before}); at most {cap} gRPC connections at once",
             limit=limit, before=before, cap=cap)
    if cap > limit - descriptors.RESERVED_DESCRIPTORS:
        log.warn("GRPC_MAX_CONNECTIONS {cap} leaves fewer than {reserved} of the {limit} open files for Stigg,"
                 " Redis, the spool and HTTP: many clients could starve them", cap=cap,
                 reserved=descriptors.RESERVED_DESCRIPTORS, limit=limit)
    try:
        tracing = tracing_setup.install()
    except tracing_setup.TracingConfigError as e:
        exit_with(str(e))
    if tracing is not None:
        log.info("OpenTelemetry {where}", where=tracing_setup.describe(tracing))
    try:
        sidecar = build_sidecar(settings, tracing=tracing, log_stream=log_stream)
    except (StateDirectoryError, TlsError, CallerTokensError) as e:
        exit_with(str(e))
    except Exception as e:
        # A bug or an environment this code did not foresee: one line; the traceback at LOG_LEVEL=debug.
        if settings.log_level == "debug":
            traceback.print_exc()
        exit_with(f"cannot start: {type(e).__name__}: {e}")
    # The process's own collector policy, not build_sidecar's (tests build many sidecars in one
    # process): what exists now (modules, the services, the cache's containers) lasts as long as
    # the process and is frozen out of every later collection (see gcpolicy).
    gcpolicy.install()
    return sidecar
