"""Bad input over real gRPC: INVALID_ARGUMENT naming the field, never UNKNOWN; oversized requests
are refused. The server is the real GrpcService on 127.0.0.1:0 with the offline backend."""

from __future__ import annotations

import math

import grpc
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from stigg_sidecar.grpc.intake import add_sidecar_service
from stigg_sidecar.grpc.server import GrpcService
from stigg_sidecar.grpc.servicer import SidecarServicer
from stigg_sidecar.offline import OfflineSidecar
from stigg_sidecar.process.assembly import connection_limits
from stigg_sidecar.settings import Settings

MAX_MESSAGE = 64 * 1024


class InvalidArgumentTests(SynchronousTestCase):
    def setUp(self):
        backend = OfflineSidecar()
        servicer = SidecarServicer(backend, backend, {}, read_timeout=1, write_timeout=1)
        self.service = GrpcService(
            [lambda s: add_sidecar_service(servicer, s)],
            address="127.0.0.1",
            port=0,
            max_workers=4,
            max_message_bytes=MAX_MESSAGE,
            grace=0.5,
            limits=connection_limits(Settings()),
        )
        self.service.privilegedStartService()
        self.service.startService()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.service.port}")
        self.stub = SidecarServiceStub(self.channel)

    def tearDown(self):
        self.channel.close()
        server = self.service._server
        assert server is not None
        server.stop(None).wait(5)

    def assertInvalid(self, method, request, message):
        with self.assertRaises(grpc.RpcError) as caught:
            getattr(self.stub, method)(request, timeout=5)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(caught.exception.details(), message)

    def test_empty_customer_id_on_every_read(self):
        for method, request in [
            ("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(feature_id="f")),
            ("GetNumericEntitlement", pb.GetNumericEntitlementRequest(feature_id="f")),
            ("GetMeteredEntitlement", pb.GetMeteredEntitlementRequest(feature_id="f")),
            ("GetEnumEntitlement", pb.GetEnumEntitlementRequest(feature_id="f")),
            ("GetEntitlement", pb.GetEntitlementRequest(feature_id="f")),
            ("GetEntitlementV2", pb.GetEntitlementV2Request(feature_id="f")),
            ("GetEntitlements", pb.GetEntitlementsRequest()),
            ("GetEntitlementsStateV2", pb.GetEntitlementsStateV2Request()),
            ("ReloadEntitlements", pb.ReloadEntitlementsRequest()),
        ]:
            self.assertInvalid(method, request, "customer_id must not be empty")

    def test_empty_feature_id_on_feature_checks(self):
        self.assertInvalid("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(customer_id="c"), "feature_id must not be empty")
        self.assertInvalid("GetEntitlement", pb.GetEntitlementRequest(customer_id="c"), "feature_id must not be empty")

    def test_v2_needs_exactly_one_of_feature_and_currency(self):
        message = "exactly one of feature_id and currency_id must be set"
        self.assertInvalid("GetEntitlementV2", pb.GetEntitlementV2Request(customer_id="c"), message)
        self.assertInvalid(
            "GetEntitlementV2", pb.GetEntitlementV2Request(customer_id="c", feature_id="f", currency_id="x"), message
        )

    def test_non_finite_requested_usage(self):
        self.assertInvalid(
            "GetMeteredEntitlement",
            pb.GetMeteredEntitlementRequest(
                customer_id="c", feature_id="f", options=pb.MeteredEntitlementOptions(requested_usage=math.nan)
            ),
            "options.requested_usage must be a finite number",
        )

    def test_non_finite_usage_value(self):
        for value in (math.nan, math.inf, -math.inf):
            self.assertInvalid(
                "ReportUsage", pb.ReportUsageRequest(customer_id="c", feature_id="f", value=value), "value must be a finite number"
            )

    def test_bulk_usage_names_the_item(self):
        self.assertInvalid(
            "ReportUsageBulk",
            pb.ReportUsageBulkRequest(
                usages=[pb.ReportUsageRequest(customer_id="c", feature_id="f", value=1), pb.ReportUsageRequest(customer_id="c", value=1)]
            ),
            "usages[1].feature_id must not be empty",
        )

    def test_events_need_name_and_idempotency_key(self):
        self.assertInvalid(
            "ReportEvents",
            pb.ReportEventsRequest(events=[pb.Event(event_name="e", customer_id="c")]),
            "events[0].idempotency_key must not be empty",
        )
        self.assertInvalid(
            "ReportEvents",
            pb.ReportEventsRequest(events=[pb.Event(customer_id="c", idempotency_key="k")]),
            "events[0].event_name must not be empty",
        )

    def test_oversized_request_is_refused(self):
        request = pb.ReportEventsRequest(
            events=[pb.Event(event_name="e" * 1000, customer_id="c", idempotency_key=str(i)) for i in range(100)]
        )
        with self.assertRaises(grpc.RpcError) as caught:
            self.stub.ReportEvents(request, timeout=5)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        # and the server still answers afterwards
        self.assertTrue(self.stub.ReloadEntitlements(pb.ReloadEntitlementsRequest(customer_id="c"), timeout=5).entitled_entity_exists)

    def test_out_of_range_timestamp(self):
        from google.protobuf.timestamp_pb2 import Timestamp

        request = pb.ReportUsageRequest(customer_id="c", feature_id="f", value=1, timestamp=Timestamp(seconds=10**13))
        in_range = "it must be between 1970-01-01T00:00:00Z and 2100-01-01T00:00:00Z"
        self.assertInvalid("ReportUsage", request, f"timestamp is out of range: {in_range}")
        event = pb.Event(event_name="e", customer_id="c", idempotency_key="k", timestamp=Timestamp(seconds=-(10**13)))
        self.assertInvalid("ReportEvents", pb.ReportEventsRequest(events=[event]), f"events[0].timestamp is out of range: {in_range}")
