"""The emulator's real-time side: graphql-transport-ws at /graphql, the state changes it pushes,
and the admin calls that drive it (publish, disconnect, sockets, raw frames, faults).

Real sockets on 127.0.0.1 port 0; every wait is bounded.
"""

from __future__ import annotations

import json
from typing import Any, cast

import treq
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, TimeoutError, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from stigg_sidecar.emulator.data import parse_data
from stigg_sidecar.emulator.graphql import subscription_field
from stigg_sidecar.emulator.state import (
    ACCOUNT_ID,
    ENVIRONMENT_ID,
    EmulatorState,
    EntitlementsChanged,
    FaultsChanged,
    PackagePublished,
    UsageChanged,
    UsageReport,
)
from stigg_sidecar.emulator.testing import (
    GraphQLWSClient,
    RunningEmulator,
    WebSocketClosed,
    start_emulator,
    stop_emulator,
    ws_connect,
)
from stigg_sidecar.emulator.websocket import parse_message
from tests.fixtures.data import EMULATOR_KEY as KEY
from tests.fixtures.data import EMULATOR_SEED as SEED
from tests.fixtures.polling import until

WAIT = 5.0  # seconds: bound on any single network wait

OTHER_KEY = "other-key"
ENTITLEMENTS_UPDATED = """subscription OnEntitlementsUpdatedV2 { entitlementsUpdatedV2 {
  customerId resourceId accessDeniedReason entitlements { __typename } } }"""
USAGE_UPDATED = """subscription OnUsageUpdatedV2 { usageUpdatedV2 { customerId resourceId
  entitlementReference { id type } usage { currentUsage usageUpdatedAt usagePeriodStart
  usagePeriodEnd } } }"""
PACKAGE_PUBLISHED = """subscription OnPackagePublished { packagePublished { accountId
  environmentId packageType packageRefId packageVersion migrationType } }"""
V1_ENTITLEMENTS_UPDATED = """subscription OnEntitlementsUpdated { entitlementsUpdated {
  ...EntitlementsUpdatedPayload } }"""
V1_USAGE_UPDATED = "subscription OnUsageUpdated { usageUpdated { ...EntitlementUsageUpdated } }"
CREDIT_BALANCE_UPDATED = """subscription OnCreditBalanceUpdated { creditBalanceUpdated {
  ...CreditBalanceUpdatedPayload } }"""
REPORT_USAGE = (
    "mutation ReportUsage($input: ReportUsageInput!) { reportUsage(input: $input) { id } }"
)


# -- pure parts -----------------------------------------------------------------------------------


class SubscriptionDocumentTests(SynchronousTestCase):
    def test_the_root_field_is_found_past_comments_fragments_and_aliases(self) -> None:
        self.assertEqual(
            subscription_field(ENTITLEMENTS_UPDATED),
            ("entitlementsUpdatedV2", "entitlementsUpdatedV2"),
        )
        query = (
            "# subscription { x }\nfragment F on T { a }\nsubscription S($v: Int = 1) {\n"
            "  # c\n  u: usageUpdatedV2 { ...F } }"
        )
        self.assertEqual(subscription_field(query), ("u", "usageUpdatedV2"))
        self.assertIsNone(subscription_field("query { subscription { id } }"))
        self.assertIsNone(subscription_field('query Q { a(s: "subscription { x }") }'))

    def test_client_messages_are_validated_like_graphql_ws(self) -> None:
        self.assertEqual(parse_message(b'{"type":"ping"}'), {"type": "ping"})
        for bad in (
            b"not json",
            b"\xff",
            b"[]",
            b'{"type":"next","id":"1"}',
            b'{"type":"subscribe","id":"","payload":{"query":"x"}}',
            b'{"type":"subscribe","id":"1","payload":{}}',
            b'{"type":"subscribe","id":"1","payload":{"query":"x","variables":[]}}',
            b'{"type":"complete"}',
            b'{"type":"connection_init","payload":"key"}',
        ):
            with self.assertRaises(ValueError, msg=bad):
                parse_message(bad)


class StateListenerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.state = EmulatorState(parse_data(SEED), clock=self.clock)
        self.changes: list[Any] = []
        self.state.add_listener(self.changes.append)

    def test_replace_announces_what_edge_now_answers(self) -> None:
        entity = self.state._customers["acme"].resources["site-1"]
        self.state.replace("acme", "site-1", entity)
        [change] = self.changes
        self.assertIsInstance(change, EntitlementsChanged)
        self.assertEqual((change.customer_id, change.resource_id), ("acme", "site-1"))
        self.assertEqual(change.state, self.state.entitlements_state("acme", "site-1"))

    def test_usage_is_announced_once_per_entitlement_with_its_final_value(self) -> None:
        reports = [
            UsageReport("acme", "feature-api-calls", 1, idempotency_key="a"),
            UsageReport("acme", "feature-seats", 4, update_behavior="SET"),
            UsageReport("acme", "feature-api-calls", 2),
            UsageReport("acme", "feature-seats", 1, resource_id="site-1"),
        ]
        self.state.report_usage(reports)
        summary = [(c.resource_id, c.reference_id, c.current_usage) for c in self.changes]
        self.assertEqual(
            summary,
            [
                (None, "feature-api-calls", 13),
                (None, "feature-seats", 4),
                ("site-1", "feature-seats", 1),
            ],
        )
        self.assertTrue(all(isinstance(c, UsageChanged) for c in self.changes))
        self.assertEqual(self.changes[0].reference_type, "FEATURE")
        self.changes.clear()
        self.state.report_usage([reports[0]])  # a repeated idempotency key changes nothing
        self.assertEqual(self.changes, [])

    def test_publish_counts_versions_per_package_and_validates(self) -> None:
        first = self.state.publish_package("ALL_CUSTOMERS")
        second = self.state.publish_package("NEW_CUSTOMERS")
        other = self.state.publish_package("ALL_CUSTOMERS", package_ref_id="p", package_version=7)
        self.assertEqual(
            first,
            PackagePublished(
                ACCOUNT_ID, ENVIRONMENT_ID, "Plan", "emulator-plan", 1, "ALL_CUSTOMERS"
            ),
        )
        self.assertEqual((second.package_version, other.package_version), (2, 7))
        self.assertEqual(self.changes, [first, second, other])
        refused: list[tuple[tuple[str, ...], dict[str, Any]]] = [
            (("SOME_CUSTOMERS",), {}),
            (("ALL_CUSTOMERS",), {"package_version": "3"}),
            (("ALL_CUSTOMERS",), {"package_ref_id": ""}),
        ]
        for args, kwargs in refused:
            with self.assertRaises(ValueError):
                self.state.publish_package(*args, **kwargs)
        self.assertEqual(len(self.changes), 3)

    def test_fault_changes_are_announced(self) -> None:
        self.state.faults.update({"down": True})
        [change] = self.changes
        self.assertIsInstance(change, FaultsChanged)
        self.assertIs(change.faults["down"], True)
        with self.assertRaises(ValueError):
            self.state.faults.update({"down": "yes"})
        self.assertEqual(len(self.changes), 1)


# -- over the wire --------------------------------------------------------------------------------


