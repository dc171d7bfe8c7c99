"""Keeping cached entries fresh without the socket: the Refresher and the Poller.

`Refresher.refresh()` refetches every cached entry, most recently read first, with bounded
concurrency and rate, so a reconnect or a poll never floods Stigg. `Poller` runs a refresh every
POLL_INTERVAL_SECS while it is active (socket down or disabled) and stands down when the socket
is back. Reactor only; time comes from the injected reactor, so tests drive it with a Clock.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from stigg_sidecar.entitlements.records import CustomerEntry, cache_key

log = Logger()

_FAILED_KEYS = 100_000  # customers remembered as failed at most

# fetch(customer_id, resource_id, mode): the Fetcher's, which stores what it gets.
Fetch = Callable[[str, "str | None", str], Deferred]


class CachedKeys(Protocol):
    """What the refresher reads of the store: which customers are cached, most recent first."""

    def __len__(self) -> int: ...

    def keys_by_recency(self) -> Iterator[str]: ...

    def entry(self, key: str) -> CustomerEntry | None: ...


class Refresher:
    def __init__(self, reactor: IReactorTime, cached: CachedKeys, fetch: Fetch, concurrency: int = 4,
                 rate: float = 50.0) -> None:
        self._reactor = reactor
        self._cached = cached
        self._fetch = fetch
        self._concurrency = concurrency
        self._pause = concurrency / rate  # per worker, so all workers together stay under `rate`
        self._running: Deferred | None = None
        self._queued: Deferred | None = None  # a revalidation waiting for the running pass to end
        self._pauses: set[Deferred] = set()
        self._stopped = False
        self._closing = False
        # Customers whose last refetch failed (insertion-ordered, bounded): retried the moment
        # Stigg answers again, not only at the next pass (issue 20, finding 10).
        self._failed_keys: dict[str, None] = {}
        self.refreshed = 0
        self.failed = 0

    @property
    def busy(self) -> bool:
        return self._running is not None

    def refresh(self) -> Deferred:
        """Refetch all cached entries; a refresh already running is joined, not repeated."""
        if self._running is not None:
            return self._running
        cached = self._cached
        # Entries are looked up as workers reach them: no Python pass over the whole cache here,
        # and a customer evicted meanwhile is skipped rather than refetched.
        return self._pass(map(cached.entry, cached.keys_by_recency()), len(cached))

    def retry_failed(self) -> Deferred:
        """Refetch the customers whose last refetch failed (Stigg answers again), unless a pass is
        running: it reaches them too. Fires when done."""
        if self._running is not None or not self._failed_keys:
            return succeed(None)
        cached = self._cached
        keys = list(self._failed_keys)
        return self._pass(map(cached.entry, keys), len(keys))

    def _pass(self, entries: Iterator[CustomerEntry | None], count: int) -> Deferred:
        self._stopped = False
        work = ((e.customer_id, e.resource_id) for e in entries if e is not None)
        done = gatherResults([self._worker(work) for _ in range(min(self._concurrency, count) or 1)])
        # Running from here: with nothing to fetch `done` has fired already, and `finished` must
        # come after this, or the refresh would stay "running" and every later poll join it.
        self._running = done

        def finished(_: object) -> None:
            self._running = None
            log.debug("Refreshed up to {n} cached customers ({failed} failed)", n=count, failed=self.failed)

        done.addBoth(finished)
        return done

    def revalidate(self) -> Deferred:
        """A whole pass that starts now, never joined to one already running: that pass began
        while the socket (or Stigg) was down, what it fetched may predate changes made since, and
        what it failed to fetch is not fetched again. It is cut short after its fetches in flight,
        and the new pass starts when it has ended; fires when the new pass has."""
        if self._running is None:
            return self.refresh()
        if self._queued is None:
            queued = self._queued = Deferred()
            self._running.addBoth(self._start_queued)  # (cutting it short may end it at once)
            self._cut_short()
            return queued
        return self._queued

    def _start_queued(self, result: object) -> object:
        queued, self._queued = self._queued, None
        if queued is not None:
            if self._closing:
                queued.callback(None)
            else:
                self.refresh().chainDeferred(queued)
        return result

    def _cut_short(self) -> None:
        self._stopped = True
        for pause in list(self._pauses):
            pause.cancel()

    def stop(self) -> Deferred:
        """End the running refresh after the fetches already in flight; fires when it has."""
        self._closing = True
        self._stopped = True
        for pause in list(self._pauses):
            pause.cancel()
        return self._running if self._running is not None else succeed(None)

    @inlineCallbacks
    def _worker(self, work: Iterator[tuple[str, str | None]]) -> Generator[Deferred[Any], Any, None]:
        for customer_id, resource_id in work:
            if self._stopped:
                return
            key = cache_key(customer_id, resource_id)
            try:
                yield self._fetch(customer_id, resource_id, "refresh")
                self.refreshed += 1
                self._failed_keys.pop(key, None)
            except Exception:
                self.failed += 1
                if len(self._failed_keys) < _FAILED_KEYS:
                    self._failed_keys[key] = None
            if self._stopped:
                return
            pause = deferLater(self._reactor, self._pause, lambda: None)
            self._pauses.add(pause)
            try:
                yield pause
            except CancelledError:
                return
            finally:
                self._pauses.discard(pause)


class Poller(Service):
    name = "poller"

    def __init__(self, reactor: IReactorTime, refresher: Refresher, interval: float, active: bool) -> None:
        self._reactor = reactor
        self._refresher = refresher
        self._interval = interval
        self.active = active
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.active:
            self._start_loop()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self._stop_loop()
        return self._refresher.stop()

    def activate(self) -> None:
        """The socket is down (or disabled): poll."""
        self.active = True
        if self.running:
            self._start_loop()

    def stand_down(self) -> None:
        """The socket is back: it carries the updates now."""
        self.active = False
        self._stop_loop()

    def _start_loop(self) -> None:
        if self._loop is None and self._interval > 0:
            self._loop = LoopingCall(self._poll)
            self._loop.clock = self._reactor
            self._loop.start(self._interval, now=False)
            # Debug: at start-up the socket usually connects at once; its ups and downs are logged there.
            log.debug("Polling Stigg every {s}s while real-time updates are off", s=self._interval)

    def _stop_loop(self) -> None:
        if self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None

    def _poll(self) -> Deferred:
        if self._refresher.busy:
            return succeed(None)
        return self._refresher.refresh()
