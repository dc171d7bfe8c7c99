"""The tracing setup's pure parts: when the environment asks for traces, which values it refuses
(with one line naming the variable), the sampler that records a delivery linking to sampled
writes, and the SDK's complaints logged once per interval.

The process tests (tests/process/test_tracing.py) run all of it against a real receiver.
"""

from __future__ import annotations

import logging

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import DEFAULT_OFF, Decision, ParentBasedTraceIdRatio
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from stigg_sidecar import spans
from stigg_sidecar.ops.tracing import (
    FLUSH_ON_STOP_SECS,
    LinkAwareSampler,
    ThrottledComplaints,
    TracingConfigError,
    _FlushOnStop,
    check,
    wanted,
)
from tests.fixtures.logs import log_events
from tests.fixtures.reactor import reactor

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318"}


class WantedTests(TestCase):
    def test_off_by_default(self):
        self.assertFalse(wanted({}))
        self.assertFalse(wanted({"OTEL_SERVICE_NAME": "sidecar", "OTEL_TRACES_SAMPLER": "always_on"}))

    def test_on_with_an_endpoint_or_the_otlp_exporter(self):
        self.assertTrue(wanted(ENDPOINT))
        self.assertTrue(wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}))
        self.assertTrue(wanted({"OTEL_TRACES_EXPORTER": "otlp"}))

    def test_disabled_or_exporter_none_wins_over_an_endpoint(self):
        self.assertFalse(wanted({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}))
        self.assertFalse(wanted({**ENDPOINT, "OTEL_SDK_DISABLED": "TRUE"}))
        self.assertFalse(wanted({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}))
        self.assertTrue(wanted({**ENDPOINT, "OTEL_SDK_DISABLED": "false"}))

    def test_an_exporter_or_protocol_it_does_not_speak_is_refused(self):
        with self.assertRaisesRegex(TracingConfigError, r"^OTEL_TRACES_EXPORTER: 'zipkin' is not supported"):
            wanted({"OTEL_TRACES_EXPORTER": "zipkin"})
        with self.assertRaisesRegex(TracingConfigError, r"^OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'grpc'"):
            wanted({**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})
        self.assertTrue(wanted({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}))


