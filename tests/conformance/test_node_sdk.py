"""Stigg's official Node server SDK 3.95.0, as a real process, sharing Redis and the emulator
with this sidecar: each reads the entries the other wrote (Stigg's format, docs/redis-format.md)
with Stigg down, and the SDK gets the emulator's v1 pushes.

Every kind of check (boolean, numeric, metered with usage and with a monthly usage period,
unlimited, soft limit, enum, resource-scoped, denied) is asked of both and must be answered the
same, the usage period and reset period included. The counts and the push latency are printed
(the figures the issue asks for), never asserted as times.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from tests.fixtures import data
from tests.fixtures import node as node_peer
from tests.fixtures.clients import http_client
from tests.fixtures.node import NodePeer
from tests.fixtures.online import OnlineHarness
from tests.fixtures.polling import until
from tests.fixtures.redis import RedisServer

PREFIX = "shared-env"
KEY = "test-key"

def _this_month() -> tuple[str, str]:
    """The current calendar month as ISO-8601 bounds: a usage period that contains now, so
    neither the emulator nor the SDK rolls it over during the test."""
    now = datetime.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return start.strftime("%Y-%m-%dT%H:%M:%S.000Z"), end.strftime("%Y-%m-%dT%H:%M:%S.000Z")


_START, _END = _this_month()
# A metered feature with a monthly reset: its period travels in the usage key and featureUsage.
MONTHLY = data.metered(
    "reports", 1000, 300, resetPeriod="MONTH", usagePeriodAnchor="2026-01-01T00:00:00.000Z",
    usagePeriodStart=_START, usagePeriodEnd=_END,
)
ACME = dict(
    data.ACME,
    entitlements=[*data.ACME["entitlements"], MONTHLY],
    resources={"site-1": data.customer(data.metered("seats", 3, 1))},
)
SEED = {"apiKeys": [KEY], "customers": {"acme": ACME}}

# (kind, customer, feature, resource, requested usage or values)
CHECKS: list[tuple[str, str, str, str | None, Any]] = [
    ("boolean", "acme", "sso", None, None),
    ("boolean", "acme", "beta", None, None),  # revoked
    ("boolean", "acme", "nope", None, None),  # not in the plan
    ("numeric", "acme", "projects", None, None),
    ("numeric", "acme", "seats-unlimited", None, None),
    ("metered", "acme", "api-calls", None, 0),
    ("metered", "acme", "api-calls", None, 10),
    ("metered", "acme", "api-calls", None, 11),  # over the limit with usage 90 of 100
    ("metered", "acme", "reports", None, 700),  # monthly reset: the period must match too
    ("metered", "acme", "reports", None, 701),
    ("metered", "acme", "dashboards", None, 1000),  # unlimited
    ("metered", "acme", "exports", None, 1),  # soft limit, already over it
    ("enum", "acme", "regions", None, ["us"]),
    ("enum", "acme", "regions", None, ["apac"]),
    ("metered", "acme", "seats", "site-1", 2),  # resource-scoped
    ("metered", "acme", "seats", "site-1", 3),
]


def reason_name(camel: str | None) -> str:
    """Stigg's AccessDeniedReason (`RequestedUsageExceedingLimit`) as the proto enum's name."""
    if not camel:
        return "ACCESS_DENIED_REASON_UNSPECIFIED"
    return "ACCESS_DENIED_REASON_" + re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()


def from_sdk(kind: str, answer: dict[str, Any]) -> dict[str, Any]:
    out = {
        "hasAccess": answer["hasAccess"],
        "isFallback": answer["isFallback"],
        "reason": reason_name(answer.get("accessDeniedReason")),
    }
    if kind == "numeric":
        out.update(value=answer.get("value") or 0, isUnlimited=bool(answer.get("isUnlimited")))
    elif kind == "metered":
        out.update(
            usageLimit=answer.get("usageLimit") or 0,
            currentUsage=answer.get("currentUsage") or 0,
            isUnlimited=bool(answer.get("isUnlimited")),
            hasSoftLimit=bool(answer.get("hasSoftLimit")),
            resetPeriod=answer.get("resetPeriod"),
            usagePeriodStart=_epoch_ms(answer.get("usagePeriodStart")),
            usagePeriodEnd=_epoch_ms(answer.get("usagePeriodEnd")),
        )
    elif kind == "enum":
        out.update(enumValues=sorted(answer.get("enumValues") or []))
    return out


def _epoch_ms(iso: str | None) -> int | None:
    """A date the SDK answered (a JS Date, ISO-8601 in JSON) as epoch ms; None when absent."""
    if not iso:
        return None
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def _timestamp_ms(message: Any, field: str) -> int | None:
    """A google.protobuf.Timestamp field of the sidecar's answer as epoch ms; None when unset."""
    return getattr(message, field).ToMilliseconds() if message.HasField(field) else None


