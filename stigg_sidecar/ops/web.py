"""The HTTP side: liveness, readiness (and metrics) on HTTP_PORT, as a Klein app and a service.

Owns the routes, the listening port and its connection timeouts (idle between requests, and a
deadline for each request's headers); reads Readiness, never changes it. No route takes a body: a
request that declares one is answered (405 or 413) and closed before a byte of it is read, so a
client can neither trickle a body to hold a connection nor make the process store one.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, cast

from klein import Klein
from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort, IReactorTCP, ITCPTransport
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException

from stigg_sidecar.lifecycle.listening import listen_error
from stigg_sidecar.ops.metrics import CONTENT_TYPE, CachedPage, Metrics
from stigg_sidecar.ops.readiness import Readiness

log = Logger()


def _json(request: Request, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode()


def health_app(
    health_path: str, ready_path: str, readiness: Readiness, metrics: Metrics | None = None, metrics_max_age: float = 0.0
) -> Klein:
    """The routes; `/metrics` is rendered at most once per `metrics_max_age` seconds (see CachedPage)."""
    app = Klein()

    if metrics is not None:
        cached = CachedPage(metrics.exposition, metrics_max_age)

        @app.route("/metrics", methods=["GET"])
        def metrics_page(request: Request) -> bytes:
            request.setHeader(b"content-type", CONTENT_TYPE.encode())
            return cached.page()

    @app.route(f"/{health_path}", methods=["GET", "HEAD"])
    def livez(request: Request) -> bytes:
        return _json(request, 200, {"status": "UP"})

    @app.route(f"/{ready_path}", methods=["GET", "HEAD"])
    def readyz(request: Request) -> bytes:
        if readiness.ready:
            return _json(request, 200, {"status": "UP"})
        return _json(request, 503, {"status": "DOWN", "reasons": readiness.reasons})

    @app.handle_errors
    def errors(request: Any, failure: Any) -> bytes:
        if failure.check(HTTPException):
            code = failure.value.code
            return _json(request, code, {"error": failure.value.name})
        log.failure("HTTP handler failed", failure)
        return _json(request, 500, {"error": "internal error"})

    return app


class _DecodableOnly(Resource):
    """Answers 400 to a request whose path or host is not UTF-8, before Klein sees it: Klein
    would log a full traceback for each such request (anyone reaching the port could fill the
    logs with them) before answering the same 400."""

    isLeaf = True

    def __init__(self, app: IResource) -> None:
        super().__init__()
        self._app = app

    def render(self, request: Any) -> bytes:
        try:
            request.getRequestHostname().decode("utf-8")
            b"/".join(request.prepath + request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            return _json(request, 400, {"error": "Bad Request"})
        return self._app.render(request)


class _DeadlineChannel(HTTPChannel):
    """An HTTP/1.1 connection whose request headers must be complete within `header_timeout`
    seconds of the connection opening or of their first byte.

    Twisted's own timeout (`timeOut`, the idle timeout) restarts on every byte, so a client sending
    a header byte every few seconds would hold the connection forever without it.
    """

    header_timeout: float | None = None
    _header_deadline: IDelayedCall | None = None
    _refused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_header_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        # Line mode: between requests or inside a request line and headers (the body is raw mode).
        if self.line_mode:
            self._start_header_deadline()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._stop_header_deadline()
        if self.length != 0:  # a Content-Length above 0, or chunked (None): a body is coming
            self._refuse_body()
            return
        super().allHeadersReceived()

    def _refuse_body(self) -> None:
        """Answer at once and close: no route takes a body, so none is read (nor buffered)."""
        command = getattr(self, "_command", b"")
        if command in (b"GET", b"HEAD"):
            status, error = b"413 Content Too Large", b"Request bodies are not accepted"
        else:
            status, error = b"405 Method Not Allowed", b"Method Not Allowed"
        body = b'{"error": "' + error + b'"}'
        transport = cast(ITCPTransport, self.transport)
        transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self._refused = True  # what arrives after the answer is dropped, never parsed as a body
        self.setTimeout(None)
        self.loseConnection()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_header_deadline()
        super().connectionLost(reason)

    def timeoutConnection(self) -> None:
        # Twisted logs each timeout at info: anyone reaching the port could fill the log with them.
        # Nothing is owed to a client that sent nothing for the idle timeout or too slow a request.
        transport = cast(ITCPTransport, self.transport)  # a TCP port's connection
        log.debug("HTTP connection from {peer} timed out", peer=str(transport.getPeer()))
        transport.abortConnection()

    def _start_header_deadline(self) -> None:
        if self._header_deadline is None and self.header_timeout is not None:
            self._header_deadline = self.callLater(self.header_timeout, self._headers_too_slow)

    def _stop_header_deadline(self) -> None:
        deadline, self._header_deadline = self._header_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        self.timeoutConnection()


class _NoBodyRequest(Request):
    """A request whose body buffer is always in memory: Twisted's own puts a body over 100 KB (or
    any chunked one) in a temporary file. Bodies are refused before they are read (see
    `_DeadlineChannel`), so this buffer stays empty."""

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()


class _QuietSite(Site):
    """Probes hit these paths every few seconds; an access log line each would drown the logs.

    Connections are `_DeadlineChannel`s (HTTP/1.1 only: the port has no TLS, so no HTTP/2).
    """

    noisy = False
    protocol = _DeadlineChannel  # type: ignore[assignment]
    requestFactory = _NoBodyRequest

    def __init__(self, resource: IResource, idle_timeout: float, header_timeout: float) -> None:
        super().__init__(resource, timeout=idle_timeout)
        self._header_timeout = header_timeout

    def buildProtocol(self, addr: IAddress | None) -> Any:
        channel = super().buildProtocol(addr)
        channel.header_timeout = self._header_timeout
        return channel

    def log(self, request: Any) -> None:
        pass


class HttpService(Service):
    """Serve a Klein app on `address:port`; `port` is the bound port once listening.

    Listens in privilegedStartService, as Twisted's own servers do, so a taken port stops start-up.
    """

    name = "http"

    def __init__(
        self, app: Klein, address: str, port: int, reactor: IReactorTCP, idle_timeout: float = 60.0, header_timeout: float = 10.0,
        address_setting: str = "BIND_ADDRESS",
    ) -> None:
        self._site = _QuietSite(_DecodableOnly(app.resource()), idle_timeout, header_timeout)
        self._reactor = reactor
        self._address = address
        self._requested_port = port
        self._address_setting = address_setting  # named when the address cannot be bound
        self._listening: IListeningPort | None = None
        self.port: int | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            # Site is a ServerFactory; Twisted's annotations want one with a type argument.
            site = cast(ServerFactory, self._site)
            self._listening = self._reactor.listenTCP(self._requested_port, site, interface=self._address)
        except CannotListenError as e:
            raise listen_error("HTTP_PORT", self._address, self._requested_port, e, self._address_setting) from None
        self.port = cast(IPv4Address, self._listening.getHost()).port  # IPv4Address or IPv6Address: both have it
        log.info("HTTP listening on {address}:{port}", address=self._address, port=self.port)

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred | None:
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is not None:
            return listening.stopListening()
        return None
