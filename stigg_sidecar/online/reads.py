"""Reads: the `EntitlementSource` of an online sidecar, called on gRPC handler threads.

A cache hit returns at once with no lock and no thread hop. A miss crosses to the reactor with
`crossing.wait.wait_on_reactor` under the caller's deadline, holding a place in the reads' wait
budget and no runner role of the handler pool; past the deadline a read answers None (the caller
then answers the fallback). A reload is a read too: it waits in the same budget, never in the
writes'. Nothing here changes state: the fetcher and the store do, on the reactor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from stigg_sidecar import spans
from stigg_sidecar.contracts import ApiKeyState, ReloadFailed
from stigg_sidecar.crossing.wait import BudgetExhausted, WaitBudget, wait_on_reactor
from stigg_sidecar.entitlements.records import CustomerEntry, cache_key
from stigg_sidecar.online.fetcher import Fetcher, wall_ms
from stigg_sidecar.online.store import EntitlementStore
from stigg_sidecar.quoting import clipped, quoted
from stigg_sidecar.upstream.errors import UpstreamError
from stigg_sidecar.upstream.wire import MalformedState

log = Logger()


def _nothing(*_: object) -> None:
    return None


@dataclass(frozen=True)
class ReadCounters:
    """Cache hits, misses, and misses answered at once without waiting on Stigg, by reason:
    "overloaded" (MAX_WAITING_READS reached), "upstream_down" (its breaker is open). Called on
    handler threads, so thread-safe."""

    hit: Callable[[], None] = _nothing
    miss: Callable[[], None] = _nothing
    fast_failed: Callable[[str], None] = _nothing


class _ThrottledWarning:
    """One "answering fallbacks" line per interval, however many reads fall back: during an
    outage every miss would otherwise log. Handler threads call it; a rare extra line from a race
    is harmless, so there is no lock."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warn(self, customer_id: str, why: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        self._next = now + self._interval
        suppressed, self._suppressed = self._suppressed, 0
        more = f" ({suppressed} more fallback reads since the last such line)" if suppressed else ""
        log.warn(
            "Entitlements for {customer} unavailable ({why}); answering fallbacks{more}",
            customer=quoted(customer_id),
            why=why,  # our wording, with any outside text in it clipped where it was composed
            suppressed=suppressed,
            more=more,
        )


class Reads:
    def __init__(
        self,
        reactor: IReactorThreads,
        store: EntitlementStore,
        fetcher: Fetcher,
        key: ApiKeyState,
        waiting: WaitBudget,
        counters: ReadCounters = ReadCounters(),
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self._reactor = reactor
        # The time of decisions and expiries: the local clock, or Stigg's when the local one is off.
        self._now_ms = now_ms
        self._store = store
        self._fetcher = fetcher
        self._key = key
        # How many handler threads may wait on Stigg at once for reads (the writes have their
        # own budget, so neither takes the other's places). A waiting thread gives its runner
        # role to another (the handler pool's blocking()): this bounds blocked threads, not the
        # threads that serve.
        self.waiting = waiting
        self._counters = counters
        self._fresh = store.fresh
        self._hit = counters.hit
        self._fallback_log = _ThrottledWarning(interval=10.0)

    def now_ms(self) -> int:
        return self._now_ms()

    def peek(self, customer_id: str, resource_id: str | None) -> CustomerEntry | None:
        # Every cached read: the cache's own method and the counter, with no call in between.
        entry = self._fresh(cache_key(customer_id, resource_id), int(time.time() * 1000))
        if entry is not None:
            self._hit()
        return entry

    def memo_grew(self, entry: CustomerEntry, nbytes: int) -> None:
        self._reactor.callFromThread(self._store.charge, entry, nbytes)

    def lookup(self, customer_id: str, resource_id: str | None, timeout: float) -> CustomerEntry | None:
        """After `peek` missed: (crossing to the reactor under `timeout`) Redis and the API; None:
        fallback. Memory is not looked at again (the reader just did: one peek per read)."""
        self._counters.miss()
        if self._key.rejected:
            return None
        with spans.tracer.start_as_current_span("entitlements miss", attributes=spans.ids(customer_id, resource_id)) as span:
            entry = self._wait_for_fetch(customer_id, resource_id, timeout)
            span.set_attribute("stigg.fallback", entry is None)
            return entry

    def _wait_for_fetch(self, customer_id: str, resource_id: str | None, timeout: float) -> CustomerEntry | None:
        try:
            return wait_on_reactor(self._reactor, self.waiting, self._stored_or_fetched, customer_id, resource_id,
                                   timeout=timeout)
        except BudgetExhausted:
            # MAX_WAITING_READS reads already wait (Stigg is slow and very many customers are
            # cold): fetch in the background and answer the fallback now.
            self._counters.fast_failed("overloaded")
            self._reactor.callFromThread(self._fetcher.fetch_in_background, customer_id, resource_id)
            self._fallback_log.warn(customer_id, "too many reads already waiting on Stigg")
        except TimeoutError:
            self._fallback_log.warn(customer_id, "not fetched in time")
        except UpstreamError as e:
            if e.fast_failed:
                self._counters.fast_failed("upstream_down")
            self._fallback_log.warn(customer_id, e.message)
        except MalformedState as e:
            self._fallback_log.warn(customer_id, f"malformed: {clipped(str(e))}")
        return None

    def _stored_or_fetched(self, customer_id: str, resource_id: str | None) -> CustomerEntry | Deferred:
        """On the reactor: a fetch that landed between the reader's peek and this crossing has
        stored the entry already; answer it rather than ask Stigg again (the hot path peeks once)."""
        entry = self._fresh(cache_key(customer_id, resource_id), int(time.time() * 1000))
        return entry if entry is not None else self._fetcher.fetch(customer_id, resource_id)

    def reload(self, customer_id: str, resource_id: str | None, timeout: float) -> bool:
        """Refetch through GraphQL on the reactor; true unless the customer is gone. A rejected
        key answers false at once (nothing is sent)."""
        if self._key.rejected:
            return False
        try:
            entry = wait_on_reactor(self._reactor, self.waiting, self._fetcher.reload, customer_id, resource_id,
                                    timeout=timeout)
        except BudgetExhausted:
            raise ReloadFailed(f"{self.waiting.limit} reads already waiting on Stigg (MAX_WAITING_READS)") from None
        except TimeoutError:
            raise ReloadFailed(f"Stigg did not answer within {timeout:.3g}s") from None
        except UpstreamError as e:
            raise ReloadFailed(e.message) from None
        except MalformedState as e:
            raise ReloadFailed(f"Stigg answered malformed entitlements: {clipped(str(e))}") from None
        except Exception as e:
            log.failure("A reload failed unexpectedly")
            raise ReloadFailed(f"the reload failed ({type(e).__name__})") from None
        return entry.access_denied_reason not in ("CustomerNotFound", "CustomerIsArchived")
