"""The local Stigg API emulator: data loading, state rules, HTTP endpoints, faults, the twistd
plugin, and Stigg's own Python API client talking to it.

Real sockets on 127.0.0.1 port 0; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from datetime import UTC, datetime
from random import Random
from typing import Any

import treq
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.http_headers import Headers

from stigg_sidecar.emulator.data import DataError, load_data_file, parse_data, parse_entity_state
from stigg_sidecar.emulator.graphql import operation_name
from stigg_sidecar.emulator.state import EmulatorState, current_period
from stigg_sidecar.emulator.testing import RunningEmulator, start_emulator, stop_emulator
from tests.fixtures.data import EMULATOR_KEY as KEY
from tests.fixtures.data import EMULATOR_SEED as SEED
from tests.fixtures.data import emulator_feature as _feature
from tests.fixtures.paths import EXAMPLES, ROOT

WAIT = 5.0  # seconds: bound on any single network wait
REPO = str(ROOT)
EXAMPLE = str(EXAMPLES / "emulator-data.json")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _usage(feature: str = "feature-api-calls", value: float = 1, **more: Any) -> dict:
    """A ReportUsageInput for customer acme."""
    return {"customerId": "acme", "featureId": feature, "value": value, **more}


class ScriptedRandom(Random):
    """`random()` answers from a script, so error_rate tests are deterministic."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


# -- the loader -----------------------------------------------------------------------------------


