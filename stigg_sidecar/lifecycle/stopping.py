"""StopBudget: the one deadline of a stop, SHUTDOWN_GRACE_SECS from the moment stopping begins.

The parts that take time to stop (gRPC draining, the spool delivering, the last cache snapshot)
share it instead of each getting the whole grace period one after the other, so the process
exits within SHUTDOWN_GRACE_SECS, under an orchestrator's stop timeout. The snapshot, written
last, reserves what its previous write took: the steps before it stop that much earlier.
Reactor only; knows nothing of what the parts do.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

# Most of the budget a snapshot's reservation may take: draining and delivering keep the rest.
_MAX_RESERVED_SHARE = 0.5


class StopBudget:
    def __init__(self, seconds: float, clock: IReactorTime) -> None:
        self.seconds = seconds
        self._clock = clock
        self._deadline: float | None = None
        self._reserved = 0.0

    def begin(self) -> None:
        """Stopping starts now (a second call keeps the first deadline)."""
        if self._deadline is None:
            self._deadline = self._clock.seconds() + self.seconds

    @property
    def begun(self) -> bool:
        return self._deadline is not None

    def reserve_last_step(self, seconds: float) -> None:
        """The last step (the snapshot) expects to need `seconds`; the others leave it that much."""
        self._reserved = min(max(0.0, seconds), self.seconds * _MAX_RESERVED_SHARE)

    def remaining(self) -> float:
        """Seconds left for a step before the last (the whole budget, less the reservation,
        while stopping has not begun)."""
        return max(0.0, self.remaining_for_last_step() - self._reserved)

    def remaining_for_last_step(self) -> float:
        if self._deadline is None:
            return self.seconds
        return max(0.0, self._deadline - self._clock.seconds())

    def elapsed(self) -> float:
        if self._deadline is None:
            return 0.0
        return self._clock.seconds() - (self._deadline - self.seconds)
