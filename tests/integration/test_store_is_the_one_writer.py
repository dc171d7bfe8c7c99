"""The store, the one writer of cached state, keeps memory, Redis and the pending-usage overlay
consistent: what Stigg says goes to both, spooled (undelivered) usage shows in memory only, a
push for a customer nobody here asked about stays out of memory, a drop leaves both.

Real parts: a redis-server on loopback, RedisMirror, EntitlementCache, PendingUsage.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.cache.redis import RedisMirror
from stigg_sidecar.contracts import UsageChange, UsageReport
from stigg_sidecar.entitlements.records import CustomerEntry, Usage
from stigg_sidecar.online.pending import PendingUsage
from stigg_sidecar.online.store import EntitlementStore
from stigg_sidecar.upstream.wire import entry_from_state
from tests.fixtures.edge import metered_item, state
from tests.fixtures.polling import until
from tests.fixtures.reactor import reactor
from tests.fixtures.redis import RedisServer

METERED = "feature-api-calls"  # metered_item: limit 1000, 42 used


def used(entry: CustomerEntry | None) -> float | None:
    return None if entry is None else entry.features[METERED].usage.current_usage


class StoreWritesTests(TestCase):
    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.server = RedisServer().start()
        self.addCleanup(self.server.cleanup)
        self.mirror = RedisMirror(reactor, prefix="store-test", host="127.0.0.1", port=self.server.port,
                                  timeout_ms=1000, max_reconnect_delay=0.3)
        self.mirror.startService()
        self.addCleanup(self.mirror.stopService)
        await until(lambda: self.mirror.connected, 5, what="mirror connected", interval=0.02)
        self.cache = EntitlementCache(10_000_000)
        self.store = EntitlementStore(self.cache, self.mirror, PendingUsage())

    def entry(self, customer: str = "acme") -> CustomerEntry:
        return entry_from_state(customer, None, state(metered_item()), 0)

    async def test_stiggs_answers_reach_memory_and_redis_and_pending_usage_only_memory(self):
        fetched = await self.store.fetched(self.entry())
        self.assertEqual(used(fetched), 42)
        self.assertEqual(used(await self.mirror.read("acme")), 42)

        shown = self.store.pending_added(1, UsageReport("acme", METERED, 5, update_behavior="DELTA"))
        assert shown is not None
        self.assertEqual(shown.current_usage, 47)
        self.assertEqual(used(self.store.entry("c_acme")), 47)
        self.assertEqual(used(await self.mirror.read("acme")), 42)  # Redis holds Stigg's number only

        # Stigg counts 50 (another sidecar reported 8): memory shows it plus the pending 5, Redis 50.
        stigg = UsageChange("acme", None, "FEATURE", METERED, Usage(50, None, None, 2_000_000_000_000))
        self.store.usage_changed(stigg)
        self.assertEqual(used(self.store.entry("c_acme")), 55)
        self.assertEqual(used(await self.mirror.read("acme")), 50)

        # Delivered: the record stops counting, memory shows Stigg's number again.
        report = UsageReport("acme", METERED, 5, update_behavior="DELTA")
        self.store.pending_settled(1, report)
        self.store.pending_shown(report)
        self.assertEqual(used(self.store.entry("c_acme")), 50)

    async def test_a_push_for_a_customer_not_cached_here_stays_out_of_memory(self):
        self.store.pushed(self.entry("stranger"), keep=False)
        self.assertIsNone(self.store.entry("c_stranger"))
        self.assertIsNone(await self.mirror.read("stranger"))  # nor written where Redis had nothing

        await self.store.fetched(self.entry())
        newer = entry_from_state("acme", None, state(metered_item(usageLimit=7)), 0)
        self.store.pushed(newer, keep=True)
        stored = self.store.entry("c_acme")
        assert stored is not None
        self.assertEqual(stored.features[METERED].usage_limit, 7)

        # The store does not wait for Redis; the mirror's commands share one connection, in order.
        self.assertEqual((await self.mirror.read("acme")).features[METERED].usage_limit, 7)

    async def test_a_drop_leaves_memory_and_redis(self):
        await self.store.fetched(self.entry())
        changes = self.store.changes
        self.store.drop("acme", None)
        self.assertIsNone(self.store.entry("c_acme"))
        self.assertGreater(self.store.changes, changes)  # the snapshot sees it changed

        self.assertIsNone(await self.mirror.read("acme"))

    async def test_a_loaded_entry_is_not_written_back_to_redis(self):
        self.store.put(self.entry())  # a snapshot load or a Redis read
        self.assertEqual(used(self.store.entry("c_acme")), 42)
        self.assertIsNone(await self.mirror.read("acme"))
