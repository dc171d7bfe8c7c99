"""The emulator's HTTP face: Stigg's Edge and GraphQL endpoints, faults, and the admin API.

Owns HTTP: routing (Klein), the ``X-API-KEY`` check on Edge paths, JSON encoding, request
counting, and applying the fault settings (latency through the reactor's ``callLater``, error
statuses, malformed bodies, dropped connections). Every decision about Stigg data is delegated
to `EmulatorState` and `graphql`; the WebSocket conversation after an upgrade to `websocket`.

Stigg endpoints (counted under the name in brackets; faults apply):
  GET  /v1/c/{customerId}/entitlements-state.json[?resourceId=]   [the path template]
  GET  /v1/c/{customerId}/entitlements.json[?resourceId=]         [the path template]
  GET  /v1/config/server-sdk-configuration.json                   [the path]
  POST /graphql                           [the operation name, or "/graphql" if there is none]
  GET  /graphql with Upgrade: websocket   ["/graphql (websocket)"]  graphql-transport-ws; the
       faults apply to the upgrade (down drops it, latency delays it, error_status answers it),
       except ``malformed``; setting ``down`` also drops the open sockets.
Admin endpoints (no key, never faulted):
  PUT  /_emulator/customers/{customerId}[?resourceId=]  body {"accessDeniedReason", "entitlements"},
       without resourceId also "resources" (the data file's customer shape): when given, they
       replace the customer's resources (one entitlementsUpdated each, removed ones included)
  GET  /_emulator/usage, GET /_emulator/events          what was reported, oldest first
  GET  /_emulator/requests, POST /_emulator/requests/reset
  GET  /_emulator/faults, POST /_emulator/faults        body: any of the `Faults` settings
  POST /_emulator/publish        body {"migrationType", "packageRefId"?, "packageType"?,
                                 "packageVersion"?}: packagePublished to the subscribers
  POST /_emulator/disconnect     abort every WebSocket (clients see 1006): {"disconnected": N}
  GET  /_emulator/sockets        {"connected": N, "subscriptions": M}
  POST /_emulator/sockets/send   body {"text", "apiKey"?}: that text as one frame to every
                                 acknowledged socket (of that key): {"sent": N}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from stigg_sidecar.emulator import graphql
from stigg_sidecar.emulator.data import DataError, parse_customer, parse_entity_state
from stigg_sidecar.emulator.state import EmulatorState
from stigg_sidecar.emulator.websocket import SocketHub
from stigg_sidecar.lifecycle.reactor import default_reactor

EDGE_ENTITLEMENTS_STATE = "/v1/c/{customerId}/entitlements-state.json"
EDGE_ENTITLEMENTS = "/v1/c/{customerId}/entitlements.json"
EDGE_SDK_CONFIGURATION = "/v1/config/server-sdk-configuration.json"
GRAPHQL = "/graphql"
GRAPHQL_WEBSOCKET = "/graphql (websocket)"

Answer = tuple[int, Any]  # HTTP status, JSON-able body
_UNAUTHORIZED: Answer = (401, graphql.error_response("Unauthenticated", "Unauthenticated"))
_MALFORMED_BODY = b'{"data": {"entitlementsState": {"__typename": "Entitlem'


class EmulatorApp:
    """The Klein application over one `EmulatorState`."""

    app = Klein()

    def __init__(
        self, state: EmulatorState, reactor: IReactorTime, sockets: SocketHub | None = None
    ) -> None:
        self.state = state
        self.reactor = reactor
        self.sockets = sockets if sockets is not None else SocketHub(state, reactor)

    # -- Stigg endpoints -----------------------------------------------------------------------

    @app.route("/v1/c/<path:customerId>/entitlements-state.json", methods=["GET"])
    def edge_entitlements_state(self, request: IRequest, customerId: str) -> Any:
        def answer() -> Answer:
            state = self.state.entitlements_state(customerId, _query_arg(request, "resourceId"))
            return 200, {"data": {"entitlementsState": state}}

        return self._stigg(request, EDGE_ENTITLEMENTS_STATE, self._edge(request, answer))

    @app.route("/v1/c/<path:customerId>/entitlements.json", methods=["GET"])
    def edge_entitlements(self, request: IRequest, customerId: str) -> Any:
        def answer() -> Answer:
            items = self.state.entitlements_v1(customerId, _query_arg(request, "resourceId"))
            return 200, {"data": {"entitlements": items}}

        return self._stigg(request, EDGE_ENTITLEMENTS, self._edge(request, answer))

    @app.route("/v1/config/server-sdk-configuration.json", methods=["GET"])
    def edge_sdk_configuration(self, request: IRequest) -> Any:
        def answer() -> Answer:
            return 200, {"data": {"sdkConfiguration": dict(graphql.SDK_CONFIGURATION)}}

        return self._stigg(request, EDGE_SDK_CONFIGURATION, self._edge(request, answer))

    @app.route("/graphql", methods=["POST"])
    def graphql_endpoint(self, request: IRequest) -> Any:
        try:
            body = json.loads(request.content.read())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as error:
            bad = graphql.error_response("BAD_REQUEST", f"Malformed JSON body: {error}")
            return self._stigg(request, GRAPHQL, lambda: (400, bad))
        name = graphql.operation_name(body)
        api_key = _header(request, b"x-api-key")
        return self._stigg(
            request, name or GRAPHQL, lambda: graphql.execute(self.state, name, body, api_key)
        )

    @app.route("/graphql", methods=["GET"])
    def graphql_websocket(self, request: IRequest) -> Any:
        upgrade = (_header(request, b"upgrade") or "").lower()
        if upgrade != "websocket":
            message = "GET /graphql is for WebSocket upgrades (graphql-transport-ws); POST queries"
            return _json(request, 400, graphql.error_response("BAD_REQUEST", message))
        self.state.count_request(GRAPHQL_WEBSOCKET)
        faults = self.state.faults
        if faults.down:
            request.transport.abortConnection()  # type: ignore[attr-defined]
            return Deferred()
        if faults.latency_ms > 0:
            return deferLater(self.reactor, faults.latency_ms / 1000, self._upgrade, request)
        return self._upgrade(request)

    def _upgrade(self, request: IRequest) -> Any:
        status = self.state.faults.error_to_inject(self.state.random)
        if status is not None:
            message = f"Emulated fault: HTTP {status}"
            return _json(request, status, graphql.error_response("EMULATED_FAULT", message))
        return self.sockets.resource  # Klein renders it: autobahn takes the connection over

    @app.route("/v1/<path:rest>", methods=["GET"])
    def edge_unknown(self, request: IRequest, rest: str) -> Any:
        return _json(request, 404, graphql.error_response("NOT_FOUND", f"No Edge path /v1/{rest}"))

    # -- admin ---------------------------------------------------------------------------------

    @app.route("/_emulator/customers/<path:customerId>", methods=["PUT"])
    def admin_put_customer(self, request: IRequest, customerId: str) -> Any:
        resource_id = _query_arg(request, "resourceId")
        try:
            body = json.loads(request.content.read())
            if resource_id is None:
                customer = parse_customer(body)
            else:
                entity = parse_entity_state(body)
        except (ValueError, DataError) as error:  # DataError is a ValueError; explicit for readers
            return _json(request, 400, {"error": str(error)})
        answer: dict[str, Any] = {"customerId": customerId, "resourceId": resource_id}
        if resource_id is not None:
            self.state.replace(customerId, resource_id, entity)
        else:
            self.state.replace(customerId, None, customer.state)
            if "resources" in body:  # the data file's shape: these become the resources
                self.state.replace_resources(customerId, customer.resources)
                answer["resources"] = {
                    rid: self.state.entitlements_state(customerId, rid) for rid in customer.resources
                }
        answer["entitlementsState"] = self.state.entitlements_state(customerId, resource_id)
        return _json(request, 200, answer)

    @app.route("/_emulator/usage", methods=["GET"])
    def admin_usage(self, request: IRequest) -> Any:
        return _json(request, 200, self.state.usage_log())

    @app.route("/_emulator/events", methods=["GET"])
    def admin_events(self, request: IRequest) -> Any:
        return _json(request, 200, self.state.event_log())

    @app.route("/_emulator/requests", methods=["GET"])
    def admin_requests(self, request: IRequest) -> Any:
        return _json(request, 200, self.state.request_counts())

    @app.route("/_emulator/requests/reset", methods=["POST"])
    def admin_reset_requests(self, request: IRequest) -> Any:
        self.state.reset_request_counts()
        return _json(request, 200, self.state.request_counts())

    @app.route("/_emulator/faults", methods=["GET"])
    def admin_get_faults(self, request: IRequest) -> Any:
        return _json(request, 200, self.state.faults.as_json())

    @app.route("/_emulator/faults", methods=["POST"])
    def admin_set_faults(self, request: IRequest) -> Any:
        try:
            body = json.loads(request.content.read())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            self.state.faults.update(body)
        except ValueError as error:
            return _json(request, 400, {"error": str(error)})
        return _json(request, 200, self.state.faults.as_json())

    @app.route("/_emulator/publish", methods=["POST"])
    def admin_publish(self, request: IRequest) -> Any:
        try:
            body = json.loads(request.content.read())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            unknown = set(body) - {"migrationType", "packageRefId", "packageType", "packageVersion"}
            if unknown:
                raise ValueError(f"{sorted(unknown)[0]}: unknown field")
            options = {
                "package_ref_id": body.get("packageRefId"),
                "package_type": body.get("packageType"),
                "package_version": body.get("packageVersion"),
            }
            subscribers = self.sockets.subscribers(graphql.PACKAGE_PUBLISHED)
            published = self.state.publish_package(
                body.get("migrationType"),  # type: ignore[arg-type]
                **{name: value for name, value in options.items() if value is not None},
            )
        except ValueError as error:
            return _json(request, 400, {"error": str(error)})
        payload = graphql.subscription_data(graphql.PACKAGE_PUBLISHED, published)
        return _json(request, 200, {"packagePublished": payload, "subscribers": subscribers})

    @app.route("/_emulator/disconnect", methods=["POST"])
    def admin_disconnect(self, request: IRequest) -> Any:
        return _json(request, 200, {"disconnected": self.sockets.drop_all()})

    @app.route("/_emulator/sockets", methods=["GET"])
    def admin_sockets(self, request: IRequest) -> Any:
        return _json(request, 200, self.sockets.counts())

    @app.route("/_emulator/sockets/send", methods=["POST"])
    def admin_sockets_send(self, request: IRequest) -> Any:
        try:
            body = json.loads(request.content.read())
            if not isinstance(body, dict) or not isinstance(body.get("text"), str):
                raise ValueError('the body must be {"text": "<frame>", "apiKey"?: "<key>"}')
            api_key = body.get("apiKey")
            if api_key is not None and not isinstance(api_key, str):
                raise ValueError("apiKey: must be a string")
        except ValueError as error:
            return _json(request, 400, {"error": str(error)})
        return _json(request, 200, {"sent": self.sockets.send_raw(body["text"], api_key)})

    # -- plumbing ------------------------------------------------------------------------------

    def _edge(self, request: IRequest, answer: Callable[[], Answer]) -> Callable[[], Answer]:
        def checked() -> Answer:
            if not self.state.is_authorized(_header(request, b"x-api-key")):
                return _UNAUTHORIZED
            return answer()

        return checked

    def _stigg(self, request: IRequest, endpoint: str, answer: Callable[[], Answer]) -> Any:
        """Count the request, then answer it through the faults in force."""
        self.state.count_request(endpoint)
        faults = self.state.faults
        if faults.down:
            request.transport.abortConnection()  # type: ignore[attr-defined]
            return Deferred()  # never fires; Klein cancels it when the connection is gone
        if faults.latency_ms > 0:
            return deferLater(self.reactor, faults.latency_ms / 1000, self._answer, request, answer)
        return self._answer(request, answer)

    def _answer(self, request: IRequest, answer: Callable[[], Answer]) -> bytes:
        faults = self.state.faults
        status = faults.error_to_inject(self.state.random)
        if status is not None:
            message = f"Emulated fault: HTTP {status}"
            return _json(request, status, graphql.error_response("EMULATED_FAULT", message))
        if faults.malformed:
            request.setHeader(b"content-type", b"application/json")
            return _MALFORMED_BODY
        return _json(request, *answer())


class EmulatorSite(Site):
    """A `Site` serving one `EmulatorState`; tracks its connections so tests can close them.

    ``sockets`` is the `SocketHub` of its WebSockets, which are among the tracked connections.
    No access log: `EmulatorState.request_counts` is the record of what was asked.
    """

    noisy = False

    def __init__(self, state: EmulatorState, reactor: IReactorTime | None = None) -> None:
        if reactor is None:
            reactor = default_reactor()
        self.state = state
        self.sockets = SocketHub(state, reactor, track=self._track)
        super().__init__(EmulatorApp(state, reactor, self.sockets).app.resource(), reactor=reactor)
        self._open: set[Any] = set()
        self._all_closed: list[Deferred[None]] = []

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self._track(protocol)
        return protocol

    def _track(self, protocol: Any) -> None:
        """Count ``protocol``'s transport as open from its connection until its loss.

        A WebSocket upgrade hands the HTTP channel's transport to a new protocol, whose
        ``connectionLost`` is then the one called: the hub tracks that protocol too.
        """
        made, lost = protocol.makeConnection, protocol.connectionLost
        transports: list[Any] = []

        def make_connection(transport: Any) -> None:
            transports.append(transport)
            self._open.add(transport)
            made(transport)

        def connection_lost(reason: Any) -> None:
            self._open.difference_update(transports)
            lost(reason)
            if not self._open:
                waiters, self._all_closed = self._all_closed, []
                for waiter in waiters:
                    waiter.callback(None)

        protocol.makeConnection = make_connection
        protocol.connectionLost = connection_lost

    def close_connections(self) -> Deferred[None]:
        """Abort every open connection, WebSockets included; fires once all of them are gone."""
        if not self._open:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._all_closed.append(waiter)
        for transport in list(self._open):
            transport.abortConnection()
        return waiter


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("utf-8", "replace") if value is not None else None


def _query_arg(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode())
    if not values or not values[0]:
        return None
    return values[0].decode("utf-8", "replace")


def _json(request: IRequest, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode("utf-8")
