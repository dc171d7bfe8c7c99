"""StiggRecovery: the moment Stigg answers again, everything waiting out the outage stops waiting.

During an outage several parts back off on their own: each upstream's circuit breaker between
probes, the write spool between delivery attempts, the real-time socket between reconnects.
Without a common signal each finds out on its own schedule (up to 30 s apart), and reads answered
fallbacks and writes sat on disk long after Stigg was back. Any success from Stigg (an API call of
any kind) after a failure, or the socket's acknowledgement, is the evidence: the listeners (the
spool delivers now; on the socket's word every breaker closes) are told once (on the next reactor
turn after a call's success; at once for the socket), with where the evidence came from: "socket", or the upstream that answered ("edge",
"graphql"). An answer from one upstream does not close the other's breaker: Edge can be down while
GraphQL answers, and it probes on its own every 1-2 s.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime


class StiggRecovery:
    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._listeners: list[Callable[[str], None]] = []
        self._doubted = False  # a call failed as if Stigg were down since the last success

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call `listener(source)` on the reactor whenever Stigg is seen answering after a failure."""
        self._listeners.append(listener)

    def failed(self) -> None:
        """A call failed in a way that says Stigg may be down (reactor)."""
        self._doubted = True

    def answered(self, upstream: str) -> None:
        """A call to `upstream` succeeded (reactor): after a failure, the listeners are told."""
        if self._doubted:
            self._announce(upstream)

    def reconnected(self) -> None:
        """Stigg acknowledged the real-time socket (reactor): the listeners are told at once, so
        the breakers are closed before the socket's revalidation starts fetching."""
        self._doubted = False
        for listener in self._listeners:
            listener("socket")

    def _announce(self, source: str) -> None:
        self._doubted = False
        for listener in self._listeners:
            # Not from inside the call that succeeded: a listener may start calls of its own.
            self._reactor.callLater(0, listener, source)
