"""Fetcher: a customer's entry from Redis or Stigg, one request per customer at a time (reactor only).

Single flight: concurrent misses for one customer (and mode) share one fetch. A miss reads the
fleet's Redis first; when Redis has nothing usable it takes the fleet's fetch lock, so one sidecar
of the fleet asks Stigg while the others wait for its answer in Redis. What a fetch gets is stored
through the `EntitlementStore`, never written to the cache here.

Redis is an accelerator, never a delay (issue 20, finding 1): a miss's Redis steps (read, lock,
read again under the lock) share one budget, REDIS_TIMEOUT_MS, not one each; past it the miss asks
Stigg at once, and for SLOW_REDIS_SKIP seconds after that misses skip Redis altogether. Nor does a
miss wait for Stigg's answer to reach Redis: the lock is released once it has.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from stigg_sidecar import spans
from stigg_sidecar.cache.memory import earliest_expiry
from stigg_sidecar.entitlements.records import CustomerEntry, cache_key
from stigg_sidecar.online.malformed import MalformedEntitlements
from stigg_sidecar.online.store import EntitlementStore
from stigg_sidecar.upstream.wire import entry_from_state


class EntitlementsApi(Protocol):
    """What the fetcher asks of Stigg (`upstream.api.StiggApi`)."""

    def fetch_state(self, customer_id: str, resource_id: str | None, timeout: float,
                    use_edge: bool | None = None) -> Deferred: ...


class FleetLocks(Protocol):
    """The fleet's Redis as the fetcher uses it (`cache.redis.RedisMirror`): reads and the fetch lock."""

    @property
    def connected(self) -> bool: ...

    def read(self, customer_id: str, resource_id: str | None = None) -> Deferred: ...

    def acquire_fetch_lock(self, customer_id: str, resource_id: str | None = None, ttl_ms: int = 5000) -> Deferred: ...

    def release_fetch_lock(self, customer_id: str, resource_id: str | None, token: str,
                           error: str | None = None) -> Deferred: ...

    def wait_for_fetch(self, customer_id: str, resource_id: str | None, timeout: float) -> Deferred: ...


log = Logger()

# After a miss's Redis steps overran their budget, misses skip Redis for this long (seconds).
SLOW_REDIS_SKIP = 5.0


def wall_ms() -> int:
    return int(time.time() * 1000)


