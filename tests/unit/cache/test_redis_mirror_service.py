"""RedisMirror as a service: its two connections' ClientServices are its children, started and
stopped with it (no Redis needed: nothing listens on the port, so the links keep retrying)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from stigg_sidecar.cache.redis import RedisMirror
from tests.fixtures.reactor import reactor
from tests.fixtures.redis import free_port

Steps = Generator[Deferred[Any], Any, None]  # an inlineCallbacks test


class MirrorServiceTests(TestCase):
    @inlineCallbacks
    def test_the_links_are_child_services_started_and_stopped_with_the_mirror(self) -> Steps:
        mirror = RedisMirror(reactor, "svc-test", host="127.0.0.1", port=free_port(), timeout_ms=100)
        children = list(mirror)
        self.assertEqual(len(children), 2)
        self.assertTrue(all(isinstance(child, ClientService) for child in children))
        self.assertTrue(all(child.parent is mirror for child in children))
        self.assertFalse(any(child.running for child in children))

        mirror.startService()
        self.assertTrue(all(child.running for child in children))
        self.assertFalse(mirror.connected)  # nothing listens: the sidecar runs on without Redis
        read = yield mirror.read("cust-1")
        self.assertIsNone(read)
        self.assertEqual(mirror.errors, 1)

        yield mirror.stopService()
        self.assertFalse(mirror.running)
        self.assertFalse(any(child.running for child in children))
