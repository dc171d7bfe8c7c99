"""KeyCheck: the lifecycle of the connection to Stigg, starting with the API key.

On start it validates the API key (Stigg's SDK-configuration call) with readiness blocked until
that first attempt ends. A rejected key keeps readiness DOWN with the reason, is logged once, and
switches reads to fallbacks. An unreachable Stigg must never take the application's pod out of
service, so then readiness is released and the check keeps retrying in the background. On stop it
cancels the retry and closes the connection pools.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from stigg_sidecar.contracts import ApiKeyState
from stigg_sidecar.lifecycle.stopping import StopBudget
from stigg_sidecar.upstream.errors import Problem, UpstreamError

log = Logger()


class ReadinessGate(Protocol):
    """What the key check does to readiness (`ops.readiness.Readiness`): hold it back, let it go."""

    def block(self, name: str, reason: str) -> None: ...

    def unblock(self, name: str) -> None: ...


class KeyedApi(Protocol):
    """What the key check uses of Stigg's client (`upstream.api.StiggApi`)."""

    def validate_key(self, timeout: float) -> Deferred: ...

    def close(self, within: float | None = None) -> Deferred: ...


class KeyCheck(Service):
    name = "key-check"

    def __init__(
        self,
        reactor: IReactorTime,
        api: KeyedApi,
        key: ApiKeyState,
        readiness: ReadinessGate,
        timeout: float,
        max_retry_delay: float = 60.0,
        on_init_error: Callable[[], Any] = lambda: None,
        budget: StopBudget | None = None,
    ) -> None:
        self._on_init_error = on_init_error
        self._budget = budget  # the stop's deadline: requests to Stigg still in flight are cut there
        self._reactor = reactor
        self._api = api
        self._key = key
        self._readiness = readiness
        self._timeout = timeout
        self._max_retry_delay = max_retry_delay
        self._retry_delay = 1.0
        self._pending: IDelayedCall | None = None
        self.key_state = "unchecked"  # unchecked | valid | rejected | unverified

    def startService(self) -> None:
        super().startService()
        self._readiness.block("api-key", "validating the API key with Stigg")
        self._check()

    def _check(self) -> None:
        self._pending = None
        self._api.validate_key(self._timeout).addCallbacks(self._accepted, self._failed)

    def _accepted(self, _: object) -> None:
        if self.key_state != "valid":
            log.info("Stigg accepted the API key")
        self.key_state = "valid"
        self._readiness.unblock("api-key")

    def _failed(self, failure: Failure) -> None:
        if not self.running:
            return
        error = failure.value
        self._on_init_error()
        if isinstance(error, UpstreamError) and error.problem is Problem.KEY_REJECTED:
            self.key_state = "rejected"
            self._key.reject()
            self._readiness.block("api-key", "Stigg rejected the API key (SERVER_API_KEY)")
            log.error("Stigg rejected the API key: reads answer fallbacks and writes fail until it is fixed")
            return
        why = error.message if isinstance(error, UpstreamError) else repr(error)
        if self.key_state == "unchecked":
            log.warn(
                "Could not validate the API key ({why}); serving from cache and fallbacks, retrying in the background",
                why=why,
            )
        self.key_state = "unverified"
        self._readiness.unblock("api-key")
        self._pending = self._reactor.callLater(self._retry_delay, self._check)
        self._retry_delay = min(self._max_retry_delay, self._retry_delay * 2)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._budget is None:
            return self._api.close()
        self._budget.begin()
        # Cut a little before the deadline: closing the connections after the cut takes a moment.
        return self._api.close(within=max(0.0, self._budget.remaining_for_last_step() - 0.25))
