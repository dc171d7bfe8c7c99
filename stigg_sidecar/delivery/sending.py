"""SpoolSender: the delivering side of the spool: what waits on disk goes to Stigg in batches.

It holds the records acknowledged and not yet delivered (per kind, in spool order) and sends
them through `UpstreamWrites`, on the reactor:

- A batch goes when `batch_size` records wait, or `flush_interval` after the first one came;
  one batch per kind in flight, in spool order.
- A batch that fails on the way (Stigg down, slow, 5xx) is retried as it was, after a capped,
  jittered exponential backoff (kept at least as long as Stigg's Retry-After); the idempotency
  keys make a repeat count once. `resume` (Stigg answers again) ends a backoff at once.
- A batch Stigg refuses for good (`is_refusal`) is split in halves until the record to blame is
  alone; that record goes to the dead-letter table with one log line, the others keep going.
- Records loaded at start (`load`) are delivered like the rest; their usage is shown in the
  pending overlay only once a delivery fails, i.e. when Stigg may lack it.
- Stop (`stop`): deliver what can go within the stop's budget, and no longer than something can
  still go; the rest stays on disk for the next start.

It never writes the spool but to delete what was delivered and dead-letter what was refused;
`SpoolAcceptor` appends, and hands it each synced record (`enqueue`).
"""

from __future__ import annotations

import itertools
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from stigg_sidecar import spans
from stigg_sidecar.contracts import EventReport, UsageReport, UsageStore
from stigg_sidecar.delivery import bodies as bodies
from stigg_sidecar.delivery.spool import SpoolFile, StoredRecord
from stigg_sidecar.delivery.upstream import UpstreamWrites
from stigg_sidecar.lifecycle.stopping import StopBudget
from stigg_sidecar.ops.metrics import Metrics
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
class SpooledRecord:
    """One record synced to the spool and not yet delivered (what the sender needs of it)."""

    seq: int
    kind: str
    size: int
    created_ms: int
    key: str
    usage: UsageReport | None = None
    event: EventReport | None = None
    trace: str | None = None  # the spooling write's traceparent: its delivery links to it


