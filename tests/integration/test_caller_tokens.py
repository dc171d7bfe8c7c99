"""Caller tokens (issue 18): with CALLER_TOKENS_FILE set, every call but gRPC health needs
`authorization: Bearer TOKEN`; none or an unknown one is UNAUTHENTICATED, a read token on a write is
PERMISSION_DENIED; the file is re-read when it changes and a broken one keeps the last good set;
the caller's name (never the token) is logged and counted. Stigg's official client
(`stigg-sidecar-sdk`) is answered with the token as metadata, over plaintext and over TLS.

An offline sidecar (reads answer fallbacks, writes are acknowledged) in this reactor on
127.0.0.1:0; grpcio clients on threads; every wait bounded.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import grpc
import stigg_sidecar_sdk as sdk
import stigg_sidecar_sdk.generated.stigg.sidecar.v1 as official
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from tests.fixtures.clients import http_client
from tests.fixtures.lockdown import (
    CALL_TIMEOUT,
    OTHER_TOKEN,
    READ_TOKEN,
    TOKENS_TEXT,
    WRITE_TOKEN,
    LogLines,
    SecretVolume,
    bearer,
    channel,
    check,
    in_thread,
    server_cert,
    start_offline_sidecar,
    status_of,
    tls_env,
    tls_files,
)
from tests.fixtures.polling import until

BOUND = 10.0

READS = {
    "GetEntitlements": pb.GetEntitlementsRequest(customer_id="customer-1"),
    "GetEntitlement": pb.GetEntitlementRequest(customer_id="customer-1", feature_id="feature-1"),
    "GetBooleanEntitlement": pb.GetBooleanEntitlementRequest(customer_id="customer-1", feature_id="feature-1"),
    "GetNumericEntitlement": pb.GetNumericEntitlementRequest(customer_id="customer-1", feature_id="feature-1"),
    "GetMeteredEntitlement": pb.GetMeteredEntitlementRequest(customer_id="customer-1", feature_id="feature-1"),
    "GetEnumEntitlement": pb.GetEnumEntitlementRequest(customer_id="customer-1", feature_id="feature-1"),
    "GetEntitlementV2": pb.GetEntitlementV2Request(customer_id="customer-1", feature_id="feature-1"),
    "GetEntitlementsStateV2": pb.GetEntitlementsStateV2Request(customer_id="customer-1"),
}
WRITES = {
    "ReportUsage": pb.ReportUsageRequest(customer_id="customer-1", feature_id="feature-1", value=1),
    "ReportUsageBulk": pb.ReportUsageBulkRequest(
        usages=[pb.ReportUsageRequest(customer_id="customer-1", feature_id="feature-1", value=1)]
    ),
    "ReportEvents": pb.ReportEventsRequest(
        events=[pb.Event(customer_id="customer-1", event_name="call", idempotency_key="k-1")]
    ),
    "ReloadEntitlements": pb.ReloadEntitlementsRequest(customer_id="customer-1"),
}


def call(ch: grpc.Channel, method: str, request, metadata=None):
    return getattr(SidecarServiceStub(ch), method)(request, timeout=CALL_TIMEOUT, metadata=metadata)


class CallerTokenTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.tokens = self.dir / "tokens"
        self.tokens.write_text(TOKENS_TEXT)
        self.logs = LogLines(self)

    def start(self, **env: str) -> None:
        self.sidecar = start_offline_sidecar(self, reactor, CALLER_TOKENS_FILE=str(self.tokens), **env)
        self.port = self.sidecar.parts.grpc.port
        self.http_port = self.sidecar.parts.http.port
        self.ch = channel(self.port)
        self.addCleanup(self.ch.close)

    async def status(self, method: str, metadata=None, request=None) -> grpc.StatusCode:
        request = request if request is not None else {**READS, **WRITES}[method]
        return await status_of(call, self.ch, method, request, metadata)

    async def details(self, method: str, metadata=None) -> str:
        try:
            await in_thread(call, self.ch, method, {**READS, **WRITES}[method], metadata)
        except grpc.RpcError as e:
            return e.details() or ""
        raise AssertionError(f"{method} was answered")

    async def test_no_token_or_an_unknown_one_is_unauthenticated_on_every_method(self):
        self.start()
        for method in {**READS, **WRITES}:
            self.assertEqual(await self.status(method), grpc.StatusCode.UNAUTHENTICATED, method)
            self.assertEqual(await self.status(method, bearer(OTHER_TOKEN)), grpc.StatusCode.UNAUTHENTICATED, method)
        self.assertEqual(await self.details("GetBooleanEntitlement"),
                         "missing caller token: send metadata 'authorization: Bearer <token>'")
        self.assertEqual(await self.details("GetBooleanEntitlement", bearer(OTHER_TOKEN)), "unknown caller token")
        for malformed in (f"Basic {READ_TOKEN}", READ_TOKEN, "Bearer ", "Bearer"):
            self.assertEqual(
                await self.details("GetBooleanEntitlement", (("authorization", malformed),)),
                "malformed authorization metadata: expected 'Bearer <token>'",
            )
        # A prefix or an extension of a real token is just as unknown.
        for near in (READ_TOKEN[:-1], READ_TOKEN + "x", READ_TOKEN.upper()):
            self.assertEqual(await self.status("GetBooleanEntitlement", bearer(near)), grpc.StatusCode.UNAUTHENTICATED)

    async def test_a_read_token_reads_and_is_refused_writes(self):
        self.start()
        for method in READS:
            self.assertEqual(await self.status(method, bearer(READ_TOKEN)), grpc.StatusCode.OK, method)
        for method in WRITES:
            self.assertEqual(await self.status(method, bearer(READ_TOKEN)), grpc.StatusCode.PERMISSION_DENIED, method)
        self.assertEqual(
            await self.details("ReportUsage", bearer(READ_TOKEN)),
            "caller app-reader has a read token; ReportUsage needs a write token",
        )
        # The scheme is case-insensitive, as HTTP's is.
        self.assertEqual(
            await self.status("GetBooleanEntitlement", (("authorization", f"bearer {READ_TOKEN}"),)), grpc.StatusCode.OK
        )

    async def test_a_write_token_reads_and_writes(self):
        self.start()
        for method in {**READS, **WRITES}:
            self.assertEqual(await self.status(method, bearer(WRITE_TOKEN)), grpc.StatusCode.OK, method)

    async def test_health_is_open_and_reflection_needs_a_token(self):
        self.start()
        health: Any = health_pb2_grpc.HealthStub(self.ch)  # the stubs' HealthStub lists no methods
        answer = await in_thread(health.Check, health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        self.assertEqual(answer.status, health_pb2.HealthCheckResponse.SERVING)

        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(self.ch)

        def list_services(metadata=None) -> list[str]:
            responses = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT, metadata=metadata
            )
            return [s.name for r in responses for s in r.list_services_response.service]

        with self.assertRaises(grpc.RpcError) as raised:
            await in_thread(list_services)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        self.assertIn("stigg.sidecar.v1.SidecarService", await in_thread(list_services, bearer(READ_TOKEN)))

    async def test_the_file_is_reread_when_it_changes_and_a_broken_one_keeps_the_last_good_set(self):
        self.start()
        self.assertEqual(await self.status("GetBooleanEntitlement", bearer(OTHER_TOKEN)), grpc.StatusCode.UNAUTHENTICATED)
        # Written as editors and config tools do: a new file renamed over the old.
        self.replace_tokens(TOKENS_TEXT.replace(f"billing write {WRITE_TOKEN}", f"newcomer write {OTHER_TOKEN}"))
        await self.until_status("ReportUsage", bearer(OTHER_TOKEN), grpc.StatusCode.OK)
        self.assertEqual(await self.status("ReportUsage", bearer(WRITE_TOKEN)), grpc.StatusCode.UNAUTHENTICATED)
        # Rewritten in place, the scope lowered.
        self.tokens.write_text(TOKENS_TEXT.replace(f"billing write {WRITE_TOKEN}", f"newcomer read {OTHER_TOKEN}"))
        await self.until_status("ReportUsage", bearer(OTHER_TOKEN), grpc.StatusCode.PERMISSION_DENIED)

        # Broken: a bad scope. Logged once (naming the line and the caller, never a token); the
        # last good set stays.
        self.replace_tokens(f"app-reader admin {READ_TOKEN}\n")
        complaint = "line 1 (caller app-reader): the scope must be read or write"
        await until(lambda: self.logs.matching(complaint), BOUND, "the broken file logged")
        await self.sleep(2.5)  # several polls
        self.assertEqual(len(self.logs.matching(complaint)), 1, self.logs.lines)
        self.assertIn("still using the 2 callers loaded before", self.logs.matching(complaint)[0])
        self.assertEqual(await self.status("GetBooleanEntitlement", bearer(READ_TOKEN)), grpc.StatusCode.OK)
        self.assertEqual(await self.status("ReportUsage", bearer(OTHER_TOKEN)), grpc.StatusCode.PERMISSION_DENIED)
        # Deleted: the same.
        self.tokens.unlink()
        await until(lambda: self.logs.matching("does not exist"), BOUND, "the missing file logged")
        self.assertEqual(await self.status("GetBooleanEntitlement", bearer(READ_TOKEN)), grpc.StatusCode.OK)
        # Empty: the same (it would lock every caller out).
        self.tokens.write_text("# nobody\n")
        await until(lambda: self.logs.matching("has no callers"), BOUND, "the empty file logged")
        self.assertEqual(await self.status("GetBooleanEntitlement", bearer(READ_TOKEN)), grpc.StatusCode.OK)
        # Fixed: taken.
        self.replace_tokens(f"only-one write {OTHER_TOKEN}\n")
        await self.until_status("GetBooleanEntitlement", bearer(READ_TOKEN), grpc.StatusCode.UNAUTHENTICATED)
        self.assertEqual(await self.status("ReportUsage", bearer(OTHER_TOKEN)), grpc.StatusCode.OK)
        for token in (READ_TOKEN, WRITE_TOKEN, OTHER_TOKEN):
            self.assertFalse([line for line in self.logs.lines if token in line], "a token was logged")
        self.assertTrue(self.logs.matching("caller tokens reloaded: 1 callers: only-one (write)"))

    async def test_callers_are_counted_by_name_and_refusals_logged_by_name(self):
        self.start()
        await self.status("GetBooleanEntitlement", bearer(READ_TOKEN))
        await self.status("GetBooleanEntitlement", bearer(READ_TOKEN))
        await self.status("ReportUsage", bearer(READ_TOKEN))
        await self.status("ReportUsage", bearer(WRITE_TOKEN))
        await self.status("GetBooleanEntitlement", bearer(OTHER_TOKEN))
        await self.status("GetBooleanEntitlement")
        response = await http_client(self, reactor).get(f"http://127.0.0.1:{self.http_port}/metrics")
        text = await response.text()
        for line in (
            'sidecar_grpc_caller_requests_total{caller="app-reader",outcome="ok"} 2.0',
            'sidecar_grpc_caller_requests_total{caller="app-reader",outcome="permission_denied"} 1.0',
            'sidecar_grpc_caller_requests_total{caller="billing",outcome="ok"} 1.0',
            'sidecar_grpc_caller_requests_total{caller="(none)",outcome="unauthenticated"} 2.0',
        ):
            self.assertIn(line, text)
        for token in (READ_TOKEN, WRITE_TOKEN, OTHER_TOKEN):
            self.assertNotIn(token, text)
        self.assertEqual(len(self.logs.matching("refused ReportUsage to caller app-reader: its token is read-only")), 1)
        self.assertEqual(len(self.logs.matching("refused GetBooleanEntitlement: unknown caller token")), 1)

    async def test_stigg_official_client_is_answered_with_the_token_as_metadata(self):
        self.start()

        async def ask(metadata):
            client = sdk.Stigg(sdk.ApiConfig(api_key="unused-offline"), remote_sidecar_host="127.0.0.1",
                               remote_sidecar_port=self.port)
            try:
                request = sdk.GetBooleanEntitlementRequest(customer_id="customer-1", feature_id="feature-1")
                return await client.get_boolean_entitlement(request, metadata=metadata)
            finally:
                client.close()

        answer = await in_thread(asyncio.run, asyncio.wait_for(ask({"authorization": f"Bearer {READ_TOKEN}"}), BOUND))
        self.assertTrue(answer.is_fallback)  # offline: the fallback answer, not an error
        import grpclib.exceptions

        with self.assertRaises(grpclib.exceptions.GRPCError) as raised:
            await in_thread(asyncio.run, asyncio.wait_for(ask(None), BOUND))
        self.assertEqual(raised.exception.status.name, "UNAUTHENTICATED")

    async def test_stigg_official_stub_over_tls_with_a_token(self):
        # Stigg's `Stigg` class trusts only its own bundled CA; its generated stub takes any grpclib
        # Channel, so a caller of a TLS sidecar builds the channel with its own CA.
        ca = trustme.CA()
        volume = SecretVolume(self.dir / "tls", tls_files(server_cert(ca)))
        self.start(**tls_env(volume))

        async def ask(token: str):
            from grpclib.client import Channel

            context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
            context.set_alpn_protocols(["h2"])
            ch = Channel("127.0.0.1", self.port, ssl=context)
            try:
                stub = official.SidecarServiceStub(ch)
                request = sdk.GetMeteredEntitlementRequest(customer_id="customer-1", feature_id="feature-1")
                return await stub.get_metered_entitlement(request, metadata={"authorization": f"Bearer {token}"})
            finally:
                ch.close()

        answer = await in_thread(asyncio.run, asyncio.wait_for(ask(WRITE_TOKEN), BOUND))
        self.assertTrue(answer.is_fallback)

    async def test_without_the_setting_no_interceptor_is_installed(self):
        from stigg_sidecar.process.access import grpc_access
        from stigg_sidecar.settings import load_settings

        access = grpc_access(load_settings({"OFFLINE": "1"}), reactor)
        self.assertEqual((access.credentials, access.interceptors, access.watchers), (None, [], []))
        sidecar = start_offline_sidecar(self, reactor)
        ch = channel(sidecar.parts.grpc.port)
        self.addCleanup(ch.close)
        self.assertFalse((await in_thread(check, ch)).has_access)

    def replace_tokens(self, text: str) -> None:
        staged = self.dir / "tokens.new"
        staged.write_text(text)
        staged.replace(self.tokens)

    async def until_status(self, method: str, metadata, wanted: grpc.StatusCode) -> None:
        deadline = reactor.seconds() + BOUND
        while (got := await self.status(method, metadata)) != wanted:
            if reactor.seconds() > deadline:
                raise AssertionError(f"{method}: {got}, not {wanted}, after {BOUND}s")
            await self.sleep(0.2)

    async def sleep(self, seconds: float) -> None:
        from twisted.internet.task import deferLater

        await deferLater(reactor, seconds, lambda: None)

