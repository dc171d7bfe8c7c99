"""SidecarService: the top of the process, a MultiService of phases holding every part.

Owns the order of start and stop: phases start in order and stop in reverse, one at a time, each
after the previous finished (so the assembly's phase order is the stop order: serving stops first,
the edge last, so probes keep getting answers while gRPC drains); readiness turns DOWN the moment
stopping begins; the log observer is handed to twistd's application so LOG_LEVEL and LOG_FORMAT
apply from the first line. The stop's `StopBudget` (SHUTDOWN_GRACE_SECS) begins with the stop:
every part that takes time to stop shares that one deadline, and the last line says how long the
whole stop took.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.logger import ILogObserver, Logger

from stigg_sidecar.lifecycle.listening import ListenError
from stigg_sidecar.lifecycle.reactor import default_reactor
from stigg_sidecar.lifecycle.stopping import StopBudget
from stigg_sidecar.ops.readiness import Readiness
from stigg_sidecar.process.startup import exit_with

log = Logger()


@inlineCallbacks
def _stop_in_reverse(parent: MultiService) -> Any:
    """Stop `parent`'s children one at a time, last added first, each after the previous finished."""
    for child in reversed(list(parent)):
        try:
            yield maybeDeferred(child.stopService)
        except Exception:
            log.failure("Stopping {name} failed", name=child.name)


class Phase(MultiService):
    """A named stage of the process (edge, sources, delivery, serving): its parts start in the
    order they were added and stop in reverse, one at a time."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.setName(name)

    def stopService(self) -> Any:
        Service.stopService(self)
        return _stop_in_reverse(self)


class SidecarService(MultiService):
    def __init__(
        self, readiness: Readiness, observer: ILogObserver | None = None, budget: StopBudget | None = None
    ) -> None:
        super().__init__()
        self.readiness = readiness
        self.budget = budget
        self._observer = observer
        self._was_ready = readiness.ready
        readiness.subscribe(self._log_readiness)

    def _log_readiness(self, ready: bool) -> None:
        # One line per flip, so the log says when the sidecar became ready and why it stopped being so.
        if ready == self._was_ready:
            return
        self._was_ready = ready
        if ready:
            log.info("Ready")
        else:
            log.info("Not ready: {reasons}", reasons="; ".join(self.readiness.reasons))

    def setServiceParent(self, parent: IServiceCollection) -> None:
        # twistd's Application is Componentized: its ILogObserver component replaces the
        # default observer when twistd starts logging, which happens after makeService.
        if self._observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self._observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # twistd calls this (and only twistd: in-process users see the ListenError itself).
        try:
            super().privilegedStartService()
        except ListenError as e:
            exit_with(str(e))

    def startService(self) -> None:
        super().startService()
        reactor = default_reactor()
        # After startup: signal handlers are in place from here on, so this line is the cue
        # that the process can be stopped cleanly.
        reactor.callWhenRunning(log.info, "stigg-sidecar running")

    @inlineCallbacks
    def stopService(self) -> Any:
        """Stop the phases one at a time, last added first, each after the previous finished."""
        if self.budget is not None:
            self.budget.begin()
        self.readiness.block("shutdown", "shutting down")
        log.info("Stopping")
        Service.stopService(self)
        yield _stop_in_reverse(self)
        if self.budget is not None:
            log.info("stigg-sidecar stopped in {took:.2f}s (SHUTDOWN_GRACE_SECS {grace:g}s)",
                     took=self.budget.elapsed(), grace=self.budget.seconds)
        else:
            log.info("stigg-sidecar stopped")
        # A drain that completed is a clean exit: twistd would otherwise re-raise SIGTERM/SIGINT
        # on itself after shutdown, and orchestrators would read that as a crash.
        reactor = default_reactor()
        if getattr(reactor, "_exitSignal", None) is not None:
            reactor._exitSignal = None  # type: ignore[attr-defined]
