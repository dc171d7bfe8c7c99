"""A running emulator for tests: start one on a free loopback port, stop it cleanly.

Usage in a trial test::

    from twisted.internet import reactor
    from stigg_sidecar.emulator.testing import start_emulator, stop_emulator

    async def test_something(self):
        emulator = await start_emulator(reactor, {"apiKeys": ["k"], "customers": {...}})
        self.addCleanup(stop_emulator, emulator)      # trial waits for the Deferred
        state, port, url = emulator                   # url: "http://127.0.0.1:<port>"
        ...  # Edge base URL is `url`, GraphQL is f"{url}/graphql", admin is f"{url}/_emulator/..."
        state.faults.update({"down": True})           # or POST {url}/_emulator/faults

`start_emulator(reactor, data, *, clock=None, random=None, api_keys=())` returns a Deferred
firing with a `RunningEmulator`: a named tuple ``(state, port, url)`` (``port`` is the
`IListeningPort`; ``emulator.site`` is the `EmulatorSite`).
``data`` is a decoded data file (see `stigg_sidecar.emulator.data`); it is validated and an
invalid one fails the Deferred with `DataError`. ``clock`` (default: ``reactor``) is the time
source for timestamps; ``random`` (default: a fresh `random.Random`) drives ``error_rate`` and
measurement ids. `stop_emulator(emulator)` aborts the open connections (WebSockets included),
stops listening and returns a Deferred that fires when both are done, leaving the reactor clean
for trial.

`ws_connect(reactor, url, api_key=None)` opens the emulator's graphql-transport-ws socket (and
sends ``connection_init`` with that key, if given)::

    client = await ws_connect(reactor, emulator.url, "k")
    self.addCleanup(client.abort)
    assert (await client.next_message()) == {"type": "connection_ack"}
    client.send({"id": "1", "type": "subscribe", "payload": {"query": "subscription { ... }"}})
    code, reason = await client.wait_closed()
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping, Sequence
from random import Random
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTime

from stigg_sidecar.emulator.data import parse_data
from stigg_sidecar.emulator.state import EmulatorState
from stigg_sidecar.emulator.web import EmulatorSite
from stigg_sidecar.emulator.websocket import GRAPHQL_TRANSPORT_WS, cancel_close_handshake_timer


class RunningEmulator(NamedTuple):
    state: EmulatorState
    port: IListeningPort
    url: str

    @property
    def site(self) -> EmulatorSite:
        return self.port.factory  # type: ignore[attr-defined]


def start_emulator(
    reactor: Any,
    data: Mapping[str, Any],
    *,
    clock: IReactorTime | None = None,
    random: Random | None = None,
    api_keys: Sequence[str] = (),
) -> Deferred[RunningEmulator]:
    """Listen on 127.0.0.1, port 0, serving ``data``; see the module docstring."""

    def listen() -> Deferred[RunningEmulator]:
        state = EmulatorState(
            parse_data(data), clock=clock or reactor, random=random, api_keys=api_keys
        )
        site = EmulatorSite(state, reactor=reactor)
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")

        def running(port: IListeningPort) -> RunningEmulator:
            address = cast(IPv4Address, port.getHost())
            return RunningEmulator(state, port, f"http://127.0.0.1:{address.port}")

        return endpoint.listen(site).addCallback(running)

    return maybeDeferred(listen)


def stop_emulator(emulator: RunningEmulator) -> Deferred[None]:
    """Stop listening and drop every open connection; fires when all is closed."""

    def stop_listening() -> Deferred[None]:
        return emulator.port.stopListening() or succeed(None)

    stopped = maybeDeferred(stop_listening)
    closed = emulator.site.close_connections()
    return gatherResults([stopped, closed]).addCallback(lambda _: None)


# -- a WebSocket client ---------------------------------------------------------------------------


class WebSocketClosed(Exception):
    """The socket closed (or never opened): ``code`` and ``reason`` as the client saw them
    (1006 when the TCP connection dropped without a close frame)."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"WebSocket closed: {code} {reason}")
        self.code = code
        self.reason = reason


