"""Readiness: the reasons the sidecar may not take traffic yet, owned by the reactor.

Each part that must be up before traffic flows blocks readiness under its own name with a reason a
person can act on, and unblocks it when done. Ready means nothing blocks.
"""

from __future__ import annotations

from collections.abc import Callable


class Readiness:
    def __init__(self) -> None:
        self._blockers: dict[str, str] = {}
        self._listeners: list[Callable[[bool], None]] = []

    def subscribe(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(ready)` now and whenever readiness flips."""
        self._listeners.append(listener)
        listener(self.ready)

    def block(self, name: str, reason: str) -> None:
        was = self.ready
        self._blockers[name] = reason
        self._notify(was)

    def unblock(self, name: str) -> None:
        was = self.ready
        self._blockers.pop(name, None)
        self._notify(was)

    def _notify(self, was: bool) -> None:
        if self.ready != was:
            for listener in self._listeners:
                listener(self.ready)

    @property
    def ready(self) -> bool:
        return not self._blockers

    @property
    def reasons(self) -> list[str]:
        return list(self._blockers.values())
