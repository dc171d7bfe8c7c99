"""Refresher and Poller scheduling on a deterministic Clock: most recently read first, bounded
concurrency and rate, polling only while active."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.entitlements.records import CustomerEntry
from stigg_sidecar.online.refresh import Poller, Refresher
from stigg_sidecar.online.store import EntitlementStore


class RecordingBackend:
    """The two things the refresher uses: the store over a real cache, and a fetch() whose
    Deferreds the test fires by hand."""

    def __init__(self, customers: int) -> None:
        self.cache = EntitlementCache(max_bytes=10**9)
        for i in range(customers):
            self.cache.put(CustomerEntry(f"c{i}", timestamp=1))
        self.store = EntitlementStore(self.cache)
        self.pending: list[tuple[str, Deferred]] = []

    def fetch(self, customer_id, resource_id, mode="miss"):
        assert mode == "refresh"
        d: Deferred[None] = Deferred()
        self.pending.append((customer_id, d))
        return d

    def finish_all(self) -> list[str]:
        done, self.pending = self.pending, []
        for _, d in done:
            d.callback(None)
        return [c for c, _ in done]


class RefresherTests(SynchronousTestCase):
    def test_the_customers_whose_refetch_failed_are_retried_alone(self):
        clock = Clock()
        backend = RecordingBackend(6)
        refresher = Refresher(clock, backend.store, backend.fetch, concurrency=6)
        done = refresher.refresh()
        for customer, d in backend.pending:
            if customer in ("c1", "c4"):
                d.errback(RuntimeError("Stigg is down"))
            else:
                d.callback(None)
        backend.pending = []
        clock.advance(1)
        self.assertTrue(done.called)
        retried = refresher.retry_failed()
        self.assertEqual(sorted(c for c, _ in backend.pending), ["c1", "c4"])
        backend.finish_all()
        clock.advance(1)
        self.assertTrue(retried.called)
        refresher.retry_failed()
        self.assertEqual(backend.pending, [])  # nothing failed any more: no pass

    def test_a_revalidation_cuts_the_running_pass_short_and_starts_its_own(self):
        clock = Clock()
        backend = RecordingBackend(10)
        refresher = Refresher(clock, backend.store, backend.fetch, concurrency=2)
        outage_pass = refresher.refresh()
        first = [c for c, _ in backend.pending]
        revalidated = refresher.revalidate()
        self.assertIsNot(revalidated, outage_pass)
        self.assertIs(refresher.revalidate(), revalidated)  # asked twice: one pass
        in_flight, backend.pending = backend.pending, []
        for _, d in in_flight:
            d.errback(RuntimeError("Stigg was down"))  # the fetches in flight end the old pass
        self.assertTrue(outage_pass.called)
        fetched: list[str] = []
        for _ in range(100):
            fetched += backend.finish_all()
            clock.advance(1)
            if revalidated.called:
                break
        self.assertTrue(revalidated.called)
        self.assertEqual(sorted(fetched), sorted(f"c{i}" for i in range(10)))  # all, those failed included
        self.assertEqual(sorted(first), sorted(fetched[:2]))  # most recent first again

    def test_a_refresh_of_an_empty_cache_ends_and_the_next_one_runs(self):
        """A refresh with nothing to fetch finishes at once; it used to stay "running" for good,
        so every later poll joined it and none ever fetched again."""
        clock = Clock()
        backend = RecordingBackend(0)
        refresher = Refresher(clock, backend.store, backend.fetch)
        self.assertTrue(refresher.refresh().called)
        self.assertFalse(refresher.busy)
        backend.cache.put(CustomerEntry("late", timestamp=1))
        refresher.refresh()
        self.assertEqual(backend.finish_all(), ["late"])

    def test_every_customer_cached_throughout_is_refreshed_once_while_the_cache_changes(self):
        from collections import Counter

        from stigg_sidecar.cache import memory

        clock = Clock()
        backend = RecordingBackend(memory._HOT_KEYS + 3 * memory._WALK_SLICE)
        cache = backend.cache
        throughout = {key[2:] for key in cache._order}
        refresher = Refresher(clock, backend.store, backend.fetch, concurrency=4, rate=1000.0)
        finished = refresher.refresh()
        fetched: list[str] = []
        added = 0
        for turn in range(10_000):
            if finished.called:
                break
            fetched += backend.finish_all()
            # Between turns customers come and go, some of them not refreshed yet.
            cache.put(CustomerEntry(f"new{added}", timestamp=1))
            added += 1
            gone = cache._order[(turn * 7919) % len(cache._order)]
            cache.purge(gone)
            throughout.discard(gone[2:])
            clock.advance(0.004)
        self.assertIsNone(self.successResultOf(finished))
        counts = Counter(fetched)
        self.assertEqual([c for c, n in counts.items() if n > 1], [])
        self.assertLessEqual(throughout, set(counts))
        self.assertGreater(len(throughout), memory._HOT_KEYS + memory._WALK_SLICE)  # it went through slices

    def test_most_recent_first_with_bounded_concurrency_and_rate(self):
        clock = Clock()
        backend = RecordingBackend(6)
        for i in (4, 1):  # c1 read last, so it goes first
            backend.cache.get(f"c_c{i}")
        refresher = Refresher(clock, backend.store, backend.fetch, concurrency=2, rate=4.0)
        finished = refresher.refresh()
        self.assertEqual([c for c, _ in backend.pending], ["c1", "c4"])
        self.assertEqual(backend.finish_all(), ["c1", "c4"])
        self.assertEqual(backend.pending, [])  # each worker pauses concurrency/rate = 0.5 s
        clock.advance(0.49)
        self.assertEqual(backend.pending, [])
        clock.advance(0.01)
        self.assertEqual(len(backend.pending), 2)
        self.assertIs(refresher.refresh(), finished)  # joined, not repeated
        for _ in range(3):
            backend.finish_all()
            clock.advance(0.5)
        self.assertIsNone(self.successResultOf(finished))
        self.assertEqual(refresher.refreshed, 6)
        self.assertFalse(refresher.busy)

    def test_failures_are_counted_and_do_not_stop_the_round(self):
        clock = Clock()
        backend = RecordingBackend(3)
        refresher = Refresher(clock, backend.store, backend.fetch, concurrency=1, rate=1000.0)
        finished = refresher.refresh()
        for _ in range(3):
            (_, d), = backend.pending
            backend.pending = []
            d.errback(RuntimeError("upstream down"))
            clock.advance(0.01)
        self.assertTrue(finished.called)
        self.assertEqual((refresher.refreshed, refresher.failed), (0, 3))

    def test_stop_ends_a_round_after_the_fetches_in_flight(self):
        clock = Clock()
        backend = RecordingBackend(5)
        refresher = Refresher(clock, backend.store, backend.fetch, concurrency=1, rate=1.0)
        refresher.refresh()
        backend.finish_all()
        stopped = refresher.stop()
        self.assertTrue(stopped.called)
        clock.advance(10)
        self.assertEqual(backend.pending, [])


class PollerTests(SynchronousTestCase):
    def test_polls_only_while_active(self):
        clock = Clock()
        backend = RecordingBackend(1)
        poller = Poller(clock, Refresher(clock, backend.store, backend.fetch, concurrency=1, rate=1000.0), interval=30, active=True)
        poller.startService()
        clock.advance(29)
        self.assertEqual(backend.pending, [])
        clock.advance(1)
        self.assertEqual(backend.finish_all(), ["c0"])
        poller.stand_down()
        clock.advance(300)
        self.assertEqual(backend.pending, [])
        poller.activate()
        clock.advance(30)
        self.assertEqual(backend.finish_all(), ["c0"])
        poller.stopService()
        clock.advance(300)
        self.assertEqual(backend.pending, [])
