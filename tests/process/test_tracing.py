"""OpenTelemetry traces from a real `twistd -n stigg-sidecar`, configured by OTEL_* variables and
exporting over OTLP/HTTP to a real receiver in this process (`tests.fixtures.otlp`), with the
emulator (in this process too) as Stigg.

Calls go through grpcio futures (the reactor keeps serving the emulator meanwhile) and carry a
caller's W3C trace context in their metadata, as an instrumented client would send it.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import tempfile

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from tests.fixtures import data
from tests.fixtures.clients import grpc_deferred, http_client
from tests.fixtures.otlp import CLIENT, CONSUMER, PRODUCER, SERVER, OtlpReceiver, SilentCollector, Span, free_port
from tests.fixtures.polling import until
from tests.fixtures.processes import SidecarProcess, base_env, run_twistd, sidecar_with_stub, until_ready
from tests.fixtures.redis import RedisServer

KEY = "tracing-test-key-" + secrets.token_hex(8)
TOKEN = "collector-token-" + secrets.token_hex(8)
CUSTOMERS = {f"c{i}": data.customer(data.feature("sso"), data.metered("api-calls", 1000, 0)) for i in range(40)}
SERVICE = "/stigg.sidecar.v1.SidecarService/"


def traceparent() -> tuple[str, str, str]:
    """A caller's sampled W3C trace context: (traceparent, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def descends(span: Span, ancestor: Span, spans: list[Span]) -> bool:
    """Whether `span` is below `ancestor` in the same trace (following parent ids)."""
    by_id = {s.span_id: s for s in spans if s.trace_id == span.trace_id}
    seen = 0
    current: Span | None = span
    while current is not None and seen < 100:
        if current.parent_span_id == ancestor.span_id:
            return True
        current = by_id.get(current.parent_span_id)
        seen += 1
    return False


def json_lines(process: SidecarProcess) -> list[dict]:
    lines = []
    for line in process.output:
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


