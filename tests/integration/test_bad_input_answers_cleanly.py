"""Hostile input over real sockets: malformed bytes, oversized and out-of-range fields, long ids in
errors and logs, garbage on the HTTP port (issue 10, findings 5, 6, 7, 8, 11).

The sidecar runs online against the emulator, both in this reactor on 127.0.0.1:0; the gRPC calls
are made from a worker thread (blocking grpcio calls) so the reactor keeps serving both.
"""

from __future__ import annotations

import io
import math
import random
import socket
from typing import cast

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.grpc import intake
from stigg_sidecar.process.logs import JsonLineObserver, TextLineObserver
from stigg_sidecar.quoting import QUOTE_LIMIT, TEXT_LIMIT, clipped, quoted
from tests.fixtures import data
from tests.fixtures.logs import log_events
from tests.fixtures.online import OnlineHarness
from tests.fixtures.paths import ROOT

SERVICE = "/stigg.sidecar.v1.SidecarService/"
READS = (
    "GetEntitlements", "GetEntitlementsStateV2", "GetEntitlement", "GetBooleanEntitlement",
    "GetNumericEntitlement", "GetMeteredEntitlement", "GetEnumEntitlement", "GetEntitlementV2",
    "ReloadEntitlements",
)
WRITES = ("ReportUsage", "ReportUsageBulk", "ReportEvents")
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
# What a healthy Stigg lets each RPC answer: reads never fail (fallbacks, ReloadEntitlements
# answers false); writes may carry Stigg's refusal of an unknown customer or feature.
DOCUMENTED = {**{m: {OK, INVALID} for m in READS}, **{m: {OK, INVALID, grpc.StatusCode.NOT_FOUND} for m in WRITES}}
# The longest status detail a test accepts: an error quotes ~100 characters of any input.
MAX_DETAILS = 500

WHEN = Timestamp(seconds=1_790_000_000)


def _usage(customer="acme") -> pb.ReportUsageRequest:
    return pb.ReportUsageRequest(
        customer_id=customer, feature_id="api-calls", value=1, update_behavior=pb.USAGE_UPDATE_BEHAVIOR_DELTA,
        dimensions={"region": pb.EventDimensionValue(string_value="eu"), "n": pb.EventDimensionValue(number_value=2)},
        timestamp=WHEN,
    )


def _event(customer="acme") -> pb.Event:
    return pb.Event(
        event_name="call", customer_id=customer, idempotency_key="k-1", resource_id="r-1",
        dimensions={"ok": pb.EventDimensionValue(boolean_value=True)}, timestamp=WHEN,
    )


def _edited(message, edit):
    """A copy of `message` changed by `edit`."""
    out = type(message)()
    out.CopyFrom(message)
    edit(out)
    return out


def valid_requests(customer: str = "acme") -> dict:
    """One well-formed request per RPC, every kind of field set: the seeds the mutations start from."""
    return {
        "GetEntitlements": pb.GetEntitlementsRequest(customer_id=customer, resource_id="r-1"),
        "GetEntitlementsStateV2": pb.GetEntitlementsStateV2Request(customer_id=customer),
        "ReloadEntitlements": pb.ReloadEntitlementsRequest(customer_id=customer),
        "GetEntitlement": pb.GetEntitlementRequest(
            customer_id=customer, feature_id="api-calls",
            options=pb.GetEntitlementOptions(requested_usage=2, requested_values=["us"]),
        ),
        "GetBooleanEntitlement": pb.GetBooleanEntitlementRequest(
            customer_id=customer, feature_id="sso",
            options=pb.BooleanEntitlementOptions(fallback=pb.BooleanEntitlementFallback(has_access=True)),
        ),
        "GetNumericEntitlement": pb.GetNumericEntitlementRequest(customer_id=customer, feature_id="projects"),
        "GetMeteredEntitlement": pb.GetMeteredEntitlementRequest(
            customer_id=customer, feature_id="api-calls",
            options=pb.MeteredEntitlementOptions(requested_usage=3, fallback=pb.MeteredEntitlementFallback(usage_limit=5)),
        ),
        "GetEnumEntitlement": pb.GetEnumEntitlementRequest(
            customer_id=customer, feature_id="regions", options=pb.EnumEntitlementOptions(requested_values=["us", "eu"])
        ),
        "GetEntitlementV2": pb.GetEntitlementV2Request(
            customer_id=customer, currency_id="tokens", options=pb.GetEntitlementOptions(requested_usage=5)
        ),
        "ReportUsage": _usage(customer),
        "ReportUsageBulk": pb.ReportUsageBulkRequest(usages=[_usage(customer), _usage(customer)]),
        "ReportEvents": pb.ReportEventsRequest(events=[_event(customer)]),
    }


