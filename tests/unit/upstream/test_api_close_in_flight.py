"""StiggApi.close while an attempt is in flight: the call fails with that attempt's error and
leaves no retry pause behind (a pause scheduled after close outlived the sidecar's stop), and a
connection that answers after close is closed rather than kept in the pool (where it idled for
240 s after the sidecar's stop)."""

from __future__ import annotations

from typing import cast

from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from stigg_sidecar.upstream.api import StiggApi, UpstreamError
from tests.fixtures.reactor import reactor


class _Holding(protocol.Protocol):
    """Accepts a request and never answers, until the test drops the connection."""

    def connectionMade(self) -> None:
        factory = cast(_HoldingFactory, self.factory)
        factory.held.append(self)
        if not factory.connected.called:
            factory.connected.callback(None)


class _HoldingFactory(protocol.ServerFactory):
    protocol = _Holding

    def __init__(self) -> None:
        self.held: list[_Holding] = []
        self.connected: Deferred[None] = Deferred()


class CloseTests(TestCase):
    def holding_upstream(self) -> tuple[_HoldingFactory, StiggApi]:
        """A server on 127.0.0.1 that holds every connection (answering only when a test writes),
        and a StiggApi pointed at it."""
        factory = _HoldingFactory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{cast(IPv4Address, port.getHost()).port}"
        return factory, StiggApi(reactor, "test-key", api_url=url, edge_api_url=url, edge_enabled=True)

    async def test_an_attempt_failing_after_close_is_not_retried(self) -> None:
        factory, api = self.holding_upstream()
        call = api.fetch_state("acme", None, timeout=3)
        await factory.connected
        closing = api.close()
        self.assertFalse(closing.called)  # it waits for the attempt in flight
        for held in factory.held:
            assert held.transport is not None
            held.transport.loseConnection()  # the attempt in flight now fails, retryably
        with self.assertRaises(UpstreamError) as caught:
            await call
        await closing
        self.assertIn("unreachable", str(caught.exception))  # its own error, not a spent budget
        self.assertEqual(len(factory.held), 1)  # no second attempt
        self.assertEqual(api._pauses, set())
        await deferLater(reactor, 0, lambda: None)  # and trial finds no delayed call left

    async def test_a_connection_answering_after_close_is_closed_not_pooled(self) -> None:
        factory, api = self.holding_upstream()
        call = api.fetch_state("acme", None, timeout=30)
        await factory.connected
        closing = api.close()
        body = b'{"data": {"entitlementsState": {"entitlements": []}}}'
        assert factory.held[0].transport is not None
        factory.held[0].transport.write(  # a keep-alive answer: the connection would be reusable
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.assertEqual(await call, {"entitlements": []})
        await closing
        self.assertEqual([c for pool in api._pools for c in pool._connections.values() if c], [])
        self.assertEqual([t for pool in api._pools for t in pool._timeouts.values()], [])
