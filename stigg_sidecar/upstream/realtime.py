"""RealtimeService: Stigg's GraphQL WebSocket (graphql-transport-ws), kept alive by ClientService.

Owns the socket: connection_init with the identification headers, the three subscriptions
(re-sent after every reconnect), keep-alive pings with a pong timeout, and the reconnect policy
(jittered exponential backoff capped at 30 s, counted from the last `connection_ack`: a refused
upgrade or a socket closed before the ack connected TCP all the same, and must not reset it).
Hands every `next` payload to an `UpdateSink` on the reactor and tells it when the socket comes
up and goes down. An invalid API key stops the retries for good, logged once. Malformed frames
are logged, counted and ignored.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from stigg_sidecar import spans
from stigg_sidecar.lifecycle.reactor import IReactor
from stigg_sidecar.quoting import clipped
from stigg_sidecar.upstream import wire
from stigg_sidecar.upstream.operations import SUBSCRIPTIONS
from stigg_sidecar.upstream.recovery import StiggRecovery

log = Logger()

SUBPROTOCOL = "graphql-transport-ws"
# The one close after which retrying cannot help, as Stigg's own client decides: every other close
# (server errors included) is retried with backoff.
_INVALID_KEY_REASON = "Invalid API key"


class UpdateSink(Protocol):
    """Where socket events go; every method is called on the reactor."""

    def socket_up(self) -> None: ...

    def socket_down(self) -> None: ...

    def entitlements_updated(self, payload: Mapping[str, Any]) -> None: ...

    def usage_updated(self, payload: Mapping[str, Any]) -> None: ...

    def package_published(self, payload: Mapping[str, Any]) -> None: ...


class GraphqlWsProtocol(WebSocketClientProtocol):
    """One socket's life: init, ack, subscribe, keep alive, dispatch."""

    factory: _Factory
    _connect_span: Any = None

    def connectionMade(self) -> None:
        # The connect is one span: TCP up, the upgrade, connection_init, until Stigg's ack.
        self._connect_span = spans.tracer.start_span(
            "realtime connect", kind=spans.SpanKind.CLIENT,
            attributes={"server.address": self.factory.host, "server.port": self.factory.port},
        )
        super().connectionMade()

    def _connect_ended(self, error: str | None = None) -> None:
        span, self._connect_span = self._connect_span, None
        if span is not None:
            if error is not None:
                span.set_status(spans.Status(spans.StatusCode.ERROR, error))
            span.end()

    def onOpen(self) -> None:
        service = self.factory.service
        self._subscriptions: dict[str, str] = {}
        self._ping_call: IDelayedCall | None = None
        self._pong_deadline: IDelayedCall | None = None
        self._send_json({"type": "connection_init", "payload": {"headers": service.init_headers}})
        # Stigg's client waits for the ack forever; a socket that never gets one is replaced.
        self._ack_deadline: IDelayedCall | None = service.reactor.callLater(service.ack_timeout, self._no_ack)

    def _no_ack(self) -> None:
        self._ack_deadline = None
        log.warn("No connection_ack from Stigg within {t}s; reconnecting", t=self.factory.service.ack_timeout)
        self.dropConnection(abort=True)

    # Not `_send`: autobahn's WebSocketProtocol._send flushes its own send queue.
    def _send_json(self, message: Mapping[str, Any]) -> None:
        self.sendMessage(wire.socket_frame(message))

    def _acknowledged(self) -> None:
        """Stigg accepted the connection: subscribe, start pinging, and tell the service."""
        if self._ack_deadline is not None and self._ack_deadline.active():
            self._ack_deadline.cancel()
        self._ack_deadline = None
        for name, (operation, query) in SUBSCRIPTIONS.items():
            sub_id = str(uuid.uuid4())
            self._subscriptions[sub_id] = name
            self._send_json({"id": sub_id, "type": "subscribe", "payload": {"operationName": operation, "query": query}})
        self._schedule_ping()
        self._connect_ended()
        self.factory.service.connected(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        service = self.factory.service
        try:
            message = wire.socket_message(payload)
        except ValueError as e:
            service.malformed_frame(str(e))
            return
        kind = message["type"]
        if kind == "connection_ack":
            self._acknowledged()
        elif kind == "ping":
            self._send_json({"type": "pong"})
        elif kind == "pong":
            if self._pong_deadline is None:
                return  # unsolicited (the protocol allows it): no ping of ours is waiting
            if self._pong_deadline.active():
                self._pong_deadline.cancel()
            self._pong_deadline = None
            self._schedule_ping()
        elif kind == "next":
            field = self._subscriptions.get(str(message.get("id")))
            update, errors = wire.pushed_data(message, field)
            if field is None or update is None:
                service.malformed_frame(f"unusable {field or 'unknown'} update{f': {errors}' if errors else ''}")
                return
            service.dispatch(field, update)
        elif kind == "error":
            # A refused or failed subscription would leave its updates silently missing while the
            # socket looks healthy: start over (with backoff), as Stigg's client resubscribes.
            log.warn(
                "Stigg ended subscription {field} with an error: {payload}; reconnecting",
                field=self._subscriptions.get(str(message.get("id"))),
                payload=message.get("payload"),
            )
            self.dropConnection(abort=True)
        elif kind == "complete":
            field = self._subscriptions.pop(str(message.get("id")), None)
            log.warn("Stigg completed subscription {field}; reconnecting to resubscribe", field=field)
            self.dropConnection(abort=True)
        else:
            service.malformed_frame(f"unknown message type {kind!r}")

    def _schedule_ping(self) -> None:
        service = self.factory.service
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = service.reactor.callLater(service.ping_interval, self._ping)

    def _ping(self) -> None:
        self._ping_call = None
        self._send_json({"type": "ping"})
        self._pong_deadline = self.factory.service.reactor.callLater(self.factory.service.pong_timeout, self._no_pong)

    def _no_pong(self) -> None:
        log.warn("No pong from Stigg within {t}s; reconnecting", t=self.factory.service.pong_timeout)
        self._pong_deadline = None
        self.dropConnection(abort=True)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # Autobahn can leave its close-handshake timer behind when the TCP side closes first.
        handshake_timer, self.closeHandshakeTimeoutCall = getattr(self, "closeHandshakeTimeoutCall", None), None
        timers = ("_ping_call", "_pong_deadline", "_ack_deadline")
        for call in (*(getattr(self, name, None) for name in timers), handshake_timer):
            if call is not None and call.active():
                call.cancel()
        self._connect_ended(f"closed before Stigg's acknowledgement (code {code})")
        self.factory.service.disconnected(self, code, reason)


class _Factory(WebSocketClientFactory):
    # Twisted's stubs want a protocol whose `factory` is any Factory; ours names its own factory type.
    protocol = GraphqlWsProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, service: RealtimeService, url: str) -> None:
        super().__init__(url, protocols=[SUBPROTOCOL])
        self.service = service
        self.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=10, closeHandshakeTimeout=2)


