"""gcpolicy: the start-up heap is frozen once, later cycles are always collected, and cached
records are out of the collector's view wherever they are built."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.cache.redis.format import decode_from
from stigg_sidecar.entitlements.changes import apply_usage, keep_newer_usage
from stigg_sidecar.entitlements.records import (
    CreditEntitlement,
    CreditRate,
    Currency,
    CustomerEntry,
    Feature,
    FeatureEntitlement,
    FrozenMap,
    Malformed,
    Usage,
)
from stigg_sidecar.lifecycle import gcpolicy
from stigg_sidecar.state.snapshot import read_snapshot, write_snapshot
from stigg_sidecar.upstream.wire import entry_from_state
from tests.fixtures.edge import NOW, boolean_item, credit_item, metered_item, state
from tests.fixtures.redis import as_store

_RECORDS = (CustomerEntry, FrozenMap, FeatureEntitlement, Usage, Feature, CreditEntitlement, Currency, CreditRate,
            Malformed, tuple, dict)  # fmt: skip


class _Node:
    __slots__ = ("other", "__weakref__")

    def __init__(self) -> None:
        self.other: object = None


def _cycle() -> tuple[weakref.ref, weakref.ref]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a), weakref.ref(b)


class InstallTests(SynchronousTestCase):
    def setUp(self) -> None:
        gcpolicy.uninstall()
        self.addCleanup(gcpolicy.uninstall)

    def test_install_freezes_what_exists_at_start_once(self):
        before = [_Node() for _ in range(1000)]
        gcpolicy.install()
        frozen = gcpolicy.frozen_objects()
        self.assertGreaterEqual(frozen, len(before))
        in_view = {id(o) for o in gc.get_objects()}
        self.assertFalse(any(id(node) in in_view for node in before))
        later = [_Node() for _ in range(1000)]
        gc.collect()
        gcpolicy.install()  # idempotent: freezes nothing more
        self.assertEqual(gcpolicy.frozen_objects(), frozen)
        in_view = {id(o) for o in gc.get_objects()}
        self.assertTrue(all(id(node) in in_view for node in later))

    def test_a_cycle_alive_during_full_collections_is_collected_once_dropped(self):
        # What the first policy leaked: objects alive at a full collection were frozen, and a
        # cycle among them that died later (a fetch in flight, a handler's frames) never left.
        gcpolicy.install()
        holder = _Node()
        holder.other = _Node()
        holder.other.other = holder
        alive = weakref.ref(holder)
        for _ in range(3):
            gc.collect()
        del holder
        gc.collect()
        self.assertIsNone(alive())

    def test_uninstall_unfreezes(self):
        gcpolicy.install()
        self.assertGreater(gcpolicy.frozen_objects(), 0)
        gcpolicy.uninstall()
        self.assertEqual(gcpolicy.frozen_objects(), 0)

    def test_the_metrics_give_the_frozen_count(self):
        from stigg_sidecar.ops.metrics import Metrics

        gcpolicy.install()
        metrics = Metrics()
        value = metrics.registry.get_sample_value("sidecar_gc_frozen_objects")
        self.assertEqual(value, gc.get_freeze_count())
        assert value is not None
        self.assertGreater(value, 0)


class UntrackTests(SynchronousTestCase):
    def test_an_untracked_object_is_still_freed_by_reference_count(self):
        node = _Node()
        gcpolicy.untrack(node)
        gcpolicy.untrack(node)  # idempotent
        self.assertFalse(gc.is_tracked(node))
        alive = weakref.ref(node)
        del node
        self.assertIsNone(alive())

    def test_what_an_untracked_object_holds_stays_alive_until_it_goes(self):
        holder = _Node()
        gcpolicy.untrack(holder)
        first, second = _cycle()
        holder.other = first()
        gc.collect()
        self.assertIsNotNone(second())  # referenced from outside the collector's view
        del holder
        gc.collect()
        self.assertIsNone(first())
        self.assertIsNone(second())


def _tracked_records(root: object) -> list[str]:
    """Every record (or container of records) reachable from `root` that the collector tracks."""
    found, seen, pending = [], set(), [root]
    while pending:
        obj = pending.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        if isinstance(obj, _RECORDS):
            if gc.is_tracked(obj):
                found.append(f"{type(obj).__name__}: {obj!r:.120}")
            pending.extend(gc.get_referents(obj))
    return found


def _entry() -> CustomerEntry:
    enum_item = boolean_item("feature-region", enumValues=["us", "eu"])
    enum_item["feature"] = {**enum_item["feature"], "featureType": "ENUM"}
    return entry_from_state(
        "cust-1",
        None,
        state(metered_item(), boolean_item(), enum_item, credit_item(), {"__typename": "FeatureEntitlement", "feature": 7}),
        NOW,
    )


class CachedRecordsAreUntrackedTests(SynchronousTestCase):
    """Collections run first: CPython untracks tuples of plain values itself, not records."""

    def assertUntracked(self, entry: CustomerEntry) -> None:
        gc.collect()
        self.assertEqual(_tracked_records(entry), [])

    def test_parsed_from_the_api(self):
        entry = _entry()
        self.assertTrue(entry.malformed)
        self.assertTrue(entry.credits["cred-tokens"].currency.additional_meta_data)
        self.assertUntracked(entry)

    def test_after_a_usage_update_and_a_merge(self):
        entry = _entry()
        updated = apply_usage(entry, "FEATURE", "feature-api-calls", Usage(7.0, None, None, NOW + 1))
        assert updated is not None
        self.assertUntracked(updated)
        credited = apply_usage(entry, "CREDIT", "cred-tokens", Usage(3.0, None, None, NOW + 1))
        assert credited is not None
        self.assertUntracked(credited)
        self.assertUntracked(keep_newer_usage(entry, updated))
        self.assertUntracked(replace(entry, access_denied_reason="Revoked"))

    def test_decoded_from_redis_and_from_a_snapshot(self):
        entry = _entry()
        decoded = decode_from("prod", "cust-1", None, as_store("prod", entry).get)
        assert decoded is not None
        self.assertUntracked(decoded)
        path = self.mktemp()
        write_snapshot(path, [entry], NOW)
        (loaded,) = read_snapshot(path).entries
        self.assertEqual(loaded.features, entry.features)
        self.assertUntracked(loaded)

    def test_the_caches_slots(self):
        cache = EntitlementCache(max_bytes=1 << 30)
        cache.put(_entry())
        gc.collect()
        tracked = [o for o in gc.get_objects() if type(o).__name__ == "_Slot" and o.entry.customer_id == "cust-1"]
        self.assertEqual(tracked, [])
        cached = cache.get("c_cust-1")
        assert cached is not None
        self.assertEqual(cached.customer_id, "cust-1")