class EmulatorWebSocketTests(TestCase):
    timeout = 15

    def setUp(self) -> Deferred:  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))
        self.clients: list[GraphQLWSClient] = []
        d = start_emulator(reactor, SEED, api_keys=[OTHER_KEY])

        def started(emulator: RunningEmulator) -> None:
            self.emulator = emulator
            self.state, _, self.url = emulator
            self.addCleanup(stop_emulator, emulator)
            self.addCleanup(self.pool.closeCachedConnections)

        return d.addCallback(started)

    def tearDown(self) -> Deferred:  # type: ignore[override]  # trial waits on what setUp/tearDown return
        # Wait for the client ends too, so that no socket outlives the test.
        return gatherResults([client.abort() for client in self.clients])

    async def connect(self, key: str | None = KEY, **options: Any) -> GraphQLWSClient:
        client = await ws_connect(reactor, self.url, key, **options)
        self.clients.append(client)
        return client

    async def acknowledged(self, key: str = KEY) -> GraphQLWSClient:
        client = await self.connect(key)
        self.assertEqual(await client.next_message(), {"type": "connection_ack"})
        return client

    async def subscribed(self, *queries: str, key: str = KEY) -> GraphQLWSClient:
        client = await self.acknowledged(key)
        _, before = await self.request("GET", "/_emulator/sockets")
        for index, query in enumerate(queries):
            client.subscribe(f"sub-{index}", query)
        await self.wait_for_sockets(subscriptions=before["subscriptions"] + len(queries))
        return client

    async def wait_for_sockets(self, **expected: int) -> None:
        """Poll GET /_emulator/sockets until it shows ``expected`` (as a test of a reconnecting
        client would)."""
        sockets: dict[str, Any] = {}

        async def shown() -> bool:
            sockets.update((await self.request("GET", "/_emulator/sockets"))[1])
            return all(sockets[name] == count for name, count in expected.items())

        try:
            await until(shown, 5, interval=0.02)
        except AssertionError:
            self.fail(f"GET /_emulator/sockets never showed {expected}: {sockets}")

    async def request(
        self, method: str, path: str, body: Any = None, key: str | None = None
    ) -> tuple[int, Any]:
        headers = Headers({"X-API-KEY": [key]} if key is not None else {})
        data = json.dumps(body).encode() if body is not None else None
        response = await self.http.request(
            method, self.url + path, data=data, headers=headers
        ).addTimeout(WAIT, reactor)
        content = await treq.content(response).addTimeout(WAIT, reactor)
        try:
            return response.code, json.loads(content)
        except ValueError:
            return response.code, content

    async def report_usage(self, usage: dict) -> None:
        body = {
            "operationName": "ReportUsage",
            "variables": {"input": usage},
            "query": REPORT_USAGE,
        }
        status, answer = await self.request("POST", "/graphql", body, key=KEY)
        self.assertEqual((status, answer.get("errors")), (200, None))

    async def assert_closed(self, client: GraphQLWSClient, code: int, reason: str) -> None:
        self.assertEqual(await client.wait_closed(), (code, reason))

    # -- the handshake -----------------------------------------------------------------------

    async def test_a_known_key_is_acknowledged(self) -> None:
        client = await self.acknowledged()
        assert client.protocol is not None
        self.assertEqual(client.protocol.websocket_protocol_in_use, "graphql-transport-ws")
        await self.acknowledged(OTHER_KEY)
        _, sockets = await self.request("GET", "/_emulator/sockets")
        self.assertEqual(sockets, {"connected": 2, "subscriptions": 0})

    async def test_a_wrong_or_missing_key_closes_4401_invalid_api_key(self) -> None:
        await self.assert_closed(await self.connect("wrong"), 4401, "Invalid API key")
        client = await self.connect(None)
        client.send({"type": "connection_init"})
        await self.assert_closed(client, 4401, "Invalid API key")

    async def test_ping_is_answered_with_pong_echoing_its_payload(self) -> None:
        client = await self.connect(None)
        client.send({"type": "ping"})  # allowed before connection_init, as in graphql-ws
        self.assertEqual(await client.next_message(), {"type": "pong"})
        client.send({"type": "connection_init", "payload": {"headers": {"x-api-key": KEY}}})
        self.assertEqual(await client.next_message(), {"type": "connection_ack"})
        client.send({"type": "ping", "payload": {"n": 1}})
        self.assertEqual(await client.next_message(), {"type": "pong", "payload": {"n": 1}})
        client.send({"type": "pong"})  # answers to server pings are accepted and ignored
        client.send({"type": "ping"})
        self.assertEqual(await client.next_message(), {"type": "pong"})

    async def test_protocol_violations_close_with_graphql_ws_codes(self) -> None:
        client = await self.connect(None)
        client.subscribe("1", ENTITLEMENTS_UPDATED)
        await self.assert_closed(client, 4401, "Unauthorized")

        client = await self.acknowledged()
        client.send({"type": "connection_init", "payload": {"headers": {"X-API-KEY": KEY}}})
        await self.assert_closed(client, 4429, "Too many initialisation requests")

        client = await self.acknowledged()
        client.subscribe("same", ENTITLEMENTS_UPDATED)
        client.subscribe("same", USAGE_UPDATED)
        await self.assert_closed(client, 4409, "Subscriber for same already exists")

        for frame in ("{not json", '{"type":"bogus"}', '{"type":"subscribe","id":"1"}'):
            client = await self.acknowledged()
            client.send_text(frame)
            await self.assert_closed(client, 4400, "Invalid message received")

    async def test_a_client_gone_mid_close_leaves_no_timer_behind(self) -> None:
        client = await self.connect(None)
        assert client.protocol is not None
        cast(tcp.Client, client.protocol.transport).pauseProducing()  # the client will not read the close frame
        client.send({"type": "connection_init", "payload": {"headers": {"X-API-KEY": "wrong"}}})
        await deferLater(reactor, 0.05, lambda: None)  # the server has sent its close frame
        await client.abort()  # and the client vanishes without answering it
        await self.wait_for_sockets(connected=0)

    async def test_no_connection_init_in_time_closes_4408(self) -> None:
        self.emulator.site.sockets.init_timeout = 0.1
        client = await self.connect(None)
        await self.assert_closed(client, 4408, "Connection initialisation timeout")

    async def test_another_subprotocol_closes_4406(self) -> None:
        client = await self.connect(KEY, protocols=["graphql-ws"])
        await self.assert_closed(client, 4406, "Subprotocol not acceptable")

    async def test_get_without_upgrade_is_a_400_and_post_still_answers(self) -> None:
        status, body = await self.request("GET", "/graphql")
        self.assertEqual(status, 400)
        self.assertEqual(body["errors"][0]["extensions"]["code"], "BAD_REQUEST")
        query = {"operationName": "GetSdkConfiguration", "variables": {}, "query": ""}
        status, body = await self.request("POST", "/graphql", query, key=KEY)
        self.assertEqual(status, 200)
        self.assertIn("sdkConfiguration", body["data"])

    # -- events ------------------------------------------------------------------------------

    async def test_admin_put_pushes_entitlements_updated_to_every_key(self) -> None:
        mine = await self.subscribed(ENTITLEMENTS_UPDATED)
        other = await self.subscribed(ENTITLEMENTS_UPDATED, key=OTHER_KEY)
        body = {"entitlements": [{"usageLimit": 9, "feature": {"refId": "feature-seats",
                "featureType": "NUMBER", "meterType": "Fluctuating"}}]}  # fmt: skip
        status, put = await self.request("PUT", "/_emulator/customers/acme?resourceId=site-1", body)
        self.assertEqual(status, 200)
        for client in (mine, other):
            message = await client.next_message()
            self.assertEqual((message["id"], message["type"]), ("sub-0", "next"))
            self.assertEqual(
                message["payload"]["data"]["entitlementsUpdatedV2"],
                {
                    "__typename": "EntitlementsUpdatedV2",
                    "customerId": "acme",
                    "resourceId": "site-1",
                    "accessDeniedReason": None,
                    "entitlements": put["entitlementsState"]["entitlementsV2"],
                },
            )
        await self.request(
            "PUT", "/_emulator/customers/gone", {"accessDeniedReason": "CustomerIsArchived"}
        )
        data = (await mine.next_message())["payload"]["data"]["entitlementsUpdatedV2"]
        self.assertEqual(
            (
                data["customerId"],
                data["resourceId"],
                data["accessDeniedReason"],
                data["entitlements"],
            ),
            ("gone", None, "CustomerIsArchived", []),
        )

    async def test_report_usage_pushes_usage_updated_per_feature(self) -> None:
        client = await self.subscribed(ENTITLEMENTS_UPDATED, USAGE_UPDATED)
        await self.report_usage(
            {"customerId": "acme", "featureId": "feature-api-calls", "value": 5}
        )
        message = await client.next_message()
        self.assertEqual((message["id"], message["type"]), ("sub-1", "next"))
        edge = await self.request("GET", "/v1/c/acme/entitlements-state.json", key=KEY)
        calls = edge[1]["data"]["entitlementsState"]["entitlementsV2"][1]
        self.assertEqual(
            message["payload"]["data"]["usageUpdatedV2"],
            {
                "__typename": "UsageUpdatedV2",
                "customerId": "acme",
                "resourceId": None,
                "entitlementReference": {
                    "__typename": "EntitlementReference",
                    "id": "feature-api-calls",
                    "type": "FEATURE",
                },
                "usage": {
                    "__typename": "UsageV2",
                    "currentUsage": 15,
                    "usageUpdatedAt": calls["usageUpdatedAt"],
                    "usagePeriodStart": "2099-01-01T00:00:00.000Z",
                    "usagePeriodEnd": "2099-02-01T00:00:00.000Z",
                },
            },
        )
        usages = [
            {"customerId": "acme", "featureId": "feature-seats", "value": 1},
            {"customerId": "acme", "featureId": "feature-seats", "value": 1},
            {
                "customerId": "acme",
                "featureId": "feature-seats",
                "value": 2,
                "resourceId": "site-1",
            },
        ]
        bulk = {"operationName": "ReportUsageBulk", "variables": {"input": {"usages": usages}},
                "query": "mutation ReportUsageBulk { x }"}  # fmt: skip
        await self.request("POST", "/graphql", bulk, key=KEY)
        seen = []
        for _ in range(2):
            data = (await client.next_message())["payload"]["data"]["usageUpdatedV2"]
            seen.append((data["resourceId"], data["usage"]["currentUsage"]))
        self.assertEqual(seen, [(None, 4), ("site-1", 2)])
        with self.assertRaises(TimeoutError):  # nothing more: one event per entitlement changed
            await client.next_message(timeout=0.2)

    async def test_v1_subscriptions_push_the_payloads_of_stiggs_schema(self) -> None:
        # stigg-api-client 6.25.0: EntitlementsUpdatedPayload, EntitlementUsageUpdated and
        # CreditBalanceUpdatedPayload, the fragments Node SDK 3.x subscribes with.
        client = await self.subscribed(V1_ENTITLEMENTS_UPDATED, V1_USAGE_UPDATED, CREDIT_BALANCE_UPDATED)
        credit = {"usageLimit": 50, "currentUsage": 20, "validUntil": "2099-03-01T00:00:00Z",
                  "currency": {"currencyId": "gems", "unitSingular": "gem", "unitPlural": "gems"}}
        body = {"entitlements": [{"feature": {"refId": "f", "featureType": "BOOLEAN"}}, credit]}
        status, put = await self.request("PUT", "/_emulator/customers/acme", body)
        self.assertEqual(status, 200)
        first, second = await client.next_message(), await client.next_message()
        self.assertEqual((first["id"], second["id"]), ("sub-0", "sub-2"))
        updated = first["payload"]["data"]["entitlementsUpdated"]
        self.assertEqual(updated["__typename"], "EntitlementsUpdated")
        self.assertEqual((updated["accountId"], updated["environmentId"]), (ACCOUNT_ID, ENVIRONMENT_ID))
        self.assertEqual(updated["entitlements"], put["entitlementsState"]["entitlements"])
        self.assertEqual([e["feature"]["refId"] for e in updated["entitlements"]], ["f"])  # V1: features
        self.assertEqual(
            second["payload"]["data"]["creditBalanceUpdated"],
            {
                "__typename": "CreditBalanceUpdated",
                "accountId": ACCOUNT_ID,
                "environmentId": ENVIRONMENT_ID,
                "customerId": "acme",
                "resourceId": None,
                "currencyId": "gems",
                "currency": {
                    "__typename": "SlimCustomCurrency",
                    "currencyId": "gems",
                    "displayName": "gems",
                    "symbol": None,
                    "units": {"__typename": "Units", "singular": "gem", "plural": "gems"},
                },
                "currentBalance": 30,
                "totalConsumed": 20,
                "totalGranted": 50,
                "validUntil": 4076006400000.0,
            },
        )
        await self.request("PUT", "/_emulator/customers/acme", SEED["customers"]["acme"])
        for _ in range(2 + 1):  # entitlementsUpdated (customer, site-1) and the tokens balance
            await client.next_message()
        await self.report_usage({"customerId": "acme", "featureId": "feature-api-calls", "value": 5})
        message = await client.next_message()
        self.assertEqual(message["id"], "sub-1")
        usage = message["payload"]["data"]["usageUpdated"]
        self.assertEqual(usage["__typename"], "UsageUpdated")
        self.assertEqual(
            usage["usage"],
            {
                "__typename": "UsageMeasurementUpdated",
                "accountId": ACCOUNT_ID,
                "environmentId": ENVIRONMENT_ID,
                "customerId": "acme",
                "resourceId": None,
                "featureId": "feature-api-calls",
                "currentUsage": 15,
                "usagePeriodStart": 4070908800000.0,
                "usagePeriodEnd": 4073587200000.0,
                "nextResetDate": 4073587200000.0,
            },
        )
        self.assertEqual(usage["entitlement"]["__typename"], "Entitlement")
        self.assertEqual(usage["entitlement"]["currentUsage"], 15)

    async def test_admin_put_takes_the_data_files_customer_shape_with_resources(self) -> None:
        client = await self.subscribed(ENTITLEMENTS_UPDATED)
        seats = {"usageLimit": 7, "feature": {"refId": "feature-seats", "featureType": "NUMBER",
                                              "meterType": "Fluctuating"}}
        body = {"entitlements": [], "resources": {"site-2": {"entitlements": [seats]}}}
        status, put = await self.request("PUT", "/_emulator/customers/acme", body)
        self.assertEqual(status, 200, put)
        self.assertEqual(set(put["resources"]), {"site-2"})
        pushed = []
        for _ in range(3):  # the customer, site-1 (removed) and site-2
            data = (await client.next_message())["payload"]["data"]["entitlementsUpdatedV2"]
            pushed.append((data["resourceId"], len(data["entitlements"])))
        self.assertEqual(pushed, [(None, 0), ("site-1", 0), ("site-2", 1)])
        _, edge = await self.request("GET", "/v1/c/acme/entitlements-state.json?resourceId=site-2", key=KEY)
        self.assertEqual(edge["data"]["entitlementsState"]["entitlementsV2"][0]["usageLimit"], 7)
        _, gone = await self.request("GET", "/v1/c/acme/entitlements-state.json?resourceId=site-1", key=KEY)
        self.assertEqual(gone["data"]["entitlementsState"]["accessDeniedReason"], "NoActiveSubscription")
        # a resource PUT takes one entity, never resources; a bad resource is named
        status, error = await self.request(
            "PUT", "/_emulator/customers/acme?resourceId=site-2", {"resources": {}}
        )
        self.assertEqual((status, error["error"]), (400, "resources: unknown field"))
        status, error = await self.request(
            "PUT", "/_emulator/customers/acme", {"resources": {"r": {"entitlements": 3}}}
        )
        self.assertEqual((status, error["error"]), (400, "resources.r.entitlements: must be a list"))

    async def test_publish_pushes_package_published(self) -> None:
        client = await self.subscribed(PACKAGE_PUBLISHED)
        body = {"migrationType": "ALL_CUSTOMERS", "packageRefId": "plan-pro", "packageVersion": 3}
        status, answer = await self.request("POST", "/_emulator/publish", body)
        self.assertEqual(status, 200)
        expected = {
            "__typename": "PackagePublished",
            "accountId": ACCOUNT_ID,
            "environmentId": ENVIRONMENT_ID,
            "packageType": "Plan",
            "packageRefId": "plan-pro",
            "packageVersion": 3,
            "migrationType": "ALL_CUSTOMERS",
        }
        self.assertEqual(answer, {"packagePublished": expected, "subscribers": 1})
        message = await client.next_message()
        self.assertEqual(
            message,
            {"id": "sub-0", "type": "next", "payload": {"data": {"packagePublished": expected}}},
        )
        bad: object
        for bad in ({"migrationType": "SOME"}, {"migrationType": "NEW_CUSTOMERS", "x": 1}, []):
            status, answer = await self.request("POST", "/_emulator/publish", bad)
            self.assertEqual(status, 400, bad)
            self.assertIn("error", answer)

    async def test_aliases_are_the_response_keys(self) -> None:
        client = await self.acknowledged()
        client.subscribe("a", "subscription { pub: packagePublished { accountId } }")
        await self.wait_for_sockets(subscriptions=1)
        await self.request("POST", "/_emulator/publish", {"migrationType": "NEW_CUSTOMERS"})
        message = await client.next_message()
        self.assertEqual(list(message["payload"]["data"]), ["pub"])

    async def test_complete_stops_that_subscription_only(self) -> None:
        client = await self.subscribed(PACKAGE_PUBLISHED, PACKAGE_PUBLISHED)
        client.send({"id": "sub-0", "type": "complete"})
        client.send({"id": "never-subscribed", "type": "complete"})
        await self.wait_for_sockets(connected=1, subscriptions=1)
        await self.request("POST", "/_emulator/publish", {"migrationType": "NEW_CUSTOMERS"})
        self.assertEqual((await client.next_message())["id"], "sub-1")
        with self.assertRaises(TimeoutError):
            await client.next_message(timeout=0.2)

    async def test_unknown_subscription_gets_an_error_and_the_socket_stays(self) -> None:
        client = await self.acknowledged()
        for subscription_id, query in (
            ("v0", "subscription { entitlementsUpdatedV0 { customerId } }"),
            ("q", "query GetEntitlementsState { entitlementsState { accessDeniedReason } }"),
        ):
            client.subscribe(subscription_id, query)
            message = await client.next_message()
            self.assertEqual((message["id"], message["type"]), (subscription_id, "error"))
            [error] = message["payload"]
            self.assertIn("Unknown subscription", error["message"])
            self.assertEqual(error["extensions"], {"code": "GRAPHQL_VALIDATION_FAILED"})
        client.send({"type": "ping"})
        self.assertEqual(await client.next_message(), {"type": "pong"})
        _, sockets = await self.request("GET", "/_emulator/sockets")
        self.assertEqual(sockets, {"connected": 1, "subscriptions": 0})

    async def test_raw_frames_reach_the_sockets_of_a_key(self) -> None:
        mine = await self.acknowledged()
        other = await self.acknowledged(OTHER_KEY)
        status, answer = await self.request(
            "POST", "/_emulator/sockets/send", {"text": "{garbage", "apiKey": KEY}
        )
        self.assertEqual((status, answer), (200, {"sent": 1}))
        self.assertEqual(await mine.next_text(), "{garbage")
        status, answer = await self.request("POST", "/_emulator/sockets/send", {"text": "x"})
        self.assertEqual((status, answer), (200, {"sent": 2}))
        self.assertEqual(await other.next_text(), "x")
        status, _ = await self.request("POST", "/_emulator/sockets/send", {"frame": "x"})
        self.assertEqual(status, 400)

    # -- dropping ----------------------------------------------------------------------------

    async def test_disconnect_drops_every_socket_like_a_network_failure(self) -> None:
        first = await self.subscribed(ENTITLEMENTS_UPDATED, USAGE_UPDATED, PACKAGE_PUBLISHED)
        second = await self.acknowledged(OTHER_KEY)
        _, sockets = await self.request("GET", "/_emulator/sockets")
        self.assertEqual(sockets, {"connected": 2, "subscriptions": 3})
        status, answer = await self.request("POST", "/_emulator/disconnect")
        self.assertEqual((status, answer), (200, {"disconnected": 2}))
        for client in (first, second):
            code, _ = await client.wait_closed()
            self.assertEqual(code, 1006)
        _, sockets = await self.request("GET", "/_emulator/sockets")
        self.assertEqual(sockets, {"connected": 0, "subscriptions": 0})
        await self.subscribed(USAGE_UPDATED)  # and clients can come back

    async def test_down_drops_sockets_and_refuses_upgrades(self) -> None:
        client = await self.acknowledged()
        status, _ = await self.request("POST", "/_emulator/faults", {"down": True})
        self.assertEqual(status, 200)
        self.assertEqual((await client.wait_closed())[0], 1006)
        with self.assertRaises(WebSocketClosed) as refused:
            await self.connect()
        self.assertEqual(refused.exception.code, 1006)
        _, counts = await self.request("GET", "/_emulator/requests")
        self.assertEqual(counts["/graphql (websocket)"], 2)
        await self.request("POST", "/_emulator/faults", {"down": False})
        await self.acknowledged()

    async def test_error_status_fault_fails_the_upgrade(self) -> None:
        await self.request("POST", "/_emulator/faults", {"error_status": 503})
        with self.assertRaises(WebSocketClosed) as refused:
            await self.connect()
        self.assertIn("503", refused.exception.reason)
        await self.request("POST", "/_emulator/faults", {"error_status": 0})
        await self.acknowledged()

    async def test_stop_emulator_closes_open_sockets(self) -> None:
        client = await self.subscribed(USAGE_UPDATED)
        await stop_emulator(self.emulator)
        self.assertEqual((await client.wait_closed())[0], 1006)
        self.assertTrue(self.emulator.site.close_connections().called)  # nothing left open