def _endpoint(reactor: IReactor, ws_url: str) -> tuple[IStreamClientEndpoint, str]:
    parts = urlsplit(f"{ws_url}/graphql")
    if not parts.hostname:
        raise ValueError(f"WS_URL has no host: {ws_url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, parts.hostname, port, timeout=10)
    if secure:
        endpoint = wrapClientTLS(optionsForClientTLS(parts.hostname), endpoint)
    return endpoint, parts.geturl()


_NEVER = 365 * 24 * 3600.0  # seconds: a retry that the stop of the client service cancels first


class RealtimeService(MultiService):
    name = "realtime"

    def __init__(
        self,
        reactor: IReactor,
        ws_url: str,
        init_headers: Mapping[str, Any],
        sink: UpdateSink,
        ping_interval: float = 10.0,
        pong_timeout: float = 10.0,
        ack_timeout: float = 30.0,
        max_delay: float = 30.0,
        jitter: Callable[[], float] = random.random,
        clock: IReactorTime | None = None,
        recovery: StiggRecovery | None = None,
    ) -> None:
        super().__init__()
        self._recovery = recovery  # told when Stigg acknowledges the socket: the breakers close
        self.reactor = reactor
        self.init_headers = dict(init_headers)
        self.sink = sink
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.ack_timeout = ack_timeout
        self.is_connected = False
        self.connections = 0
        self.malformed = 0
        self.last_update: float | None = None
        self.gave_up = False
        self._protocol: GraphqlWsProtocol | None = None
        self._backoff = backoffPolicy(initialDelay=1.0, maxDelay=max_delay, factor=2.0, jitter=jitter)
        self.attempts_since_ack = 0
        endpoint, url = _endpoint(reactor, ws_url)
        self._client = ClientService(
            endpoint,
            _Factory(self, url),
            retryPolicy=self._retry_delay,
            clock=reactor if clock is None else clock,
        )
        self._client.setServiceParent(self)

    def _retry_delay(self, attempts_since_tcp_connect: int) -> float:
        """ClientService counts failed attempts from the last TCP connect, but an upgrade Stigg
        refuses (a 404, a 503 from a proxy) connects TCP first: counted that way every retry
        would be the first, forever. The socket is up only once Stigg acknowledged it."""
        if self.gave_up:
            # Stigg rejected the key: the client service is being stopped (ClientService asks for
            # a delay on the way), so there is no retry to announce and none is made.
            return _NEVER
        self.attempts_since_ack += 1
        delay = self._backoff(self.attempts_since_ack)
        log.info("Real-time socket: retry {n} in {delay:.1f}s", n=self.attempts_since_ack, delay=delay)
        return delay

    # -- events from the protocol -----------------------------------------------------------------

    def connected(self, protocol: GraphqlWsProtocol) -> None:
        self.attempts_since_ack = 0
        self._protocol = protocol
        self.is_connected = True
        self.connections += 1
        log.info("Real-time updates connected (connection {n})", n=self.connections)
        if self._recovery is not None:
            self._recovery.reconnected()
        self.sink.socket_up()

    def disconnected(self, protocol: GraphqlWsProtocol, code: int | None, reason: str | None) -> None:
        self._protocol = None
        was_connected, self.is_connected = self.is_connected, False
        if was_connected:
            log.warn("Real-time updates disconnected (code {code}); cached data stays, refreshed by polling", code=code)
            self.sink.socket_down()
        if reason == _INVALID_KEY_REASON:
            if not self.gave_up:
                self.gave_up = True
                log.error("Stigg closed the real-time socket for good ({code} {reason}); not retrying", code=code, reason=reason)
                if not was_connected:
                    self.sink.socket_down()
                self.reactor.callLater(0, self._client.stopService)

    def dispatch(self, field: str, payload: Mapping[str, Any]) -> None:
        self.last_update = self.reactor.seconds()
        customer = payload.get("customerId")
        resource = payload.get("resourceId")
        attributes = spans.ids(customer if isinstance(customer, str) else None,
                               resource if isinstance(resource, str) else None)
        with spans.tracer.start_as_current_span(f"realtime {field}", kind=spans.SpanKind.CONSUMER,
                                                attributes=attributes):
            self._apply(field, payload)

    def _apply(self, field: str, payload: Mapping[str, Any]) -> None:
        try:
            if field == "entitlementsUpdatedV2":
                self.sink.entitlements_updated(payload)
            elif field == "usageUpdatedV2":
                self.sink.usage_updated(payload)
            elif field == "packagePublished":
                self.sink.package_published(payload)
        except Exception:
            self.malformed += 1
            log.failure("Could not apply a {field} update; ignored", field=field)

    def malformed_frame(self, why: str) -> None:
        self.malformed += 1
        log.warn("Ignored a malformed real-time frame: {why}", why=clipped(why))

    def stopService(self) -> Deferred[Any]:
        # ClientService closes the TCP connection. A WebSocket close frame first would be politer,
        # but autobahn's batched close-handshake timer then outlives the connection.
        self.is_connected = False
        return super().stopService()
