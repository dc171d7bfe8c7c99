"""Poisoned or stale Redis does not outrank a healthy Stigg (issue 20, finding 8).

A whole sidecar in this process with REDIS_ENVIRONMENT_PREFIX against a real redis-server, Stigg
(the emulator) healthy, cold reads of a customer whose Redis keys were tampered with:

- a fetch lock without an expiry is taken over, not waited on;
- an entry whose `#timestamp` is far in the future (a planted denial) is not served, and Stigg's
  answer replaces it in Redis, so a cold peer does not serve it either;
- an entitlements value over the read bound is a miss that never leaves Redis, and a large one
  within it is decoded off the reactor.
"""

from __future__ import annotations

import threading

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.cache.redis import reads
from stigg_sidecar.cache.redis.format import EntryKeys, timestamp_key
from stigg_sidecar.upstream.wire import entry_from_state
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness
from tests.fixtures.redis import RedisServer

PREFIX = "poison"
YEAR_MS = 365 * 86_400_000


class PoisonedRedisTests(TestCase):
    timeout = 90

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp returns
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.h = await OnlineHarness(self, reactor).start(
            {"apiKeys": ["test-key"], "customers": {"victim": data.ACME}},
            REDIS_ENVIRONMENT_PREFIX=PREFIX, REDIS_HOST="127.0.0.1", REDIS_PORT=str(self.redis.port),
            REDIS_TIMEOUT_MS="1000", ENTITLEMENTS_TIMEOUT_MS="3000",
        )
        self.mirror = self.h.parts.online.mirror
        await self.h.wait_until(lambda: _true(self.mirror.connected and self.mirror.subscribed), timeout=10)
        self.keys = EntryKeys(PREFIX, "victim", None)

    async def read_sso(self, timeout: float = 5.0):
        request = pb.GetBooleanEntitlementRequest(customer_id="victim", feature_id="sso")
        return await self.h.call("GetBooleanEntitlement", request, timeout=timeout)

    async def test_a_fetch_lock_without_expiry_is_taken_over(self):
        self.redis.command("SET", self.keys.fetch_lock, "left-behind")  # no PX: never expires
        answer = await self.read_sso(timeout=2.0)  # waiting on the lock would take 3.5 s
        self.assertEqual((answer.has_access, answer.is_fallback), (True, False))
        self.assertNotEqual(self.redis.command("PTTL", self.keys.fetch_lock), -1)  # ours carries an expiry
        # ... and goes once Stigg's answer is in Redis.
        await self.h.wait_until(lambda: _true(self.redis.command("PTTL", self.keys.fetch_lock) == -2), timeout=5)

    async def test_a_future_stamped_denial_is_not_served_and_stiggs_answer_replaces_it(self):
        far = self.h.parts.online.api.stigg_clock.now_ms() + YEAR_MS
        planted = entry_from_state("victim", None, {"entitlementsV2": [], "accessDeniedReason": "CustomerIsArchived"}, far)
        self.assertTrue(await self.mirror.write(planted))
        self.redis.command("SET", timestamp_key(self.keys.entitlements), str(far))  # a year ahead
        answer = await self.read_sso()
        self.assertEqual((answer.has_access, answer.is_fallback), (True, False))
        shared = await self.mirror.read("victim")
        self.assertIsNotNone(shared)
        self.assertIn("sso", shared.features)  # what a cold peer would read now
        self.assertLess(shared.timestamp, far)

    async def test_an_entitlements_value_over_the_bound_is_a_miss(self):
        huge = entry_from_state("victim", None, {"entitlementsV2": [data.feature(f"f{i}") for i in range(20_000)]},
                                self.h.parts.online.api.stigg_clock.now_ms())
        self.assertTrue(await self.mirror.write(huge))
        size = self.redis.command("STRLEN", self.keys.entitlements)
        self.assertGreater(size, 4 * 1024 * 1024)  # MAX_VALUE_BYTES
        errors = self.mirror.errors
        answer = await self.read_sso()  # the huge entry has no sso: Stigg's has
        self.assertEqual((answer.has_access, answer.is_fallback), (True, False))
        self.assertGreater(self.mirror.errors, errors)  # counted as unreadable, logged

    async def test_a_large_value_within_the_bound_is_decoded_off_the_reactor(self):
        large = entry_from_state("victim", None, {"entitlementsV2": [data.feature(f"f{i}") for i in range(2_000)]},
                                 self.h.parts.online.api.stigg_clock.now_ms())
        self.assertTrue(await self.mirror.write(large))
        self.assertGreater(self.redis.command("STRLEN", self.keys.entitlements), reads.OFFLOAD_BYTES)
        threads: list[bool] = []
        decode = reads.decode_entitlements

        def watched(*args):
            threads.append(isThreadPoolThread())
            return decode(*args)

        self.patch(reads, "decode_entitlements", watched)
        shared = await self.mirror.read("victim")
        self.assertEqual(len(shared.features), 2_000)
        self.assertEqual(threads, [True])


def isThreadPoolThread() -> bool:
    return threading.current_thread() is not threading.main_thread()


async def _true(value: bool) -> bool:
    return value