def from_sidecar(kind: str, r: Any) -> dict[str, Any]:
    out = {
        "hasAccess": r.has_access,
        "isFallback": r.is_fallback,
        "reason": pb.AccessDeniedReason.Name(r.access_denied_reason),
    }
    e = r.entitlement
    if kind == "numeric":
        out.update(value=e.value, isUnlimited=e.is_unlimited)
    elif kind == "metered":
        out.update(
            usageLimit=e.usage_limit, currentUsage=e.current_usage, isUnlimited=e.is_unlimited,
            hasSoftLimit=e.has_soft_limit,
            resetPeriod=pb.EntitlementResetPeriod.Name(e.reset_period).removeprefix("ENTITLEMENT_RESET_PERIOD_")
            if e.reset_period else None,
            usagePeriodStart=_timestamp_ms(e, "usage_period_start"),
            usagePeriodEnd=_timestamp_ms(e, "usage_period_end"),
        )
    elif kind == "enum":
        out.update(enumValues=sorted(e.enum_values))
    return out


async def ask_sidecar(h: OnlineHarness, check: tuple) -> dict[str, Any]:
    kind, customer, feature, resource, extra = check
    common = {"customer_id": customer, "feature_id": feature, "resource_id": resource or ""}
    if kind == "boolean":
        r = await h.call("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(**common))
    elif kind == "numeric":
        r = await h.call("GetNumericEntitlement", pb.GetNumericEntitlementRequest(**common))
    elif kind == "metered":
        metered = pb.MeteredEntitlementOptions(requested_usage=extra)
        r = await h.call("GetMeteredEntitlement", pb.GetMeteredEntitlementRequest(**common, options=metered))
    else:
        enum = pb.EnumEntitlementOptions(requested_values=extra)
        r = await h.call("GetEnumEntitlement", pb.GetEnumEntitlementRequest(**common, options=enum))
    return from_sidecar(kind, r)


async def ask_sdk(peer: NodePeer, check: tuple) -> dict[str, Any]:
    kind, customer, feature, resource, extra = check
    fields: dict[str, Any] = {"kind": kind, "customerId": customer, "featureId": feature, "resourceId": resource}
    if kind == "metered":
        fields["requestedUsage"] = extra
    elif kind == "enum":
        fields["requestedValues"] = extra
    return from_sdk(kind, await peer.request("check", **fields))


class NodeSdkTests(TestCase):
    timeout = 120

    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)

    async def peer(self, emulator_url: str, redis: bool = True, realtime: bool = False) -> NodePeer:
        peer = await NodePeer(reactor).start()
        self.addCleanup(peer.stop)
        options: dict[str, Any] = {"apiKey": KEY, "baseUri": emulator_url, "realtime": realtime}
        if redis:
            options["redis"] = {"host": "127.0.0.1", "port": self.redis.port, "environmentPrefix": PREFIX}
        await peer.request("init", **options)
        return peer

    async def sidecar(self, emulator=None) -> OnlineHarness:
        h = await OnlineHarness(self, reactor).start(
            SEED, emulator=emulator, REDIS_ENVIRONMENT_PREFIX=PREFIX, REDIS_HOST="127.0.0.1",
            REDIS_PORT=str(self.redis.port),
            # Far above a loaded machine's fetch from the emulator: a fetch past its budget would
            # answer a fallback, and every answer here is compared as a real one.
            ENTITLEMENTS_TIMEOUT_MS="5000",
            REDIS_TIMEOUT_MS="2000",  # a Redis read past it misses, and with Stigg down answers a fallback
        )
        mirror = h.parts.online.mirror

        async def connected():
            return mirror.connected

        await h.wait_until(connected, timeout=10)
        return h

    async def test_the_sdk_answers_from_the_sidecars_entries_as_the_sidecar_does(self):
        h = await self.sidecar()
        expected = [await ask_sidecar(h, check) for check in CHECKS]
        self.assertFalse([a for a in expected if a["isFallback"]])
        monthly = expected[CHECKS.index(("metered", "acme", "reports", None, 700))]
        self.assertEqual(  # the period is compared, not two absent values
            (monthly["resetPeriod"], monthly["usagePeriodStart"] is None, monthly["usagePeriodEnd"] is None),
            ("MONTH", False, False),
        )
        await h.faults(down=True)  # Stigg is gone: the SDK has only what the sidecar wrote

        peer = await self.peer(h.emulator.url)
        answers = [await ask_sdk(peer, check) for check in CHECKS]
        mismatches = [(c, e, a) for c, e, a in zip(CHECKS, expected, answers, strict=True) if e != a]
        self.assertEqual(mismatches, [], peer.stderr_tail())
        print(f"\nsidecar -> Node SDK 3.95.0: {len(CHECKS) - len(mismatches)} of {len(CHECKS)} answers match")
        self.assertNotIn("TypeError", peer.stderr.decode(errors="replace"))

    async def test_a_fresh_sidecar_answers_from_the_sdks_entries_with_stigg_down(self):
        emulator = await start_emulator(reactor, SEED)
        self.addCleanup(stop_emulator, emulator)
        peer = await self.peer(emulator.url)
        by_sdk = [await ask_sdk(peer, check) for check in CHECKS]
        self.assertFalse([a for a in by_sdk if a["isFallback"]])
        self.assertEqual(self.redis.command("EXISTS", f"{PREFIX}:c_acme", f"{PREFIX}:c_acme:r_site-1"), 2)
        emulator.state.faults.update({"down": True})

        h = await self.sidecar(emulator=emulator)
        answers = [await ask_sidecar(h, check) for check in CHECKS]
        fallbacks = [c for c, a in zip(CHECKS, answers, strict=True) if a["isFallback"]]
        self.assertEqual(fallbacks, [])
        mismatches = [(c, s, a) for c, s, a in zip(CHECKS, by_sdk, answers, strict=True) if s != a]
        self.assertEqual(mismatches, [])
        assert h.parts.online is not None and h.parts.online.mirror is not None
        self.assertEqual(h.parts.online.mirror.errors, 0)  # every entry read, none unreadable
        print(f"\nNode SDK 3.95.0 -> sidecar: {len(CHECKS) - len(mismatches)} of {len(CHECKS)} answers match, "
              f"{len(fallbacks)} fallbacks")

    async def test_the_sdk_gets_an_admin_change_pushed_without_refetching(self):
        emulator = await start_emulator(reactor, SEED)
        self.addCleanup(stop_emulator, emulator)
        peer = await self.peer(emulator.url, redis=False, realtime=True)
        await peer.request("listen", event="entitlementsUpdated")
        check = ("numeric", "acme", "projects", None, None)
        self.assertEqual((await ask_sdk(peer, check))["value"], 10)
        h = _Admin(self, emulator)
        await h.wait_for_subscribers("entitlementsUpdated", "usageUpdated", "creditBalanceUpdated")
        self.assertTrue(fetches_of(emulator))  # the first read fetched: this is how a fetch shows
        emulator.state.reset_request_counts()

        latencies = []
        for limit in (20, 30, 40):
            changed = dict(ACME, entitlements=[
                e if e.get("feature", {}).get("refId") != "projects" else dict(e, usageLimit=limit)
                for e in ACME["entitlements"]
            ])
            before = len(peer.events)
            sent_at = time.time() * 1000
            status, _ = await h.put("customers/acme", {k: v for k, v in changed.items() if k != "resources"})
            self.assertEqual(status, 200)
            await h.wait(lambda n=before: len(peer.events) > n)
            latencies.append(peer.events[before]["at"] - sent_at)
            self.assertEqual((await ask_sdk(peer, check))["value"], limit)
        self.assertEqual(fetches_of(emulator), {})  # the new limits came by push: no refetch
        print(f"\npush to Node SDK 3.95.0 (admin PUT -> SDK's entitlementsUpdated event): "
              f"{', '.join(f'{ms:.1f}' for ms in latencies)} ms")