METHODS = tuple(valid_requests())



def _descriptor(message_type: type[Message]) -> Descriptor:
    """A message type's descriptor, as intake sees it (the stubs also allow upb's own type)."""
    return cast(Descriptor, message_type.DESCRIPTOR)

class _Caller:
    """Blocking raw-bytes calls on the harness's channel (run them in a worker thread)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._raw: dict[str, grpc.UnaryUnaryMultiCallable] = {m: channel.unary_unary(SERVICE + m) for m in METHODS}

    def call(self, method: str, request: bytes, timeout: float = 10) -> tuple[grpc.StatusCode, str]:
        try:
            self._raw[method](request, timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        return OK, ""


# -- hypothesis: random and mutated bytes --------------------------------------------------------


@st.composite
def _mutated(draw, seed: bytes) -> bytes:
    out = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set-high"]))
        at = draw(st.integers(0, len(out)))
        if op == "flip" and at < len(out):
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 4))]
        elif op == "set-high" and at < len(out):
            out[at] = draw(st.sampled_from([0x80, 0xC3, 0xFE, 0xFF]))
    return bytes(out)


def _field_values(draw, message) -> None:
    """Overwrite some top-level scalar fields of `message` with arbitrary values of their type."""
    for field in message.DESCRIPTOR.fields:
        if field.is_repeated or not draw(st.booleans()):
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            setattr(message, field.name, draw(st.text(max_size=1100)))
        elif field.type == FieldDescriptor.TYPE_DOUBLE:
            setattr(message, field.name, draw(st.floats()))
        elif field.type == FieldDescriptor.TYPE_ENUM:
            setattr(message, field.name, draw(st.integers(-(2**31), 2**31 - 1)))


@st.composite
def hostile_calls(draw) -> tuple[str, bytes]:
    method = draw(st.sampled_from(METHODS))
    seed = valid_requests()[method]
    kind = draw(st.sampled_from(["random", "mutated", "fields"]))
    if kind == "random":
        return method, draw(st.binary(max_size=300))
    if kind == "mutated":
        return method, draw(_mutated(seed.SerializeToString()))
    _field_values(draw, seed)
    return method, seed.SerializeToString()


class HostileInputTests(TestCase):
    timeout = 120

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.h = await OnlineHarness(self, reactor).start(data.SEED, seed=3)
        self.caller = _Caller(self.h.channel)

        async def ready():  # the start-up key check is done: Stigg hears nothing more unasked
            return (await self.h.readiness())[0] == 200

        await self.h.wait_until(ready)

    async def in_thread(self, fn, *args):
        return await deferToThread(fn, *args)

    async def upstream_requests(self) -> int:
        return sum((await self.h.requests()).values())

    async def test_random_and_mutated_bytes_get_only_documented_codes(self):
        """Every RPC, random bytes, mutations of valid requests and arbitrary field values: only
        OK, INVALID_ARGUMENT or the RPC's documented codes, with short details; still serving."""
        seen: dict[str, set] = {m: set() for m in METHODS}

        @settings(max_examples=250, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(hostile_calls())
        def property(call):
            method, request = call
            code, details = self.caller.call(method, request)
            seen[method].add(code)
            assert code in DOCUMENTED[method], (method, request[:200], code, details)
            assert len(details) <= MAX_DETAILS, (method, code, len(details))

        await self.in_thread(property)
        self.assertTrue(any(INVALID in codes for codes in seen.values()))
        self.assertTrue(any(OK in codes for codes in seen.values()))
        r = await self.h.call("GetBooleanEntitlement", valid_requests()["GetBooleanEntitlement"])
        self.assertTrue(r.has_access)
        self.assertFalse(r.is_fallback)

    async def test_malformed_bytes_are_invalid_argument_on_every_rpc(self):
        """Finding 5: invalid UTF-8 in a string field, a truncated varint, random bytes."""
        noise = bytes(random.Random(5).randrange(256) for _ in range(64))
        before = await self.upstream_requests()
        for method, request in valid_requests("ZZZZ").items():
            good = request.SerializeToString()
            cases = {
                "invalid UTF-8": (good.replace(b"ZZZZ", b"Z\xff\xfeZ"), "customer_id is not valid UTF-8"),
                "truncated varint": (good + b"\x78\x80", "truncated varint"),
                "random bytes": (noise, "the request is not a valid"),
            }
            for case, (request_bytes, expected) in cases.items():
                code, details = await self.in_thread(self.caller.call, method, request_bytes)
                self.assertEqual(code, INVALID, (method, case, details))
                self.assertIn(expected, details, (method, case))
                self.assertIn(request.DESCRIPTOR.full_name, details)
        self.assertEqual(await self.upstream_requests(), before)

    async def test_huge_ids_are_refused_before_any_work(self):
        """Findings 6 and 7: a 1 MiB, 100,000- or 12,000-character id is INVALID_ARGUMENT naming
        the field with a short message (never RESOURCE_EXHAUSTED), and Stigg is never asked."""
        before = await self.upstream_requests()
        for size in (12_000, 100_000, 1 << 20):
            for method, request in valid_requests("c" * size).items():
                code, details = await self.in_thread(self.caller.call, method, request.SerializeToString())
                self.assertEqual(code, INVALID, (method, size, details[:200]))
                self.assertIn("customer_id must be at most 1024 bytes", details)
                self.assertLessEqual(len(details), MAX_DETAILS)
        self.assertEqual(await self.upstream_requests(), before)

    async def test_ids_are_bounded_in_bytes_not_characters(self):
        # 600 characters, 1,200 bytes of UTF-8
        request = pb.GetBooleanEntitlementRequest(customer_id="acme", feature_id="é" * 600)
        code, details = await self.in_thread(self.caller.call, "GetBooleanEntitlement", request.SerializeToString())
        self.assertEqual((code, details.split(" (")[0]), (INVALID, "feature_id must be at most 1024 bytes"))
        request = pb.GetBooleanEntitlementRequest(customer_id="acme", feature_id="é" * 512)  # exactly 1,024
        self.assertEqual((await self.in_thread(self.caller.call, "GetBooleanEntitlement", request.SerializeToString()))[0], OK)

    async def test_limits_name_the_field(self):
        """Finding 8 and the input limits: each refused locally, naming the field, before Stigg."""
        dim = pb.EventDimensionValue
        usage = _usage()
        cases = []

        def case(method, request, expected):
            cases.append((method, request, expected))

        for bad in (math.nan, math.inf, -math.inf):
            u = _edited(usage, lambda u: u.dimensions["cost"].CopyFrom(dim(number_value=bad)))  # noqa: B023
            case("ReportUsage", u, "dimensions['cost'] must be a finite number")
        e = _edited(_event(), lambda e: e.dimensions["cost"].CopyFrom(dim(number_value=math.nan)))
        case("ReportEvents", pb.ReportEventsRequest(events=[_event(), e]), "events[1].dimensions['cost'] must be a finite number")
        case("ReportUsage", _edited(usage, lambda u: setattr(u, "update_behavior", 99)),
             "update_behavior 99 is not a UsageUpdateBehavior")
        for stamp in (Timestamp(seconds=-62135596800), Timestamp(seconds=4102444800), Timestamp(seconds=1, nanos=-1)):
            u = _edited(usage, lambda u: u.timestamp.CopyFrom(stamp))  # noqa: B023
            case("ReportUsage", u, "timestamp is out of range: it must be between 1970-01-01T00:00:00Z and 2100-01-01T00:00:00Z")
        e = _edited(_event(), lambda e: e.timestamp.CopyFrom(Timestamp(seconds=-62135596800)))  # year 1
        case("ReportEvents", pb.ReportEventsRequest(events=[e]), "events[0].timestamp is out of range")
        case("ReportUsageBulk", pb.ReportUsageBulkRequest(usages=[usage] * 1001), "usages must have at most 1000 items (got 1001)")
        case("ReportEvents", pb.ReportEventsRequest(events=[_event()] * 1001), "events must have at most 1000 items (got 1001)")

        def many_dimensions(u):
            for i in range(101):
                u.dimensions[f"d{i}"].boolean_value = True

        case("ReportUsage", _edited(usage, many_dimensions), "dimensions must have at most 100 entries (got 103)")
        case("ReportUsage", _edited(usage, lambda u: u.dimensions["k" * 2000].CopyFrom(dim(boolean_value=True))),
             "dimensions keys must be at most 1024 bytes")
        case("ReportUsage", _edited(usage, lambda u: u.dimensions[""].CopyFrom(dim(boolean_value=True))),
             "dimensions keys must not be empty")
        case("ReportUsage", _edited(usage, lambda u: u.dimensions["text"].CopyFrom(dim(string_value="x" * 5000))),
             "dimensions['text'] must be at most 4096 bytes")
        e = _edited(_event(), lambda e: setattr(e, "idempotency_key", "k" * 1025))
        case("ReportEvents", pb.ReportEventsRequest(events=[e]), "events[0].idempotency_key must be at most 1024 bytes")
        e = _edited(_event(), lambda e: setattr(e, "event_name", "n" * 1025))
        case("ReportEvents", pb.ReportEventsRequest(events=[e]), "events[0].event_name must be at most 1024 bytes")
        u = _edited(usage, lambda u: setattr(u, "resource_id", "r" * 1025))
        case("ReportUsageBulk", pb.ReportUsageBulkRequest(usages=[usage, u]), "usages[1].resource_id must be at most 1024 bytes")
        case("GetEnumEntitlement",
             pb.GetEnumEntitlementRequest(customer_id="acme", feature_id="regions",
                                          options=pb.EnumEntitlementOptions(requested_values=["v"] * 101)),
             "options.requested_values must have at most 100 items (got 101)")
        case("GetEntitlement",
             pb.GetEntitlementRequest(customer_id="acme", feature_id="regions",
                                      options=pb.GetEntitlementOptions(requested_values=["us", "v" * 1025])),
             "options.requested_values[1] must be at most 1024 bytes")
        case("GetEntitlementV2", pb.GetEntitlementV2Request(customer_id="acme", currency_id="t" * 1025),
             "currency_id must be at most 1024 bytes")
        case("GetEntitlements", pb.GetEntitlementsRequest(customer_id="acme", resource_id="r" * 1025),
             "resource_id must be at most 1024 bytes")
        case("GetMeteredEntitlement",
             pb.GetMeteredEntitlementRequest(customer_id="acme", feature_id="api-calls", options=pb.MeteredEntitlementOptions(
                 fallback=pb.MeteredEntitlementFallback(usage_limit=math.nan))),
             "options.fallback.usage_limit must be a finite number")

        before = await self.upstream_requests()
        for method, request, expected in cases:
            code, details = await self.in_thread(self.caller.call, method, request.SerializeToString())
            self.assertEqual(code, INVALID, (method, expected, details))
            self.assertTrue(details.startswith(expected), (details, expected))
            self.assertLessEqual(len(details), MAX_DETAILS)
        self.assertEqual(await self.upstream_requests(), before)
        # and the limits themselves are accepted
        bulk = pb.ReportUsageBulkRequest(usages=[usage] * 1000)
        code, details = await self.in_thread(self.caller.call, "ReportUsageBulk", bulk.SerializeToString(), 30)
        self.assertEqual(code, OK, details)

    async def test_upstream_errors_quote_long_ids_briefly(self):
        """Finding 7: Stigg's refusal of an unknown 1,000-character customer reaches the caller
        with the id cut to ~100 characters."""
        request = _usage("u" * 1000)
        code, details = await self.in_thread(self.caller.call, "ReportUsage", request.SerializeToString())
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND, details)
        self.assertLessEqual(len(details), MAX_DETAILS)
        self.assertNotIn("u" * (TEXT_LIMIT + 1), details)


