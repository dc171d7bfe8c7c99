"""DirectDelivery: the Writer when the spool is off: a write is acknowledged with Stigg's answer.

The caller waits (under its deadline) while the reactor sends the write through `UpstreamWrites`;
a failure is the precise gRPC status of what went wrong. Reloads are reads and stay with the
online backend.
"""

from __future__ import annotations

from typing import Callable, Sequence

from twisted.internet.defer import inlineCallbacks

from stigg_sidecar.contracts import EventReport, UsageAck, UsageReport, WriteError, WriteFailure
from stigg_sidecar.crossing.gate import WriteGate
from stigg_sidecar.delivery.upstream import UpstreamWrites, ack_from_result
from stigg_sidecar.entitlements.records import MalformedState


def reload_through(gate: WriteGate, backend, customer_id: str, resource_id: str | None, timeout: float) -> bool:
    """A reload from a handler thread: refetch on the reactor; true unless the customer is gone."""
    if backend.key_rejected:
        return False
    try:
        entry = gate.run(backend.reload_entry, customer_id, resource_id, timeout=timeout)
    except MalformedState as e:
        raise WriteError(WriteFailure.UNAVAILABLE, f"Stigg answered malformed entitlements: {e}") from None
    return entry.access_denied_reason not in ("CustomerNotFound", "CustomerIsArchived")


class DirectDelivery:
    def __init__(self, gate: WriteGate, writes: UpstreamWrites, backend) -> None:
        self._gate = gate
        self._writes = writes
        self._backend = backend  # OnlineSidecar, for reloads

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

    def reload(self, customer_id: str, resource_id: str | None, timeout: float) -> bool:
        return reload_through(self._gate, self._backend, customer_id, resource_id, timeout)

    # -- reactor ----------------------------------------------------------------------------------

    @inlineCallbacks
    def _report_usage(self, usages: Sequence[UsageReport], timeout: float):
        results = yield self._writes.usage(usages, None, timeout)
        return [ack_from_result(u, r) for u, r in zip(usages, results, strict=True)]