class Fetcher:
    def __init__(
        self,
        api: EntitlementsApi,
        store: EntitlementStore,
        malformed: MalformedEntitlements,
        fetch_timeout: float,
        fleet: FleetLocks | None = None,
        background_limit: int = 512,
        now_ms: Callable[[], int] = wall_ms,
        clock: IReactorTime | None = None,
        redis_budget: float = 0.25,
    ) -> None:
        self._api = api
        self._clock = clock
        self._redis_budget = redis_budget
        self._skip_redis_until = 0.0
        self._store = store
        self._malformed = malformed
        self._fetch_timeout = fetch_timeout
        self._fleet = fleet
        self._background_limit = background_limit
        self._now_ms = now_ms
        self._inflight: dict[tuple[str, str], list[Deferred]] = {}
        self._background = 0  # fetches for reads that answered a fallback

    def fetch(self, customer_id: str, resource_id: str | None, mode: str = "miss") -> Deferred:
        """The customer's entry, stored; one request per key and mode at a time.

        Modes: "miss" (a read missed memory: Redis first, then the API under the fleet's fetch
        lock), "refresh" (the API through Edge when enabled), "reload" (the API through GraphQL,
        never Edge, which may lag). What the API answers is written through to Redis.
        """
        flight = (cache_key(customer_id, resource_id), mode)
        mine: Deferred = Deferred()
        waiters = self._inflight.get(flight)
        if waiters is not None:
            waiters.append(mine)
            # Waiting on another caller's fetch: its spans are in that caller's trace.
            return spans.span_until(f"join in-flight {mode} fetch", lambda: mine,
                                    attributes=spans.ids(customer_id, resource_id))
        self._inflight[flight] = [mine]
        self._fetch(customer_id, resource_id, mode).addBoth(self._landed, flight)
        return mine

    def reload(self, customer_id: str, resource_id: str | None) -> Deferred:
        """Refetch through GraphQL (never Edge, which may lag); fires with the entry."""
        return spans.span_until("reload entitlements", self.fetch, customer_id, resource_id, "reload",
                                attributes=spans.ids(customer_id, resource_id))

    def fetch_in_background(self, customer_id: str, resource_id: str | None) -> None:
        """Fetch for a read that answered a fallback without waiting, within a bound: unbounded, a
        burst past MAX_WAITING_READS started a fetch per fallback answered, the client raced ahead
        of Stigg, and thousands of fetches in flight at once (connections, buffers, parsed answers)
        left the heap several times the size of a steady warm-up. Past the bound the customer is
        fetched on a later read."""
        if self._background >= self._background_limit:
            return
        self._background += 1

        def landed(_: object) -> None:
            self._background -= 1

        self.fetch(customer_id, resource_id).addBoth(landed)

    def fetching(self, key: str) -> bool:
        """Whether a fetch for `key` is in flight."""
        return any(flight_key == key for flight_key, _ in self._inflight)

    @property
    def in_flight(self) -> int:
        """Fetches in flight (distinct keys and modes)."""
        return len(self._inflight)

    def _landed(self, result: Any, flight: tuple[str, str]) -> None:
        for waiter in self._inflight.pop(flight):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    @inlineCallbacks
    def _fetch(self, customer_id: str, resource_id: str | None, mode: str) -> Any:
        fleet = self._fleet
        token = None
        if fleet is not None and mode == "miss" and not self._skipping_redis():
            try:
                shared, token, busy = yield self._within_budget(fleet, customer_id, resource_id)
            except TimeoutError:
                self._redis_was_slow()
                shared, token, busy = None, None, False
            if shared is not None:
                return self._store.put(shared)
            # Another sidecar of the fleet is fetching this customer: wait for its result.
            if busy and (yield spans.span_until(
                "wait for the fleet's fetch", fleet.wait_for_fetch, customer_id, resource_id, self._fetch_timeout + 0.5
            )) and not self._skipping_redis():
                shared = yield _traced_read(fleet, customer_id, resource_id)
                if self._usable(shared):
                    return self._store.put(shared)
        try:
            use_edge = False if mode == "reload" else None
            state = yield self._api.fetch_state(customer_id, resource_id, self._fetch_timeout, use_edge)
            fetched = entry_from_state(customer_id, resource_id, state, self._now_ms())
            self._malformed.seen(fetched, throttled=(mode != "reload"))
        except Exception:
            if fleet is not None and token is not None:
                fleet.release_fetch_lock(customer_id, resource_id, token, error="fetch failed")
            raise
        # Into memory now; the read does not wait for Redis. The lock goes once Redis has the
        # answer, so the fleet's waiters find it there.
        written = self._store.fetched(fetched, force=(mode == "reload"))
        if fleet is not None and token is not None:
            lock = token
            written.addBoth(lambda _: fleet.release_fetch_lock(customer_id, resource_id, lock))
        return self._store.entry(fetched.key) or fetched

    def _within_budget(self, fleet: FleetLocks, customer_id: str, resource_id: str | None) -> Deferred:
        """The Redis steps, or TimeoutError once the budget is spent. Steps that answer later are
        not cut off (Redis's own timeout bounds them), but a lock they took is released at once."""
        steps = self._redis_steps(fleet, customer_id, resource_id)
        if self._clock is None:
            return steps
        raced: Deferred = Deferred()

        def too_late() -> None:
            if not raced.called:
                raced.errback(TimeoutError(f"Redis took over {self._redis_budget:.3g}s"))

        timer = self._clock.callLater(self._redis_budget, too_late)

        def landed(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if not raced.called:
                raced.callback(result)  # a Failure errbacks
            elif not isinstance(result, Failure) and result[1] is not None:
                fleet.release_fetch_lock(customer_id, resource_id, result[1])

        steps.addBoth(landed)
        return raced

    @inlineCallbacks
    def _redis_steps(self, fleet: FleetLocks, customer_id: str, resource_id: str | None) -> Any:
        """A miss's Redis steps, under one budget: (a usable entry or None, our lock token or None,
        whether a peer holds the lock)."""
        shared = yield _traced_read(fleet, customer_id, resource_id)
        if self._usable(shared):
            return shared, None, False
        lock_ms = int(self._fetch_timeout * 1000) + 1000  # held as long as our fetch may take
        token = yield spans.span_until(
            "fleet fetch lock", lambda: fleet.acquire_fetch_lock(customer_id, resource_id, ttl_ms=lock_ms)
        )
        if token is not None and fleet.connected:
            # The read above may predate a peer's whole fetch: it wrote Redis and released the
            # lock between our read and our lock. Looked at again under the lock, the fleet
            # fetches a customer once.
            shared = yield _traced_read(fleet, customer_id, resource_id)
            if self._usable(shared):
                fleet.release_fetch_lock(customer_id, resource_id, token)
                return shared, None, False
        return None, token, token is None and fleet.connected

    def _skipping_redis(self) -> bool:
        return self._clock is not None and self._clock.seconds() < self._skip_redis_until

    def _redis_was_slow(self) -> None:
        assert self._clock is not None
        if not self._skipping_redis():
            log.warn(
                "Redis did not answer a cache miss within {ms:.0f} ms (REDIS_TIMEOUT_MS); misses ask Stigg"
                " directly for the next {skip:.0f}s",
                ms=self._redis_budget * 1000, skip=SLOW_REDIS_SKIP,
            )
        self._skip_redis_until = self._clock.seconds() + SLOW_REDIS_SKIP

    def _usable(self, shared: CustomerEntry | None) -> bool:
        """A Redis copy is used unless an entitlement in it is past its validUntil."""
        if shared is None:
            return False
        expires = earliest_expiry(shared)
        return expires is None or expires > self._now_ms()


def _traced_read(fleet: FleetLocks, customer_id: str, resource_id: str | None) -> Deferred:
    return spans.span_until("redis read", fleet.read, customer_id, resource_id,
                            kind=spans.SpanKind.CLIENT, attributes={"db.system": "redis"})
