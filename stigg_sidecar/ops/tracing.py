"""Traces: OpenTelemetry's SDK set up from the OTEL_* variables, and one SERVER span per RPC.

Owns whether this process records traces, and everything that records them: the tracer provider
(installed as OpenTelemetry's global one, so every part's `stigg_sidecar.spans.tracer` records
on it), the sampler, the batch span processor and the OTLP/HTTP exporter, the gRPC interceptor
that continues a caller's W3C `traceparent`/`tracestate` into a SERVER span, and a service that
flushes at stop. Configured the OpenTelemetry way, by the SDK from the environment:

- On when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, or
  `OTEL_TRACES_EXPORTER=otlp`; off by default, and when `OTEL_SDK_DISABLED=true` or
  `OTEL_TRACES_EXPORTER=none`. Off, nothing of this exists: no interceptor, no provider.
- `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`(`_ARG`), `OTEL_BSP_*`,
  `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`, `_COMPRESSION`, `_TIMEOUT` are the SDK's own reading.
  Values the SDK would silently replace by a default stop the process with one line instead.

Nothing waits on the collector: spans are queued by the batch processor and exported on its own
thread; a full queue drops spans. The SDK's complaints (a collector down or slow, a full queue)
are logged once per interval with how many there were, not once per batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.protobuf.message_factory import GetMessageClass
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    _KNOWN_SAMPLERS,
    ALWAYS_OFF,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.trace.sampling import _get_from_env_or_default as sampler_from_env
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from stigg_sidecar import spans
from stigg_sidecar._proto import sidecar_pb2
from stigg_sidecar.lifecycle.reactor import IReactor

log = Logger()

ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_TRUE = ("true", "1", "yes", "on")
_POSITIVE_INTS = ("OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                  "OTEL_BSP_EXPORT_TIMEOUT")
_POSITIVE_NUMBERS = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
_COMPRESSIONS = ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION")
_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
# The SDK's complaints are logged at most once per this many seconds.
EXPORT_LOG_INTERVAL = 60.0
# How long a stop waits for the last spans to reach the collector.
FLUSH_ON_STOP_SECS = 2.0


class TracingConfigError(ValueError):
    """An OTEL_* variable the sidecar cannot honour; the message is one line naming it."""


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces (raises TracingConfigError for an exporter or
    protocol this sidecar does not speak)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    exporters = [e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if exporters == ["none"]:
        return False
    unknown = [e for e in exporters if e != "otlp"]
    if unknown:
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER: {unknown[0]!r} is not supported (otlp or none)")
    for name in _PROTOCOLS:
        protocol = environ.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            raise TracingConfigError(f"{name}: {protocol!r} is not supported (http/protobuf)")
    return bool(exporters) or any(environ.get(name, "").strip() for name in ENDPOINTS)


def check(environ: Mapping[str, str]) -> None:
    """Refuse, with one line, the values the SDK would replace by a default with a warning."""
    _check_endpoints(environ)
    _check_sampler(environ)
    for name in _POSITIVE_INTS:
        raw = environ.get(name, "").strip()
        if raw and (not raw.isdigit() or int(raw) < 1):
            raise TracingConfigError(f"{name}: {raw!r} is not a positive whole number")


def _check_endpoints(environ: Mapping[str, str]) -> None:
    for name in ENDPOINTS:
        url = environ.get(name, "").strip()
        if url:
            parts = urlsplit(url)
            try:
                port_ok = parts.port is None or parts.port > 0
            except ValueError:
                port_ok = False
            if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
                raise TracingConfigError(f"{name}: must be an http:// or https:// URL")


def _check_sampler(environ: Mapping[str, str]) -> None:
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler and sampler not in _KNOWN_SAMPLERS:
        raise TracingConfigError(f"OTEL_TRACES_SAMPLER: {sampler!r} is not one of {', '.join(_KNOWN_SAMPLERS)}")
    if sampler.endswith("traceidratio") and environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip():
        raw = environ["OTEL_TRACES_SAMPLER_ARG"].strip()
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TracingConfigError(f"OTEL_TRACES_SAMPLER_ARG: {raw!r} is not a ratio between 0 and 1")
    for name in _POSITIVE_NUMBERS:
        raw = environ.get(name, "").strip()
        if raw:
            try:
                ok = float(raw) > 0
            except ValueError:
                ok = False
            if not ok:
                raise TracingConfigError(f"{name}: {raw!r} is not a positive number of seconds")
    for name in _COMPRESSIONS:
        raw = environ.get(name, "").strip().lower()
        if raw and raw not in ("gzip", "deflate", "none"):
            raise TracingConfigError(f"{name}: {raw!r} is not gzip, deflate or none")


class LinkAwareSampler(Sampler):
    """The configured sampler, except that a root span linking to a sampled span is sampled: a
    spooled write's delivery (its own trace, linking to the writes it carries) is recorded
    whenever one of those writes was."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if links and not parent.is_valid and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"LinkAware{{{self.inner.get_description()}}}"


