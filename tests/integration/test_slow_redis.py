"""Redis is an accelerator, never a delay (issue 20, finding 1).

A whole sidecar in this process with REDIS_ENVIRONMENT_PREFIX against a real redis-server that
stops answering (SIGSTOP: its connections stay open), Stigg (the emulator) healthy: cold reads
under a 500 ms client deadline answer Stigg's data. A miss's Redis steps (read, fetch lock, read
again) share one REDIS_TIMEOUT_MS budget instead of taking one each, and the miss does not wait for
Stigg's answer to reach Redis.
"""

from __future__ import annotations

import grpc
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness
from tests.fixtures.redis import RedisServer

CUSTOMERS = {f"cold-{i}": data.ACME for i in range(40)}


class SlowRedisTests(TestCase):
    timeout = 90

    async def test_cold_reads_answer_stiggs_data_within_half_a_second_while_redis_hangs(self):
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        self.addCleanup(redis.resume)
        h = await OnlineHarness(self, reactor).start(
            {"apiKeys": ["test-key"], "customers": CUSTOMERS},
            REDIS_ENVIRONMENT_PREFIX="slow", REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis.port),
            REDIS_TIMEOUT_MS="250", ENTITLEMENTS_TIMEOUT_MS="3000",
        )
        mirror = h.parts.online.mirror
        await h.wait_until(lambda: _true(mirror.connected and mirror.subscribed), timeout=10)
        redis.pause()  # connected, never answering
        answers = {"stigg": 0, "fallback": 0, "deadline": 0}
        for i in range(20):
            request = pb.GetBooleanEntitlementRequest(customer_id=f"cold-{i}", feature_id="sso")
            try:
                answer = await h.call("GetBooleanEntitlement", request, timeout=0.5)
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
                answers["deadline"] += 1
                continue
            answers["fallback" if answer.is_fallback else "stigg"] += 1
        self.assertEqual(answers, {"stigg": 20, "fallback": 0, "deadline": 0})


async def _true(value: bool) -> bool:
    return value