class CheckTests(TestCase):
    def test_values_the_sdk_would_replace_silently_are_refused(self):
        bad = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "otel-collector:4318",
            "OTEL_TRACES_SAMPLER": "mostly",
            "OTEL_BSP_MAX_QUEUE_SIZE": "0",
            "OTEL_BSP_EXPORT_TIMEOUT": "-5",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "soon",
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "brotli",
        }
        for name, value in bad.items():
            with self.assertRaisesRegex(TracingConfigError, rf"^{name}: ", msg=name):
                check({name: value})
        with self.assertRaisesRegex(TracingConfigError, r"^OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: must be an http"):
            check({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:port/v1/traces"})
        with self.assertRaisesRegex(TracingConfigError, r"^OTEL_TRACES_SAMPLER_ARG: '1.5' is not a ratio"):
            check({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"})

    def test_good_values_pass(self):
        check({**ENDPOINT, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25",
               "OTEL_BSP_SCHEDULE_DELAY": "500", "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",
               "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})


def _context(sampled: bool) -> SpanContext:
    return SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1 if sampled else 0))


class LinkAwareSamplerTests(TestCase):
    def test_a_root_linking_to_a_sampled_span_is_sampled(self):
        sampler = LinkAwareSampler(DEFAULT_OFF)
        links = [Link(_context(False)), Link(_context(True))]
        self.assertEqual(sampler.should_sample(None, 1, "deliver", links=links).decision, Decision.RECORD_AND_SAMPLE)

    def test_otherwise_the_configured_sampler_decides(self):
        sampler = LinkAwareSampler(DEFAULT_OFF)
        self.assertEqual(sampler.should_sample(None, 1, "read").decision, Decision.DROP)
        self.assertEqual(sampler.should_sample(None, 1, "deliver", links=[Link(_context(False))]).decision,
                         Decision.DROP)
        # A span with a parent follows its parent, links or not.
        unsampled_parent = trace.set_span_in_context(NonRecordingSpan(_context(False)))
        self.assertEqual(
            sampler.should_sample(unsampled_parent, 1, "x", links=[Link(_context(True))]).decision, Decision.DROP
        )
        sampled_parent = trace.set_span_in_context(NonRecordingSpan(_context(True)))
        self.assertEqual(sampler.should_sample(sampled_parent, 1, "x").decision, Decision.RECORD_AND_SAMPLE)
        self.assertIn("ParentBased", LinkAwareSampler(ParentBasedTraceIdRatio(0.5)).get_description())


class ThrottledComplaintsTests(TestCase):
    def test_one_line_per_interval_saying_how_many_were_held_back(self):
        now = [100.0]
        complaints = ThrottledComplaints(interval=60, clock=lambda: now[0])
        events = log_events(self)
        sdk = logging.getLogger("opentelemetry.test-complaints")
        sdk.addHandler(complaints)
        sdk.propagate = False
        self.addCleanup(sdk.removeHandler, complaints)

        for _ in range(5):
            sdk.error("Failed to export spans batch code: %s", 503)
        self.assertEqual(complaints.lines, 1)
        now[0] += 61
        sdk.warning("Queue full, dropping Span.")
        self.assertEqual(complaints.lines, 2)
        lines = [e for e in events if e.get("log_namespace") == "stigg_sidecar.ops.tracing"]
        self.assertEqual([e["complaint"] for e in lines], ["Failed to export spans batch code: 503",
                                                           "Queue full, dropping Span."])
        self.assertEqual([e["suppressed"] for e in lines], [0, 4])


class SpanContextTests(TestCase):
    def test_a_sampled_span_is_kept_as_its_traceparent_and_linked_back(self):
        tracer = TracerProvider().get_tracer("test")
        self.assertIsNone(spans.traceparent_of_current())
        with tracer.start_as_current_span("write") as span:
            kept = spans.traceparent_of_current()
        context = span.get_span_context()
        self.assertEqual(kept, f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}")
        link = spans.link_to(kept)
        assert link is not None
        self.assertEqual((link.context.trace_id, link.context.span_id), (context.trace_id, context.span_id))
        self.assertTrue(link.context.trace_flags.sampled)

    def test_a_malformed_or_absent_traceparent_links_nowhere(self):
        for stored in (None, "", "00-abc", "00-" + "g" * 32 + "-" + "1" * 16 + "-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"):
            self.assertIsNone(spans.link_to(stored), stored)

    def test_ids_leave_out_what_is_not_set(self):
        self.assertEqual(spans.ids("acme", None, "api-calls"),
                         {spans.CUSTOMER_ID: "acme", spans.FEATURE_ID: "api-calls"})
        self.assertEqual(spans.ids(None, "", None), {})


class DropsEveryRootTests(TestCase):
    def test_samplers_that_drop_every_call_without_a_callers_context(self):
        from opentelemetry.sdk.trace.sampling import (
            ALWAYS_OFF,
            ALWAYS_ON,
            DEFAULT_ON,
            ParentBasedTraceIdRatio,
            TraceIdRatioBased,
        )

        from stigg_sidecar.ops.tracing import drops_every_root

        for sampler in (DEFAULT_OFF, ALWAYS_OFF, ParentBasedTraceIdRatio(0), TraceIdRatioBased(0)):
            self.assertTrue(drops_every_root(LinkAwareSampler(sampler)), sampler.get_description())
        for sampler in (DEFAULT_ON, ALWAYS_ON, ParentBasedTraceIdRatio(0.01), TraceIdRatioBased(1.0)):
            self.assertFalse(drops_every_root(LinkAwareSampler(sampler)), sampler.get_description())


class DescribeTests(TestCase):
    def test_the_endpoint_as_the_sdk_resolves_it_without_credentials(self):
        from stigg_sidecar.ops.tracing import describe

        self.assertEqual(describe(ENDPOINT), "traces to http://otel-collector.observability:4318/v1/traces")
        self.assertEqual(describe({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://u:secret@collector:4318/"}),
                         "traces to https://collector:4318/v1/traces")
        self.assertEqual(describe({**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:9/x?token=secret"}),
                         "traces to http://traces:9/x")
        self.assertEqual(describe({"OTEL_TRACES_EXPORTER": "otlp"}), "traces to http://localhost:4318/v1/traces")


class _RecordingProcessor(SpanProcessor):
    """A span processor that records the time each flush was given."""

    def __init__(self) -> None:
        self.flush_timeouts: list[int] = []

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.flush_timeouts.append(timeout_millis)
        return True


class FlushOnStopTests(TestCase):
    """The last spans are flushed at stop, but never past what the stop's budget has left: the
    tracing service stops last, after the snapshot, and the orchestrator's SIGKILL follows."""

    def flushing(self, seconds_left: float) -> tuple[_RecordingProcessor, Deferred]:
        provider = TracerProvider()
        processor = _RecordingProcessor()
        provider.add_span_processor(processor)
        service = _FlushOnStop(provider, reactor, lambda: seconds_left)
        service.startService()
        return processor, service.stopService()

    async def test_the_flush_gets_what_the_budget_has_left(self):
        processor, stopped = self.flushing(0.3)
        await stopped
        (given,) = processor.flush_timeouts
        self.assertTrue(0 < given <= 300, given)

    async def test_the_flush_is_capped_when_the_budget_is_generous(self):
        processor, stopped = self.flushing(60)
        await stopped
        (given,) = processor.flush_timeouts
        self.assertTrue(FLUSH_ON_STOP_SECS * 1000 - 100 < given <= FLUSH_ON_STOP_SECS * 1000, given)

    def test_no_flush_once_the_budget_is_spent(self):
        processor, stopped = self.flushing(0)
        self.assertTrue(stopped.called)
        self.assertEqual(processor.flush_timeouts, [])
