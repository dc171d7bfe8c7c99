"""gcpolicy: full collections freeze their survivors; cycles that die young are still collected."""

from __future__ import annotations

import gc
import weakref

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar import gcpolicy


class _Node:
    def __init__(self) -> None:
        self.other: object = None


class GcPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        gcpolicy.install()
        self.addCleanup(gcpolicy.uninstall)

    def test_survivors_of_a_full_collection_leave_the_collectors_view(self):
        kept = [_Node() for _ in range(1000)]
        gc.collect()
        self.assertGreaterEqual(gcpolicy.frozen_objects(), len(kept))
        in_view = {id(o) for o in gc.get_objects()}
        self.assertFalse(any(id(node) in in_view for node in kept))

    def test_a_cycle_discarded_before_a_collection_is_still_collected(self):
        gc.collect()  # freezes what exists now
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        alive = weakref.ref(a)
        del a, b
        gc.collect()
        self.assertIsNone(alive())

    def test_frozen_objects_are_still_freed_by_reference_count(self):
        node = _Node()
        alive = weakref.ref(node)
        gc.collect()
        self.assertTrue(gc.is_tracked(node))
        del node
        self.assertIsNone(alive())

    def test_install_is_idempotent_and_uninstall_unfreezes(self):
        gcpolicy.install()
        self.assertEqual(gc.callbacks.count(gcpolicy._freeze_after_full_collection), 1)
        gc.collect()
        gcpolicy.uninstall()
        self.assertEqual(gcpolicy.frozen_objects(), 0)
        self.assertNotIn(gcpolicy._freeze_after_full_collection, gc.callbacks)

    def test_the_metrics_give_the_frozen_count(self):
        from stigg_sidecar.metrics import Metrics

        kept = [_Node() for _ in range(1000)]
        gc.collect()
        metrics = Metrics()
        value = metrics.registry.get_sample_value("sidecar_gc_frozen_objects")
        self.assertGreaterEqual(value, len(kept))

    def test_full_collections_come_more_often_and_uninstall_restores_the_thresholds(self):
        gcpolicy.uninstall()
        before = gc.get_threshold()
        gcpolicy.install()
        self.assertEqual(gc.get_threshold(), (before[0], before[1], gcpolicy._FULL_EVERY))
        gcpolicy.uninstall()
        self.assertEqual(gc.get_threshold(), before)