class DataFileTests(SynchronousTestCase):
    def assert_error(self, data: dict, expected: str) -> None:
        with self.assertRaises(DataError) as caught:
            parse_data(data)
        self.assertEqual(str(caught.exception), expected)

    def with_entitlement(self, entitlement: dict, index: int = 2) -> dict:
        data = copy.deepcopy(SEED)
        data["customers"]["acme"]["entitlements"][index] = entitlement
        return data

    def test_error_names_the_place_of_a_bad_feature_type(self) -> None:
        bad = {"feature": _feature("feature-x", "NUMBR")}
        self.assert_error(
            self.with_entitlement(bad),
            "customers.acme.entitlements[2].feature.featureType: "
            "must be one of BOOLEAN, NUMBER, ENUM",
        )

    def test_error_suggests_the_field_meant(self) -> None:
        bad = {"usgeLimit": 3, "feature": _feature("feature-x")}
        self.assert_error(
            self.with_entitlement(bad),
            "customers.acme.entitlements[2].usgeLimit: unknown field (did you mean usageLimit?)",
        )

    def test_error_names_resources_and_quotes_odd_keys(self) -> None:
        data = copy.deepcopy(SEED)
        data["customers"]["a.b"] = {"resources": {"r 1": {"accessDeniedReason": "Revoked"}}}
        self.assert_error(
            data,
            'customers."a.b".resources."r 1".accessDeniedReason: '
            "must be one of CustomerIsArchived, CustomerNotFound, NoActiveSubscription",
        )

    def test_rejects_bad_values(self) -> None:
        cases: list[tuple[Any, str]] = [
            ({"feature": {"featureType": "BOOLEAN"}}, "feature.refId: required"),
            (
                {"usagePeriodEnd": "yesterday", "feature": _feature("x")},
                "usagePeriodEnd: must be an ISO-8601 timestamp with a timezone, "
                "e.g. 2025-01-31T00:00:00.000Z",
            ),
            ({"usageLimit": "10", "feature": _feature("x")}, "usageLimit: must be a finite number"),
            (
                {"feature": _feature("x", "BOOLEAN", "Incremental")},
                "feature.meterType: only NUMBER features can be metered",
            ),
            (
                {"isGranted": True, "accessDeniedReason": "Revoked", "feature": _feature("x")},
                "isGranted: cannot be true with an accessDeniedReason",
            ),
            ({"__typename": "CreditEntitlement", "currency": {}}, "currency.currencyId: required"),
            (
                {"__typename": "Entitlement"},
                "__typename: must be one of FeatureEntitlement, CreditEntitlement",
            ),
            (
                {"feature": _feature("feature-sso", "BOOLEAN")},
                ": duplicates customers.acme.entitlements[0] (feature:feature-sso)",
            ),
        ]
        for entitlement, problem in cases:
            with self.subTest(problem=problem):
                self.assert_error(
                    self.with_entitlement(entitlement),
                    f"customers.acme.entitlements[2]{'' if problem[0] == ':' else '.'}{problem}",
                )

    def test_normalises_to_the_api_shape(self) -> None:
        data = parse_data(SEED)
        sso, api_calls, seats, regions, tokens = data.customers["acme"].state.entitlements
        self.assertEqual(sso["isGranted"], True)
        self.assertIsNone(sso["currentUsage"])
        self.assertEqual(sso["feature"]["__typename"], "EntitlementFeature")
        self.assertEqual(sso["feature"]["displayName"], "feature-sso")
        self.assertEqual(api_calls["usagePeriodEnd"], "2099-02-01T00:00:00.000Z")
        self.assertEqual(regions["enumValues"], ["eu", "us"])
        self.assertEqual(tokens["__typename"], "CreditEntitlement")
        self.assertEqual(tokens["currency"]["__typename"], "EntitlementCurrency")
        resource = data.customers["acme"].resources["site-1"].entitlements[0]
        self.assertEqual(resource["__typename"], "FeatureEntitlement")
        self.assertEqual(resource["currentUsage"], 0)  # metered: usage defaults to 0
        self.assertEqual(data.customers["archived"].state.entitlements, [])

    def test_file_errors_start_with_the_path(self) -> None:
        path = self.mktemp()
        with open(path, "w") as stream:
            stream.write('{"apiKeys": [}')
        with self.assertRaises(DataError) as caught:
            load_data_file(path)
        self.assertTrue(str(caught.exception).startswith(f"{path}: not valid JSON: "))

    def test_example_file_is_valid(self) -> None:
        data = load_data_file(EXAMPLE)
        self.assertEqual(data.api_keys, ["local-dev-key"])
        self.assertEqual(
            data.customers["customer-archived"].state.access_denied_reason, "CustomerIsArchived"
        )

    def test_operation_name_falls_back_to_the_query_text(self) -> None:
        query = (
            '# GetX\nfragment F on T { a }\nquery GetEntitlementsState($q: Q!) { x(q: "query Y") }'
        )
        self.assertEqual(operation_name({"query": query}), "GetEntitlementsState")
        self.assertEqual(operation_name({"operationName": "A", "query": query}), "A")
        self.assertIsNone(operation_name({"query": "{ sdkConfiguration { sentryDsn } }"}))


# -- the state's rules ----------------------------------------------------------------------------


