"""Readiness: the reasons the sidecar may not take traffic yet, owned by the reactor.

Each part that must be up before traffic flows blocks readiness under its own name with a reason a
person can act on, and unblocks it when done. Ready means nothing blocks.
"""

from __future__ import annotations


class Readiness:
    def __init__(self) -> None:
        self._blockers: dict[str, str] = {}

    def block(self, name: str, reason: str) -> None:
        self._blockers[name] = reason

    def unblock(self, name: str) -> None:
        self._blockers.pop(name, None)

    @property
    def ready(self) -> bool:
        return not self._blockers

    @property
    def reasons(self) -> list[str]:
        return list(self._blockers.values())
