"""Stigg's real-time updates: the ``graphql-transport-ws`` WebSocket at ``/graphql``.

Owns the socket side of the emulator: the graphql-transport-ws protocol (graphql-ws 5.x) as
Stigg's API speaks it to its SDKs, the open sockets with their API keys and subscriptions, and
the fan-out of every `EmulatorState` change to them as ``next`` messages. What a change looks
like to a subscription comes from `graphql.subscription_data`; whether an upgrade is answered at
all (routing, faults, request counts) is decided in `web`.

The conversation, server side (``id`` is the client's subscription id)::

    client                                     server
    {"type":"connection_init",                 {"type":"connection_ack"}
     "payload":{"headers":{"X-API-KEY":k}}}
    {"type":"ping","payload"?:p}               {"type":"pong","payload"?:p}
    {"type":"subscribe","id":i,                {"id":i,"type":"next",
     "payload":{"query":q,...}}                 "payload":{"data":{"<field>":{...}}}}  per change
                                               {"id":i,"type":"error","payload":[{"message"}]}
                                                   if q is not one of the subscriptions below
    {"type":"complete","id":i}                 (no more ``next`` for i)

Subscriptions: entitlementsUpdatedV2, usageUpdatedV2, packagePublished, and the v1
entitlementsUpdated, usageUpdated, creditBalanceUpdated. Every change goes to
every acknowledged socket that subscribed to its field: the emulator has one environment, which
all of its API keys share. Closes (code, reason), as graphql-ws's server closes:

    4406 Subprotocol not acceptable          the client did not offer graphql-transport-ws
    4408 Connection initialisation timeout   no connection_init within `SocketHub.init_timeout`
    4401 Invalid API key                     connection_init without a known X-API-KEY
    4429 Too many initialisation requests    a second connection_init
    4401 Unauthorized                        subscribe before connection_ack
    4409 Subscriber for <id> already exists  subscribe with an id in use
    4400 Invalid message received            not JSON, not a known message, or a bad shape
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.logger import Logger

from stigg_sidecar.emulator import graphql
from stigg_sidecar.emulator.model import FaultsChanged, StateChange
from stigg_sidecar.emulator.state import EmulatorState

GRAPHQL_TRANSPORT_WS = "graphql-transport-ws"
INVALID_API_KEY = "Invalid API key"  # the reason Stigg's SDK treats as "give up for good"

BAD_REQUEST = 4400
UNAUTHORIZED = 4401
SUBPROTOCOL_NOT_ACCEPTABLE = 4406
CONNECTION_INITIALISATION_TIMEOUT = 4408
SUBSCRIBER_ALREADY_EXISTS = 4409
TOO_MANY_INITIALISATION_REQUESTS = 4429

_CLIENT_MESSAGES = ("connection_init", "ping", "pong", "subscribe", "complete")


def parse_message(data: bytes) -> dict[str, Any]:
    """A client message, validated as graphql-ws 5.x validates them; raises ValueError."""
    message = json.loads(data.decode("utf-8"))
    if not isinstance(message, dict) or message.get("type") not in _CLIENT_MESSAGES:
        raise ValueError("not a graphql-transport-ws client message")
    kind = message["type"]
    if kind in ("subscribe", "complete"):
        if not isinstance(message.get("id"), str) or not message["id"]:
            raise ValueError(f"{kind}: id must be a non-empty string")
    if kind == "subscribe":
        payload = message.get("payload")
        if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
            raise ValueError("subscribe: payload.query must be a string")
        for name, kinds in (("variables", dict), ("extensions", dict), ("operationName", str)):
            if payload.get(name) is not None and not isinstance(payload[name], kinds):
                raise ValueError(f"subscribe: payload.{name} has the wrong type")
    elif kind != "complete" and message.get("payload") is not None:
        if not isinstance(message["payload"], dict):
            raise ValueError(f"{kind}: payload must be an object")
    return message


class GraphQLTransportWSProtocol(WebSocketServerProtocol):
    """One client's socket: its handshake state, API key and subscriptions."""

    factory: SocketFactory

    def __init__(self) -> None:
        super().__init__()
        self.api_key: str | None = None
        self.acknowledged = False
        self.subscriptions: dict[str, tuple[str, str]] = {}  # id -> (response key, field)
        self._init_received = False
        self._subprotocol_ok = False
        self._closing = False
        self._init_timer: IDelayedCall | None = None

    @property
    def hub(self) -> SocketHub:
        return self.factory.hub

    def onConnect(self, request: ConnectionRequest) -> str | None:
        # graphql-ws accepts the upgrade without a subprotocol, then closes with 4406.
        self._subprotocol_ok = GRAPHQL_TRANSPORT_WS in request.protocols
        return GRAPHQL_TRANSPORT_WS if self._subprotocol_ok else None

    def onOpen(self) -> None:
        self.hub.opened(self)
        if not self._subprotocol_ok:
            self.close(SUBPROTOCOL_NOT_ACCEPTABLE, "Subprotocol not acceptable")
            return
        self._init_timer = self.hub.reactor.callLater(self.hub.init_timeout, self._init_timed_out)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._closing:
            return
        try:
            message = parse_message(payload)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
            self.close(BAD_REQUEST, "Invalid message received")
            return
        getattr(self, "_on_" + message["type"])(message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._cancel_init_timer()
        self.subscriptions.clear()
        self.hub.closed(self)

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        cancel_close_handshake_timer(self)

    # -- messages ----------------------------------------------------------------------------

    def _on_connection_init(self, message: Mapping[str, Any]) -> None:
        if self._init_received:
            self.close(TOO_MANY_INITIALISATION_REQUESTS, "Too many initialisation requests")
            return
        self._init_received = True
        self._cancel_init_timer()
        key = _api_key((message.get("payload") or {}).get("headers"))
        if not self.hub.state.is_authorized(key):
            self.close(UNAUTHORIZED, INVALID_API_KEY)
            return
        self.api_key, self.acknowledged = key, True
        self.send({"type": "connection_ack"})

    def _on_ping(self, message: Mapping[str, Any]) -> None:
        pong: dict[str, Any] = {"type": "pong"}
        if message.get("payload") is not None:
            pong["payload"] = message["payload"]
        self.send(pong)

    def _on_pong(self, message: Mapping[str, Any]) -> None:
        pass

    def _on_subscribe(self, message: Mapping[str, Any]) -> None:
        if not self.acknowledged:
            self.close(UNAUTHORIZED, "Unauthorized")
            return
        subscription_id = message["id"]
        if subscription_id in self.subscriptions:
            self.close(
                SUBSCRIBER_ALREADY_EXISTS, f"Subscriber for {subscription_id} already exists"
            )
            return
        root = graphql.subscription_field(message["payload"]["query"])
        if root is None or root[1] not in graphql.SUBSCRIPTIONS:
            asked = f'"{root[1]}"' if root else "no subscription"
            text = (
                f"Unknown subscription: {asked}: the Stigg emulator serves "
                f"{', '.join(graphql.SUBSCRIPTIONS)}"
            )
            error = {"message": text, "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}}
            self.send({"id": subscription_id, "type": "error", "payload": [error]})
            return
        self.subscriptions[subscription_id] = root

    def _on_complete(self, message: Mapping[str, Any]) -> None:
        self.subscriptions.pop(message["id"], None)

    # -- out ---------------------------------------------------------------------------------

    def deliver(self, change: StateChange) -> None:
        """Send ``change`` to each of this socket's subscriptions that receives it."""
        for subscription_id, (key, field) in list(self.subscriptions.items()):
            for data in graphql.subscription_events(field, change):
                payload = {"data": {key: data}}
                self.send({"id": subscription_id, "type": "next", "payload": payload})

    def send(self, message: Mapping[str, Any]) -> None:
        self.send_text(json.dumps(message))

    def send_text(self, text: str) -> None:
        if not self._closing:
            self.sendMessage(text.encode("utf-8"), isBinary=False)

    def close(self, code: int, reason: str) -> None:
        """Close as graphql-ws does: a close frame with ``code`` and ``reason``."""
        self._closing = True
        self._cancel_init_timer()
        self.subscriptions.clear()
        self.sendClose(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame: the client sees 1006."""
        self._closing = True
        cast(ITCPTransport, self.transport).abortConnection()

    def _init_timed_out(self) -> None:
        self._init_timer = None
        if not self._init_received:
            self.close(CONNECTION_INITIALISATION_TIMEOUT, "Connection initialisation timeout")

    def _cancel_init_timer(self) -> None:
        if self._init_timer is not None and self._init_timer.active():
            self._init_timer.cancel()
        self._init_timer = None


class SocketFactory(WebSocketServerFactory):
    # Twisted's stubs want a protocol whose `factory` is any Factory; ours names its own factory type.
    protocol = GraphQLTransportWSProtocol  # type: ignore[assignment]

    def __init__(self, hub: SocketHub) -> None:
        super().__init__(reactor=hub.reactor)
        self.hub = hub

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.hub.track(protocol)
        return protocol


class SocketHub:
    """The open sockets of one emulator; delivers every state change to them.

    ``resource`` is the `WebSocketResource` to render for an upgrade request. ``track`` is
    called with each new socket protocol before it is connected (`EmulatorSite` uses it to
    close sockets with its other connections). Setting the ``down`` fault drops every socket.
    """

    log = Logger()

    def __init__(
        self,
        state: EmulatorState,
        reactor: Any,
        *,
        track: Callable[[Any], None] = lambda protocol: None,
        init_timeout: float = 3.0,  # graphql-ws's connectionInitWaitTimeout
    ) -> None:
        self.state = state
        self.reactor = reactor
        self.track = track
        self.init_timeout = init_timeout
        self._open: list[GraphQLTransportWSProtocol] = []
        self.factory = SocketFactory(self)
        self.resource = WebSocketResource(self.factory)
        state.add_listener(self._state_changed)

    def opened(self, socket: GraphQLTransportWSProtocol) -> None:
        self._open.append(socket)

    def closed(self, socket: GraphQLTransportWSProtocol) -> None:
        if socket in self._open:
            self._open.remove(socket)

    def counts(self) -> dict[str, int]:
        """Open sockets, and the subscriptions they hold."""
        return {
            "connected": len(self._open),
            "subscriptions": sum(len(socket.subscriptions) for socket in self._open),
        }

    def subscribers(self, field: str) -> int:
        """How many subscriptions to ``field`` are open."""
        return sum(
            1 for socket in self._open for _, f in socket.subscriptions.values() if f == field
        )

    def drop_all(self) -> int:
        """Abort every open socket, like a network failure; returns how many."""
        sockets = list(self._open)
        for socket in sockets:
            socket.abort()
        return len(sockets)

    def send_raw(self, text: str, api_key: str | None = None) -> int:
        """Send ``text`` as it is to every acknowledged socket (of ``api_key`` if given)."""
        sockets = [
            socket
            for socket in self._open
            if socket.acknowledged and (api_key is None or socket.api_key == api_key)
        ]
        for socket in sockets:
            socket.send_text(text)
        return len(sockets)

    def _state_changed(self, change: StateChange) -> None:
        if isinstance(change, FaultsChanged):
            if change.faults["down"]:
                self.drop_all()
            return
        for socket in list(self._open):
            if socket.acknowledged:
                try:
                    socket.deliver(change)
                except Exception:  # one broken socket must not fail the change for the rest
                    self.log.failure("delivering {change} failed", change=change)


def cancel_close_handshake_timer(protocol: Any) -> None:
    """Autobahn leaves its close-handshake timer running when the TCP connection is lost
    mid-handshake; cancel it so that no timer outlives the connection."""
    call, protocol.closeHandshakeTimeoutCall = protocol.closeHandshakeTimeoutCall, None
    if call is not None:
        call.cancel()


def _api_key(headers: object) -> str | None:
    if not isinstance(headers, Mapping):
        return None
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() == "x-api-key" and isinstance(value, str):
            return value
    return None
