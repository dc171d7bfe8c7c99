"""Freshness: admin changes at the emulator reach gRPC answers through the real-time socket, or
through the poller when the socket is disabled or down."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.logs import log_events
from tests.fixtures.online import OnlineHarness


def sso(customer="acme"):
    return pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso")


class PollerTests(TestCase):
    timeout = 30

    async def test_poller_refreshes_cached_customers_with_the_socket_disabled(self):
        h = await OnlineHarness(self, reactor).start(data.SEED, POLL_INTERVAL_SECS="0.2")
        r = await h.call("GetBooleanEntitlement", sso())
        self.assertTrue(r.has_access)
        code, _ = await h.admin("PUT", "customers/acme", data.customer(data.feature("other")))
        self.assertEqual(code, 200)

        async def changed():
            answer = await h.call("GetBooleanEntitlement", sso())
            return not answer.has_access and not answer.is_fallback

        await h.wait_until(changed, timeout=10)
        # polling never touched customers nobody asked for
        counts = await h.requests()
        self.assertGreaterEqual(counts["/v1/c/{customerId}/entitlements-state.json"], 2)


def metered(customer, feature, usage=None):
    options = pb.MeteredEntitlementOptions(requested_usage=usage) if usage is not None else None
    return pb.GetMeteredEntitlementRequest(customer_id=customer, feature_id=feature, options=options)


class SocketTests(TestCase):
    timeout = 60

    async def start(self, **settings):
        h = await OnlineHarness(self, reactor).start(data.SEED, realtime=True, **settings)
        await self.subscribed(h)
        return h

    async def subscribed(self, h, connected: int = 1):
        """Wait until the emulator counts `connected` sockets with their three subscriptions."""

        async def ready():
            _, sockets = await h.admin("GET", "sockets")
            return sockets == {"connected": connected, "subscriptions": 3 * connected}

        await h.wait_until(ready, timeout=15)

    def realtime(self, h):
        return h.parts.online.realtime

    async def test_admin_change_reaches_a_grpc_answer(self):
        h = await self.start()
        self.assertTrue((await h.call("GetBooleanEntitlement", sso())).has_access)
        await h.admin("PUT", "customers/acme", data.customer(data.feature("other")))

        async def changed():
            return not (await h.call("GetBooleanEntitlement", sso())).has_access

        await h.wait_until(changed, timeout=5)
        counts = await h.requests()
        self.assertEqual(counts["/v1/c/{customerId}/entitlements-state.json"], 1)  # pushed, not fetched

    async def test_usage_reported_through_one_sidecar_is_seen_by_another(self):
        first = await self.start()
        second = await OnlineHarness(self, reactor).start(None, emulator=first.emulator, realtime=True)
        await self.subscribed(second, connected=2)
        r = await second.call("GetMeteredEntitlement", metered("acme", "api-calls"))
        self.assertEqual(r.entitlement.current_usage, 90)
        await first.call("ReportUsage", pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=7))

        async def seen():
            answer = await second.call("GetMeteredEntitlement", metered("acme", "api-calls"))
            return answer.entitlement.current_usage == 97

        await second.wait_until(seen, timeout=5)

    async def test_reconnect_restores_subscriptions_without_cold_reads(self):
        h = await self.start()
        await h.call("GetBooleanEntitlement", sso())
        await h.admin("POST", "requests/reset")
        code, body = await h.admin("POST", "disconnect")
        self.assertEqual(body, {"disconnected": 1})
        # while the socket is down, the cached answer is served from memory
        r = await h.call("GetBooleanEntitlement", sso())
        self.assertEqual((r.has_access, r.is_fallback), (True, False))
        await self.subscribed(h)
        self.assertEqual(self.realtime(h).connections, 2)
        # the reconnect revalidated in the background, and updates flow again
        async def revalidated():
            return (await h.requests()).get("/v1/c/{customerId}/entitlements-state.json", 0) >= 1

        await h.wait_until(revalidated, timeout=5)
        await h.admin("PUT", "customers/acme", data.customer(data.feature("other")))

        async def changed():
            return not (await h.call("GetBooleanEntitlement", sso())).has_access

        await h.wait_until(changed, timeout=5)

    async def test_wrong_key_is_not_retried(self):
        events = log_events(self)
        h = await OnlineHarness(self, reactor).start(data.SEED, api_key="wrong-key", realtime=True)

        async def gave_up():
            return self.realtime(h).gave_up

        await h.wait_until(gave_up, timeout=10)
        attempts = (await h.requests()).get("/graphql (websocket)")
        from twisted.internet.task import deferLater

        await deferLater(reactor, 2.5, lambda: None)  # longer than the first backoff steps
        self.assertEqual((await h.requests()).get("/graphql (websocket)"), attempts)
        self.assertEqual(attempts, 1)
        # The log says so once, and claims no retry after it.
        socket_lines = [formatEvent(e) for e in events if "real-time socket" in formatEvent(e).lower()]
        self.assertEqual(len(socket_lines), 1, socket_lines)
        self.assertIn("for good", socket_lines[0])
        self.assertIn("not retrying", socket_lines[0])

    async def test_malformed_frames_are_ignored_and_the_socket_stays_up(self):
        h = await self.start()
        await h.call("GetBooleanEntitlement", sso())
        for frame in ("not json", '{"type": "next", "id": "nobody", "payload": {}}', '{"no": "type"}'):
            code, body = await h.admin("POST", "sockets/send", {"text": frame})
            self.assertEqual(body["sent"], 1)
        await h.admin("PUT", "customers/acme", data.customer(data.feature("other")))

        async def changed():
            return not (await h.call("GetBooleanEntitlement", sso())).has_access

        await h.wait_until(changed, timeout=5)
        self.assertEqual(self.realtime(h).connections, 1)
        self.assertEqual(self.realtime(h).malformed, 3)

    async def test_a_push_during_a_fetch_is_kept(self):
        # The fetch is held far longer than a loaded machine needs to deliver the push, within
        # a budget it cannot outlast (the assertion below is that it is still in flight).
        h = await self.start(ENTITLEMENTS_TIMEOUT_MS="15000")
        await h.faults(latency_ms=5000)
        reading = h.call("GetBooleanEntitlement", sso(), timeout=20)  # cold: a fetch is now in flight
        await h.wait_until(lambda: _true(h.parts.online.fetcher.fetching("c_acme")), timeout=5)
        await h.admin("PUT", "customers/acme", data.customer(data.feature("other")))
        cache = h.parts.online.cache

        async def pushed():
            entry = cache.get_entry("c_acme")
            return entry is not None and "other" in entry.features

        await h.wait_until(pushed, timeout=10)
        self.assertTrue(h.parts.online.fetcher.fetching("c_acme"))
        await reading

    async def test_a_subscription_error_replaces_the_socket(self):
        h = await self.start()
        frame = '{"id": "any", "type": "error", "payload": [{"message": "ThrottlerException"}]}'
        code, body = await h.admin("POST", "sockets/send", {"text": frame})
        self.assertEqual(body["sent"], 1)

        async def reconnected():
            return self.realtime(h).connections >= 2

        await h.wait_until(reconnected, timeout=10)
        await self.subscribed(h)

    async def test_package_published_for_all_customers_drops_the_cache(self):
        h = await self.start()
        await h.call("GetBooleanEntitlement", sso())
        cache = h.parts.online.cache
        self.assertEqual(len(cache), 1)
        await h.admin("POST", "publish", {"migrationType": "NEW_CUSTOMERS"})
        await h.admin("POST", "publish", {"migrationType": "ALL_CUSTOMERS"})

        async def dropped():
            return len(cache) == 0

        await h.wait_until(dropped, timeout=5)

    async def test_poller_stands_down_while_the_socket_is_up(self):
        h = await self.start(POLL_INTERVAL_SECS="0.2")
        poller = h.parts.online.poller
        self.assertFalse(poller.active)
        await h.admin("POST", "faults", {"down": True})

        async def polling():
            return poller.active

        await h.wait_until(polling, timeout=5)
        await h.admin("POST", "faults", {"down": False})
        await self.subscribed(h)
        await h.wait_until(lambda: _false(poller.active), timeout=5)

    async def test_emulator_restart(self):
        h = await self.start()
        await h.call("GetBooleanEntitlement", sso())
        site, port_number = h.emulator.site, h.emulator.port.getHost().port
        await h.emulator.port.stopListening()
        await site.close_connections()
        r = await h.call("GetBooleanEntitlement", sso())
        self.assertEqual((r.has_access, r.is_fallback), (True, False))
        listening = reactor.listenTCP(port_number, site, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        await self.subscribed(h)
        self.assertGreaterEqual(self.realtime(h).connections, 2)


async def _false(value):
    return not value


async def _true(value):
    return bool(value)
