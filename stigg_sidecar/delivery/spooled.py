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

Two parts do the work: `accepting.SpoolAcceptor` (append under the caller's handoff, the
acknowledgement, the pending usage) and `sending.SpoolSender` (what waits, batches, outcomes,
dead letters, backoff, resume). This service builds both, opens the spool, gates readiness on
loading it, and orders the stop.

Traces: accepting a write is a PRODUCER span ("spool usage"/"spool events", the commit on the
spool's thread under it) whose traceparent is kept with each record, on disk too; each delivery
attempt is a CONSUMER span in a trace of its own, linking to the writes it carries.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from stigg_sidecar.contracts import EventReport, UsageAck, UsageReport, UsageStore
from stigg_sidecar.crossing.gate import WriteGate
from stigg_sidecar.delivery.accepting import SpoolAcceptor
from stigg_sidecar.delivery.sending import DELIVERY_BACKOFF, SpoolSender
from stigg_sidecar.delivery.spool import SpoolFile, StoredRecord
from stigg_sidecar.delivery.upstream import UpstreamWrites
from stigg_sidecar.lifecycle.stopping import StopBudget
from stigg_sidecar.ops.metrics import Metrics
from stigg_sidecar.ops.readiness import Readiness
from stigg_sidecar.upstream.api import RetryPolicy

log = Logger()


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
        self._gate = gate
        self.spool = spool
        self._readiness = readiness
        self.sender = SpoolSender(
            clock, writes, spool, store,
            # The stop's deadline, shared with the other parts (else `grace` seconds of its own).
            budget if budget is not None else StopBudget(grace, clock),
            batch_size=batch_size, flush_interval=flush_interval, send_timeout=send_timeout, backoff=backoff,
            rng=rng, metrics=metrics, wall=wall,
        )
        self.acceptor = SpoolAcceptor(spool, self.sender, store, max_bytes=max_bytes, wall=wall)

    # -- gauges -----------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether the spool is open and what it held is loaded: writes are taken."""
        return self.sender.loaded

    @property
    def records(self) -> int:
        return self.sender.records

    @property
    def bytes(self) -> int:
        return self.sender.bytes

    def oldest_age(self) -> float:
        """Seconds since the oldest undelivered record was acknowledged (0 when none waits)."""
        return self.sender.oldest_age()

    @property
    def delivered(self) -> int:
        return self.sender.delivered

    @property
    def dead_lettered(self) -> int:
        return self.sender.dead_lettered

    @property
    def unacknowledged(self) -> int:
        """Records synced after their caller's deadline or cancellation, removed."""
        return self.acceptor.unacknowledged

    # -- handler threads --------------------------------------------------------------------------

    def report_usage(
        self, usages: Sequence[UsageReport], timeout: float, still_wanted: Callable[[], bool] | None = None
    ) -> Sequence[UsageAck]:
        return self._gate.run_acknowledged(self.acceptor.accept_usage, usages, timeout=timeout,
                                           still_wanted=still_wanted)

    def report_events(
        self, events: Sequence[EventReport], timeout: float, still_wanted: Callable[[], bool] | None = None
    ) -> None:
        self._gate.run_acknowledged(self.acceptor.accept_events, events, timeout=timeout, still_wanted=still_wanted)

    # -- reactor ----------------------------------------------------------------------------------

    def resume(self, source: str = "") -> None:
        """Stigg answers again (`StiggRecovery`): a batch waiting out its backoff goes now."""
        self.sender.resume(source)

    def startService(self) -> None:
        super().startService()
        self.acceptor.start()
        self.sender.start()
        if self._readiness is not None:
            self._readiness.block("spool", "loading the write spool")
        self.spool.open().addCallbacks(self._opened, self._not_opened)

    def _opened(self, stored: list[StoredRecord]) -> None:
        self.sender.load(stored)
        if self._readiness is not None:
            self._readiness.unblock("spool")
        self.sender.pump_all()

    def _not_opened(self, failure: Failure) -> None:
        log.error("The write spool cannot be opened: {why}; writes are refused", why=failure.getErrorMessage())
        if self._readiness is not None:
            self._readiness.block("spool", f"the write spool cannot be opened: {failure.getErrorMessage()}")

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        """Deliver what can be delivered within the stop's budget; the rest stays on disk."""
        super().stopService()
        self.acceptor.stop()
        yield self.sender.stop()
        if self.records:
            log.info("{n} spooled {records} on disk for the next start", n=self.records,
                     records="record stays" if self.records == 1 else "records stay")
        yield self.spool.close()
