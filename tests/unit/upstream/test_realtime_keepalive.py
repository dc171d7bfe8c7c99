"""Keep-alive: a socket whose server stops answering pings is dropped after the pong timeout and
replaced, with the subscriptions sent again. The server here is a real autobahn WebSocket server
on 127.0.0.1 that acknowledges and then ignores every ping."""

from __future__ import annotations

import json
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from stigg_sidecar.upstream.realtime import SUBPROTOCOL, RealtimeService
from tests.fixtures.polling import until
from tests.fixtures.reactor import reactor
from tests.fixtures.realtime import RecordingSink


class RecordingFactory(WebSocketServerFactory):
    """Keeps the protocols it opened and the message types they received."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: list[SilentServer] = []
        self.received: list[str] = []


class SilentServer(WebSocketServerProtocol):
    def onConnect(self, request):
        return SUBPROTOCOL

    def onOpen(self):
        self.factory.opened.append(self)

    def onMessage(self, payload, isBinary):
        message = json.loads(payload)
        self.factory.received.append(message["type"])
        if message["type"] == "connection_init":
            self.sendMessage(json.dumps({"type": "connection_ack"}).encode())


class KeepAliveTests(TestCase):
    timeout = 30

    async def test_missing_pong_drops_and_replaces_the_socket(self):
        factory = RecordingFactory(protocols=[SUBPROTOCOL])
        factory.protocol = SilentServer
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sink = RecordingSink()
        service = RealtimeService(
            reactor, f"ws://127.0.0.1:{cast(IPv4Address, port.getHost()).port}", {"X-API-KEY": "k"}, sink,
            ping_interval=0.2, pong_timeout=0.2, max_delay=0.5, jitter=lambda: 0.0,
        )
        service.startService()
        self.addCleanup(service.stopService)

        await until(lambda: service.connections >= 2, 10, "a second connection")
        self.assertGreaterEqual(service.connections, 2)
        # until the server has read the second socket's subscribes
        await until(lambda: factory.received.count("subscribe") >= 6, 10, "the subscribes sent again")
        self.assertEqual(sink.events[:3], ["up", "down", "up"])
        self.assertGreaterEqual(len(factory.opened), 2)
        # each connection pinged, then subscribed again after the reconnect
        self.assertIn("ping", factory.received)
        self.assertGreaterEqual(factory.received.count("subscribe"), 6)
        for protocol in factory.opened:
            protocol.dropConnection(abort=True)
        await deferLater(reactor, 0.05, lambda: None)
