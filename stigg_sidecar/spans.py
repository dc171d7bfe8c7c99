"""Spans where time goes: the one tracer every part records on, and what they share.

A leaf like `quoting`: anything may import it, it imports nothing of ours. Parts use
OpenTelemetry's API only (`opentelemetry.trace`); whether anything is recorded is decided once
per process by `stigg_sidecar.ops.tracing`, which installs the SDK when the OTEL_* variables ask
for traces. Until then `tracer` is the API's no-op (a span costs about a microsecond and records
nothing), which is why the cached read path has no span call at all: it must cost nothing.

Attributes carry what an operator searches by (customer, feature, resource ids); never an API
key, a token or a password.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

__all__ = ["CUSTOMER_ID", "FEATURE_ID", "RESOURCE_ID", "Link", "SpanKind", "Status", "StatusCode", "failed", "ids",
           "link_to", "span_until", "traceparent_of_current", "tracer"]
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

tracer = trace.get_tracer("stigg_sidecar")

CUSTOMER_ID = "stigg.customer.id"
FEATURE_ID = "stigg.feature.id"
RESOURCE_ID = "stigg.resource.id"

def ids(customer_id: str | None, resource_id: str | None = None, feature_id: str | None = None) -> dict[str, str]:
    """The id attributes that are set (empty ones are left out)."""
    attributes = {}
    if customer_id:
        attributes[CUSTOMER_ID] = customer_id
    if resource_id:
        attributes[RESOURCE_ID] = resource_id
    if feature_id:
        attributes[FEATURE_ID] = feature_id
    return attributes


def failed(span: Span, error: BaseException) -> None:
    """Mark `span` as failed with the error's type and its (caller-safe) message."""
    if span.is_recording():
        message = getattr(error, "message", None) or type(error).__name__
        span.set_status(Status(StatusCode.ERROR, str(message)[:200]))
        span.set_attribute("error.type", type(error).__name__)


def span_until(
    name: str,
    start: Callable[..., Deferred],
    *args: Any,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    links: list[Link] | None = None,
    context: otel_context.Context | None = None,
) -> Deferred:
    """Call `start(*args)` inside a new span (current while `start` runs, so what it begins is the
    span's child, on this thread or, through an inlineCallbacks copy of the context, later on the
    reactor) and end the span when the Deferred it returns fires. An error marks the span."""
    span = tracer.start_span(name, context=context, kind=kind, attributes=attributes, links=links)
    # Current even when not recording: what `start` begins then inherits "not sampled".
    token = otel_context.attach(trace.set_span_in_context(span, context))
    try:
        d = start(*args)
    except BaseException as e:
        failed(span, e)
        span.end()
        raise
    finally:
        otel_context.detach(token)

    def ended(result: Any) -> Any:
        if isinstance(result, Failure) and result.value is not None:
            failed(span, result.value)
        span.end()
        return result

    return d.addBoth(ended)


def traceparent_of_current() -> str | None:
    """The W3C traceparent of the current span when it is sampled (what a spooled write keeps so
    its later delivery can link back to it); None otherwise."""
    context = trace.get_current_span().get_span_context()
    if not (context.is_valid and context.trace_flags.sampled):
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def link_to(traceparent: str | None) -> Link | None:
    """A span link to the span a stored traceparent names; None when it is absent or malformed."""
    if not traceparent:
        return None
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return Link(context) if context.is_valid else None