class ThrottledComplaints(logging.Handler):
    """The SDK's own log records (stdlib logging), as at most one warning per `interval`: the
    latest complaint and how many came since the last line. Called from the export thread."""

    def __init__(self, interval: float = EXPORT_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(level=logging.WARNING)
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._suppressed += 1
                return
            self._next = now + self._interval
            suppressed, self._suppressed = self._suppressed, 0
            self.lines += 1
        more = f" ({suppressed} more such messages since the last line)" if suppressed else ""
        log.warn("Traces: {complaint}{more}; spans that cannot be exported are dropped, reads and writes"
                 " are unaffected", complaint=message[:300], more=more, suppressed=suppressed)


class CountingExporter(SpanExporter):
    """The OTLP exporter, counting what it exported and failed to (for the log and for tests)."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self.exported = 0
        self.failed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception as e:  # the processor would log it with a traceback, per batch
            logging.getLogger("opentelemetry.exporter").warning("exporting spans failed: %s", type(e).__name__)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class Tracing:
    """What `install` set up: the provider, and the pieces the assembly plugs in."""

    def __init__(self, provider: TracerProvider, exporter: CountingExporter, complaints: ThrottledComplaints) -> None:
        self.provider = provider
        self.exporter = exporter
        self.complaints = complaints

    def interceptor(self) -> grpc.ServerInterceptor:
        return ServerSpans(unparented_dropped=drops_every_root(self.provider.sampler))

    def service(self, reactor: IReactor, seconds_left: Callable[[], float] = lambda: FLUSH_ON_STOP_SECS) -> Service:
        """Flushes the queued spans at stop, within FLUSH_ON_STOP_SECS and what `seconds_left()`
        says remains of the stop's budget then."""
        return _FlushOnStop(self.provider, reactor, seconds_left)


def drops_every_root(sampler: Sampler) -> bool:
    """Whether `sampler` drops every span without a parent (parentbased_always_off, always_off,
    a ratio of 0): then a call without a caller's trace context needs no span at all."""
    if isinstance(sampler, LinkAwareSampler):
        return drops_every_root(sampler.inner)
    if isinstance(sampler, ParentBased):
        return drops_every_root(sampler._root)
    if isinstance(sampler, StaticSampler):
        return sampler is ALWAYS_OFF or sampler.get_description() == ALWAYS_OFF.get_description()
    if isinstance(sampler, TraceIdRatioBased):
        return sampler.rate == 0
    return False


def install(environ: Mapping[str, str] | None = None) -> Tracing | None:
    """Set up tracing as the environment (default: the process's) asks; None when it does not.
    Once per process: the provider becomes OpenTelemetry's global one."""
    env = os.environ if environ is None else environ
    if not wanted(env):
        return None
    check(env)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415 - its import costs ~0.2 s, paid only with tracing on

    complaints = ThrottledComplaints()
    sdk_log = logging.getLogger("opentelemetry")
    sdk_log.addHandler(complaints)
    sdk_log.propagate = False  # not also on stderr through logging's last-resort handler
    # The SDK reads os.environ itself (sampler, resource, processor, exporter): that is the point.
    # No exit hook: its shutdown waits for the export thread (up to the exporter's timeout with a
    # collector that does not answer); the stop's bounded flush is the last word instead.
    provider = TracerProvider(sampler=LinkAwareSampler(sampler_from_env()), resource=Resource.create(),
                              shutdown_on_exit=False)
    exporter = CountingExporter(OTLPSpanExporter())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return Tracing(provider, exporter, complaints)


def endpoint(environ: Mapping[str, str]) -> str:
    """Where the exporter sends spans, resolved as the SDK resolves it."""
    full = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if full:
        return full
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
    return f"{base.removesuffix('/')}/v1/traces"


def describe(environ: Mapping[str, str] | None = None) -> str:
    """For the log: where spans go (the endpoint without credentials or query)."""
    parts = urlsplit(endpoint(os.environ if environ is None else environ))
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"traces to {parts.scheme}://{host}{port}{parts.path}"


class _FlushOnStop(Service):
    """At stop, the spans still queued go to the collector, for at most FLUSH_ON_STOP_SECS and
    never past the stop's budget (it stops last, so what the budget has left is its own): a
    collector that is down must not hold the process up."""

    name = "tracing"

    def __init__(self, provider: TracerProvider, reactor: IReactor, seconds_left: Callable[[], float]) -> None:
        self._provider = provider
        self._reactor = reactor
        self._seconds_left = seconds_left

    def stopService(self) -> Deferred:
        super().stopService()
        done: Deferred = Deferred()
        allowed = max(0.0, min(FLUSH_ON_STOP_SECS, self._seconds_left()))
        if allowed <= 0:
            done.callback(None)
            return done

        def flush() -> None:
            try:
                self._provider.force_flush(int(allowed * 1000))
            finally:
                self._reactor.callFromThread(fire)

        def fire() -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        timer = self._reactor.callLater(allowed, fire)
        threading.Thread(target=flush, name="tracing-flush", daemon=True).start()
        return done


# -- the SERVER span ----------------------------------------------------------------------------

_PROPAGATOR = TraceContextTextMapPropagator()
_SERVICE_PREFIX = "/stigg.sidecar.v1.SidecarService/"


def _request_ids(request: Any) -> dict[str, str]:
    """Customer, resource and feature ids of a request (the first item's, for a bulk one)."""
    items = getattr(request, "usages", None) or getattr(request, "events", None)
    if items:
        first = items[0]
        return spans.ids(getattr(first, "customer_id", None), getattr(first, "resource_id", None),
                         getattr(first, "feature_id", None))
    return spans.ids(getattr(request, "customer_id", None), getattr(request, "resource_id", None),
                     getattr(request, "feature_id", None) or getattr(request, "currency_id", None))


class ServerSpans(grpc.ServerInterceptor):
    """One SERVER span per unary call, continuing the caller's W3C trace context (metadata
    `traceparent`, `tracestate`). Wrapped handlers are cached per method. Installed only when
    tracing is on.

    `unparented_dropped`: the sampler drops every span without a parent, so a call that brings no
    trace context gets no span at all (measured: a non-recording span and its context cost a
    cached read about 5 us of CPU, skipping them about 0.5; see bench/README.md). What such a
    call starts below (a miss, a write) is a root too, dropped by the same sampler."""

    def __init__(self, unparented_dropped: bool = False) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._unparented_dropped = unparented_dropped

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            _traced(handler.unary_unary, method, self._unparented_dropped),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._handlers[method] = wrapped
        return wrapped


def _request_type(method: str) -> Any:
    """The request message class of one of SidecarService's methods (None for other services)."""
    if not method.startswith(_SERVICE_PREFIX):
        return None
    descriptor = sidecar_pb2.DESCRIPTOR.services_by_name["SidecarService"].methods_by_name.get(
        method[len(_SERVICE_PREFIX):])
    return GetMessageClass(descriptor.input_type) if descriptor is not None else None


def _traced(behaviour: Callable, method: str, unparented_dropped: bool = False) -> Callable:
    service, _, name = method.lstrip("/").rpartition("/")
    span_name = method.lstrip("/")
    static = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    tracer = spans.tracer
    request_type = _request_type(method)

    def traced(request: Any, context: grpc.ServicerContext) -> Any:
        carrier: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if key in ("traceparent", "tracestate") and isinstance(value, str):
                carrier[key] = value
        if not carrier and unparented_dropped:
            return behaviour(request, context)
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = tracer.start_span(span_name, context=parent, kind=SpanKind.SERVER, attributes=static)
        if request_type is not None and span.is_recording():
            # SidecarService's handlers take raw bytes (grpc.intake parses and checks them): the
            # ids are read from a parse of our own, made only for a span that records.
            try:
                parsed = request_type.FromString(request) if isinstance(request, bytes) else request
                span.set_attributes(_request_ids(parsed))
            except Exception:  # malformed: the intake answers INVALID_ARGUMENT, the span has no ids
                pass
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            response = behaviour(request, context)
        except BaseException as e:
            code = context.code() if hasattr(context, "code") else None
            if isinstance(code, grpc.StatusCode):
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_status(Status(StatusCode.ERROR, code.name))
            else:
                spans.failed(span, e)
            raise
        else:
            span.set_attribute("rpc.grpc.status_code", 0)
            return response
        finally:
            otel_context.detach(token)
            span.end()

    return traced