class StateTests(SynchronousTestCase):
    def test_month_periods_clamp_to_the_month_end(self) -> None:
        anchor = datetime(2025, 1, 31, tzinfo=UTC)
        now = datetime(2025, 3, 5, tzinfo=UTC)
        start, end = current_period(anchor, "MONTH", now)
        self.assertEqual((start.month, start.day, end.month, end.day), (2, 28, 3, 31))
        start, end = current_period(anchor, "DAY", now)
        self.assertEqual((start.day, end.day), (5, 6))

    def test_ended_period_rolls_over_keeping_seeded_usage_then_resets(self) -> None:
        clock = Clock()
        clock.advance(datetime(2025, 3, 20, 12, tzinfo=UTC).timestamp())
        entity = parse_entity_state(
            {
                "entitlements": [
                    {
                        "currentUsage": 7,
                        "resetPeriod": "MONTH",
                        "usagePeriodAnchor": "2025-01-15T00:00:00Z",
                        "usagePeriodStart": "2025-01-15T00:00:00Z",
                        "usagePeriodEnd": "2025-02-15T00:00:00Z",
                        "feature": _feature("calls", meter_type="Incremental"),
                    }
                ]
            }
        )
        state = EmulatorState(parse_data({"apiKeys": ["k"]}), clock=clock)
        state.replace("c", None, entity)
        (item,) = state.entitlements_state("c")["entitlementsV2"]
        self.assertEqual(item["currentUsage"], 7)
        self.assertEqual(item["usagePeriodStart"], "2025-03-15T00:00:00.000Z")
        self.assertEqual(item["usagePeriodEnd"], "2025-04-15T00:00:00.000Z")
        clock.advance(30 * 86400)  # 2025-04-19: the period ended while running
        (item,) = state.entitlements_state("c")["entitlementsV2"]
        self.assertEqual(item["currentUsage"], 0)
        self.assertEqual(item["usagePeriodStart"], "2025-04-15T00:00:00.000Z")
        self.assertEqual(item["usageUpdatedAt"], "2025-04-19T12:00:00.000Z")

    def test_replacements_get_strictly_increasing_stamps(self) -> None:
        state = EmulatorState(parse_data(SEED), clock=Clock())
        entity = parse_entity_state({"entitlements": [{"feature": _feature("x", "BOOLEAN")}]})
        stamps = []
        for _ in range(3):
            state.replace("acme", None, entity)
            stamps.append(
                state.entitlements_state("acme")["entitlementsV2"][0]["entitlementUpdatedAt"]
            )
        self.assertEqual(stamps, sorted(set(stamps)))
        self.assertEqual(stamps[-1], "1970-01-01T00:00:00.005Z")  # 3 stamps went to loading


# -- over HTTP ------------------------------------------------------------------------------------


