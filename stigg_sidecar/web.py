"""The HTTP side: liveness, readiness (and metrics) on HTTP_PORT, as a Klein app and a service.

Owns the routes and the listening port; reads Readiness, never changes it.
"""

from __future__ import annotations

import json

from klein import Klein
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from stigg_sidecar.health import Readiness
from stigg_sidecar.metrics import CONTENT_TYPE, Metrics
from stigg_sidecar.startup import listen_error

log = Logger()


def _json(request, status: int, body: dict) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode()


def health_app(health_path: str, ready_path: str, readiness: Readiness, metrics: Metrics | None = None) -> Klein:
    app = Klein()

    if metrics is not None:

        @app.route("/metrics", methods=["GET"])
        def metrics_page(request):
            request.setHeader(b"content-type", CONTENT_TYPE.encode())
            return metrics.exposition()

    @app.route(f"/{health_path}", methods=["GET", "HEAD"])
    def livez(request):
        return _json(request, 200, {"status": "UP"})

    @app.route(f"/{ready_path}", methods=["GET", "HEAD"])
    def readyz(request):
        if readiness.ready:
            return _json(request, 200, {"status": "UP"})
        return _json(request, 503, {"status": "DOWN", "reasons": readiness.reasons})

    @app.handle_errors
    def errors(request, failure):
        from werkzeug.exceptions import HTTPException

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

    def render(self, request):
        try:
            request.getRequestHostname().decode("utf-8")
            b"/".join(request.prepath + request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            return _json(request, 400, {"error": "Bad Request"})
        return self._app.render(request)


class _QuietSite(Site):
    """Probes hit these paths every few seconds; an access log line each would drown the logs."""

    noisy = False

    def log(self, request) -> None:
        pass


class HttpService(Service):
    """Serve a Klein app on `address:port`; `port` is the bound port once listening.

    Listens in privilegedStartService, as Twisted's own servers do, so a taken port stops start-up.
    """

    name = "http"

    def __init__(self, app: Klein, address: str, port: int, reactor) -> None:
        self._site = _QuietSite(_DecodableOnly(app.resource()))
        self._reactor = reactor
        self._address = address
        self._requested_port = port
        self._listening: IListeningPort | None = None
        self.port: int | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            self._listening = self._reactor.listenTCP(self._requested_port, self._site, interface=self._address)
        except CannotListenError as e:
            raise listen_error("HTTP_PORT", self._address, self._requested_port, e) from None
        self.port = self._listening.getHost().port  # type: ignore[union-attr]  # an IPv4/6 address
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
