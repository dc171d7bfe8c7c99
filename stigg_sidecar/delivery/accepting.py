"""SpoolAcceptor: the accepting side of the spool: a write is durable before it is acknowledged.

On the reactor, under the handoff of the caller's crossing (`WriteGate`): a write gets its
idempotency key and is appended to the `SpoolFile`; once that append is synced to disk, and
only if the caller still waits (its `Handoff` is still claimable), the records go to the
`SpoolSender` and a usage report counts in the store's pending usage, which gives the usage its
acknowledgement shows. Synced too late for its caller, a write is deleted again.

Refusals are precise and never flood the log: a spool over SPOOL_MAX_BYTES or a full disk is
RESOURCE_EXHAUSTED, a spool not open yet or shutting down is UNAVAILABLE (`RefusalLog` writes
one line per interval with a count). The accepting side never sends anything to Stigg.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from stigg_sidecar import spans
from stigg_sidecar.contracts import (
    EventReport,
    UsageAck,
    UsageReport,
    UsageStore,
    WriteError,
    WriteFailure,
    measurement_id,
)
from stigg_sidecar.crossing.wait import Handoff
from stigg_sidecar.delivery import bodies as bodies
from stigg_sidecar.delivery.sending import SpooledRecord, SpoolSender
from stigg_sidecar.delivery.spool import SpoolFile, is_disk_full

log = Logger()

# One line about refused writes per this many seconds, with how many were refused since.
REFUSAL_LOG_INTERVAL = 10.0


class RefusalLog:
    """Refused writes, logged once per interval with a count: a full spool or disk refuses every
    write, and a line each would flood the log. Reactor only; time is monotonic."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._next = 0.0
        self._since = 0  # refused since the last line

    def count(self, why: str) -> None:
        self._since += 1
        now = self._clock()
        if now < self._next:
            return
        n, self._since = self._since, 0
        self._next = now + self._interval
        log.error("Writes refused: {why} ({n} refused since the last such line; at most one line per {interval:.0f}s)",
                  why=why, n=n, interval=self._interval)


