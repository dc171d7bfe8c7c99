"""Redis Sentinel with real processes: a master, its replica and a Sentinel on 127.0.0.1.

The sidecar finds the master through REDIS_SENTINELS; the master is killed; the Sentinel
promotes the replica; the sidecar follows by itself and writes resume, while gRPC reads keep
answering (memory, then Stigg) without one failure. The failover time is printed, not asserted.
"""

from __future__ import annotations

import time
from dataclasses import replace

from twisted.internet.task import deferLater
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.cache.redis import RedisMirror
from stigg_sidecar.settings import SettingsError, load_settings
from stigg_sidecar.upstream.wire import entry_from_state
from tests.fixtures import data
from tests.fixtures import sentinel as redis_sentinel
from tests.fixtures.edge import boolean_item, metered_item, state
from tests.fixtures.logs import log_events
from tests.fixtures.online import OnlineHarness
from tests.fixtures.polling import until
from tests.fixtures.reactor import reactor
from tests.fixtures.sentinel import MASTER_NAME, SentinelGroup

PREFIX = "sentinel-env"


class SentinelSettingsTests(SynchronousTestCase):
    def test_sentinels_are_host_port_pairs(self) -> None:
        settings = load_settings({
            "SERVER_API_KEY": "k",
            "REDIS_SENTINELS": "10.0.0.1:26379, sentinel-b:26380,[::1]:26381",
            "REDIS_SENTINEL_MASTER": "cache",
        })
        self.assertEqual(
            settings.redis_sentinels, (("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381))
        )
        self.assertEqual(settings.redis_sentinel_master, "cache")
        self.assertEqual(load_settings({"SERVER_API_KEY": "k"}).redis_sentinels, ())

    def test_sentinel_credentials_are_settings_and_the_password_a_secret(self) -> None:
        settings = load_settings({
            "SERVER_API_KEY": "k",
            "REDIS_SENTINELS": "127.0.0.1:26379",
            "REDIS_SENTINEL_USERNAME": "watcher",
            "REDIS_SENTINEL_PASSWORD": "sentinel-s3cret",
        })
        self.assertEqual((settings.redis_sentinel_username, settings.redis_sentinel_password),
                         ("watcher", "sentinel-s3cret"))
        self.assertIn("sentinel-s3cret", settings.secrets())
        mirror = RedisMirror.from_settings(reactor, replace(settings, redis_environment_prefix=PREFIX))
        self.assertEqual(mirror.sentinel_username, "watcher")
        self.assertNotIn("sentinel-s3cret", repr(mirror))

    def test_a_bad_sentinel_address_is_refused_by_name(self) -> None:
        for text in ("sentinel-a", "host:port", "host:0", ":26379"):
            with self.assertRaises(SettingsError) as caught:
                load_settings({"SERVER_API_KEY": "k", "REDIS_SENTINELS": text})
            self.assertIn("REDIS_SENTINELS", str(caught.exception))


class SentinelGroupTests(SynchronousTestCase):
    def test_a_group_that_fails_to_start_leaves_no_process(self) -> None:
        self.patch(redis_sentinel, "find_redis_sentinel", lambda: "/bin/false")  # exits at once
        group = SentinelGroup()
        with self.assertRaises(RuntimeError):
            group.start()
        assert group.replica is not None
        self.assertEqual([group.master.process, group.replica.process], [None, None])
        self.assertFalse(group.master.dir.exists() or group.replica.dir.exists())


class SentinelFailoverTests(TestCase):
    timeout = 120

    def setUp(self):
        self.group = SentinelGroup().start()
        self.addCleanup(self.group.cleanup)

    async def test_failover_is_followed_with_no_failed_read(self):
        group = self.group
        seed = {"apiKeys": ["test-key"], "customers": {f"c{i}": data.ACME for i in range(40)}}
        h = await OnlineHarness(self, reactor).start(
            seed,
            REDIS_ENVIRONMENT_PREFIX=PREFIX,
            REDIS_SENTINELS=f"127.0.0.1:{group.sentinel.port}",
            REDIS_SENTINEL_MASTER=MASTER_NAME,
            REDIS_HOST="127.0.0.1",
            REDIS_PORT="1",  # ignored with Sentinels: nothing listens there
        )
        mirror = h.parts.online.mirror

        async def connected():
            return mirror.connected and mirror.subscribed

        await h.wait_until(connected, timeout=10)
        self.assertEqual(mirror.address, f"127.0.0.1:{group.master.port}")

        failed, answered = [], 0

        async def read(customer):
            nonlocal answered
            request = pb.GetMeteredEntitlementRequest(customer_id=customer, feature_id="api-calls")
            try:
                r = await h.call("GetMeteredEntitlement", request)
            except Exception as e:
                failed.append(f"{customer}: {e!r}")
                return
            answered += 1
            if r.is_fallback or r.entitlement.current_usage != 90:
                failed.append(f"{customer}: fallback={r.is_fallback} usage={r.entitlement.current_usage}")

        for i in range(10):  # cached in memory and Redis before the failover
            await read(f"c{i}")

        def in_master(server, customer):
            return server.command("EXISTS", f"{PREFIX}:c_{customer}") == 1

        async def c9_in_master():
            return in_master(group.master, "c9")

        await h.wait_until(c9_in_master, timeout=5)

        killed_at = time.monotonic()
        group.master.kill9()
        promoted_at = written_at = None
        i = 10
        deadline = killed_at + 30
        while time.monotonic() < deadline:
            await read(f"c{i % 40}")  # old ones from memory, new ones through Redis or from Stigg
            i += 1
            # Paced, not flat out: a steady load, leaving the CPU to the Sentinel and other tests.
            await deferLater(reactor, 0.002, lambda: None)
            if promoted_at is None and group.sentinel.master_address() == ("127.0.0.1", group.replica.port):
                promoted_at = time.monotonic()
            if promoted_at is not None and mirror.connected and mirror.address.endswith(f":{group.replica.port}"):
                if written_at is None:
                    await h.admin("PUT", f"customers/late{i}", data.ACME)
                    await read(f"late{i}")
                    if await _eventually(h, lambda n=i: in_master(group.replica, f"late{n}")):
                        written_at = time.monotonic()
                elif i >= 80:
                    break
        self.assertIsNotNone(promoted_at, "the Sentinel did not promote the replica: " + group.sentinel.log_tail())
        self.assertIsNotNone(written_at, "the sidecar did not write to the new master")
        assert promoted_at is not None and written_at is not None
        self.assertEqual(failed, [])
        self.assertGreaterEqual(answered, 80)  # reads all through the failover
        self.assertEqual(group.replica.command("ROLE")[0], "master")
        print(
            f"\nSentinel failover: replica promoted {promoted_at - killed_at:.2f} s after the master was "
            f"killed; sidecar writing to it {written_at - killed_at:.2f} s after; "
            f"{answered} reads meanwhile, {len(failed)} failed"
        )

    async def test_a_demoted_master_is_left_for_the_promoted_one(self):
        # A manual failover keeps the old master running, as a replica: the mirror must not stay
        # on it (Sentinel kills its clients; a write answered READONLY also makes it reconnect).
        group = self.group
        mirror = RedisMirror(
            reactor, PREFIX, sentinels=[("127.0.0.1", group.sentinel.port)], sentinel_master=MASTER_NAME,
            timeout_ms=500,
        )
        mirror.startService()
        self.addCleanup(mirror.stopService)
        entry = entry_from_state("cust-1", None, state(metered_item(), boolean_item()), 0)
        await until(lambda: mirror.connected and mirror.subscribed, 15)
        self.assertTrue(await mirror.write(entry))
        group.sentinel.failover()
        await until(lambda: group.sentinel.master_address() == ("127.0.0.1", group.replica.port), 15)

        stamp = entry.timestamp

        async def writes_to_the_new_master() -> bool:
            nonlocal stamp
            stamp += 1
            await mirror.write(replace(entry, timestamp=stamp))
            return group.replica.command("GET", f"{PREFIX}:c_cust-1#timestamp") == str(stamp)

        await until(writes_to_the_new_master, 15)
        self.assertEqual(mirror.address, f"127.0.0.1:{group.replica.port}")
        self.assertEqual(await mirror.read("cust-1"), replace(entry, timestamp=stamp))


SENTINEL_SECRET = "sentinel-s3cret-pw"


class SentinelCredentialsTests(TestCase):
    """Sentinels with their own `requirepass`: the mirror authenticates to ask them, and a
    wrong or missing password is one clear line that never shows a password."""

    timeout = 60

    def setUp(self):
        self.group = SentinelGroup(sentinel_password=SENTINEL_SECRET).start()
        self.addCleanup(self.group.cleanup)
        self.events = log_events(self)

    def mirror(self, **options) -> RedisMirror:
        mirror = RedisMirror(
            reactor, PREFIX, sentinels=[("127.0.0.1", self.group.sentinel.port)], sentinel_master=MASTER_NAME,
            timeout_ms=500, **options,
        )
        mirror.startService()
        self.addCleanup(mirror.stopService)
        return mirror

    def logged(self) -> list[str]:
        return [formatEvent(e) or "" for e in self.events]

    async def test_the_sentinel_password_finds_the_master(self):
        mirror = self.mirror(sentinel_password=SENTINEL_SECRET)
        await until(lambda: mirror.connected, 15)
        self.assertEqual(mirror.address, f"127.0.0.1:{self.group.master.port}")
        entry = entry_from_state("cust-1", None, state(boolean_item()), 0)
        self.assertTrue(await mirror.write(entry))
        self.assertNotIn(SENTINEL_SECRET, "\n".join(self.logged()))

    async def test_a_wrong_or_missing_sentinel_password_is_one_line_without_it(self):
        wrong = "wrong-sentinel-pw"
        mirrors = [self.mirror(sentinel_password=wrong), self.mirror()]

        def rejected() -> list[str]:
            return [line for line in self.logged() if "Sentinel" in line and "rejected the credentials" in line]

        await until(lambda: len(rejected()) >= 2, 15)
        await deferLater(reactor, 1.5, lambda: None)  # several retries with backoff: no more lines
        self.assertEqual(len(rejected()), 2)
        self.assertIn(f"127.0.0.1:{self.group.sentinel.port}", rejected()[0])
        self.assertEqual([m.connected for m in mirrors], [False, False])
        text = "\n".join(self.logged())
        self.assertNotIn(wrong, text)
        self.assertNotIn(SENTINEL_SECRET, text)


async def _eventually(h, predicate, timeout: float = 3.0) -> bool:
    try:
        async def check():
            return predicate()

        await h.wait_until(check, timeout=timeout)
    except AssertionError:
        return False
    return True