class TracingTests(TestCase):
    timeout = 120

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.emulator = await start_emulator(reactor, {"apiKeys": [KEY], "customers": CUSTOMERS})
        self.addCleanup(stop_emulator, self.emulator)
        self.receiver = OtlpReceiver()
        self.addCleanup(self.receiver.stop)

    def env(self, **settings: str) -> dict[str, str]:
        return base_env(**{"SERVER_API_KEY": KEY, "API_URL": self.emulator.url, "EDGE_API_URL": self.emulator.url,
                           "WS_ENABLED": "0", "ENTITLEMENTS_TIMEOUT_MS": "2000", "LOG_FORMAT": "json",
                           "OTEL_BSP_SCHEDULE_DELAY": "50", **settings})

    def traced_env(self, **settings: str) -> dict[str, str]:
        return self.env(OTEL_EXPORTER_OTLP_ENDPOINT=self.receiver.endpoint, OTEL_SERVICE_NAME="billing-sidecar",
                        **settings)

    def call(self, process, method: str, request, parent: str | None = None, state: str | None = None,
             timeout: float = 5):
        metadata = []
        if parent is not None:
            metadata.append(("traceparent", parent))
        if state is not None:
            metadata.append(("tracestate", state))
        multicallable = getattr(process.stub, method)
        return grpc_deferred(reactor, multicallable.future(request, timeout=timeout, metadata=metadata))

    async def spans_where(self, predicate, what: str, timeout: float = 20) -> list[Span]:
        found: list[Span] = []

        def arrived() -> bool:
            found[:] = [s for s in self.receiver.received() if predicate(s)]
            return bool(found)

        await until(arrived, timeout, what)
        return found

    def assert_no_secret(self, process: SidecarProcess) -> None:
        for span in self.receiver.received():
            for value in (*span.attributes.values(), *span.resource.values(), span.name, span.status_message):
                self.assertNotIn(KEY, str(value), f"the API key in span {span.name}")
                self.assertNotIn(TOKEN, str(value), f"the collector's token in span {span.name}")
        self.assertNotIn(KEY, process.text)
        self.assertNotIn(TOKEN, process.text)

    # -- reads ------------------------------------------------------------------------------------

    async def test_a_callers_trace_continues_into_the_server_span_and_a_miss_shows_stiggs_fetch(self):
        process = sidecar_with_stub(self, self.traced_env(
            OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
            OTEL_EXPORTER_OTLP_HEADERS=f"authorization=Bearer {TOKEN}",
            OTEL_EXPORTER_OTLP_COMPRESSION="gzip",
        ))
        parent, trace_id, parent_span = traceparent()
        answer = await self.call(process, "GetBooleanEntitlement",
                                 pb.GetBooleanEntitlementRequest(customer_id="c1", feature_id="sso"),
                                 parent, "vendor=opaque")
        self.assertTrue(answer.has_access)
        self.assertFalse(answer.is_fallback)

        (server,) = await self.spans_where(lambda s: s.trace_id == trace_id and s.kind == SERVER, "the SERVER span")
        self.assertEqual(server.name, SERVICE.lstrip("/") + "GetBooleanEntitlement")
        self.assertEqual(server.parent_span_id, parent_span)
        self.assertEqual(server.trace_state, "vendor=opaque")
        self.assertEqual(server.attributes["rpc.system"], "grpc")
        self.assertEqual(server.attributes["rpc.method"], "GetBooleanEntitlement")
        self.assertEqual(server.attributes["rpc.grpc.status_code"], 0)
        self.assertEqual(server.attributes["stigg.customer.id"], "c1")
        self.assertEqual(server.attributes["stigg.feature.id"], "sso")
        self.assertEqual(server.resource["service.name"], "billing-sidecar")
        self.assertEqual(server.resource["deployment.environment"], "test")

        # The miss crossed to the reactor: Stigg's fetch is a CLIENT span below the SERVER span.
        clients = await self.spans_where(lambda s: s.trace_id == trace_id and s.kind == CLIENT, "Stigg's fetch")
        fetch = clients[0]
        spans = self.receiver.received()
        self.assertTrue(descends(fetch, server, spans), [(s.name, s.span_id, s.parent_span_id) for s in spans])
        self.assertEqual(fetch.name, "GET /v1/c/{customerId}/entitlements-state.json")
        self.assertEqual(fetch.attributes["http.request.method"], "GET")
        self.assertEqual(fetch.attributes["url.full"], f"{self.emulator.url}/v1/c/c1/entitlements-state.json")
        self.assertEqual(fetch.attributes["http.response.status_code"], 200)
        (miss,) = [s for s in spans if s.trace_id == trace_id and s.name == "entitlements miss"]
        self.assertEqual(miss.parent_span_id, server.span_id)
        self.assertEqual(miss.attributes["stigg.customer.id"], "c1")

        # A cached read is a SERVER span of its own trace with nothing below it.
        parent2, trace2, _ = traceparent()
        await self.call(process, "GetBooleanEntitlement",
                        pb.GetBooleanEntitlementRequest(customer_id="c1", feature_id="sso"), parent2)
        await self.spans_where(lambda s: s.trace_id == trace2 and s.kind == SERVER, "the cached read's span")
        self.assertEqual([s.name for s in self.receiver.received() if s.trace_id == trace2],
                         [SERVICE.lstrip("/") + "GetBooleanEntitlement"])

        # Exported as configured: gzip, with the collector's header.
        self.assertIn("gzip", self.receiver.encodings)
        self.assertEqual(self.receiver.requests[0]["authorization"], f"Bearer {TOKEN}")
        self.assert_no_secret(process)

    async def test_log_lines_inside_a_span_carry_its_trace_and_span_ids(self):
        process = sidecar_with_stub(self, self.traced_env())
        self.emulator.state.faults.update({"down": True})  # the miss fails: a warning, inside the miss span
        parent, trace_id, _ = traceparent()
        answer = await self.call(process, "GetBooleanEntitlement",
                                 pb.GetBooleanEntitlementRequest(customer_id="c2", feature_id="sso"), parent)
        self.assertTrue(answer.is_fallback)
        (miss,) = await self.spans_where(lambda s: s.trace_id == trace_id and s.name == "entitlements miss",
                                         "the miss span")
        self.assertIs(miss.attributes["stigg.fallback"], True)
        process.wait_for("unavailable", 10)
        lines = [line for line in json_lines(process) if "unavailable" in line["message"]]
        self.assertTrue(lines, process.text)
        self.assertEqual(lines[0]["trace_id"], trace_id)
        self.assertEqual(lines[0]["span_id"], miss.span_id)
        # Outside any span, a line has no ids.
        ready = [line for line in json_lines(process) if "gRPC listening" in line["message"]]
        self.assertNotIn("trace_id", ready[0])

    async def test_parent_based_sampling_records_only_calls_with_a_sampled_parent(self):
        process = sidecar_with_stub(self, self.traced_env(OTEL_TRACES_SAMPLER="parentbased_always_off"))
        request = pb.GetBooleanEntitlementRequest(customer_id="c3", feature_id="sso")
        await self.call(process, "GetBooleanEntitlement", request)  # a miss, no parent
        await self.call(process, "GetBooleanEntitlement", request)  # cached, no parent
        unsampled = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"
        await self.call(process, "GetBooleanEntitlement", request, unsampled)
        parent, trace_id, _ = traceparent()
        await self.call(process, "GetBooleanEntitlement", request, parent)
        await self.spans_where(lambda s: s.trace_id == trace_id, "the sampled call's span")
        # Batches leave in order: by the time the sampled call's span arrived, the others' would have.
        self.assertEqual({s.trace_id for s in self.receiver.received()}, {trace_id})

    async def test_redis_the_socket_and_the_snapshot_are_spans(self):
        redis = RedisServer().start()
        self.addCleanup(redis.stop)
        state_dir = tempfile.mkdtemp()
        process = sidecar_with_stub(self, self.traced_env(
            REDIS_ENVIRONMENT_PREFIX="traced", REDIS_PORT=str(redis.port), REDIS_HOST="127.0.0.1", WS_ENABLED="1",
            WS_URL=self.emulator.url.replace("http://", "ws://"), STATE_DIR=state_dir, SNAPSHOT_INTERVAL_SECS="0.2",
        ))
        (connect,) = await self.spans_where(lambda s: s.name == "realtime connect", "the socket's connect")
        self.assertEqual(connect.kind, CLIENT)
        self.assertEqual(connect.attributes["server.address"], "127.0.0.1")

        # A miss in Redis mode: the Redis read and the fleet's fetch lock, below the miss.
        parent, trace_id, _ = traceparent()
        await self.call(process, "GetBooleanEntitlement",
                        pb.GetBooleanEntitlementRequest(customer_id="c8", feature_id="sso"), parent)
        await self.spans_where(lambda s: s.trace_id == trace_id and s.kind == CLIENT and s.name.startswith("GET"),
                               "Stigg's fetch")
        in_trace = [s for s in self.receiver.received() if s.trace_id == trace_id]
        (miss,) = [s for s in in_trace if s.name == "entitlements miss"]
        reads = [s for s in in_trace if s.name == "redis read"]
        self.assertTrue(reads, [s.name for s in in_trace])
        self.assertEqual(reads[0].attributes["db.system"], "redis")
        self.assertEqual(reads[0].parent_span_id, miss.span_id)
        (lock,) = [s for s in in_trace if s.name == "fleet fetch lock"]
        self.assertEqual(lock.parent_span_id, miss.span_id)

        # Stigg pushes a change of c8: the push is a span naming the customer.
        http = http_client(self, reactor)
        body = json.dumps(data.customer(data.feature("sso"), data.metered("api-calls", 5000, 0))).encode()
        response = await http.put(f"{self.emulator.url}/_emulator/customers/c8", data=body)
        self.assertEqual(response.code, 200, await response.text())
        (push,) = await self.spans_where(
            lambda s: s.name == "realtime entitlementsUpdatedV2" and s.attributes.get("stigg.customer.id") == "c8",
            "the push")
        self.assertEqual(push.kind, CONSUMER)

        # The cache changed: the snapshot is written, a span of its own. A write that ran while the
        # push replaced c8 may have seen an empty cache; one that holds c8 follows (every 0.2 s).
        (snapshot, *_) = await self.spans_where(
            lambda s: s.name == "snapshot write" and s.attributes.get("stigg.snapshot.customers", 0) >= 1,
            "a snapshot write holding c8")
        self.assertEqual(snapshot.attributes["stigg.snapshot.customers"], 1)
        self.assert_no_secret(process)

    # -- writes -----------------------------------------------------------------------------------

    async def test_a_direct_write_shows_stiggs_call_as_a_client_span(self):
        process = sidecar_with_stub(self, self.traced_env())
        parent, trace_id, parent_span = traceparent()
        ack = await self.call(process, "ReportUsage",
                              pb.ReportUsageRequest(customer_id="c4", feature_id="api-calls", value=3), parent)
        self.assertEqual(ack.current_usage, 3)
        (server,) = await self.spans_where(lambda s: s.trace_id == trace_id and s.kind == SERVER, "the SERVER span")
        self.assertEqual(server.parent_span_id, parent_span)
        self.assertEqual(server.attributes["stigg.feature.id"], "api-calls")
        (client,) = await self.spans_where(lambda s: s.trace_id == trace_id and s.kind == CLIENT, "Stigg's call")
        self.assertEqual(client.name, "POST ReportUsage")
        self.assertEqual(client.attributes["url.full"], f"{self.emulator.url}/graphql")
        self.assertTrue(descends(client, server, self.receiver.received()))
        self.assert_no_secret(process)

    async def test_a_spooled_writes_delivery_is_a_trace_of_its_own_linking_back_to_it(self):
        state_dir = tempfile.mkdtemp()
        process = sidecar_with_stub(self, self.traced_env(STATE_DIR=state_dir, SPOOL_WRITES="1",
                                                          SPOOL_FLUSH_MS="20"))
        await until_ready(process)
        self.emulator.state.faults.update({"down": True})  # delivery waits: the record stays on disk
        parent, trace_id, _ = traceparent()
        ack = await self.call(process, "ReportUsage",
                              pb.ReportUsageRequest(customer_id="c5", feature_id="api-calls", value=2), parent)
        self.assertTrue(ack.measurement_id)

        (server,) = await self.spans_where(lambda s: s.trace_id == trace_id and s.kind == SERVER, "the SERVER span")
        (spooled,) = await self.spans_where(lambda s: s.trace_id == trace_id and s.kind == PRODUCER, "the spooling")
        self.assertEqual(spooled.name, "spool usage")
        self.assertEqual(spooled.attributes["stigg.customer.id"], "c5")
        self.assertTrue(descends(spooled, server, self.receiver.received()))
        # The commit ran on the spool's own thread, under the write's span.
        (commit,) = await self.spans_where(lambda s: s.trace_id == trace_id and s.name == "spool commit", "the commit")
        self.assertEqual(commit.parent_span_id, spooled.span_id)

        # The write's span context is kept with the record on disk.
        db = sqlite3.connect(f"{state_dir}/spool.sqlite3")
        try:
            stored = db.execute("SELECT trace FROM spool").fetchall()
        finally:
            db.close()
        self.assertEqual(stored, [(f"00-{trace_id}-{spooled.span_id}-01",)])

        self.emulator.state.faults.update({"down": False})
        await until(lambda: len(self.emulator.state.usage_log()) == 1, 20, "delivery")

        def delivered(s: Span) -> bool:
            return s.kind == CONSUMER and s.status_code != 2 and (trace_id, spooled.span_id) in s.links

        (delivery,) = await self.spans_where(delivered, "the successful delivery")
        self.assertEqual(delivery.name, "deliver spooled usage records")
        self.assertNotEqual(delivery.trace_id, trace_id)
        self.assertEqual(delivery.parent_span_id, "")
        (sent,) = await self.spans_where(lambda s: s.trace_id == delivery.trace_id and s.kind == CLIENT and
                                         s.status_code != 2, "the delivery's call to Stigg")
        self.assertEqual(sent.name, "POST ReportUsage")
        self.assertEqual(sent.parent_span_id, delivery.span_id)
        self.assert_no_secret(process)

    # -- the collector --------------------------------------------------------------------------

    async def test_with_the_collector_not_answering_reads_and_writes_answer_in_time(self):
        silent = SilentCollector()
        self.addCleanup(silent.stop)
        # The exporter would wait 60 s for each batch; every call's deadline is 3 s, and the stop
        # below is given 30 s.
        process = sidecar_with_stub(self, self.env(
            OTEL_EXPORTER_OTLP_ENDPOINT=silent.endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="60",
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE="2", OTEL_BSP_MAX_QUEUE_SIZE="16",
        ))
        for i in range(30):
            customer = f"c{i}"
            miss = await self.call(process, "GetBooleanEntitlement",
                                   pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso"),
                                   traceparent()[0], timeout=3)
            self.assertFalse(miss.is_fallback, i)
            cached = await self.call(process, "GetMeteredEntitlement",
                                     pb.GetMeteredEntitlementRequest(customer_id=customer, feature_id="api-calls"),
                                     traceparent()[0], timeout=3)
            self.assertFalse(cached.is_fallback, i)
            ack = await self.call(process, "ReportUsage",
                                  pb.ReportUsageRequest(customer_id=customer, feature_id="api-calls", value=1),
                                  traceparent()[0], timeout=3)
            self.assertEqual(ack.current_usage, 1)
        self.assertEqual(process.process.poll(), None)
        # Nor does the stop wait on the collector: SIGTERM, and the process exits (stop() fails past 30 s).
        self.assertEqual(process.stop(timeout=30), 0, process.text)

    async def test_a_collector_that_is_down_is_logged_once_per_interval(self):
        process = sidecar_with_stub(self, self.env(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}", OTEL_EXPORTER_OTLP_TIMEOUT="0.2",
        ))
        for i in range(20):  # spans of many batches (one every 50 ms), each failing at once
            await self.call(process, "GetBooleanEntitlement",
                            pb.GetBooleanEntitlementRequest(customer_id=f"c{i}", feature_id="sso"), traceparent()[0])
        process.wait_for("Traces:", 10)
        for i in range(20, 30):  # more failing batches after the first complaint
            await self.call(process, "GetBooleanEntitlement",
                            pb.GetBooleanEntitlementRequest(customer_id=f"c{i}", feature_id="sso"), traceparent()[0])
            await deferLater(reactor, 0.1, lambda: None)
        process.stop()
        complaints = [line for line in process.output if "Traces:" in line]
        self.assertEqual(len(complaints), 1, complaints)
        sdk_lines = [line for line in process.output if re.search("export|Queue full", line) and "Traces:" not in line]
        self.assertEqual(sdk_lines, [])

    # -- off --------------------------------------------------------------------------------------

    async def test_unconfigured_nothing_is_traced(self):
        process = sidecar_with_stub(self, self.env(OTEL_SERVICE_NAME="billing-sidecar"))
        self.emulator.state.faults.update({"down": True})
        parent, trace_id, _ = traceparent()
        answer = await self.call(process, "GetBooleanEntitlement",
                                 pb.GetBooleanEntitlementRequest(customer_id="c6", feature_id="sso"), parent)
        self.assertTrue(answer.is_fallback)
        process.wait_for("unavailable", 10)
        self.assertFalse(any("trace_id" in line for line in json_lines(process)))
        self.assertNotIn("OpenTelemetry", process.text)

    async def test_disabled_or_exporter_none_exports_nothing(self):
        for off in ({"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}):
            process = sidecar_with_stub(self, self.traced_env(**off))
            parent, trace_id, _ = traceparent()
            await self.call(process, "GetBooleanEntitlement",
                            pb.GetBooleanEntitlementRequest(customer_id="c7", feature_id="sso"), parent)
            process.stop()  # a stop flushes what was recorded: nothing
            self.assertEqual(process.process.returncode, 0, process.text)
            self.assertNotIn("OpenTelemetry", process.text)
        self.assertEqual(self.receiver.received(), [])

    def test_a_bad_variable_stops_the_start_with_one_line(self):
        cases = {
            "OTEL_TRACES_SAMPLER": ("sometimes", "OTEL_TRACES_SAMPLER: 'sometimes' is not one of"),
            "OTEL_TRACES_SAMPLER_ARG": ("2", "OTEL_TRACES_SAMPLER_ARG: '2' is not a ratio between 0 and 1"),
            "OTEL_BSP_SCHEDULE_DELAY": ("soon", "OTEL_BSP_SCHEDULE_DELAY: 'soon' is not a positive whole number"),
            "OTEL_EXPORTER_OTLP_COMPRESSION": ("zstd", "OTEL_EXPORTER_OTLP_COMPRESSION: 'zstd' is not gzip"),
            "OTEL_EXPORTER_OTLP_PROTOCOL": ("grpc", "OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc' is not supported"),
        }
        for name, (value, message) in cases.items():
            extra = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"} if name == "OTEL_TRACES_SAMPLER_ARG" else {}
            env = base_env(SERVER_API_KEY=KEY, API_URL="http://127.0.0.1:9", EDGE_API_URL="http://127.0.0.1:9",
                           WS_ENABLED="0", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", **{name: value, **extra})
            result = run_twistd("stigg-sidecar", env)
            self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            self.assertEqual(len(lines), 1, result.stderr)
            self.assertTrue(re.match(rf"stigg-sidecar: {re.escape(message)}", lines[0]), lines[0])
