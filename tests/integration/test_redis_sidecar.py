"""Sidecars with REDIS_ENVIRONMENT_PREFIX against a real redis-server: warm start with Stigg down,
a fleet sharing one Redis, one upstream fetch for a cold fleet, Redis killed mid-load, AUTH."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.logs import log_events
from tests.fixtures.online import OnlineHarness
from tests.fixtures.redis import RedisServer

PREFIX = "test-env"


def metered(customer, feature="api-calls"):
    return pb.GetMeteredEntitlementRequest(customer_id=customer, feature_id=feature)


def redis_settings(server: RedisServer, **extra: str) -> dict[str, Any]:
    settings = {
        "REDIS_ENVIRONMENT_PREFIX": PREFIX,
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(server.port),
        # Within a gRPC call's default 10 s, and far above a loaded machine's fetch from the
        # emulator: a fleet peer waits this long (plus 0.5 s) for the lock holder's fetch, and a
        # fetch that outlasts it shows as a fallback or a second fetch.
        "ENTITLEMENTS_TIMEOUT_MS": "5000",
        # Likewise for a Redis read (250 ms by default): one past it is a miss, and with Stigg
        # down a miss answers a fallback where the test expects Redis's copy.
        "REDIS_TIMEOUT_MS": "2000",
    }
    settings.update(extra)
    return settings


class RedisSidecarTests(TestCase):
    timeout = 90

    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)

    async def sidecar(self, emulator=None, seed=data.SEED, **extra):
        h = await OnlineHarness(self, reactor).start(seed, emulator=emulator, **redis_settings(self.redis, **extra))
        mirror = h.parts.online.mirror

        async def connected():
            return mirror.connected and mirror.subscribed

        await h.wait_until(connected, timeout=10)
        return h

    async def test_warm_start_answers_from_redis_with_stigg_down(self):
        first = await self.sidecar()
        r = await first.call("GetMeteredEntitlement", metered("acme"))
        self.assertEqual((r.is_fallback, r.entitlement.current_usage), (False, 90))
        keys = set(self.redis.command("KEYS", f"{PREFIX}:*"))
        for key in ("c_acme", "c_acme#timestamp", "c_acme:metadata", "c_acme:f_api-calls", "c_acme:f_api-calls#timestamp",
                    "c_acme:credit_tokens"):
            self.assertIn(f"{PREFIX}:{key}", keys)
        ttl = self.redis.command("TTL", f"{PREFIX}:c_acme")
        self.assertTrue(604000 < ttl <= 604800, ttl)
        await first.sidecar.stopService()

        first.emulator.state.faults.update({"down": True})
        second = await self.sidecar(emulator=first.emulator)
        r = await second.call("GetMeteredEntitlement", metered("acme"))
        self.assertEqual((r.is_fallback, r.has_access, r.entitlement.current_usage), (False, True, 90))

    async def test_an_expired_redis_copy_is_not_served(self):
        import time

        soon = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 1.5)) + ".000Z"
        seed = {"apiKeys": ["test-key"], "customers": {"trial": data.customer(data.feature("sso", validUntil=soon))}}
        first = await self.sidecar(seed=seed)
        r = await first.call("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(customer_id="trial", feature_id="sso"))
        self.assertFalse(r.is_fallback)
        await deferLater(reactor, 1.6, lambda: None)
        second = await self.sidecar(emulator=first.emulator)
        await second.admin("POST", "requests/reset")
        await second.call("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(customer_id="trial", feature_id="sso"))
        counts = await second.requests()
        self.assertEqual(counts.get("/v1/c/{customerId}/entitlements-state.json"), 1)  # asked Stigg, not the stale copy

    async def test_fleet_sharing_redis_sees_each_others_usage(self):
        a = await self.sidecar()
        b = await self.sidecar(emulator=a.emulator)
        await a.call("GetMeteredEntitlement", metered("acme"))
        self.assertEqual((await b.call("GetMeteredEntitlement", metered("acme"))).entitlement.current_usage, 90)
        await a.call("ReportUsage", pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=4))

        async def seen():
            return (await b.call("GetMeteredEntitlement", metered("acme"))).entitlement.current_usage == 94

        await b.wait_until(seen, timeout=10)

    async def test_a_cold_fleet_fetches_a_customer_once(self):
        a = await self.sidecar()
        b = await self.sidecar(emulator=a.emulator)
        a.emulator.state.faults.update({"latency_ms": 300})
        await a.admin("POST", "requests/reset")
        calls = [h.call("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(customer_id="acme", feature_id="sso"))
                 for h in (a, b, a, b)]
        answers = await gatherResults(calls)
        self.assertTrue(all(r.has_access and not r.is_fallback for r in answers))
        counts = await a.requests()
        self.assertEqual(counts["/v1/c/{customerId}/entitlements-state.json"], 1)

    async def test_redis_killed_mid_load_then_restarted(self):
        seed = {"apiKeys": ["test-key"], "customers": {f"c{i}": data.ACME for i in range(30)}}
        h = await self.sidecar(seed=seed)
        mirror = h.parts.online.mirror
        failures = 0
        answered = 0

        async def load(customers):
            nonlocal failures, answered
            for c in customers:
                try:
                    r = await h.call("GetMeteredEntitlement", metered(c))
                    answered += 1
                    if r.is_fallback:
                        failures += 1
                except Exception:
                    failures += 1

        await load([f"c{i}" for i in range(10)])
        self.redis.kill9()
        await load([f"c{i}" for i in range(30)])  # cached ones from memory, the rest from the API
        self.assertEqual((failures, answered), (0, 40))
        self.assertGreater(mirror.errors, 0)

        self.redis.start()

        async def reconnected():
            return mirror.connected

        await h.wait_until(reconnected, timeout=20)
        # a fresh customer written through to Redis after the restart
        await h.admin("PUT", "customers/late", data.ACME)
        await load(["late"])
        self.assertEqual(failures, 0)

        async def in_redis():
            return self.redis.command("EXISTS", f"{PREFIX}:c_late") == 1

        await h.wait_until(in_redis, timeout=5)

    async def test_auth_with_username_and_password(self):
        self.redis.cleanup()
        self.redis = RedisServer(users={"sidecar": "s3cret-pass"}).start()
        self.addCleanup(self.redis.cleanup)
        h = await self.sidecar(REDIS_USERNAME="sidecar", REDIS_PASSWORD="s3cret-pass")
        await h.call("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(customer_id="acme", feature_id="sso"))
        self.assertEqual(self.redis.command("EXISTS", f"{PREFIX}:c_acme", user="sidecar", password="s3cret-pass"), 1)

    async def test_wrong_password_logs_once_and_reads_still_answer(self):
        self.redis.cleanup()
        self.redis = RedisServer(password="right-pass").start()
        self.addCleanup(self.redis.cleanup)
        events = log_events(self)
        h = await OnlineHarness(self, reactor).start(
            data.SEED, **redis_settings(self.redis, REDIS_PASSWORD="wrong-pass-value")
        )
        for _ in range(3):
            r = await h.call("GetBooleanEntitlement", pb.GetBooleanEntitlementRequest(customer_id="acme", feature_id="sso"))
            self.assertEqual((r.has_access, r.is_fallback), (True, False))
        await deferLater(reactor, 1.0, lambda: None)
        from twisted.logger import formatEvent

        texts = [formatEvent(e) for e in events]
        rejected = [t for t in texts if "Redis rejected the credentials" in t]
        self.assertEqual(len(rejected), 1, rejected)
        self.assertFalse([t for t in texts if "wrong-pass-value" in t])
