"""RedisMirror against a real redis-server on loopback: layout, newer wins, locks, peers, failures.

Every wait is bounded; reconnect backoff is capped low so recovery tests stay quick.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Generator
from dataclasses import replace
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.ssl import Certificate
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from stigg_sidecar.cache.redis import RedisMirror
from stigg_sidecar.cache.redis import errors as redis_errors
from stigg_sidecar.entitlements.changes import apply_usage
from stigg_sidecar.entitlements.records import CustomerEntry, Usage
from stigg_sidecar.settings import load_settings
from stigg_sidecar.upstream.wire import entry_from_state
from tests.fixtures.edge import boolean_item, credit_item, metered_item, state
from tests.fixtures.logs import log_events
from tests.fixtures.polling import until
from tests.fixtures.reactor import reactor
from tests.fixtures.redis import RedisServer, free_port

PREFIX = "test-env"
TIMEOUT_MS = 250
METERED = "feature-api-calls"
CREDIT = "cred-tokens"

Steps = Generator[Deferred[Any], Any, None]  # an inlineCallbacks test


def sample_entry(customer: str = "cust-1", resource: str | None = None, timestamp: int | None = None) -> CustomerEntry:
    entry = entry_from_state(customer, resource, state(metered_item(), boolean_item(), credit_item()), 0)
    return entry if timestamp is None else replace(entry, timestamp=timestamp)


def sleep(seconds: float) -> Any:
    return task.deferLater(reactor, seconds, lambda: None)


def at_once(testcase: Any, d: Any) -> Any:
    """`d`, asserted already fired: with Redis known unreachable a call answers without waiting
    (checked this way rather than against a wall clock, which a loaded machine stretches)."""
    testcase.assertTrue(d.called, "answered at once")
    return d


class MirrorTestCase(TestCase):
    """Starts a redis-server per test; `mirror()` makes a started, connected RedisMirror."""

    server_options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.server = RedisServer(**self.server_options).start()
        self.addCleanup(self.server.cleanup)
        self.events = log_events(self)

    def make_mirror(self, **options: Any) -> RedisMirror:
        settings: dict[str, Any] = dict(
            prefix=PREFIX, host="127.0.0.1", port=self.server.port, timeout_ms=TIMEOUT_MS, max_reconnect_delay=0.3
        )
        settings.update(options)
        mirror = RedisMirror(reactor, **settings)
        mirror.startService()
        self.addCleanup(mirror.stopService)
        return mirror

    @inlineCallbacks
    def mirror(self, **options: Any) -> Any:
        mirror = self.make_mirror(**options)
        yield until(lambda: mirror.connected and mirror.subscribed, 5, what="mirror connected", interval=0.02)
        return mirror

    def logged(self, text: str) -> list[str]:
        lines = [formatEvent(e) or "" for e in self.events]
        return [line for line in lines if text in line]

    def all_logged(self) -> str:
        return "\n".join(formatEvent(e) or "" for e in self.events)


class LayoutTests(MirrorTestCase):
    @inlineCallbacks
    def test_write_stores_stigg_key_layout_with_ttl(self) -> Steps:
        mirror = yield self.mirror(ttl_secs=600)
        entry = sample_entry()
        written = yield mirror.write(entry)
        self.assertTrue(written)
        base = f"{PREFIX}:c_cust-1"
        values = [base, f"{base}:metadata", f"{base}:f_{METERED}", f"{base}:credit_{CREDIT}"]
        expected = set(values) | {v + "#timestamp" for v in values}
        self.assertEqual(set(self.server.command("KEYS", f"{PREFIX}:*")), expected)
        for key in expected:
            self.assertTrue(0 < self.server.command("TTL", key) <= 600, key)
        self.assertEqual(self.server.command("GET", base + "#timestamp"), str(entry.timestamp))
        stored = json.loads(self.server.command("GET", base))
        self.assertEqual(stored[METERED]["calculatedEntitlement"]["feature"]["id"], METERED)
        self.assertEqual(json.loads(self.server.command("GET", f"{base}:metadata")), {"accessDeniedReason": None})
        usage = json.loads(self.server.command("GET", f"{base}:f_{METERED}"))
        self.assertEqual(usage["currentUsage"], 42.0)
        usage_stamp = entry.features[METERED].usage.updated_at
        self.assertEqual(self.server.command("GET", f"{base}:f_{METERED}#timestamp"), str(usage_stamp))

    @inlineCallbacks
    def test_negative_ttl_stores_keys_without_expiry(self) -> Steps:
        mirror = yield self.mirror(ttl_secs=-1)
        yield mirror.write(sample_entry())
        self.assertEqual(self.server.command("TTL", f"{PREFIX}:c_cust-1"), -1)
        self.assertEqual(self.server.command("TTL", f"{PREFIX}:c_cust-1:f_{METERED}#timestamp"), -1)

    @inlineCallbacks
    def test_db_selects_the_database(self) -> Steps:
        mirror = yield self.mirror(db=3)
        yield mirror.write(sample_entry())
        self.assertEqual(self.server.command("EXISTS", f"{PREFIX}:c_cust-1", db=3), 1)
        self.assertEqual(self.server.command("EXISTS", f"{PREFIX}:c_cust-1"), 0)


class ReadWriteTests(MirrorTestCase):
    @inlineCallbacks
    def test_read_returns_what_was_written(self) -> Steps:
        mirror = yield self.mirror()
        entry = sample_entry()
        yield mirror.write(entry)
        read = yield mirror.read("cust-1", None)
        self.assertEqual(read, entry)
        self.assertEqual(mirror.errors, 0)

    @inlineCallbacks
    def test_read_misses_without_entitlements_timestamp_or_any_usage_key(self) -> Steps:
        mirror = yield self.mirror()
        self.assertIsNone((yield mirror.read("nobody", None)))
        for gone in ("c_cust-1#timestamp", f"c_cust-1:credit_{CREDIT}", f"c_cust-1:f_{METERED}#timestamp"):
            yield mirror.write(sample_entry())
            self.server.command("DEL", f"{PREFIX}:{gone}")
            self.assertIsNone((yield mirror.read("cust-1", None)), gone)
        self.assertEqual(mirror.errors, 0)

    @inlineCallbacks
    def test_unreadable_entry_is_a_miss_and_an_error(self) -> Steps:
        mirror = yield self.mirror()
        yield mirror.write(sample_entry())
        self.server.command("SET", f"{PREFIX}:c_cust-1", '{"v":99}')
        self.assertIsNone((yield mirror.read("cust-1", None)))
        self.assertIsNone((yield mirror.read("cust-1", None)))
        self.assertEqual(mirror.errors, 2)
        self.assertEqual(len(self.logged("cannot read")), 1)  # one line per key per interval

    @inlineCallbacks
    def test_each_unreadable_key_is_logged_once_per_interval(self) -> Steps:
        self.patch(redis_errors, "FORMAT_LOG_INTERVAL", 0.5)
        mirror = yield self.mirror()
        for customer in ("cust-1", "cust-2", "cust-3"):
            yield mirror.write(sample_entry(customer))
        yield mirror.write(sample_entry("cust-3", resource="site-1"))
        self.server.command("SET", f"{PREFIX}:c_cust-1", "not json")
        self.server.command("SET", f"{PREFIX}:c_cust-2:f_{METERED}", '{"currentUsage":"many"}')
        self.server.command("SET", f"{PREFIX}:c_cust-3#timestamp", "yesterday")  # the resource's customer stamp
        reads = [("cust-1", None)] * 3 + [("cust-2", None)] * 2 + [("cust-3", "site-1")] * 2
        for customer, resource in reads:
            self.assertIsNone((yield mirror.read(customer, resource)))
        self.assertEqual(mirror.errors, len(reads))  # each a miss, counted

        def lines(key: str) -> list[str]:
            return [line for line in self.logged("cannot read") if f"{PREFIX}:{key} " in line]

        self.assertEqual([len(lines(k)) for k in ("c_cust-1", "c_cust-2", "c_cust-3:r_site-1")], [1, 1, 1])
        self.assertIn("currentUsage", lines("c_cust-2")[0])  # the line says what is wrong
        yield sleep(0.6)  # the interval is over: the next read of a bad key logs it again
        self.assertIsNone((yield mirror.read("cust-1", None)))
        self.assertEqual(len(lines("c_cust-1")), 2)
        self.assertEqual(len(self.logged("cannot read")), 4)

    @inlineCallbacks
    def test_the_earlier_v1_envelope_is_a_miss_that_a_write_replaces(self) -> Steps:
        mirror = yield self.mirror()
        entry = sample_entry()
        yield mirror.write(entry)
        self.server.command("SET", f"{PREFIX}:c_cust-1", '{"v":1,"entitlements":{}}')
        self.assertIsNone((yield mirror.read("cust-1", None)))
        self.assertEqual(len(self.logged("earlier format")), 1)
        self.assertTrue((yield mirror.write(entry)))  # the refetch's write, same timestamp
        self.assertEqual((yield mirror.read("cust-1", None)), entry)

    @inlineCallbacks
    def test_resource_read_needs_a_customer_entry_that_is_not_newer(self) -> Steps:
        mirror = yield self.mirror()
        resource = sample_entry(resource="site-9", timestamp=2000)
        yield mirror.write(resource)
        self.assertIsNone((yield mirror.read("cust-1", "site-9")), "customer entry missing")
        yield mirror.write(sample_entry(timestamp=1000))
        self.assertEqual((yield mirror.read("cust-1", "site-9")), resource)
        yield mirror.write(sample_entry(timestamp=3000))
        self.assertIsNone((yield mirror.read("cust-1", "site-9")), "customer entry newer")
        lenient = yield self.mirror(require_customer_entry=False)
        self.assertEqual((yield lenient.read("cust-1", "site-9")), resource)

    @inlineCallbacks
    def test_older_write_is_skipped_equal_and_epoch_zero_win(self) -> Steps:
        mirror = yield self.mirror()
        self.assertTrue((yield mirror.write(sample_entry(timestamp=2000))))
        self.assertFalse((yield mirror.write(sample_entry(timestamp=1000))))
        self.assertEqual(self.server.command("GET", f"{PREFIX}:c_cust-1#timestamp"), "2000")
        self.assertTrue((yield mirror.write(sample_entry(timestamp=2000))))
        self.assertTrue((yield mirror.write(sample_entry(timestamp=0))))
        self.assertEqual(self.server.command("GET", f"{PREFIX}:c_cust-1#timestamp"), "0")

    @inlineCallbacks
    def test_only_if_cached_writes_nothing_for_an_uncached_customer(self) -> Steps:
        mirror = yield self.mirror()
        self.assertFalse((yield mirror.write(sample_entry(), only_if_cached=True)))
        self.assertEqual(self.server.command("KEYS", f"{PREFIX}:*"), [])
        yield mirror.write(sample_entry(timestamp=1))
        self.assertTrue((yield mirror.write(sample_entry(timestamp=2), only_if_cached=True)))

    @inlineCallbacks
    def test_racing_writers_keep_the_newest(self) -> Steps:
        # A generous timeout: 400 calls issued at once must not time out on a loaded test machine.
        first = yield self.mirror(timeout_ms=10_000)
        second = yield self.mirror(timeout_ms=10_000)
        stamps = random.Random(7).sample(range(1, 1_000_000), 400)
        writes = []
        for i, stamp in enumerate(stamps):
            entry = replace(sample_entry(timestamp=stamp), access_denied_reason=f"v{stamp}")
            writes.append((first if i % 2 else second).write(entry))
        results = yield gatherResults(writes)
        self.assertTrue(any(results) and not all(results))
        newest = max(stamps)
        self.assertEqual(self.server.command("GET", f"{PREFIX}:c_cust-1#timestamp"), str(newest))
        self.assertEqual(self.server.command("GET", f"{PREFIX}:c_cust-1:metadata#timestamp"), str(newest))
        read = yield first.read("cust-1", None)
        self.assertEqual((read.timestamp, read.access_denied_reason), (newest, f"v{newest}"))
        self.assertEqual(first.errors + second.errors, 0)


    @inlineCallbacks
    def test_a_bad_call_is_counted_not_raised(self) -> Steps:
        mirror = yield self.mirror()
        entry = sample_entry()
        broken = replace(entry.features[METERED], usage=Usage(current_usage=float("nan")))
        self.assertFalse((yield mirror.write(replace(entry, features={METERED: broken}))))
        self.assertFalse((yield mirror.write_usage("cust-1", None, "SEAT", "x", Usage(1, None, None, 1))))
        self.assertEqual(mirror.errors, 2)
        self.assertEqual(self.server.command("KEYS", "*"), [])


class UsageAndPurgeTests(MirrorTestCase):
    @inlineCallbacks
    def test_write_usage_only_for_a_cached_customer(self) -> Steps:
        mirror = yield self.mirror()
        written = yield mirror.write_usage("cust-1", None, "FEATURE", METERED, Usage(5, None, None, 10))
        self.assertFalse(written)
        self.assertEqual(self.server.command("KEYS", f"{PREFIX}:*"), [])

    @inlineCallbacks
    def test_write_usage_newer_wins_and_the_read_sees_it(self) -> Steps:
        mirror = yield self.mirror()
        entry = sample_entry()
        yield mirror.write(entry)
        stamp = entry.features[METERED].usage.updated_at
        credit_stamp = entry.credits[CREDIT].usage_updated_at
        self.assertTrue((yield mirror.write_usage("cust-1", None, "FEATURE", METERED, Usage(77, 1, 2, stamp + 10))))
        self.assertFalse((yield mirror.write_usage("cust-1", None, "FEATURE", METERED, Usage(55, 1, 2, stamp + 5))))
        self.assertFalse((yield mirror.write_usage("cust-1", None, "CREDIT", CREDIT, Usage(1, None, 4, credit_stamp - 1))))
        self.assertTrue((yield mirror.write_usage("cust-1", None, "CREDIT", CREDIT, Usage(300, 9, 4, credit_stamp + 1))))
        read = yield mirror.read("cust-1", None)
        expected = apply_usage(entry, "FEATURE", METERED, Usage(77, 1, 2, stamp + 10))
        assert expected is not None
        expected = apply_usage(expected, "CREDIT", CREDIT, Usage(300, None, 4, credit_stamp + 1))
        self.assertEqual(read, expected)
        # A later fetch with older usage keeps the newer usage stored (usage is versioned alone).
        yield mirror.write(replace(entry, timestamp=entry.timestamp + 1))
        self.assertEqual((yield mirror.read("cust-1", None)).features[METERED].usage.current_usage, 77)

    @inlineCallbacks
    def test_purge_deletes_entitlements_and_metadata_but_leaves_usage(self) -> Steps:
        mirror = yield self.mirror()
        yield mirror.write(sample_entry())
        self.assertTrue((yield mirror.purge("cust-1", None)))
        base = f"{PREFIX}:c_cust-1"
        self.assertEqual(
            sorted(self.server.command("KEYS", f"{PREFIX}:*")),
            sorted([f"{base}:f_{METERED}", f"{base}:f_{METERED}#timestamp", f"{base}:credit_{CREDIT}",
                    f"{base}:credit_{CREDIT}#timestamp"]),
        )
        self.assertIsNone((yield mirror.read("cust-1", None)))


class CrossInstanceTests(MirrorTestCase):
    @inlineCallbacks
    def test_fetch_lock_single_flight_between_two_mirrors(self) -> Steps:
        first = yield self.mirror()
        second = yield self.mirror()
        token = yield first.acquire_fetch_lock("cust-1", None)
        self.assertIsNotNone(token)
        self.assertIsNone((yield second.acquire_fetch_lock("cust-1", None)))
        self.assertEqual(
            self.server.command("PTTL", f"{PREFIX}:refetchEntityEntitlementsAfterCacheMiss-cust-1") > 4000, True
        )
        waiting = second.wait_for_fetch("cust-1", None, timeout=5)
        yield sleep(0.1)
        self.assertNoResult(waiting)
        entry = sample_entry()
        yield first.write(entry)
        started = time.monotonic()
        self.assertTrue((yield first.release_fetch_lock("cust-1", None, token)))
        self.assertTrue((yield waiting))
        self.assertLess(time.monotonic() - started, 5)  # woken by the release, before its own 5 s timeout
        self.assertEqual((yield second.read("cust-1", None)), entry)
        self.assertIsNotNone((yield second.acquire_fetch_lock("cust-1", None)), "released")

    @inlineCallbacks
    def test_wait_reports_the_holders_error_and_times_out(self) -> Steps:
        first = yield self.mirror()
        second = yield self.mirror()
        token = yield first.acquire_fetch_lock("cust-1", "site-9")
        waiting = second.wait_for_fetch("cust-1", "site-9", timeout=5)
        yield sleep(0.1)
        yield first.release_fetch_lock("cust-1", "site-9", token, error="Stigg is down")
        self.assertFalse((yield waiting))
        yield first.acquire_fetch_lock("cust-1", "site-9")
        started = time.monotonic()
        self.assertFalse((yield second.wait_for_fetch("cust-1", "site-9", timeout=0.3)))
        self.assertLess(time.monotonic() - started, 4)  # its own 0.3 s ended it, long before the held lock (5 s TTL) goes

    @inlineCallbacks
    def test_a_cancelled_wait_unsubscribes(self) -> Steps:
        first = yield self.mirror()
        second = yield self.mirror()
        yield first.acquire_fetch_lock("cust-1", None)
        waiting = second.wait_for_fetch("cust-1", None, timeout=5)
        channel = f"{PREFIX}:refetchEntityEntitlementsAfterCacheMiss:cust-1"
        yield until(lambda: self.server.command("PUBSUB", "NUMSUB", channel)[1] == 1, 5, what="subscribed", interval=0.02)
        waiting.cancel()
        self.failureResultOf(waiting)
        yield until(lambda: self.server.command("PUBSUB", "NUMSUB", channel)[1] == 0, 5, what="unsubscribed", interval=0.02)

    @inlineCallbacks
    def test_wait_after_the_lock_was_released_answers_at_once(self) -> Steps:
        first = yield self.mirror()
        second = yield self.mirror()
        token = yield first.acquire_fetch_lock("cust-1", None)
        yield first.release_fetch_lock("cust-1", None, token)
        self.assertTrue((yield second.wait_for_fetch("cust-1", None, timeout=5)))

    @inlineCallbacks
    def test_release_with_a_stale_token_keeps_the_new_holders_lock(self) -> Steps:
        mirror = yield self.mirror()
        yield mirror.acquire_fetch_lock("cust-1", None, ttl_ms=50)
        yield sleep(0.1)
        token = yield mirror.acquire_fetch_lock("cust-1", None)
        self.assertFalse((yield mirror.release_fetch_lock("cust-1", None, "someone-elses")))
        self.assertEqual(self.server.command("GET", f"{PREFIX}:refetchEntityEntitlementsAfterCacheMiss-cust-1"), token)

    @inlineCallbacks
    def test_peer_changes_reach_the_other_mirror_and_not_self(self) -> Steps:
        heard_first: list[tuple[str, str]] = []
        heard_second: list[tuple[str, str]] = []
        first = yield self.mirror(on_peer_change=lambda key, kind: heard_first.append((key, kind)))
        second = yield self.mirror(on_peer_change=lambda key, kind: heard_second.append((key, kind)))
        entry = sample_entry(resource="site-9")
        yield first.write(entry)
        yield first.write_usage("cust-1", "site-9", "FEATURE", METERED, Usage(1, None, None, 2**42))
        yield first.purge("cust-1", "site-9")
        expected = [("c_cust-1:r_site-9", "entry"), ("c_cust-1:r_site-9", "usage"), ("c_cust-1:r_site-9", "purge")]
        yield until(lambda: len(heard_second) == 3, 5, what="three peer notifications", interval=0.02)
        self.assertEqual(heard_second, expected)
        plain = entry_from_state("cust-2", None, state(boolean_item()), 0)
        yield second.write(plain)
        yield until(lambda: heard_first, 5, what="notification from the second mirror", interval=0.02)
        self.assertFalse((yield first.write(replace(plain, timestamp=plain.timestamp - 1))))  # stale: silent
        yield first.purge("cust-2", None)
        yield until(lambda: len(heard_second) == 4, 5, what="the purge notification", interval=0.02)
        self.assertEqual(heard_first, [("c_cust-2", "entry")])
        self.assertEqual(heard_second[3], ("c_cust-2", "purge"))


    @inlineCallbacks
    def test_health_probes_keep_the_subscriber_in_step(self) -> Steps:
        heard: list[tuple[str, str]] = []
        first = yield self.mirror(health_interval=0.05)
        second = yield self.mirror(health_interval=0.05, on_peer_change=lambda key, kind: heard.append((key, kind)))
        yield sleep(0.3)  # PINGs on the subscribed connection
        yield first.write(sample_entry())
        yield until(lambda: heard, 5, what="a notification after the probes", interval=0.02)
        token = yield first.acquire_fetch_lock("cust-1", None)
        waiting = second.wait_for_fetch("cust-1", None, timeout=5)
        yield sleep(0.2)
        yield first.release_fetch_lock("cust-1", None, token)
        self.assertTrue((yield waiting))
        self.assertTrue(second.connected and second.subscribed)


class AuthTests(MirrorTestCase):
    server_options = {"users": {"sidecar": "acl-s3cret-pw"}, "password": "default-s3cret-pw"}

    @inlineCallbacks
    def test_acl_user_and_password(self) -> Steps:
        mirror = yield self.mirror(username="sidecar", password="acl-s3cret-pw")
        entry = sample_entry()
        self.assertTrue((yield mirror.write(entry)))
        self.assertEqual((yield mirror.read("cust-1", None)), entry)
        self.assertEqual(self.server.command("ACL", "WHOAMI", user="sidecar", password="acl-s3cret-pw"), "sidecar")

    @inlineCallbacks
    def test_password_only_authenticates_the_default_user(self) -> Steps:
        mirror = yield self.mirror(password="default-s3cret-pw")
        self.assertTrue((yield mirror.write(sample_entry())))

    @inlineCallbacks
    def test_wrong_password_logs_one_line_and_reads_miss_promptly(self) -> Steps:
        secret = "wrong-s3cret-pw"
        mirror = self.make_mirror(username="sidecar", password=secret)
        yield until(lambda: self.logged("Redis rejected the credentials"), 5, what="the credentials line", interval=0.02)
        self.assertIsNone((yield at_once(self, mirror.read("cust-1", None))))
        self.assertFalse((yield mirror.write(sample_entry())))
        yield sleep(1)  # several retries with the capped backoff
        self.assertEqual(len(self.logged("Redis rejected the credentials (REDIS_USERNAME/REDIS_PASSWORD)")), 1)
        self.assertFalse(mirror.connected)
        self.assertEqual(mirror.errors, 2)
        self.assertNotIn(secret, self.all_logged())
        self.assertNotIn(secret, repr(mirror))

    @inlineCallbacks
    def test_missing_password_is_reported_as_rejected_credentials(self) -> Steps:
        mirror = self.make_mirror()
        yield until(lambda: self.logged("Redis rejected the credentials"), 5, what="the credentials line", interval=0.02)
        self.assertFalse(mirror.connected)


class FailureTests(MirrorTestCase):
    @inlineCallbacks
    def test_redis_down_at_start_then_up(self) -> Steps:
        self.server.stop()
        mirror = self.make_mirror()
        self.assertIsNone((yield at_once(self, mirror.read("cust-1", None))))
        self.assertFalse((yield at_once(self, mirror.write(sample_entry()))))
        self.assertIsNotNone((yield at_once(self, mirror.acquire_fetch_lock("cust-1", None))), "fetch yourself")
        self.assertFalse((yield at_once(self, mirror.wait_for_fetch("cust-1", None, timeout=5))))
        yield until(lambda: self.logged("is unreachable"), 5, what="the unreachable line", interval=0.02)
        self.server.start()
        yield until(lambda: mirror.connected and mirror.subscribed, 5, what="reconnect", interval=0.02)
        self.assertTrue((yield mirror.write(sample_entry())))
        self.assertEqual(len(self.logged("is unreachable")), 1)
        self.assertEqual(len(self.logged("reachable again")), 1)

    @inlineCallbacks
    def test_kill9_then_restart_recovers_without_a_new_mirror(self) -> Steps:
        heard: list[tuple[str, str]] = []
        mirror = yield self.mirror()
        peer = yield self.mirror(on_peer_change=lambda key, kind: heard.append((key, kind)))
        yield mirror.write(sample_entry())
        self.server.kill9()
        yield until(lambda: not mirror.connected, 5, what="loss noticed", interval=0.02)
        self.assertIsNone((yield at_once(self, mirror.read("cust-1", None))))
        yield sleep(0.5)  # a few failed reconnects
        self.server.start()
        def both_up() -> bool:
            return all((mirror.connected, mirror.subscribed, peer.connected, peer.subscribed))

        yield until(both_up, 5, what="reconnect", interval=0.02)
        entry = sample_entry()
        self.assertTrue((yield mirror.write(entry)))  # the data died with the server: written anew
        self.assertEqual((yield mirror.read("cust-1", None)), entry)
        yield until(lambda: heard, 5, what="peer notification after the restart", interval=0.02)
        self.assertEqual(len(self.logged("is unreachable")), 2)  # one line per mirror
        self.assertEqual(len(self.logged("reachable again")), 2)

    @inlineCallbacks
    def test_a_stalled_redis_bounds_every_call(self) -> Steps:
        mirror = yield self.mirror()
        yield mirror.write(sample_entry())
        self.server.pause()  # SIGSTOP: connected, but never answers
        self.addCleanup(self.server.resume)
        started = time.monotonic()
        results = yield gatherResults([mirror.read("cust-1", None), mirror.write(sample_entry()), mirror.purge("x")])
        elapsed = time.monotonic() - started
        self.assertEqual(results, [None, False, False])
        # They waited for the reply timeout (no upper bound in seconds: a loaded machine can take
        # any time; the log line below says the timeout, not something else, answered them).
        self.assertGreaterEqual(elapsed, TIMEOUT_MS / 1000 * 0.9)
        self.assertEqual(mirror.errors, 3)
        self.assertEqual(len(self.logged("did not answer within 250 ms")), 1)
        self.server.resume()  # SIGCONT
        yield until(lambda: mirror.connected, 5, what="still connected", interval=0.02)
        # The same connection answers again once the resumed server has worked off its backlog;
        # on a loaded machine the first read after SIGCONT can itself outlast the 250 ms.
        entry = None
        for _ in range(100):  # bounded: 10 s
            entry = yield mirror.read("cust-1", None)
            if entry is not None:
                break
            yield sleep(0.1)
        self.assertIsNotNone(entry)


    @inlineCallbacks
    def test_a_wedged_redis_is_dropped_and_reconnected(self) -> Steps:
        mirror = yield self.mirror()
        self.server.pause()  # SIGSTOP past the reply timeout (2 s at least)
        self.addCleanup(self.server.resume)
        self.assertIsNone((yield mirror.read("cust-1", None)))
        yield until(lambda: not mirror.connected, 5, what="the wedged connection dropped", interval=0.02)
        self.assertEqual(len(self.logged("is unreachable")), 1)
        self.server.resume()
        yield until(lambda: mirror.connected and mirror.subscribed, 5, what="reconnect", interval=0.02)
        entry = sample_entry()
        self.assertTrue((yield mirror.write(entry)))
        self.assertEqual((yield mirror.read("cust-1", None)), entry)


class TlsTests(MirrorTestCase):
    server_options = {"tls": True}

    @inlineCallbacks
    def test_tls_connection_verifies_the_server(self) -> Steps:
        trust = Certificate.loadPEM(self.server.certificate_pem)
        mirror = yield self.mirror(tls=True, host="localhost", tls_trust_root=trust)
        entry = sample_entry()
        self.assertTrue((yield mirror.write(entry)))
        self.assertEqual((yield mirror.read("cust-1", None)), entry)

    @inlineCallbacks
    def test_tls_refuses_an_untrusted_server_with_one_clear_line(self) -> Steps:
        mirror = self.make_mirror(tls=True, host="localhost")
        yield until(lambda: self.logged("TLS with Redis at localhost"), 5, what="the TLS line", interval=0.02)
        yield sleep(0.5)  # retries
        self.assertFalse(mirror.connected)
        self.assertEqual(len(self.logged("certificate verify failed")), 1)
        self.assertEqual(self.logged("is unreachable"), [])


class SettingsTests(TestCase):
    def test_from_settings_takes_every_redis_setting(self) -> None:
        settings = load_settings(
            {
                "SERVER_API_KEY": "server-key",
                "REDIS_ENVIRONMENT_PREFIX": "prod",
                "REDIS_HOST": "127.0.0.1",
                "REDIS_PORT": str(free_port()),
                "REDIS_DB": "2",
                "REDIS_USERNAME": "sidecar",
                "REDIS_PASSWORD": "pw-from-settings",
                "REDIS_KEYS_TTL_IN_SECS": "60",
                "REDIS_TIMEOUT_MS": "100",
            }
        )
        mirror = RedisMirror.from_settings(reactor, settings)
        self.assertEqual((mirror.prefix, mirror.host, mirror.db), ("prod", "127.0.0.1", 2))
        self.assertEqual(mirror.port, settings.redis_port)
        self.assertEqual((mirror.username, mirror.ttl_secs, mirror.timeout, mirror.tls), ("sidecar", 60, 0.1, False))
        self.assertNotIn("pw-from-settings", repr(mirror))

    def test_a_prefix_is_required(self) -> None:
        self.assertRaises(ValueError, RedisMirror, reactor, "")