class NodePeerTests(TestCase):
    timeout = 60

    async def test_a_peer_that_is_not_ready_in_time_is_stopped(self):
        self.patch(node_peer, "WAIT", 0.0)  # no Node process is ready that fast
        peer = NodePeer(reactor)
        with self.assertRaises(defer.TimeoutError):
            await peer.start()
        assert peer.transport is not None  # spawned, then exited
        self.assertIsNone(peer.transport.pid)  # exited and reaped: no orphan node


def fetches_of(emulator: Any) -> dict[str, int]:
    """The emulator's entitlements requests (Edge or GraphQL) since its counters were reset."""
    return {k: v for k, v in emulator.state.request_counts().items() if "entitlements" in k.lower()}


class _Admin:
    """The emulator's admin API over HTTP, and bounded waits, for a test without a sidecar."""

    def __init__(self, testcase: TestCase, emulator: Any) -> None:
        self.emulator = emulator
        self.http = http_client(testcase, reactor)

    async def put(self, path: str, body: Any) -> tuple[int, Any]:
        response = await self.http.request(
            "PUT", f"{self.emulator.url}/_emulator/{path}", data=json.dumps(body).encode()
        )
        return response.code, json.loads(await response.text())

    async def wait(self, predicate, timeout: float = 10.0) -> None:
        await until(predicate, timeout, interval=0.01)

    async def wait_for_subscribers(self, *fields: str) -> None:
        async def subscribed() -> bool:
            response = await self.http.get(f"{self.emulator.url}/_emulator/sockets")
            return json.loads(await response.text())["subscriptions"] >= len(fields)

        await until(subscribed, 10, "the SDK subscribed")