class GraphQLWSClient:
    """The client end of one graphql-transport-ws socket; every wait is bounded."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.protocol: _ClientProtocol | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._texts: deque[str] = deque()
        self._waiting: list[Deferred[str]] = []
        self._opened: Deferred[GraphQLWSClient] = Deferred()
        self._closed: Deferred[None] = Deferred()

    @property
    def is_closed(self) -> bool:
        return self._closed.called

    def send(self, message: Mapping[str, Any]) -> None:
        self.send_text(json.dumps(message))

    def send_text(self, text: str) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(text.encode("utf-8"), isBinary=False)

    def subscribe(self, subscription_id: str, query: str) -> None:
        self.send({"id": subscription_id, "type": "subscribe", "payload": {"query": query}})

    def next_text(self, timeout: float | None = None) -> Deferred[str]:
        """The next frame received, as text; fails with WebSocketClosed if the socket closes
        first, or TimeoutError (`defer.TimeoutError`) after ``timeout`` seconds."""
        if self._texts:
            return succeed(self._texts.popleft())
        if self.is_closed:
            return fail(WebSocketClosed(self.close_code, self.close_reason))
        waiter: Deferred[str] = Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(waiter)
        return waiter.addTimeout(self.timeout if timeout is None else timeout, self.reactor)

    def next_message(self, timeout: float | None = None) -> Deferred[Any]:
        """The next frame received, decoded from JSON; see `next_text`."""
        return self.next_text(timeout).addCallback(lambda text: json.loads(text))

    def wait_closed(self, timeout: float | None = None) -> Deferred[tuple[int | None, str | None]]:
        """``(code, reason)`` once the socket has closed."""
        done: Deferred[None] = Deferred()

        def closed(result: object) -> object:
            if not done.called:  # it may have timed out
                done.callback(None)
            return result

        self._closed.addBoth(closed)
        done.addTimeout(self.timeout if timeout is None else timeout, self.reactor)
        return done.addCallback(lambda _: (self.close_code, self.close_reason))

    def abort(self) -> Deferred[None]:
        """Drop the TCP connection; fires once it is gone (a no-op if it already is)."""
        if not self.is_closed:
            self._drop()
        return self.wait_closed().addCallback(lambda _: None)

    def _drop(self) -> None:
        transport: Any = self.protocol.transport if self.protocol is not None else None
        if transport is not None:
            transport.abortConnection()

    # -- from the protocol -------------------------------------------------------------------

    def _received(self, text: str) -> None:
        if self._waiting:
            self._waiting.pop(0).callback(text)
        else:
            self._texts.append(text)

    def _lost(self, code: int | None, reason: str | None) -> None:
        if self.is_closed:
            return
        self.close_code, self.close_reason = code, reason
        closed = WebSocketClosed(code, reason)
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.errback(closed)
        if not self._opened.called:
            self._opened.errback(closed)
        self._closed.callback(None)


class _ClientProtocol(WebSocketClientProtocol):
    factory: _ClientFactory

    @property
    def client(self) -> GraphQLWSClient:
        return self.factory.client

    def connectionMade(self) -> None:
        self.client.protocol = self
        super().connectionMade()

    def onOpen(self) -> None:
        if not self.client._opened.called:  # else it timed out, and is being aborted
            self.client._opened.callback(self.client)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.client._received(payload.decode("utf-8", "replace"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.client._lost(code, reason)

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        cancel_close_handshake_timer(self)
        self.client._lost(1006, "connection lost")  # in case autobahn did not call onClose


class _ClientFactory(WebSocketClientFactory):
    # Twisted's stubs want a protocol whose `factory` is any Factory; ours names its own factory type.
    protocol = _ClientProtocol  # type: ignore[assignment]

    def __init__(self, client: GraphQLWSClient, url: str, protocols: Sequence[str]) -> None:
        super().__init__(url, protocols=list(protocols) or None, reactor=client.reactor)
        self.client = client


def ws_connect(
    reactor: Any,
    url: str,
    api_key: str | None = None,
    *,
    protocols: Sequence[str] = (GRAPHQL_TRANSPORT_WS,),
    timeout: float = 5.0,
) -> Deferred[GraphQLWSClient]:
    """Open ``<url>/graphql`` as a WebSocket (``url`` as `RunningEmulator.url`); fires once
    open, with ``connection_init`` already sent when ``api_key`` is given. Fails with
    WebSocketClosed if the handshake does not complete."""
    address = urlsplit(url)
    assert address.hostname and address.port, url
    client = GraphQLWSClient(reactor, timeout)
    factory = _ClientFactory(client, f"ws://{address.hostname}:{address.port}/graphql", protocols)

    def opened(client: GraphQLWSClient) -> GraphQLWSClient:
        if api_key is not None:
            headers = {"X-API-KEY": api_key, "source": "NODE_SERVER_SDK"}
            client.send({"type": "connection_init", "payload": {"headers": headers}})
        return client

    def not_opened(failure: Any) -> Any:
        connected.cancel()
        client._drop()
        return failure

    def not_connected(failure: Any) -> None:
        if not client._opened.called:
            client._opened.errback(failure)

    endpoint = TCP4ClientEndpoint(reactor, address.hostname, address.port, timeout=timeout)
    connected = endpoint.connect(factory)
    connected.addErrback(not_connected)
    return client._opened.addTimeout(timeout, reactor).addCallbacks(opened, not_opened)
