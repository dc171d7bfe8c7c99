"""CircuitBreaker: one upstream's outage memory (Edge, GraphQL), so an outage costs one probe,
not every call's retries.

Closed, calls go through and consecutive failures are counted; `threshold` of them in a row open
it. Open, calls are refused at once (`BreakerOpen`) except one probe at a time, admitted when the
current backoff delay has passed: the delay grows with each failed probe (capped exponential,
jittered so a fleet does not probe in step). The first success of any call closes it. What counts
as a failure is the caller's call (`StiggApi`: unreachable, timeouts, 5xx, 429, malformed bodies;
an answer such as 401 or a GraphQL validation error means Stigg is up). Pure state machine: time
comes from an injected clock (`seconds()`), so tests drive it with `task.Clock`. Reactor only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from stigg_sidecar.quoting import clipped

log = Logger()


@dataclass(frozen=True)
class BreakerPolicy:
    threshold: int = 5  # consecutive failed attempts that open the breaker
    initial: float = 1.0  # backoff before the first probe (s)
    factor: float = 2.0
    # Cap on the backoff between probes (s): one probe per 1-2 s at most, so a read finds Stigg
    # back within about 2 s of its return (issue 20, finding 9); only calls that come probe.
    max_delay: float = 2.0

    def delay(self, failed_probes: int, rng: Callable[[], float]) -> float:
        """Before probe n+1 after n failed probes: random(0.5..1) * min(max, initial * factor**n)."""
        return (0.5 + rng() / 2) * min(self.max_delay, self.initial * self.factor**failed_probes)


class Ticket:
    """Permission for one attempt; `probe` when it is the open breaker's one probe."""

    __slots__ = ("probe", "settled")

    def __init__(self, probe: bool) -> None:
        self.probe = probe
        self.settled = False


class BreakerOpen(Exception):
    """Refused without trying: the upstream failed `failures` times in a row. `message` is
    UpstreamError's (api.py turns this into one)."""

    def __init__(self, name: str, failures: int, last_error: str, retry_in: float) -> None:
        self.message = (
            f"not sent: Stigg's {name} failed {failures} times in a row (last: {clipped(last_error)}); "
            f"calls fail at once until a probe succeeds (next in {max(0.0, retry_in):.1f}s)"
        )
        super().__init__(self.message)


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        clock: IReactorTime,
        policy: BreakerPolicy = BreakerPolicy(),
        rng: Callable[[], float] = random.random,
        on_change: Callable[[bool], None] = lambda is_open: None,
    ) -> None:
        self.name = name
        self._clock = clock
        self._policy = policy
        self._rng = rng
        self._on_change = on_change
        self.is_open = False
        self.failures = 0  # consecutive failed attempts
        self.probes = 0  # probes admitted so far
        self.last_error = ""
        self._failed_probes = 0
        self._retry_at = 0.0
        self._probing = False
        self._opened_at = 0.0

    def admit(self) -> Ticket:
        """A ticket for one attempt, or BreakerOpen when the breaker is open and it is not yet
        time to probe (or another probe is out)."""
        if not self.is_open:
            return Ticket(probe=False)
        now = self._clock.seconds()
        if self._probing or now < self._retry_at:
            raise BreakerOpen(self.name, self.failures, self.last_error, self._retry_at - now)
        self._probing = True
        self.probes += 1
        return Ticket(probe=True)

    def succeeded(self, ticket: Ticket) -> None:
        if ticket.settled:
            return
        ticket.settled = True
        if self.is_open:
            log.info(
                "Stigg's {name} answers again after {seconds:.1f}s; the circuit is closed",
                name=self.name,
                seconds=self._clock.seconds() - self._opened_at,
            )
        was_open = self.is_open
        self.is_open = False
        self.failures = 0
        self._failed_probes = 0
        self._probing = False
        if was_open:
            self._on_change(False)

    def failed(self, ticket: Ticket, why: str) -> None:
        if ticket.settled:
            return
        ticket.settled = True
        self.last_error = why
        if ticket.probe and self.is_open:
            self._probing = False
            self.failures += 1
            self._failed_probes += 1
            self._schedule_probe()
            return
        if self.is_open:
            return  # an attempt admitted before it opened: the probes drive the backoff now
        self.failures += 1
        if self.failures >= self._policy.threshold:
            self.is_open = True
            self._opened_at = self._clock.seconds()
            self._schedule_probe()
            log.warn(
                "Stigg's {name} failed {n} times in a row ({why}); calls to it fail at once while"
                " one probe at a time retries (backoff up to {cap:.0f}s)",
                name=self.name,
                n=self.failures,
                why=why,
                cap=self._policy.max_delay,
            )
            self._on_change(True)

    def close(self, why: str) -> None:
        """Stigg answered elsewhere (another upstream, the real-time socket): close at once rather
        than wait for this breaker's next probe."""
        if not self.is_open:
            return
        log.info(
            "Stigg's {name} is taken as answering again after {seconds:.1f}s ({why}); the circuit is closed",
            name=self.name,
            seconds=self._clock.seconds() - self._opened_at,
            why=why,
        )
        self.is_open = False
        self.failures = 0
        self._failed_probes = 0
        self._probing = False
        self._on_change(False)

    def abandoned(self, ticket: Ticket) -> None:
        """The attempt ended without an answer either way (cancelled): a probe's turn passes on."""
        if ticket.settled:
            return
        ticket.settled = True
        if ticket.probe:
            self._probing = False

    def _schedule_probe(self) -> None:
        self._retry_at = self._clock.seconds() + self._policy.delay(self._failed_probes, self._rng)