class SpoolAcceptor:
    """Appends writes to the spool and acknowledges them once synced; reactor only. Takes writes
    between `start` and `stop`, once the sender has loaded what the spool held."""

    def __init__(
        self,
        spool: SpoolFile,
        sender: SpoolSender,
        store: UsageStore,
        *,
        max_bytes: int,
        wall: Callable[[], float] = time.time,
        refusals: RefusalLog | None = None,
    ) -> None:
        self._spool = spool
        self._sender = sender
        self._store = store
        self._max_bytes = max_bytes
        self._wall = wall  # the date: records' creation times, kept on disk across restarts
        self._refusals = refusals if refusals is not None else RefusalLog()
        self._started = False
        self._reserved = 0  # bytes of appends not yet synced
        self.unacknowledged = 0  # records synced after their caller's deadline or cancellation, removed

    def start(self) -> None:
        self._started = True

    def stop(self) -> None:
        self._started = False

    def accept_usage(self, usages: Sequence[UsageReport], budget: float, handoff: Handoff | None = None) -> Deferred:
        keyed = [(u, measurement_id()) for u in usages]
        rows = [(bodies.usage_body(u, key), (u, key)) for u, key in keyed]
        first = usages[0]
        attributes = {**spans.ids(first.customer_id, first.resource_id, first.feature_id), "stigg.records": len(rows)}
        return spans.span_until("spool usage", self._append, bodies.USAGE, rows, handoff, kind=spans.SpanKind.PRODUCER,
                                attributes=attributes).addCallback(self._usage_acks)

    def accept_events(self, events: Sequence[EventReport], budget: float, handoff: Handoff | None = None) -> Deferred:
        rows = [(bodies.event_body(e), e) for e in events]
        attributes = {**spans.ids(events[0].customer_id, events[0].resource_id), "stigg.records": len(rows)}
        return spans.span_until("spool events", self._append, bodies.EVENT, rows, handoff, kind=spans.SpanKind.PRODUCER,
                                attributes=attributes).addCallback(lambda _: None)

    def _append(self, kind: str, rows: list[tuple[str, Any]], handoff: Handoff | None = None) -> Deferred:
        """Store `rows`; once synced, and only if `handoff` is still claimable (the caller will
        get the acknowledgement), they count and wait for delivery. Synced too late for their
        caller, they are deleted again: a write whose caller saw a failure is never delivered."""
        if not self._started:
            raise WriteError(WriteFailure.UNAVAILABLE, "the sidecar is shutting down; write not accepted")
        if not self._sender.loaded:
            raise WriteError(WriteFailure.UNAVAILABLE, "the write spool is not open yet; try again shortly")
        size = sum(len(body) for body, _ in rows)
        # What the files take on disk (as of the last commit), or the bodies when that is more.
        # With nothing waiting, what is on disk is delivered records about to be freed: room.
        waiting = self._sender.bytes
        used = max(waiting, self._spool.disk_bytes) if waiting else 0
        if used + self._reserved + size > self._max_bytes:
            self._refusals.count(f"write spool full: {used} of {self._max_bytes} bytes (SPOOL_MAX_BYTES) used")
            raise WriteError(
                WriteFailure.RESOURCE_EXHAUSTED,
                f"write spool full: {used} of {self._max_bytes} bytes (SPOOL_MAX_BYTES) wait for delivery to Stigg",
            )
        self._reserved += size
        now_ms = int(self._wall() * 1000)
        traced = spans.traceparent_of_current()

        def synced(seqs: list[int]) -> list[SpooledRecord]:
            self._reserved -= size
            if handoff is not None and not handoff.claim():
                self._unacknowledged(seqs)
                raise WriteError(WriteFailure.DEADLINE_EXCEEDED,
                                 "the write spool did not sync within the call's deadline; write not recorded")
            added = []
            for seq, (body, payload) in zip(seqs, rows, strict=True):
                if kind == bodies.USAGE:
                    usage, key = payload
                    record = SpooledRecord(seq, kind, len(body), now_ms, key, usage=usage, trace=traced)
                else:
                    record = SpooledRecord(seq, kind, len(body), now_ms, payload.idempotency_key, event=payload,
                                           trace=traced)
                added.append(record)
            self._sender.enqueue(kind, added)
            return added

        def failed(failure: Failure) -> None:
            self._reserved -= size
            if is_disk_full(failure.value):
                self._refusals.count(f"the disk of the write spool {self._spool.path} is full")
                raise WriteError(WriteFailure.RESOURCE_EXHAUSTED, "write spool full: its disk is full; write not accepted")
            self._refusals.count(f"appending to the write spool failed: {failure.getErrorMessage()}")
            raise WriteError(WriteFailure.UNAVAILABLE, "the write spool could not be written; write not accepted")

        return self._spool.append([(kind, body, now_ms, traced) for body, _ in rows]).addCallbacks(synced, failed)

    def _unacknowledged(self, seqs: list[int]) -> None:
        """Records synced after their caller gave up: removed before anything could send them."""
        self.unacknowledged += len(seqs)
        self._spool.delete(seqs).addErrback(
            lambda f: log.error("Could not remove {n} unacknowledged records from the spool: {why}",
                                n=len(seqs), why=f.getErrorMessage())
        )

    def _usage_acks(self, added: list[SpooledRecord]) -> list[UsageAck]:
        """The pending usage counts each record; its acknowledgement shows the usage after it."""
        acks = []
        for record in added:
            usage = record.usage
            assert usage is not None
            shown = self._store.pending_added(record.seq, usage)
            acks.append(
                UsageAck(
                    measurement_id=record.key,
                    customer_id=usage.customer_id,
                    feature_id=usage.feature_id,
                    resource_id=usage.resource_id,
                    current_usage=shown.current_usage if shown is not None else None,
                    usage_period_start=shown.usage_period_start if shown is not None else None,
                    usage_period_end=shown.usage_period_end if shown is not None else None,
                )
            )
        return acks
