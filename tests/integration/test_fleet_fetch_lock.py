"""The fleet's single flight through Redis, with a real redis-server and the emulator: a sidecar
whose Redis read missed just before a peer fetched the same customer, wrote it to Redis and
released the fetch lock, finds the peer's copy under its own lock instead of fetching again."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness
from tests.fixtures.redis import RedisServer

EDGE_FETCH = "/v1/c/{customerId}/entitlements-state.json"


class FleetFetchLockTests(TestCase):
    timeout = 60

    async def sidecar(self, emulator=None) -> OnlineHarness:
        h = await OnlineHarness(self, reactor).start(
            data.SEED, emulator=emulator, REDIS_ENVIRONMENT_PREFIX="lock-test", REDIS_HOST="127.0.0.1",
            REDIS_PORT=str(self.redis.port), REDIS_TIMEOUT_MS="2000", ENTITLEMENTS_TIMEOUT_MS="5000",
        )
        mirror = h.parts.online.mirror

        async def connected():
            return mirror.connected and mirror.subscribed

        await h.wait_until(connected, timeout=10)
        return h

    async def test_a_peer_fetch_finished_between_our_read_and_our_lock_is_not_repeated(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        a = await self.sidecar()
        b = await self.sidecar(emulator=a.emulator)
        request = pb.GetBooleanEntitlementRequest(customer_id="acme", feature_id="sso")
        assert b.parts.online is not None and b.parts.online.mirror is not None
        mirror = b.parts.online.mirror
        acquire = mirror.acquire_fetch_lock
        peer_answers = []

        async def peer_fetches_first(*args, **kwargs):
            # b's Redis read has missed; before b asks for the lock, a misses too and fetches the
            # customer from Stigg, writes it to Redis and releases the lock: the race's timing.
            peer_answers.append(await a.call("GetBooleanEntitlement", request))
            return await acquire(*args, **kwargs)

        mirror.acquire_fetch_lock = lambda *args, **kwargs: ensureDeferred(peer_fetches_first(*args, **kwargs))  # type: ignore[method-assign]
        a.emulator.state.reset_request_counts()
        answer = await b.call("GetBooleanEntitlement", request)
        self.assertEqual([(r.has_access, r.is_fallback) for r in (*peer_answers, answer)], [(True, False)] * 2)
        self.assertEqual(a.emulator.state.request_counts().get(EDGE_FETCH), 1)
