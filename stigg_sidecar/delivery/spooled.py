"""SpooledDelivery: the Writer when SPOOL_WRITES is on: durable first, delivered in the background.

A write is validated by the servicer, crosses to the reactor once (`WriteGate`), gets its
idempotency key, and is appended to the `SpoolFile`; once that append is synced to disk the
write is acknowledged and its usage is counted in the cache at once (the store's pending usage).
Everything after that runs on the reactor:

- Delivery in batches (ReportUsageBulk, one ReportEvent with many events) through the same
  `UpstreamWrites` as direct writes: a batch goes when `batch_size` records wait, or
  `flush_interval` after the first one came; one batch per kind in flight, in spool order.
- A batch that fails on the way (Stigg down, slow, 5xx) is retried as it was, after a capped,
  jittered exponential backoff; the idempotency keys make a repeat count once.
- A batch Stigg refuses for good (a GraphQL error such as FeatureNotFound or BadUserInput) is
  split in halves until the record to blame is alone; that record goes to the dead-letter table
  with one log line, and the records behind it keep going.
- Stop: deliver what can be delivered within the stop's budget (shared with the gRPC drain and
  the snapshot: `StopBudget`), and no longer than something can still go: with Stigg down, once
  the next attempt would come after the deadline, the stop ends. The rest stays on disk for the
  next start, which loads it before readiness and delivers it.

Traces: accepting a write is a PRODUCER span ("spool usage"/"spool events", the commit on the
spool's thread under it) whose traceparent is kept with each record, on disk too; each delivery
attempt is a CONSUMER span in a trace of its own, linking to the writes it carries.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
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
from stigg_sidecar.crossing.gate import WriteGate
from stigg_sidecar.crossing.wait import Handoff
from stigg_sidecar.delivery import bodies as bodies
from stigg_sidecar.delivery.spool import SpoolFile, StoredRecord, is_disk_full
from stigg_sidecar.delivery.upstream import UpstreamWrites
from stigg_sidecar.lifecycle.stopping import StopBudget
from stigg_sidecar.ops.metrics import Metrics
from stigg_sidecar.ops.readiness import Readiness
from stigg_sidecar.quoting import quoted
from stigg_sidecar.upstream.api import RetryPolicy
from stigg_sidecar.upstream.errors import UpstreamError

log = Logger()

KINDS = (bodies.USAGE, bodies.EVENT)
# Between attempts at a batch while Stigg is down: 0.25-0.5 s at first, at most 15-30 s.
DELIVERY_BACKOFF = RetryPolicy(initial=0.5, factor=2.0, max_delay=30.0)
# GraphQL error codes that do not blame the records: retried like an outage.
_NOT_REFUSALS = {"", "Unauthenticated", "RateLimitExceeded", "INTERNAL_SERVER_ERROR"}


def is_refusal(error: BaseException) -> bool:
    """Whether Stigg refused the batch for good: it answered with a GraphQL error about the input."""
    return isinstance(error, UpstreamError) and error.code is not None and error.code not in _NOT_REFUSALS


@dataclass(frozen=True, slots=True)
class _Record:
    seq: int
    kind: str
    size: int
    created_ms: int
    key: str
    usage: UsageReport | None = None
    event: EventReport | None = None
    trace: str | None = None  # the spooling write's traceparent: its delivery links to it


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


class SpooledDelivery(Service):
    name = "delivery"

    def __init__(
        self,
        clock: IReactorTime,
        gate: WriteGate,
        writes: UpstreamWrites,
        spool: SpoolFile,
        store: UsageStore,
        *,
        max_bytes: int,
        batch_size: int = 100,
        flush_interval: float = 0.1,
        send_timeout: float = 10.0,
        grace: float = 10.0,
        budget: StopBudget | None = None,
        backoff: RetryPolicy = DELIVERY_BACKOFF,
        rng: Callable[[], float] = random.random,
        readiness: Readiness | None = None,
        metrics: Metrics | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock  # timers and intervals (monotonic in the process)
        self._wall = wall  # the date: records' creation times, kept on disk across restarts
        self._gate = gate
        self._writes = writes
        self.spool = spool
        self._store = store
        self._max_bytes = max_bytes
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._send_timeout = send_timeout
        # The stop's deadline, shared with the other parts (else `grace` seconds of its own).
        self._budget = budget if budget is not None else StopBudget(grace, clock)
        self._backoff = backoff
        self._rng = rng
        self._readiness = readiness
        self._metrics = metrics
        self._queues: dict[str, OrderedDict[int, _Record]] = {kind: OrderedDict() for kind in KINDS}
        self._retries: dict[str, deque[list[int]]] = {kind: deque() for kind in KINDS}  # batches to send as they are
        self._inflight: dict[str, list[int] | None] = {kind: None for kind in KINDS}
        self._failures: dict[str, int] = {kind: 0 for kind in KINDS}  # consecutive, for the backoff
        self._waiting: dict[str, Any] = {kind: None for kind in KINDS}  # backoff timers
        self._told_to_wait: dict[str, bool] = {kind: False for kind in KINDS}  # Stigg's Retry-After
        self._flush_timer: Any = None
        self._bytes = 0
        self._reserved = 0  # bytes of appends not yet synced
        self._loaded = False
        self._stopping = False
        self.delivered = 0
        self.dead_lettered = 0
        self.unacknowledged = 0  # records synced after their caller's deadline or cancellation, removed
        self._refusals = RefusalLog()
        self._uncounted: dict[int, UsageReport] = {}  # loaded at start, not yet in the pending usage

    # -- gauges -----------------------------------------------------------------------------------

    @property
    def records(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def bytes(self) -> int:
        return self._bytes

    def oldest_age(self) -> float:
        """Seconds since the oldest undelivered record was acknowledged (0 when none waits)."""
        oldest = [next(iter(q.values())).created_ms for q in self._queues.values() if q]
        return max(0.0, self._wall() - min(oldest) / 1000) if oldest else 0.0

    # -- handler threads --------------------------------------------------------------------------

    def report_usage(
        self, usages: Sequence[UsageReport], timeout: float, still_wanted: Callable[[], bool] | None = None
    ) -> Sequence[UsageAck]:
        return self._gate.run_acknowledged(self._accept_usage, usages, timeout=timeout, still_wanted=still_wanted)

    def report_events(
        self, events: Sequence[EventReport], timeout: float, still_wanted: Callable[[], bool] | None = None
    ) -> None:
        self._gate.run_acknowledged(self._accept_events, events, timeout=timeout, still_wanted=still_wanted)

    # -- reactor: accepting -----------------------------------------------------------------------

    def _accept_usage(self, usages: Sequence[UsageReport], budget: float, handoff: Handoff | None = None) -> Deferred:
        keyed = [(u, measurement_id()) for u in usages]
        rows = [(bodies.usage_body(u, key), (u, key)) for u, key in keyed]
        first = usages[0]
        attributes = {**spans.ids(first.customer_id, first.resource_id, first.feature_id), "stigg.records": len(rows)}
        return spans.span_until("spool usage", self._append, bodies.USAGE, rows, handoff, kind=spans.SpanKind.PRODUCER,
                                attributes=attributes).addCallback(self._usage_acks)

    def _accept_events(self, events: Sequence[EventReport], budget: float, handoff: Handoff | None = None) -> Deferred:
        rows = [(bodies.event_body(e), e) for e in events]
        attributes = {**spans.ids(events[0].customer_id, events[0].resource_id), "stigg.records": len(rows)}
        return spans.span_until("spool events", self._append, bodies.EVENT, rows, handoff, kind=spans.SpanKind.PRODUCER,
                                attributes=attributes).addCallback(lambda _: None)

    def _append(self, kind: str, rows: list[tuple[str, Any]], handoff: Handoff | None = None) -> Deferred:
        """Store `rows`; once synced, and only if `handoff` is still claimable (the caller will
        get the acknowledgement), they count and wait for delivery. Synced too late for their
        caller, they are deleted again: a write whose caller saw a failure is never delivered."""
        if not self.running or self._stopping:
            raise WriteError(WriteFailure.UNAVAILABLE, "the sidecar is shutting down; write not accepted")
        if not self._loaded:
            raise WriteError(WriteFailure.UNAVAILABLE, "the write spool is not open yet; try again shortly")
        size = sum(len(body) for body, _ in rows)
        # What the files take on disk (as of the last commit), or the bodies when that is more.
        # With nothing waiting, what is on disk is delivered records about to be freed: room.
        used = max(self._bytes, self.spool.disk_bytes) if self._bytes else 0
        if used + self._reserved + size > self._max_bytes:
            self._refusals.count(f"write spool full: {used} of {self._max_bytes} bytes (SPOOL_MAX_BYTES) used")
            raise WriteError(
                WriteFailure.RESOURCE_EXHAUSTED,
                f"write spool full: {used} of {self._max_bytes} bytes (SPOOL_MAX_BYTES) wait for delivery to Stigg",
            )
        self._reserved += size
        now_ms = int(self._wall() * 1000)
        traced = spans.traceparent_of_current()

        def synced(seqs: list[int]) -> list[_Record]:
            self._reserved -= size
            if handoff is not None and not handoff.claim():
                self._unacknowledged(seqs)
                raise WriteError(WriteFailure.DEADLINE_EXCEEDED,
                                 "the write spool did not sync within the call's deadline; write not recorded")
            added = []
            for seq, (body, payload) in zip(seqs, rows, strict=True):
                if kind == bodies.USAGE:
                    usage, key = payload
                    record = _Record(seq, kind, len(body), now_ms, key, usage=usage, trace=traced)
                else:
                    record = _Record(seq, kind, len(body), now_ms, payload.idempotency_key, event=payload, trace=traced)
                self._register(record)
                added.append(record)
            self._kick(kind)
            return added

        def failed(failure: Failure) -> None:
            self._reserved -= size
            if is_disk_full(failure.value):
                self._refusals.count(f"the disk of the write spool {self.spool.path} is full")
                raise WriteError(WriteFailure.RESOURCE_EXHAUSTED, "write spool full: its disk is full; write not accepted")
            self._refusals.count(f"appending to the write spool failed: {failure.getErrorMessage()}")
            raise WriteError(WriteFailure.UNAVAILABLE, "the write spool could not be written; write not accepted")

        return self.spool.append([(kind, body, now_ms, traced) for body, _ in rows]).addCallbacks(synced, failed)

    def _unacknowledged(self, seqs: list[int]) -> None:
        """Records synced after their caller gave up: removed before anything could send them."""
        self.unacknowledged += len(seqs)
        self.spool.delete(seqs).addErrback(
            lambda f: log.error("Could not remove {n} unacknowledged records from the spool: {why}",
                                n=len(seqs), why=f.getErrorMessage())
        )

    def _register(self, record: _Record) -> None:
        self._queues[record.kind][record.seq] = record
        self._bytes += record.size

    def _usage_acks(self, added: list[_Record]) -> list[UsageAck]:
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

    # -- reactor: starting and stopping -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._readiness is not None:
            self._readiness.block("spool", "loading the write spool")
        self.spool.open().addCallbacks(self._opened, self._not_opened)

    def _opened(self, stored: list[StoredRecord]) -> None:
        unreadable = []
        for row in stored:
            try:
                if row.kind == bodies.USAGE:
                    spooled = bodies.read_usage(row.body)
                    record = _Record(row.seq, row.kind, len(row.body), row.created_ms, spooled.key, usage=spooled.usage,
                                     trace=row.trace)
                    # Perhaps delivered already (its delete failed, or the process died first):
                    # counted only once its first delivery fails, i.e. when Stigg may lack it.
                    self._uncounted[row.seq] = spooled.usage
                elif row.kind == bodies.EVENT:
                    event = bodies.read_event(row.body)
                    record = _Record(row.seq, row.kind, len(row.body), row.created_ms, event.idempotency_key, event=event,
                                     trace=row.trace)
                else:
                    raise bodies.BodyError(f"unknown kind {row.kind!r}")
            except bodies.BodyError as e:
                unreadable.append((row.seq, str(e)))
                continue
            self._register(record)
        for seq, why in unreadable:
            log.warn("Spooled record {seq} is unreadable ({why}); moved to the dead letters", seq=seq, why=why)
            self.spool.dead_letter([seq], f"unreadable: {why}", int(self._wall() * 1000))
        if self.records:
            log.info("Write spool {path}: {n} records from before the restart, delivering", path=self.spool.path,
                     n=self.records)
        self._loaded = True
        if self._readiness is not None:
            self._readiness.unblock("spool")
        for kind in KINDS:
            self._pump(kind)

    def _not_opened(self, failure: Failure) -> None:
        log.error("The write spool cannot be opened: {why}; writes are refused", why=failure.getErrorMessage())
        if self._readiness is not None:
            self._readiness.block("spool", f"the write spool cannot be opened: {failure.getErrorMessage()}")

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        """Deliver what can be delivered within the stop's budget; the rest stays on disk."""
        super().stopService()
        self._stopping = True
        self._budget.begin()
        left = self._budget.remaining()
        deadline = self._clock.seconds() + left
        if self._flush_timer is not None and self._flush_timer.active():
            self._flush_timer.cancel()
        self._flush_timer = None
        for kind in KINDS:
            timer = self._waiting[kind]
            if timer is not None and timer.active():
                timer.cancel()
            self._waiting[kind] = None
            if left > 0:  # no time at all: start nothing that would outlive the stop
                self._pump(kind)
        while self._loaded and self._can_deliver_before(deadline) and self._clock.seconds() < deadline:
            yield deferLater(self._clock, min(0.05, max(0.0, deadline - self._clock.seconds())), lambda: None)
        for kind in KINDS:
            timer = self._waiting[kind]
            if timer is not None and timer.active():
                timer.cancel()
        self._stopping = False  # stopped: nothing more is sent (see _pump)
        if self.records:
            log.info("{n} spooled {records} on disk for the next start", n=self.records,
                     records="record stays" if self.records == 1 else "records stay")
        yield self.spool.close()

    def _can_deliver_before(self, deadline: float) -> bool:
        """Whether a batch is in flight, or one waits whose next attempt comes before `deadline`."""
        for kind in KINDS:
            if self._inflight[kind] is not None:
                return True
            if self._queues[kind]:
                timer = self._waiting[kind]
                if timer is None or not timer.active() or timer.getTime() < deadline:
                    return True
        return False

    # -- reactor: delivering ----------------------------------------------------------------------

    def _kick(self, kind: str) -> None:
        """Records came: send a full batch now, else within the flush interval."""
        if not self.running and not self._stopping:
            return
        if len(self._queues[kind]) >= self._batch_size:
            self._pump(kind)
        elif self._flush_timer is None or not self._flush_timer.active():
            self._flush_timer = self._clock.callLater(self._flush_interval, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        for kind in KINDS:
            self._pump(kind)

    def _pump(self, kind: str) -> None:  # noqa: C901 - one batch's send and every outcome of it, read in order
        """Send the next batch of `kind` unless one is in flight or waiting out a backoff."""
        if not self._loaded or self._inflight[kind] is not None or self._waiting[kind] is not None:
            return
        if not self.running and not self._stopping:
            return
        queue = self._queues[kind]
        batch: list[int] = []
        retries = self._retries[kind]
        while retries and not batch:
            batch = [seq for seq in retries.popleft() if seq in queue]
        if not batch:
            batch = list(itertools.islice(queue, self._batch_size))
        if not batch:
            return
        self._inflight[kind] = batch
        records = [queue[seq] for seq in batch]
        if self._metrics is not None:
            self._metrics.spool_batch_size.observe(len(records))
        if kind == bodies.USAGE:
            usages = [r.usage for r in records if r.usage is not None]

            def settled() -> None:
                for r in records:
                    if r.usage is not None:
                        self._store.pending_settled(r.seq, r.usage)

            def send() -> Deferred:
                return self._writes.usage(usages, [r.key for r in records], self._send_timeout, settled)
        else:

            def send() -> Deferred:
                return self._writes.events([r.event for r in records if r.event is not None], self._send_timeout)

        # A trace of its own (an empty parent context), linking to the writes it carries.
        links = [link for link in (spans.link_to(r.trace) for r in records) if link is not None]
        attributes = {"stigg.records": len(records), "stigg.delivery.failures": self._failures[kind]}
        sent = spans.span_until(f"deliver spooled {kind} records", send, kind=spans.SpanKind.CONSUMER, links=links,
                                attributes=attributes, context=otel_context.Context())
        sent.addCallbacks(self._delivered, self._failed, callbackArgs=(kind, records), errbackArgs=(kind, records))

    def _count_uncounted(self) -> None:
        """Usage loaded at start that Stigg may not have (a delivery failed): shown from now on."""
        uncounted, self._uncounted = self._uncounted, {}
        for seq in sorted(uncounted):
            self._store.pending_added(seq, uncounted[seq])

    def _delivered(self, _: Any, kind: str, records: list[_Record]) -> None:
        queue = self._queues[kind]
        for r in records:
            self._uncounted.pop(r.seq, None)
            if queue.pop(r.seq, None) is not None:
                self._bytes -= r.size
            if r.usage is not None:
                self._store.pending_shown(r.usage)
        self.spool.delete([r.seq for r in records]).addErrback(
            lambda f: log.warn("Could not delete delivered records from the spool: {why}", why=f.getErrorMessage())
        )
        self.delivered += len(records)
        if self._metrics is not None:
            self._metrics.spool_delivered.inc(len(records))
        if self._failures[kind]:
            log.info("Stigg takes spooled {kind} records again; {n} still waiting", kind=kind, n=len(queue))
        self._failures[kind] = 0
        self._inflight[kind] = None
        self._next(kind)

    def _next(self, kind: str) -> None:
        queue = self._queues[kind]
        if self._retries[kind] or len(queue) >= self._batch_size or self._stopping:
            self._pump(kind)
        elif queue:
            self._kick(kind)

    def _failed(self, failure: Failure, kind: str, records: list[_Record]) -> None:
        error = failure.value
        assert error is not None
        batch = [r.seq for r in records]
        if is_refusal(error):
            if len(records) == 1:
                self._dead_letter(kind, records[0], getattr(error, "message", str(error)))
                return
            # All or nothing: halve the batch until the refused record is alone.
            middle = len(batch) // 2
            self._retries[kind].appendleft(batch[middle:])
            self._retries[kind].appendleft(batch[:middle])
            self._inflight[kind] = None
            self._pump(kind)
            return
        self._inflight[kind] = None
        self._retries[kind].appendleft(batch)  # the same batch again: same keys, counted once
        if kind == bodies.USAGE:
            self._count_uncounted()
        self._failures[kind] += 1
        why = error.message if isinstance(error, UpstreamError) else repr(error)
        if not isinstance(error, UpstreamError):
            log.failure("Delivering spooled {kind} records failed unexpectedly", failure, kind=kind)
        delay = self._backoff.delay(min(self._failures[kind], 64), self._rng)
        self._told_to_wait[kind] = isinstance(error, UpstreamError) and bool(error.retry_after)
        if isinstance(error, UpstreamError) and error.retry_after:
            delay = max(delay, error.retry_after)
        if self._failures[kind] == 1:
            log.warn(
                "Could not deliver spooled {kind} records ({why}); {n} kept on disk, retrying with backoff",
                kind=kind, why=why, n=len(self._queues[kind]),
            )
        self._waiting[kind] = self._clock.callLater(delay, self._retry, kind)

    def _retry(self, kind: str) -> None:
        self._waiting[kind] = None
        self._pump(kind)

    def resume(self, source: str = "") -> None:
        """Stigg answers again (`StiggRecovery`): a batch waiting out its backoff goes now, not up
        to 30 s later. A wait Stigg asked for (Retry-After) is kept."""
        for kind in KINDS:
            timer = self._waiting[kind]
            if timer is not None and timer.active() and not self._told_to_wait[kind]:
                timer.cancel()
                self._retry(kind)

    def _dead_letter(self, kind: str, record: _Record, why: str) -> None:
        def moved(_: Any) -> None:
            self._uncounted.pop(record.seq, None)
            if self._queues[kind].pop(record.seq, None) is not None:
                self._bytes -= record.size
            if record.usage is not None:
                self._store.pending_settled(record.seq, record.usage)
                self._store.pending_shown(record.usage)
            self.dead_lettered += 1
            if self._metrics is not None:
                self._metrics.spool_dead_letters.inc()
            # Ids come from callers: quoted (at most ~100 characters each), like every log line's input.
            what = (f"usage of {quoted(record.usage.feature_id)}" if record.usage is not None
                    else f"event {quoted(record.event.event_name) if record.event else '?'}")
            customer = record.usage.customer_id if record.usage is not None else (record.event.customer_id if record.event else "?")
            log.warn(
                "Stigg refused spooled {what} for customer {customer} (idempotency key {key}) for good: {why};"
                " moved to the dead letters of {path}",
                what=what, customer=quoted(customer), key=quoted(record.key), why=why, path=self.spool.path,
            )
            self._inflight[kind] = None
            self._next(kind)

        def not_moved(failure: Failure) -> None:
            log.warn("Could not move a refused record to the dead letters: {why}", why=failure.getErrorMessage())
            self._inflight[kind] = None
            self._failures[kind] += 1
            self._waiting[kind] = self._clock.callLater(self._backoff.delay(self._failures[kind], self._rng),
                                                        self._retry, kind)

        self.spool.dead_letter([record.seq], why, int(self._wall() * 1000)).addCallbacks(moved, not_moved)
