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
measurement ids. `stop_emulator(emulator)` aborts the open connections, stops listening and
returns a Deferred that fires when both are done, leaving the reactor clean for trial.
"""

from __future__ import annotations

from random import Random
from typing import Any, Mapping, NamedTuple, Sequence

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTime

from stigg_sidecar.emulator.data import parse_data
from stigg_sidecar.emulator.state import EmulatorState
from stigg_sidecar.emulator.web import EmulatorSite


class RunningEmulator(NamedTuple):
    state: EmulatorState
    port: IListeningPort
    url: str

    @property
    def site(self) -> EmulatorSite:
        return self.port.factory  # type: ignore[attr-defined, no-any-return]


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
            return RunningEmulator(state, port, f"http://127.0.0.1:{port.getHost().port}")

        return endpoint.listen(site).addCallback(running)

    return maybeDeferred(listen)


def stop_emulator(emulator: RunningEmulator) -> Deferred[None]:
    """Stop listening and drop every open connection; fires when all is closed."""
    stopped = maybeDeferred(emulator.port.stopListening)
    closed = emulator.site.close_connections()
    return gatherResults([stopped, closed]).addCallback(lambda _: None)