class EmulatorHTTPTests(TestCase):
    timeout = 15

    def setUp(self) -> Deferred:  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))
        self.random = ScriptedRandom([0.9] * 100)
        d = start_emulator(reactor, SEED, random=self.random)

        def started(emulator: RunningEmulator) -> None:
            self.state, _, self.url = emulator
            self.addCleanup(stop_emulator, emulator)
            self.addCleanup(self.pool.closeCachedConnections)

        return d.addCallback(started)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        key: str | None = KEY,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        headers = Headers({"X-API-KEY": [key]} if key is not None else {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = await self.http.request(
            method, self.url + path, data=data, headers=headers
        ).addTimeout(WAIT, reactor)
        content = await treq.content(response).addTimeout(WAIT, reactor)
        try:
            return response.code, json.loads(content)
        except ValueError:
            return response.code, content

    async def graphql(
        self,
        operation: str | None,
        variables: dict | None = None,
        key: str | None = KEY,
        query: str | None = None,
    ) -> tuple[int, Any]:
        body = {"operationName": operation, "variables": variables or {}, "query": query or ""}
        return await self.request("POST", "/graphql", body, key=key)

    async def state_of(self, customer: str, resource: str | None = None) -> dict:
        suffix = f"?resourceId={resource}" if resource else ""
        status, body = await self.request(
            "GET", f"/v1/c/{customer}/entitlements-state.json{suffix}"
        )
        self.assertEqual(status, 200)
        return body["data"]["entitlementsState"]

    def by_feature(self, state: dict) -> dict[str, dict]:
        return {
            e["feature"]["refId"]: e
            for e in state["entitlementsV2"]
            if e["__typename"] == "FeatureEntitlement"
        }

    # -- Edge --------------------------------------------------------------------------------

    async def test_edge_entitlements_state_has_the_api_shape(self) -> None:
        state = await self.state_of("acme")
        self.assertEqual(state["__typename"], "EntitlementsState")
        self.assertIsNone(state["accessDeniedReason"])
        kinds = [e["__typename"] for e in state["entitlementsV2"]]
        self.assertEqual(kinds, ["FeatureEntitlement"] * 4 + ["CreditEntitlement"])
        calls = self.by_feature(state)["feature-api-calls"]
        self.assertEqual(calls["currentUsage"], 10)
        self.assertEqual(calls["feature"]["meterType"], "Incremental")
        self.assertRegex(calls["entitlementUpdatedAt"], TIMESTAMP)
        self.assertRegex(calls["usageUpdatedAt"], TIMESTAMP)
        self.assertEqual(len(state["entitlements"]), 4)  # V1: features only
        self.assertEqual(state["entitlements"][0]["__typename"], "Entitlement")
        self.assertEqual(state["entitlements"][1]["nextResetDate"], "2099-02-01T00:00:00.000Z")

    async def test_edge_rejects_a_missing_or_wrong_key_with_401(self) -> None:
        for key in (None, "wrong"):
            status, body = await self.request("GET", "/v1/c/acme/entitlements-state.json", key=key)
            self.assertEqual(status, 401)
            self.assertEqual(body["errors"][0]["extensions"]["code"], "Unauthenticated")

    async def test_edge_denials_for_unknown_customer_resource_and_archived(self) -> None:
        cases = [
            ("nobody", None, "CustomerNotFound"),
            ("acme", "site-9", "NoActiveSubscription"),
            ("archived", None, "CustomerIsArchived"),
            ("archived", "site-1", "CustomerIsArchived"),
        ]
        for customer, resource, reason in cases:
            state = await self.state_of(customer, resource)
            self.assertEqual((state["accessDeniedReason"], state["entitlementsV2"]), (reason, []))

    async def test_edge_resource_scope(self) -> None:
        state = await self.state_of("acme", "site-1")
        self.assertEqual(self.by_feature(state)["feature-seats"]["usageLimit"], 3)
        self.assertEqual(state["entitlements"][0]["resourceId"], "site-1")

    async def test_edge_v1_entitlements_and_sdk_configuration(self) -> None:
        status, body = await self.request("GET", "/v1/c/acme/entitlements.json")
        self.assertEqual(status, 200)
        refs = [e["feature"]["refId"] for e in body["data"]["entitlements"]]
        self.assertEqual(
            refs, ["feature-sso", "feature-api-calls", "feature-seats", "feature-regions"]
        )
        status, body = await self.request("GET", "/v1/config/server-sdk-configuration.json")
        self.assertEqual(status, 200)
        self.assertEqual(body["data"]["sdkConfiguration"]["__typename"], "SdkConfiguration")

    # -- GraphQL -----------------------------------------------------------------------------

    async def test_graphql_reads(self) -> None:
        query = {"query": {"customerId": "acme", "resourceId": None}}
        status, body = await self.graphql("GetEntitlementsState", query)
        self.assertEqual(status, 200)
        self.assertEqual(body["data"]["entitlementsState"], await self.state_of("acme"))
        status, body = await self.graphql("GetEntitlements", query)
        self.assertEqual(len(body["data"]["entitlements"]), 4)
        status, body = await self.graphql(
            None, query="query GetSdkConfiguration { sdkConfiguration { sentryDsn } }"
        )
        self.assertEqual(body["data"]["sdkConfiguration"]["showWatermark"], False)

    async def test_graphql_wrong_key_is_unauthenticated_in_a_200(self) -> None:
        status, body = await self.graphql("GetSdkConfiguration", key="wrong")
        self.assertEqual(status, 200)
        self.assertEqual(
            body,
            {
                "errors": [
                    {"message": "Unauthenticated", "extensions": {"code": "Unauthenticated"}}
                ],
                "data": None,
            },
        )

    async def test_graphql_unknown_operation_and_malformed_body(self) -> None:
        status, body = await self.graphql("GetCustomerById")
        self.assertEqual(status, 400)
        self.assertEqual(body["errors"][0]["extensions"]["code"], "GRAPHQL_VALIDATION_FAILED")
        self.assertIn('Unknown operation "GetCustomerById"', body["errors"][0]["message"])
        status, body = await self.request("POST", "/graphql", raw=b'{"operationName": ')
        self.assertEqual(status, 400)
        self.assertEqual(body["errors"][0]["extensions"]["code"], "BAD_REQUEST")

    async def test_graphql_bad_input(self) -> None:
        event = {"customerId": "acme", "eventName": "e", "idempotencyKey": "k"}
        cases = [
            ("GetEntitlementsState", {"query": {}}, "variables.query.customerId"),
            ("ReportUsage", {"input": _usage(value=float("nan"))}, "variables.input.value"),
            (
                "ReportUsage",
                {"input": _usage(updateBehavior="ADD")},
                "variables.input.updateBehavior",
            ),
            (
                "ReportEvent",
                {"input": {"usageEvents": [{**event, "idempotencyKey": None}]}},
                "variables.input.usageEvents[0].idempotencyKey",
            ),
            (
                "ReportEvent",
                {"input": {"usageEvents": [event, {**event, "eventName": ""}]}},
                "variables.input.usageEvents[1].eventName",
            ),
        ]
        for operation, variables, place in cases:
            status, body = await self.graphql(operation, variables)
            self.assertEqual(
                (status, body["errors"][0]["extensions"]["code"]), (200, "BadUserInput")
            )
            self.assertTrue(body["errors"][0]["message"].startswith(place + ":"), body)
        self.assertEqual(self.state.usage_log() + self.state.event_log(), [])

    async def test_report_usage_delta_and_set_show_in_the_next_state(self) -> None:
        status, body = await self.graphql("ReportUsage", {"input": _usage(value=5)})
        result = body["data"]["reportUsage"]
        expected = {
            "__typename": "UsageMeasurementWithCurrentUsage",
            "featureId": "feature-api-calls",
            "customerId": "acme",
            "resourceId": None,
            "currentUsage": 15,
            "usagePeriodStart": "2099-01-01T00:00:00.000Z",
            "usagePeriodEnd": "2099-02-01T00:00:00.000Z",
            "nextResetDate": "2099-02-01T00:00:00.000Z",
            "credit": None,
        }
        self.assertEqual({k: result[k] for k in expected}, expected)
        self.assertRegex(result["timestamp"], TIMESTAMP)
        before = self.by_feature(await self.state_of("acme"))["feature-seats"]
        seats = _usage("feature-seats", 4, updateBehavior="SET")
        await self.graphql("ReportUsage", {"input": seats})
        after = self.by_feature(await self.state_of("acme"))
        self.assertEqual(after["feature-api-calls"]["currentUsage"], 15)
        self.assertEqual(after["feature-seats"]["currentUsage"], 4)
        self.assertGreater(after["feature-seats"]["usageUpdatedAt"], before["usageUpdatedAt"])
        self.assertEqual(
            after["feature-seats"]["entitlementUpdatedAt"], before["entitlementUpdatedAt"]
        )
        self.assertEqual([u["updateBehavior"] for u in self.state.usage_log()], ["DELTA", "SET"])

    async def test_report_usage_bulk_resource_and_idempotency(self) -> None:
        usages = [
            _usage(idempotencyKey="a"),
            _usage(idempotencyKey="a"),
            _usage("feature-seats", 2, resourceId="site-1"),
        ]
        status, body = await self.graphql("ReportUsageBulk", {"input": {"usages": usages}})
        results = body["data"]["reportUsageBulk"]
        self.assertEqual([r["currentUsage"] for r in results], [11, 11, 2])
        self.assertEqual(results[0]["id"], results[1]["id"])
        self.assertEqual(results[2]["resourceId"], "site-1")
        self.assertEqual(len(self.state.usage_log()), 2)

    async def test_report_usage_errors(self) -> None:
        cases = [
            (_usage(customerId="nobody"), "CustomerNotFound"),
            (_usage("feature-seats", resourceId="x"), "CustomerResourceNotFound"),
            (_usage("feature-sso"), "MeteringNotAvailableForFeatureType"),
            (_usage("feature-nope"), "FeatureNotFound"),
        ]
        for usage, code in cases:
            status, body = await self.graphql("ReportUsage", {"input": usage})
            self.assertEqual((status, body["errors"][0]["extensions"]["code"]), (200, code))
        # A failing bulk applies nothing.
        bulk = {"usages": [_usage(), _usage(customerId="nobody")]}
        status, body = await self.graphql("ReportUsageBulk", {"input": bulk})
        self.assertEqual(body["errors"][0]["extensions"]["code"], "CustomerNotFound")
        self.assertEqual(self.state.usage_log(), [])

    async def test_report_event_dedupes_by_idempotency_key(self) -> None:
        events = [
            {
                "customerId": "acme",
                "eventName": "api_call",
                "idempotencyKey": "e1",
                "dimensions": {"route": "/x"},
                "timestamp": "2025-05-01T10:00:00+02:00",
            },
            {"customerId": "acme", "eventName": "api_call", "idempotencyKey": "e1"},
            {"customerId": "other", "eventName": "api_call", "idempotencyKey": "e1"},
        ]
        status, body = await self.graphql("ReportEvent", {"input": {"usageEvents": events}})
        self.assertEqual((status, body), (200, {"data": {"reportEvent": "OK"}}))
        await self.graphql("ReportEvent", {"input": {"usageEvents": events[:1]}})
        status, logged = await self.request("GET", "/_emulator/events")
        self.assertEqual(
            [(e["customerId"], e["idempotencyKey"]) for e in logged],
            [("acme", "e1"), ("other", "e1")],
        )
        self.assertEqual(logged[0]["timestamp"], "2025-05-01T08:00:00.000Z")
        self.assertEqual(logged[0]["dimensions"], {"route": "/x"})

    # -- admin -------------------------------------------------------------------------------

    async def test_admin_put_replaces_state_and_bumps_entitlement_updated_at(self) -> None:
        before = self.by_feature(await self.state_of("acme"))["feature-sso"]
        body = {
            "accessDeniedReason": None,
            "entitlements": [{"feature": _feature("feature-sso", "BOOLEAN")}],
        }
        status, answer = await self.request("PUT", "/_emulator/customers/acme", body, key=None)
        self.assertEqual(status, 200)
        state = await self.state_of("acme")
        self.assertEqual(answer["entitlementsState"], state)
        self.assertEqual(list(self.by_feature(state)), ["feature-sso"])
        self.assertGreater(
            state["entitlementsV2"][0]["entitlementUpdatedAt"], before["entitlementUpdatedAt"]
        )
        # A resource, and a customer that did not exist.
        await self.request("PUT", "/_emulator/customers/newco?resourceId=r1", body, key=None)
        self.assertEqual(len((await self.state_of("newco", "r1"))["entitlementsV2"]), 1)
        self.assertEqual((await self.state_of("newco"))["entitlementsV2"], [])

    async def test_customer_ids_are_percent_decoded_on_every_path(self) -> None:
        body = {"entitlements": [{"feature": _feature("feature-sso", "BOOLEAN")}]}
        encoded = "team%2F%C3%BC%40x.com%3F"  # "team/ü@x.com?"
        status, answer = await self.request("PUT", f"/_emulator/customers/{encoded}", body)
        self.assertEqual(answer["customerId"], "team/ü@x.com?")
        state = await self.state_of(encoded)
        self.assertEqual(state["entitlements"][0]["customerId"], "team/ü@x.com?")

    async def test_admin_put_rejects_invalid_state_with_the_message(self) -> None:
        body = {"entitlements": [{"feature": {"refId": "x", "featureType": "NUMBR"}}]}
        status, answer = await self.request("PUT", "/_emulator/customers/acme", body, key=None)
        self.assertEqual(status, 400)
        self.assertEqual(
            answer["error"],
            "entitlements[0].feature.featureType: must be one of BOOLEAN, NUMBER, ENUM",
        )
        self.assertEqual(len((await self.state_of("acme"))["entitlementsV2"]), 5)

    async def test_requests_are_counted_per_endpoint_and_reset(self) -> None:
        await self.state_of("acme")
        await self.state_of("nobody")
        await self.request("GET", "/v1/c/acme/entitlements.json", key="wrong")
        await self.request("GET", "/v1/config/server-sdk-configuration.json")
        await self.graphql("GetEntitlementsState", {"query": {"customerId": "acme"}})
        await self.graphql(
            None, query="mutation ReportEvent($input: X!) { reportEvent(events: $input) }"
        )
        await self.graphql("Nope")
        await self.request("POST", "/graphql", raw=b"[")
        status, counts = await self.request("GET", "/_emulator/requests", key=None)
        self.assertEqual(
            counts,
            {
                "/v1/c/{customerId}/entitlements-state.json": 2,
                "/v1/c/{customerId}/entitlements.json": 1,
                "/v1/config/server-sdk-configuration.json": 1,
                "GetEntitlementsState": 1,
                "ReportEvent": 1,
                "Nope": 1,
                "/graphql": 1,
            },
        )
        status, counts = await self.request("POST", "/_emulator/requests/reset", key=None)
        self.assertEqual((status, counts), (200, {}))

    # -- faults ------------------------------------------------------------------------------

    async def set_faults(self, **faults: Any) -> dict:
        status, body = await self.request("POST", "/_emulator/faults", faults, key=None)
        self.assertEqual(status, 200, body)
        return body

    async def test_fault_latency_delays_stigg_answers_only(self) -> None:
        await self.set_faults(latency_ms=300)
        started = reactor.seconds()
        await self.request("GET", "/_emulator/faults")
        self.assertLess(reactor.seconds() - started, 0.25)
        started = reactor.seconds()
        await self.state_of("acme")
        self.assertGreaterEqual(reactor.seconds() - started, 0.29)

    async def test_fault_error_status_and_error_rate(self) -> None:
        await self.set_faults(error_status=503)
        status, body = await self.graphql("GetSdkConfiguration")
        self.assertEqual(status, 503)
        self.assertEqual(body["errors"][0]["extensions"]["code"], "EMULATED_FAULT")
        self.random.values[:4] = [0.1, 0.7, 0.3, 0.4]
        await self.set_faults(error_status=0, error_rate=0.5)
        path = "/v1/config/server-sdk-configuration.json"
        statuses = [(await self.request("GET", path))[0] for _ in range(3)]
        self.assertEqual(statuses, [500, 200, 500])
        await self.set_faults(error_status=429)  # error_rate 0.5 still applies, with this status
        self.assertEqual((await self.request("GET", path))[0], 429)
        status, body = await self.request("POST", "/_emulator/faults", {"error_rate": 2}, key=None)
        self.assertEqual((status, body), (400, {"error": "error_rate: must be between 0 and 1"}))

    async def test_fault_malformed_body(self) -> None:
        await self.set_faults(malformed=True)
        status, body = await self.request("GET", "/v1/c/acme/entitlements-state.json")
        self.assertEqual(status, 200)
        self.assertIsInstance(body, bytes)
        self.assertRaises(ValueError, json.loads, body)
        await self.set_faults(malformed=False)
        await self.state_of("acme")

    async def test_fault_down_drops_connections_while_admin_answers(self) -> None:
        faults = await self.set_faults(down=True)
        self.assertEqual(faults["down"], True)
        with self.assertRaises(ResponseNeverReceived):
            await self.request("GET", "/v1/c/acme/entitlements-state.json")
        with self.assertRaises(ResponseNeverReceived):
            await self.graphql("GetSdkConfiguration")
        status, counts = await self.request("GET", "/_emulator/requests", key=None)
        self.assertEqual(status, 200)
        self.assertGreaterEqual(counts["/v1/c/{customerId}/entitlements-state.json"], 1)
        self.assertGreaterEqual(counts["GetSdkConfiguration"], 1)
        await self.set_faults(down=False)
        await self.state_of("acme")


# -- Stigg's own Python API client ----------------------------------------------------------------


class StiggApiClientTests(TestCase):
    """stigg-api-client-v2's pydantic models validate every answer. The client is asyncio/httpx
    based, so it runs in a worker thread with its own event loop while the emulator serves from
    the reactor."""

    timeout = 30

    def setUp(self) -> Deferred:  # type: ignore[override]  # trial waits on what setUp/tearDown return
        def started(emulator: RunningEmulator) -> None:
            self.state, _, self.url = emulator
            self.addCleanup(stop_emulator, emulator)

        return start_emulator(reactor, SEED).addCallback(started)

    def run_client(self, enable_edge: bool) -> Deferred:
        from stigg import Stigg
        from stigg.generated import FetchEntitlementsQuery, ReportUsageInput

        async def scenario() -> dict:
            client = Stigg.create_async_client(
                api_key=KEY,
                api_url=f"{self.url}/graphql",
                enable_edge=enable_edge,
                edge_api_url=self.url,
            )
            async with client:
                query = FetchEntitlementsQuery(customer_id="acme")
                usage = ReportUsageInput(
                    customer_id="acme", feature_id="feature-api-calls", value=3
                )
                reported = await client.report_usage(usage)
                state = await client.get_entitlements_state(query)
                scoped = await client.get_entitlements_state(
                    FetchEntitlementsQuery(customer_id="acme", resource_id="site-1")
                )
                v1 = await client.get_entitlements(query)
                missing = await client.get_entitlements_state(
                    FetchEntitlementsQuery(customer_id="x")
                )
                config = await client.get_sdk_configuration()
                return {
                    "reported": reported,
                    "state": state,
                    "scoped": scoped,
                    "v1": v1,
                    "missing": missing,
                    "config": config,
                }

        def run() -> dict:
            return asyncio.run(asyncio.wait_for(scenario(), 20))

        return threads.deferToThread(run).addTimeout(25, reactor)

    async def check(self, enable_edge: bool) -> None:
        results = await self.run_client(enable_edge)
        self.assertEqual(results["reported"].report_usage.current_usage, 13)
        state = results["state"].entitlements_state
        self.assertIsNone(state.access_denied_reason)
        typenames = [e.typename__ for e in state.entitlements_v_2]
        self.assertEqual(typenames, ["FeatureEntitlement"] * 4 + ["CreditEntitlement"])
        calls = state.entitlements_v_2[1]
        self.assertEqual((calls.feature.ref_id, calls.current_usage), ("feature-api-calls", 13))
        self.assertEqual(state.entitlements_v_2[4].currency.currency_id, "tokens")
        scoped = results["scoped"].entitlements_state.entitlements_v_2
        self.assertEqual([e.usage_limit for e in scoped], [3])
        self.assertEqual(len(results["v1"].entitlements), 4)
        self.assertEqual(
            results["missing"].entitlements_state.access_denied_reason.value, "CustomerNotFound"
        )
        self.assertIsNotNone(results["config"].sdk_configuration)
        counts = self.state.request_counts()
        if enable_edge:
            self.assertEqual(counts["/v1/c/{customerId}/entitlements-state.json"], 3)
            self.assertNotIn("GetEntitlementsState", counts)
        else:
            self.assertEqual(counts["GetEntitlementsState"], 3)
            self.assertEqual(counts["GetEntitlements"], 1)
        self.assertEqual(counts["ReportUsage"], 1)

    async def test_with_edge(self) -> None:
        await self.check(enable_edge=True)

    async def test_without_edge(self) -> None:
        await self.check(enable_edge=False)

    async def test_report_usage_error_surfaces_its_code(self) -> None:
        from stigg import Stigg
        from stigg.generated import GraphQLClientGraphQLMultiError, ReportUsageInput

        async def scenario() -> Any:
            client = Stigg.create_async_client(api_key=KEY, api_url=f"{self.url}/graphql")
            async with client:
                usage = ReportUsageInput(customer_id="nobody", feature_id="f", value=1)
                try:
                    await client.report_usage(usage)
                except GraphQLClientGraphQLMultiError as error:
                    return error.errors[0].extensions
            return None

        extensions = await threads.deferToThread(asyncio.run, scenario()).addTimeout(25, reactor)
        self.assertEqual(extensions, {"code": "CustomerNotFound"})
