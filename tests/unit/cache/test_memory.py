"""EntitlementCache: byte bound under churn, approximate LRU, newer wins, usage kept when newer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.entitlements.changes import apply_usage
from stigg_sidecar.entitlements.records import CustomerEntry, Feature, FeatureEntitlement, Usage, cache_key

API_CALLS = Feature("api-calls", "NUMBER", "Incremental")


def entry(customer: str, timestamp: int = 1000, usage: float = 0, usage_at: int = 1000, features: int = 3) -> CustomerEntry:
    ents = {
        f"f{i}": FeatureEntitlement(Feature(f"f{i}", "BOOLEAN"), updated_at=timestamp) for i in range(features - 1)
    }
    ents["api-calls"] = FeatureEntitlement(
        API_CALLS, usage_limit=100, updated_at=timestamp, usage=Usage(usage, None, None, usage_at)
    )
    return CustomerEntry(customer, features=ents, timestamp=timestamp)


def _entry(cache: EntitlementCache, key: str) -> CustomerEntry:
    """The entry cached under `key`, which the test knows is there."""
    entry = cache.get_entry(key)
    if entry is None:
        raise AssertionError(f"{key} is not cached")
    return entry


class ByteBoundTests(SynchronousTestCase):
    def test_total_never_exceeds_budget_under_churn(self):
        one = entry("c0").size
        cache = EntitlementCache(max_bytes=one * 50)
        for i in range(2000):
            cache.put(entry(f"c{i}"))
            self.assertLessEqual(cache.bytes, cache.max_bytes)
            cache.get(cache_key("c0", None))  # c0 stays hot
        self.assertLessEqual(len(cache), 50)
        self.assertGreater(cache.evictions, 1900)
        self.assertIsNotNone(cache.get(cache_key("c0", None)))
        self.assertEqual(cache.bytes, sum(e.size for e in cache.entries()))

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8)), min_size=1, max_size=200), st.integers(1, 30))
    def test_accounting_matches_contents(self, puts, budget_entries):
        cache = EntitlementCache(max_bytes=entry("x").size * budget_entries)
        for customer, features in puts:
            cache.put(entry(f"c{customer}", features=features))
            self.assertLessEqual(cache.bytes, cache.max_bytes)
        self.assertEqual(cache.bytes, sum(e.size for e in cache.entries()))

    def test_least_recently_read_go_first(self):
        one = entry("a").size
        cache = EntitlementCache(max_bytes=one * 3, low_water=0.99)
        for name in "abc":
            cache.put(entry(name))
        cache.get(cache_key("a", None))
        cache.put(entry("d"))
        self.assertIsNone(cache.get_entry(cache_key("b", None)))
        self.assertIsNotNone(cache.get_entry(cache_key("a", None)))


class NewerWinsTests(SynchronousTestCase):
    def test_older_entry_does_not_replace_newer(self):
        cache = EntitlementCache(max_bytes=10**9)
        self.assertTrue(cache.put(entry("c", timestamp=2000)))
        self.assertFalse(cache.put(entry("c", timestamp=1000)))
        self.assertEqual(_entry(cache, "c_c").timestamp, 2000)

    def test_epoch_zero_always_replaces(self):
        cache = EntitlementCache(max_bytes=10**9)
        cache.put(entry("c", timestamp=2000))
        self.assertTrue(cache.put(CustomerEntry("c", access_denied_reason="CustomerNotFound", timestamp=0)))

    def test_refetch_keeps_newer_usage(self):
        cache = EntitlementCache(max_bytes=10**9)
        cache.put(entry("c", usage=5, usage_at=1000))
        cache.update("c_c", lambda e: apply_usage(e, "FEATURE", "api-calls", Usage(9, None, None, 3000)))
        cache.put(entry("c", usage=6, usage_at=2000))  # a fetch that started before the update
        self.assertEqual(_entry(cache, "c_c").features["api-calls"].usage.current_usage, 9)
        cache.put(entry("c", usage=11, usage_at=4000))
        self.assertEqual(_entry(cache, "c_c").features["api-calls"].usage.current_usage, 11)

    def test_expired_entries_are_not_fresh(self):
        cache = EntitlementCache(max_bytes=10**9)
        ents = {"sso": FeatureEntitlement(Feature("sso", "BOOLEAN"), valid_until=5000)}
        cache.put(CustomerEntry("c", features=ents, timestamp=1))
        self.assertIsNotNone(cache.get_fresh("c_c", 4999))
        self.assertIsNone(cache.get_fresh("c_c", 5000))


class ExpiryTests(SynchronousTestCase):
    def test_earliest_valid_until_over_features_and_credits(self):
        from stigg_sidecar.cache.memory import earliest_expiry
        from stigg_sidecar.entitlements.records import CreditEntitlement, Currency

        ents = {"sso": FeatureEntitlement(Feature("sso", "BOOLEAN"), valid_until=9000)}
        credits = {"t": CreditEntitlement(Currency("t"), valid_until=7000)}
        self.assertEqual(earliest_expiry(CustomerEntry("c", features=ents, credits=credits)), 7000)
        self.assertIsNone(earliest_expiry(entry("c")))


class RecencyTests(SynchronousTestCase):
    def test_reads_from_handler_threads_order_refreshes_and_eviction(self):
        import threading

        one = entry("a").size
        cache = EntitlementCache(max_bytes=one * 4, low_water=1.0)
        for name in "abcd":
            cache.put(entry(name))
        reader = threading.Thread(target=lambda: [cache.get(cache_key(n, None)) for n in "ca"])
        reader.start()
        reader.join(5)
        self.assertEqual(list(cache.keys_by_recency()), ["c_a", "c_c", "c_d", "c_b"])
        cache.put(entry("e"))  # evicts the least recently read: b
        self.assertEqual(list(cache.keys_by_recency()), ["c_e", "c_a", "c_c", "c_d"])

    def test_one_store_evicts_a_bounded_batch(self):
        from stigg_sidecar.cache import memory

        one = entry("x").size
        cache = EntitlementCache(max_bytes=one * 1000, low_water=0.5)
        for i in range(1000):
            cache.put(entry(f"c{i}"))
        cache.put(entry("new"))
        # Down under the budget plus at most the bounded extra, not all the way to low water.
        self.assertLessEqual(cache.evictions, 1 + memory._MAX_EXTRA_EVICTIONS)
        self.assertLessEqual(cache.bytes, cache.max_bytes)
        for i in range(20):
            cache.put(entry(f"more{i}"))
        self.assertLessEqual(cache.bytes, cache.max_bytes)
        self.assertEqual(cache.bytes, sum(e.size for e in cache.entries()))

    def test_past_the_hot_keys_every_other_key_follows_once(self):
        from stigg_sidecar.cache import memory

        cache = EntitlementCache(max_bytes=10**12)
        total = memory._HOT_KEYS + 50
        for i in range(total):
            cache.put(entry(f"c{i}"))
        cache.get(cache_key("c0", None))  # the oldest, read now: first
        keys = list(cache.keys_by_recency())
        self.assertEqual(keys[0], "c_c0")
        self.assertEqual(sorted(keys), sorted(f"c_c{i}" for i in range(total)))
        self.assertEqual(keys[1], f"c_c{total - 1}")  # then the newest


class RefreshWalkTests(SynchronousTestCase):
    """keys_by_recency walks the keys in slices while the cache changes between them."""

    def assert_order_consistent(self, cache: EntitlementCache) -> None:
        self.assertEqual(sorted(cache._order), sorted(cache._slots))
        for pos, key in enumerate(cache._order):
            self.assertEqual(cache._slots[key].pos, pos)

    def test_every_key_cached_throughout_is_walked_exactly_once_under_churn(self):
        import random
        from collections import Counter

        from stigg_sidecar.cache import memory

        self.patch(memory, "_HOT_KEYS", 5)
        one = entry("x").size
        for seed in range(25):
            rng = random.Random(seed)
            cache = EntitlementCache(max_bytes=one * 120, low_water=0.9)
            for i in range(100):
                cache.put(entry(f"k{i}"))
            throughout = set(cache._slots)
            ever = set(throughout)
            walk = cache.keys_by_recency(slice_size=7)
            walked: list[str] = []
            fresh = 100
            while True:
                step = rng.random()
                if step < 0.25:  # a new customer (evicts once the budget is reached)
                    cache.put(entry(f"k{fresh}"))
                    ever.add(cache_key(f"k{fresh}", None))
                    fresh += 1
                elif step < 0.35 and cache._order:
                    cache.purge(rng.choice(cache._order))
                elif step < 0.45 and cache._order:  # a replacement keeps the key where it is
                    key = rng.choice(cache._order)
                    cache.update(key, lambda e: apply_usage(e, "FEATURE", "api-calls", Usage(1, None, None, 2000)))
                elif step < 0.55 and cache._order:
                    cache.get(rng.choice(cache._order))
                else:
                    walked_key = next(walk, None)
                    if walked_key is None:
                        break
                    walked.append(walked_key)
                throughout &= set(cache._slots)
            counts = Counter(walked)
            self.assertEqual([k for k, n in counts.items() if n > 1], [], f"seed {seed}")
            self.assertLessEqual(throughout, set(walked), f"seed {seed}")
            self.assertLessEqual(set(walked), ever)
            self.assertGreater(cache.evictions, 0)
            self.assert_order_consistent(cache)

    def test_a_new_walk_ends_the_previous_one(self):
        from stigg_sidecar.cache import memory

        self.patch(memory, "_HOT_KEYS", 2)
        cache = EntitlementCache(max_bytes=10**12)
        for i in range(10):
            cache.put(entry(f"k{i}"))
        first = cache.keys_by_recency(slice_size=3)
        taken = [next(first) for _ in range(4)]  # the two hot keys, then into the first slice
        second = cache.keys_by_recency(slice_size=3)
        self.assertEqual(len(taken) + len(list(first)), 5)  # the rest of that slice, no more
        self.assertEqual(sorted(second), sorted(cache._slots))

    def test_clear_and_purge_keep_the_order_consistent(self):
        cache = EntitlementCache(max_bytes=10**12)
        for i in range(10):
            cache.put(entry(f"k{i}"))
        for key in ("c_k0", "c_k9", "c_k4", "missing"):
            cache.purge(key)
        self.assert_order_consistent(cache)
        cache.clear()
        self.assertEqual(cache._order, [])
        cache.put(entry("again"))
        self.assertEqual(list(cache.keys_by_recency()), ["c_again"])
