"""``twistd -n stigg-emulator``: options and service assembly for the local Stigg API emulator.

Owns the command line and start-up: a bad data file stops start-up with one line naming the
place (``stigg-emulator: FILE: customers.acme.entitlements[2].feature.featureType: must be one
of BOOLEAN, NUMBER, ENUM``) and a non-zero exit, without a traceback. Once listening it logs
exactly one line ``stigg-emulator listening on http://HOST:PORT``.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from stigg_sidecar.emulator.data import DataError, load_data_file
from stigg_sidecar.emulator.state import EmulatorState
from stigg_sidecar.emulator.web import EmulatorSite
from stigg_sidecar.lifecycle.reactor import default_reactor

DEFAULT_PORT = 8090


class Options(usage.Options):
    synopsis = "--data FILE [--port PORT] [--interface 127.0.0.1] [--api-key KEY ...]"
    optParameters = [
        ["port", "p", DEFAULT_PORT, "TCP port to listen on; 0 picks a free one.", int],
        ["data", "d", None, "JSON data file: API keys and customers' entitlements (required)."],
        ["interface", "i", "127.0.0.1", "Address to listen on."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["api-keys"] = []

    def opt_api_key(self, key: str) -> None:
        """Accept this API key as well as the data file's (repeatable)."""
        self["api-keys"].append(key)

    def postOptions(self) -> None:
        if not self["data"]:
            raise usage.UsageError("--data FILE is required")
        if not 0 <= self["port"] <= 65535:
            raise usage.UsageError("--port must be between 0 and 65535")


class EmulatorService(service.Service):
    """Listens on an endpoint and says where, once."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, site: EmulatorSite) -> None:
        self.endpoint = endpoint
        self.site = site
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        self.endpoint.listen(self.site).addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = cast(IPv4Address | IPv6Address, port.getHost())
        host = f"[{address.host}]" if ":" in address.host else address.host
        self.log.info(
            "stigg-emulator listening on http://{host}:{port}", host=host, port=address.port
        )

    def _failed(self, failure: Any) -> None:
        reactor = default_reactor()
        self.log.critical("stigg-emulator cannot listen: {error}", error=failure.getErrorMessage())
        reactor.callWhenRunning(reactor.stop)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def makeService(options: Options) -> service.IService:
    """Build the emulator; raises SystemExit with a one-line message if the data is bad."""
    reactor = default_reactor()
    try:
        data = load_data_file(options["data"])
    except DataError as error:
        raise SystemExit(f"stigg-emulator: {error}") from None
    if not data.api_keys and not options["api-keys"]:
        raise SystemExit(
            f"stigg-emulator: {options['data']}: apiKeys is empty and no --api-key was given"
        )
    clock: Any = reactor
    state = EmulatorState(data, clock=clock, api_keys=options["api-keys"])
    site = EmulatorSite(state, reactor=clock)
    endpoint = TCP4ServerEndpoint(reactor, options["port"], interface=options["interface"])
    return EmulatorService(endpoint, site)
