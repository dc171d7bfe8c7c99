"""The read path does each thing once: one peek of the cache per read (a miss then looks up
without peeking again), the memo keyed by the request's bytes as they arrived (never serialized
again), intake the only validator, and calls counted and timed where their handlers are
registered (no interceptor)."""

from __future__ import annotations

from typing import Any, cast

import grpc
from prometheus_client import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.contracts import EntitlementSource
from stigg_sidecar.entitlements.records import CustomerEntry, Feature, FeatureEntitlement
from stigg_sidecar.grpc.intake import CHECKS, InvalidArgument, sidecar_method_handlers
from stigg_sidecar.grpc.servicer import SidecarServicer
from stigg_sidecar.grpc.timing import TimedServer
from stigg_sidecar.offline import OfflineSidecar
from stigg_sidecar.ops.metrics import Metrics

NOW = 1_790_000_000_000
READS = [
    ("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(customer_id="acme", feature_id="seats")),
    ("GetNumericEntitlement", pb.GetNumericEntitlementRequest(customer_id="acme", feature_id="seats")),
    ("GetMeteredEntitlement", pb.GetMeteredEntitlementRequest(customer_id="acme", feature_id="seats")),
    ("GetEnumEntitlement", pb.GetEnumEntitlementRequest(customer_id="acme", feature_id="seats")),
    ("GetEntitlement", pb.GetEntitlementRequest(customer_id="acme", feature_id="seats")),
    ("GetEntitlementV2", pb.GetEntitlementV2Request(customer_id="acme", feature_id="seats")),
    ("GetEntitlements", pb.GetEntitlementsRequest(customer_id="acme")),
    ("GetEntitlementsStateV2", pb.GetEntitlementsStateV2Request(customer_id="acme")),
]


class CountingSource:
    """An EntitlementSource over a real EntitlementCache that counts its calls; `lookup` finds
    what the fetch would have stored (`fetched`), as a miss that waits for Stigg does."""

    def __init__(self) -> None:
        self.cache = EntitlementCache(max_bytes=10**9)
        self.fetched: CustomerEntry | None = None
        self.peeks = 0
        self.lookups = 0

    def peek(self, customer_id, resource_id):
        self.peeks += 1
        return self.cache.get_fresh(f"c_{customer_id}", NOW)

    def lookup(self, customer_id, resource_id, timeout):
        self.lookups += 1
        if self.fetched is not None:
            self.cache.put(self.fetched)
        return self.fetched

    def memo_grew(self, entry, nbytes):
        self.cache.charge(entry, nbytes)

    def now_ms(self):
        return NOW


class Context:
    def time_remaining(self):
        return None

    def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


def acme() -> CustomerEntry:
    seats = FeatureEntitlement(Feature("seats", "BOOLEAN", None), updated_at=1)
    return CustomerEntry("acme", features={"seats": seats}, timestamp=1)


def call(handlers, method: str, data: bytes) -> bytes:
    """A handler as grpcio calls it: the request's bytes in, the answer's bytes out."""
    answer = handlers[method].unary_unary(data, Context())
    assert isinstance(answer, bytes), answer
    return answer



def _source(source: object) -> EntitlementSource:
    """The counting source where the servicer wants an EntitlementSource (it has every method)."""
    return cast(EntitlementSource, source)


class OnePeekPerReadTests(SynchronousTestCase):
    def setUp(self):
        self.source = CountingSource()
        self.fallbacks: list[str] = []
        self.handlers = sidecar_method_handlers(
            SidecarServicer(_source(self.source), OfflineSidecar(), {}, 1, 1, on_fallback=self.fallbacks.append)
        )

    def test_a_hit_peeks_once_and_never_looks_up(self):
        self.source.cache.put(acme())
        for method, request in READS:
            before = self.source.peeks
            call(self.handlers, method, request.SerializeToString())
            call(self.handlers, method, request.SerializeToString())  # the memoized answer too
            self.assertEqual((method, self.source.peeks - before, self.source.lookups), (method, 2, 0))

    def test_a_miss_peeks_once_then_looks_up_once(self):
        self.source.fetched = acme()
        for method, request in READS:
            self.source.cache.clear()
            peeks, lookups = self.source.peeks, self.source.lookups
            call(self.handlers, method, request.SerializeToString())
            self.assertEqual((method, self.source.peeks - peeks, self.source.lookups - lookups), (method, 1, 1))
        self.assertNotIn("Unknown", self.fallbacks)  # every answer came from the fetched entry

    def test_a_miss_with_nothing_fetched_answers_the_fallback_after_one_lookup(self):
        answer = call(self.handlers, "GetBooleanEntitlement", READS[0][1].SerializeToString())
        self.assertTrue(pb.GetBooleanEntitlementResponse.FromString(answer).is_fallback)
        self.assertEqual(self.fallbacks, ["Unknown"])
        self.assertEqual((self.source.peeks, self.source.lookups), (1, 1))


class MemoKeyedByRawBytesTests(SynchronousTestCase):
    def setUp(self):
        self.source = CountingSource()
        self.source.cache.put(acme())
        self.handlers = sidecar_method_handlers(SidecarServicer(_source(self.source), OfflineSidecar(), {}, 1, 1))

    def memo_keys(self) -> list[Any]:
        entry = self.source.cache.get_entry("c_acme")
        assert entry is not None and entry.memo is not None
        return list(entry.memo)

    def test_the_key_is_the_bytes_as_they_arrived(self):
        # feature_id (field 2) before customer_id (field 1): valid protobuf, but not what
        # serializing the parsed message gives, so a key made by re-serializing would differ.
        raw = b"\x12\x05seats\x0a\x04acme"
        canonical = pb.GetBooleanEntitlementRequest.FromString(raw).SerializeToString()
        self.assertNotEqual(raw, canonical)
        first = call(self.handlers, "GetBooleanEntitlement", raw)
        self.assertEqual(self.memo_keys(), [("boolean", raw)])
        self.assertIs(call(self.handlers, "GetBooleanEntitlement", raw), first)
        answer = pb.GetBooleanEntitlementResponse.FromString(first)
        self.assertEqual((answer.has_access, answer.is_fallback), (True, False))

    def test_the_same_bytes_on_another_typed_check_are_another_answer(self):
        raw = READS[0][1].SerializeToString()  # the boolean and numeric requests have the same fields
        granted = pb.GetBooleanEntitlementResponse.FromString(call(self.handlers, "GetBooleanEntitlement", raw))
        numeric = pb.GetNumericEntitlementResponse.FromString(call(self.handlers, "GetNumericEntitlement", raw))
        self.assertEqual((granted.has_access, granted.is_fallback), (True, False))
        # "seats" is a boolean feature: a numeric check of it is a type mismatch, not the boolean answer.
        self.assertEqual((numeric.has_access, numeric.access_denied_reason),
                         (False, pb.ACCESS_DENIED_REASON_FEATURE_TYPE_MISMATCH))
        self.assertEqual(self.memo_keys(), [("boolean", raw)])


class IntakeIsTheOnlyValidatorTests(SynchronousTestCase):
    def test_exactly_one_of_feature_and_currency_is_held_at_intake(self):
        for request in [
            pb.GetEntitlementV2Request(customer_id="acme"),
            pb.GetEntitlementV2Request(customer_id="acme", feature_id="", currency_id=""),
            pb.GetEntitlementV2Request(customer_id="acme", feature_id="seats", currency_id="credits"),
        ]:
            with self.assertRaises(InvalidArgument) as caught:
                CHECKS["GetEntitlementV2"](request)
            self.assertEqual(str(caught.exception), "exactly one of feature_id and currency_id must be set")
        CHECKS["GetEntitlementV2"](pb.GetEntitlementV2Request(customer_id="acme", currency_id="credits"))
        CHECKS["GetEntitlementV2"](pb.GetEntitlementV2Request(customer_id="acme", feature_id="seats", currency_id=""))


class Registry:
    """What a grpc.Server keeps of registrations (TimedServer hands them on)."""

    def __init__(self) -> None:
        self.generic: list = []
        self.registered: dict = {}

    def add_generic_rpc_handlers(self, handlers):
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service, handlers):
        self.registered[service] = handlers


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class TimedAtRegistrationTests(SynchronousTestCase):
    def setUp(self):
        self.metrics = Metrics()
        self.server = Registry()
        self.timed = TimedServer(self.server, self.metrics.hot.timed)  # type: ignore[arg-type]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def test_unary_handlers_are_counted_and_timed_by_method_and_code(self):
        def ok(request, context):
            return b"answer"

        def refuse(request, context):
            raise RuntimeError("refused")

        class Refusing:
            def code(self):
                return grpc.StatusCode.INVALID_ARGUMENT

        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {"Check": grpc.unary_unary_rpc_method_handler(ok),
                    "Bad": grpc.unary_unary_rpc_method_handler(refuse)}
        self.timed.add_registered_method_handlers("svc.Service", handlers)
        wrapped = self.server.registered["svc.Service"]
        for _ in range(3):
            self.assertEqual(wrapped["Check"].unary_unary(b"", None), b"answer")
        with self.assertRaises(RuntimeError):
            wrapped["Bad"].unary_unary(b"", Refusing())
        self.assertEqual(self.sample("sidecar_grpc_requests_total", method="Check", code="OK"), 3)
        self.assertEqual(self.sample("sidecar_grpc_requests_total", method="Bad", code="INVALID_ARGUMENT"), 1)
        self.assertIsNone(self.sample("sidecar_grpc_requests_total", method="Bad", code="OK"))
        self.assertEqual(self.sample("sidecar_grpc_request_duration_seconds_count", method="Check"), 3)
        self.assertEqual(self.sample("sidecar_grpc_request_duration_seconds_count", method="Bad"), 1)
        self.assertIn(b'sidecar_grpc_request_duration_seconds_bucket{le="+Inf",method="Check"} 3.0',
                      generate_latest(self.metrics.registry))

    def test_generic_handlers_are_wrapped_once_per_method_and_streams_pass_through(self):
        unary: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")
        stream: grpc.RpcMethodHandler[Any, Any] = grpc.unary_stream_rpc_method_handler(lambda request, context: iter(()))
        generic = grpc.method_handlers_generic_handler("svc.Service", {"Check": unary, "Watch": stream})
        self.timed.add_generic_rpc_handlers((generic,))
        (wrapped,) = self.server.generic
        check = wrapped.service(Details("/svc.Service/Check"))
        self.assertIsNot(check, unary)
        self.assertIs(wrapped.service(Details("/svc.Service/Check")), check)
        self.assertIs(wrapped.service(Details("/svc.Service/Watch")), stream)
        self.assertIsNone(wrapped.service(Details("/other.Service/Check")))
        check.unary_unary(b"", None)
        self.assertEqual(self.sample("sidecar_grpc_requests_total", method="Check", code="OK"), 1)