class LogAmplificationTests(TestCase):
    """Finding 11: logs never amplify input."""

    timeout = 60

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.h = await OnlineHarness(self, reactor).start(data.SEED, seed=3)
        self.events = log_events(self)

    def lines(self) -> list[str]:
        out = io.StringIO()
        text, as_json = TextLineObserver(out), JsonLineObserver(out)
        for event in self.events:
            text(event)
            as_json(event)
        return out.getvalue().splitlines()

    async def test_fallback_warning_quotes_a_truncated_id(self):
        await self.h.faults(down=True)
        customer = "w" * 1000
        r = await self.h.call("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso"))
        self.assertTrue(r.is_fallback)
        warnings = [line for line in self.lines() if "answering fallbacks" in line]
        self.assertTrue(warnings)
        for line in warnings:
            self.assertIn(quoted(customer), line)
            self.assertNotIn("w" * (QUOTE_LIMIT + 1), line)
            self.assertLess(len(line), 2000)

    async def test_garbage_on_the_http_port_answers_400_and_logs_nothing(self):
        requests = [
            b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"GET /%ff%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"GET /livez HTTP/1.1\r\nHost: \xff\xfe\r\nConnection: close\r\n\r\n",
            b"\xff\xfe\x00 garbage\r\n\r\n",
            b"GET /" + b"%ff" * 3000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ]
        port = self.h.http_port

        def send(raw: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(raw)  # (no half-close: Twisted drops a request whose client half-closed)
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
                return answer

        del self.events[:]
        for raw in requests:
            answer = await deferToThread(send, raw)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (raw[:40], answer[:100]))
        self.assertEqual([e for e in self.events if "log_failure" in e], [])
        # (Other parts of the sidecar log meanwhile, e.g. its client's connections to Stigg.)
        for line in self.lines():
            for trace in ("Traceback", "garbage", "%ff", "\\xff", "PATH_INFO", "Invalid encoding"):
                self.assertNotIn(trace, line)
        # and it still serves
        answer = await deferToThread(send, b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "))


class QuotingTests(SynchronousTestCase):
    def test_quoted_keeps_short_values_whole(self):
        self.assertEqual(quoted("acme"), "'acme'")
        self.assertEqual(quoted("a\nb"), "'a\\nb'")

    def test_quoted_cuts_long_values_and_says_how_long(self):
        text = quoted("x" * 5000)
        self.assertEqual(text, repr("x" * QUOTE_LIMIT) + "... (5000 characters)")

    def test_clipped(self):
        self.assertEqual(clipped("abc", 5), "abc")
        self.assertEqual(clipped("abcdefgh", 5), "abcde... (3 more characters)")

    def test_log_lines_are_bounded_whatever_an_event_holds(self):
        """The backstop: a 3.9 MB field (the size the issue saw) still makes a short line."""
        huge = "z" * 3_900_000
        event = {"log_format": "Entitlements for {customer} unavailable", "customer": huge, "log_level": None,
                 "log_namespace": "t", "log_time": 0.0}
        from twisted.logger import LogLevel

        event["log_level"] = LogLevel.warn
        out = io.StringIO()
        TextLineObserver(out)(dict(event))
        JsonLineObserver(out)(dict(event))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        for line in lines:
            self.assertLess(len(line), 3000)

    def test_malformed_descriptions(self):
        descriptor = _descriptor(pb.ReportEventsRequest)
        nested = pb.ReportEventsRequest(events=[pb.Event(event_name="ZZ")]).SerializeToString().replace(b"ZZ", b"\xc3(")
        self.assertEqual(
            intake.describe_malformed(nested, descriptor),
            "the request is not a valid stigg.sidecar.v1.ReportEventsRequest: events.event_name is not valid UTF-8 (at byte 2)",
        )
        self.assertIn("events claims 100 bytes but only 0 remain", intake.describe_malformed(b"\x0a\x64", descriptor))
        self.assertIn("invalid wire type 7", intake.describe_malformed(b"\x0f", descriptor))


class DocumentedLimitsTests(SynchronousTestCase):
    def test_the_readme_states_the_limits_the_code_applies(self):
        text = (ROOT / "README.md").read_text()
        table = text[text.index("### Input limits") :].split("\n\n")[1]
        for expected in (
            f"at most {intake.MAX_ID_BYTES} bytes of UTF-8",
            f"`ReportEvents` | at most {intake.MAX_BATCH} |",
            f"fallback `enum_values` | at most {intake.MAX_VALUES} |",
            f"per usage or event | at most {intake.MAX_DIMENSIONS} |",
            f"string value | at most {intake.MAX_DIMENSION_TEXT_BYTES} bytes |",
            "from 1970-01-01T00:00:00Z to before 2100-01-01T00:00:00Z",
        ):
            self.assertIn(expected, table)
        self.assertEqual((intake.EARLIEST_TIMESTAMP, intake.LATEST_TIMESTAMP), (0, 4102444800))

    def test_the_diagnosis_of_a_large_request_is_bounded(self):
        """A request of many tiny valid fields with a defect at its end: the walk stops after a
        bounded number of fields instead of walking megabytes in Python."""
        data = b"\x78\x01" * 1_000_000 + b"\x78"  # 2 MB of unknown varint fields, then a truncated one
        message = intake.describe_malformed(data, _descriptor(pb.GetBooleanEntitlementRequest))
        self.assertIn("the first 10000 fields look fine", message)
        self.assertIn("truncated varint", intake.describe_malformed(data[-2001:], _descriptor(pb.GetBooleanEntitlementRequest)))