class SpoolSender:
    """Delivers the spool's records to Stigg in batches; reactor only. `start` before anything
    is sent, `load` once the spool is open, `stop` when the service stops."""

    def __init__(
        self,
        clock: IReactorTime,
        writes: UpstreamWrites,
        spool: SpoolFile,
        store: UsageStore,
        budget: StopBudget,
        *,
        batch_size: int = 100,
        flush_interval: float = 0.1,
        send_timeout: float = 10.0,
        backoff: RetryPolicy = DELIVERY_BACKOFF,
        rng: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock  # timers and intervals (monotonic in the process)
        self._wall = wall  # the date: records' creation times, kept on disk across restarts
        self._writes = writes
        self._spool = spool
        self._store = store
        self._budget = budget  # the stop's deadline, shared with the other parts
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._send_timeout = send_timeout
        self._backoff = backoff
        self._rng = rng
        self._metrics = metrics
        self._queues: dict[str, OrderedDict[int, SpooledRecord]] = {kind: OrderedDict() for kind in KINDS}
        self._retries: dict[str, deque[list[int]]] = {kind: deque() for kind in KINDS}  # batches to send as they are
        self._inflight: dict[str, list[int] | None] = {kind: None for kind in KINDS}
        self._failures: dict[str, int] = {kind: 0 for kind in KINDS}  # consecutive, for the backoff
        self._waiting: dict[str, Any] = {kind: None for kind in KINDS}  # backoff timers
        self._told_to_wait: dict[str, bool] = {kind: False for kind in KINDS}  # Stigg's Retry-After
        self._flush_timer: Any = None
        self._bytes = 0
        self._loaded = False
        self._running = False  # between `start` and the beginning of `stop`
        self._stopping = False  # during `stop`: what can go goes at once
        self.delivered = 0
        self.dead_lettered = 0
        self._uncounted: dict[int, UsageReport] = {}  # loaded at start, not yet in the pending usage

    # -- what waits -------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether the records from before the start are loaded (the spool takes writes)."""
        return self._loaded

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

    def enqueue(self, kind: str, records: list[SpooledRecord]) -> None:
        """Records of `kind` synced and acknowledged: they wait for delivery."""
        for record in records:
            self._register(record)
        self._kick(kind)

    def _register(self, record: SpooledRecord) -> None:
        self._queues[record.kind][record.seq] = record
        self._bytes += record.size

    def _forget(self, record: SpooledRecord) -> None:
        self._uncounted.pop(record.seq, None)
        if self._queues[record.kind].pop(record.seq, None) is not None:
            self._bytes -= record.size

    # -- starting and stopping --------------------------------------------------------------------

    def start(self) -> None:
        self._running = True

    def load(self, stored: list[StoredRecord]) -> None:
        """The records the spool held at start: they wait for delivery; unreadable ones go to
        the dead letters. Nothing is sent before `pump_all`."""
        unreadable = []
        for row in stored:
            try:
                if row.kind == bodies.USAGE:
                    spooled = bodies.read_usage(row.body)
                    record = SpooledRecord(row.seq, row.kind, len(row.body), row.created_ms, spooled.key,
                                           usage=spooled.usage, trace=row.trace)
                    # Perhaps delivered already (its delete failed, or the process died first):
                    # counted only once its first delivery fails, i.e. when Stigg may lack it.
                    self._uncounted[row.seq] = spooled.usage
                elif row.kind == bodies.EVENT:
                    event = bodies.read_event(row.body)
                    record = SpooledRecord(row.seq, row.kind, len(row.body), row.created_ms, event.idempotency_key,
                                           event=event, trace=row.trace)
                else:
                    raise bodies.BodyError(f"unknown kind {row.kind!r}")
            except bodies.BodyError as e:
                unreadable.append((row.seq, str(e)))
                continue
            self._register(record)
        for seq, why in unreadable:
            log.warn("Spooled record {seq} is unreadable ({why}); moved to the dead letters", seq=seq, why=why)
            self._spool.dead_letter([seq], f"unreadable: {why}", int(self._wall() * 1000))
        if self.records:
            log.info("Write spool {path}: {n} records from before the restart, delivering", path=self._spool.path,
                     n=self.records)
        self._loaded = True

    def pump_all(self) -> None:
        for kind in KINDS:
            self._pump(kind)

    @inlineCallbacks
    def stop(self) -> Generator[Deferred[Any], Any, None]:
        """Deliver what can be delivered within the stop's budget; then send nothing more."""
        self._running = False
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

    # -- delivering -------------------------------------------------------------------------------

    def _kick(self, kind: str) -> None:
        """Records came: send a full batch now, else within the flush interval."""
        if not self._running and not self._stopping:
            return
        if len(self._queues[kind]) >= self._batch_size:
            self._pump(kind)
        elif self._flush_timer is None or not self._flush_timer.active():
            self._flush_timer = self._clock.callLater(self._flush_interval, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        self.pump_all()

    def _pump(self, kind: str) -> None:  # noqa: C901 - one batch's send and every outcome of it, read in order
        """Send the next batch of `kind` unless one is in flight or waiting out a backoff."""
        if not self._loaded or self._inflight[kind] is not None or self._waiting[kind] is not None:
            return
        if not self._running and not self._stopping:
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

    def _delivered(self, _: Any, kind: str, records: list[SpooledRecord]) -> None:
        for r in records:
            self._forget(r)
            if r.usage is not None:
                self._store.pending_shown(r.usage)
        self._spool.delete([r.seq for r in records]).addErrback(
            lambda f: log.warn("Could not delete delivered records from the spool: {why}", why=f.getErrorMessage())
        )
        self.delivered += len(records)
        if self._metrics is not None:
            self._metrics.spool_delivered.inc(len(records))
        if self._failures[kind]:
            log.info("Stigg takes spooled {kind} records again; {n} still waiting", kind=kind, n=len(self._queues[kind]))
        self._failures[kind] = 0
        self._inflight[kind] = None
        self._next(kind)

    def _next(self, kind: str) -> None:
        queue = self._queues[kind]
        if self._retries[kind] or len(queue) >= self._batch_size or self._stopping:
            self._pump(kind)
        elif queue:
            self._kick(kind)

    def _failed(self, failure: Failure, kind: str, records: list[SpooledRecord]) -> None:
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

    # -- refused for good -------------------------------------------------------------------------

    def _dead_letter(self, kind: str, record: SpooledRecord, why: str) -> None:
        def moved(_: Any) -> None:
            self._forget(record)
            if record.usage is not None:
                self._store.pending_settled(record.seq, record.usage)
                self._store.pending_shown(record.usage)
            self.dead_lettered += 1
            if self._metrics is not None:
                self._metrics.spool_dead_letters.inc()
            log.warn(
                "Stigg refused spooled {what} for customer {customer} (idempotency key {key}) for good: {why};"
                " moved to the dead letters of {path}",
                what=_what(record), customer=quoted(_customer(record)), key=quoted(record.key), why=why,
                path=self._spool.path,
            )
            self._inflight[kind] = None
            self._next(kind)

        def not_moved(failure: Failure) -> None:
            log.warn("Could not move a refused record to the dead letters: {why}", why=failure.getErrorMessage())
            self._inflight[kind] = None
            self._failures[kind] += 1
            self._waiting[kind] = self._clock.callLater(self._backoff.delay(self._failures[kind], self._rng),
                                                        self._retry, kind)

        self._spool.dead_letter([record.seq], why, int(self._wall() * 1000)).addCallbacks(moved, not_moved)


# Ids come from callers: quoted (at most ~100 characters each), like every log line's input.
def _what(record: SpooledRecord) -> str:
    if record.usage is not None:
        return f"usage of {quoted(record.usage.feature_id)}"
    return f"event {quoted(record.event.event_name) if record.event else '?'}"


def _customer(record: SpooledRecord) -> str:
    if record.usage is not None:
        return record.usage.customer_id
    return record.event.customer_id if record.event else "?"
