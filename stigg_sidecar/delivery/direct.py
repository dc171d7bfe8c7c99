"""DirectDelivery: the Writer when the spool is off: a write is acknowledged with Stigg's answer.

The caller waits (under its deadline) while the reactor sends the write through `UpstreamWrites`;
a failure is the precise gRPC status of what went wrong. Reloads are reads: `online.reads`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import inlineCallbacks

from stigg_sidecar.contracts import EventReport, UsageAck, UsageReport
from stigg_sidecar.crossing.gate import WriteGate
from stigg_sidecar.delivery.upstream import UpstreamWrites


class DirectDelivery:
    def __init__(self, gate: WriteGate, writes: UpstreamWrites) -> None:
        self._gate = gate
        self._writes = writes

    # -- handler threads --------------------------------------------------------------------------

    # `still_wanted` is not consulted: a write sent to Stigg cannot be taken back.
    def report_usage(
        self, usages: Sequence[UsageReport], timeout: float, still_wanted: Callable[[], bool] | None = None
    ) -> Sequence[UsageAck]:
        return self._gate.run(self._report_usage, usages, timeout=timeout)

    def report_events(
        self, events: Sequence[EventReport], timeout: float, still_wanted: Callable[[], bool] | None = None
    ) -> None:
        self._gate.run(self._writes.events, events, timeout=timeout)

    # -- reactor ----------------------------------------------------------------------------------

    @inlineCallbacks
    def _report_usage(self, usages: Sequence[UsageReport], timeout: float) -> Any:
        results = yield self._writes.usage(usages, None, timeout)
        return [result.ack for result in results]
