"""PendingUsage: the cache shows Stigg's usage plus what is acknowledged and not yet delivered.

Pure reconciliation rules over a real EntitlementCache and the store's update paths: the
timestamps are data here (newer wins), so no clock is needed.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.contracts import UsageChange, UsageReport
from stigg_sidecar.entitlements.records import CustomerEntry, Feature, FeatureEntitlement, Usage
from stigg_sidecar.online.pending import PendingUsage
from stigg_sidecar.online.store import EntitlementStore

API_CALLS = Feature("api-calls", "NUMBER", "Incremental")


def entry(usage: float, usage_at: int, timestamp: int = 1000, customer: str = "acme") -> CustomerEntry:
    ent = FeatureEntitlement(API_CALLS, usage_limit=100, updated_at=timestamp, usage=Usage(usage, 10, 20, usage_at))
    return CustomerEntry(customer, features={"api-calls": ent}, timestamp=timestamp)


def delta(value: float, customer: str = "acme") -> UsageReport:
    return UsageReport(customer, "api-calls", value, update_behavior="DELTA")


def set_to(value: float) -> UsageReport:
    return UsageReport("acme", "api-calls", value, update_behavior="SET")


class ReconciliationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache = EntitlementCache(10_000_000)
        self.pending = PendingUsage()
        self.store = EntitlementStore(self.cache, pending=self.pending)

    def shown(self, customer: str = "acme") -> float:
        cached = self.cache.get_entry(f"c_{customer}")
        assert cached is not None
        return cached.features["api-calls"].usage.current_usage

    def authoritative(self, current: float, stamp: int) -> None:
        """Stigg's usage arriving (a push or a delivery result)."""
        self.store.usage_changed(UsageChange("acme", None, "FEATURE", "api-calls", Usage(current, 10, 20, stamp)))

    def test_a_report_moves_the_cached_usage_at_once(self):
        self.store.put(entry(90, usage_at=100))
        shown = self.store.pending_added(1, delta(5))
        assert shown is not None
        self.assertEqual((shown.current_usage, shown.updated_at), (95, 100))
        self.assertEqual(self.shown(), 95)
        self.store.pending_added(2, set_to(40))
        self.store.pending_added(3, delta(2))
        self.assertEqual(self.shown(), 42)

    def test_newer_authoritative_usage_is_shown_plus_what_is_undelivered(self):
        self.store.put(entry(90, usage_at=100))
        self.store.pending_added(1, delta(5))
        self.authoritative(93, stamp=200)  # another instance reported 3 meanwhile
        self.assertEqual(self.shown(), 98)
        self.authoritative(50, stamp=150)  # older: ignored
        self.assertEqual(self.shown(), 98)

    def test_delivery_result_counts_the_record_once(self):
        self.store.put(entry(90, usage_at=100))
        report = delta(5)
        self.store.pending_added(1, report)
        self.store.pending_added(2, delta(1))
        # Delivery of record 1: it leaves the pending set before Stigg's answer (95) is applied.
        self.store.pending_settled(1, report)
        self.authoritative(95, stamp=300)
        self.store.pending_shown(report)
        self.assertEqual(self.shown(), 96)

    def test_a_push_newer_than_the_delivery_result_is_not_undone(self):
        self.store.put(entry(90, usage_at=100))
        report = delta(5)
        self.store.pending_added(1, report)
        self.authoritative(97, stamp=400)  # a push that already includes the record and 2 more
        self.assertEqual(self.shown(), 102)  # until the delivery answers, the record still counts
        self.store.pending_settled(1, report)
        self.authoritative(95, stamp=300)  # the delivery's own (older) answer
        self.store.pending_shown(report)
        self.assertEqual(self.shown(), 97)
        self.assertEqual(len(self.pending), 0)

    def test_a_refused_record_stops_counting(self):
        self.store.put(entry(90, usage_at=100))
        report = delta(5)
        self.store.pending_added(1, report)
        self.store.pending_settled(1, report)
        self.store.pending_shown(report)
        self.assertEqual(self.shown(), 90)
        self.assertEqual(self.pending.tracked_keys(), set())

    def test_a_refetched_entry_gets_the_pending_records(self):
        self.store.put(entry(90, usage_at=100))
        self.store.pending_added(1, delta(5))
        self.store.put(entry(91, usage_at=500, timestamp=2000))  # refetch: Stigg says 91
        self.assertEqual(self.shown(), 96)
        self.store.put(entry(80, usage_at=50, timestamp=3000))  # an older usage in a newer entry
        self.assertEqual(self.shown(), 96)

    def test_records_for_a_customer_not_cached_apply_when_it_arrives(self):
        self.assertIsNone(self.store.pending_added(1, delta(5)))
        self.store.pending_added(2, delta(1))
        self.store.put(entry(10, usage_at=100))
        self.assertEqual(self.shown(), 16)

    def test_the_base_is_what_stigg_said(self):
        self.store.put(entry(90, usage_at=100))
        self.store.pending_added(1, delta(5))
        self.assertEqual(self.pending.base("c_acme", "api-calls"), Usage(90, 10, 20, 100))
