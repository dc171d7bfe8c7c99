"""CachedPage: /metrics rendered at most once per interval, on a monotonic clock."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.ops.metrics import CachedPage


class CachedPageTests(SynchronousTestCase):
    def setUp(self):
        self.now = 100.0
        self.rendered = 0

    def render(self) -> bytes:
        self.rendered += 1
        return f"page {self.rendered}".encode()

    def test_scrapes_within_the_interval_get_the_same_bytes(self):
        page = CachedPage(self.render, 1.0, clock=lambda: self.now)
        self.assertEqual(page.page(), b"page 1")
        self.now += 0.999
        self.assertEqual(page.page(), b"page 1")
        self.now += 0.001
        self.assertEqual(page.page(), b"page 2")
        self.assertEqual((self.rendered, page.renders), (2, 2))

    def test_zero_renders_every_scrape(self):
        page = CachedPage(self.render, 0.0, clock=lambda: self.now)
        self.assertEqual([page.page() for _ in range(3)], [b"page 1", b"page 2", b"page 3"])
