"""OnlineSidecar: reads from the reactor-owned cache, misses and writes through Stigg's API.

The two halves of this class live on different threads, and that is the point of it:

- `peek` and `lookup` are called on gRPC handler threads. A cache hit returns at once with no
  lock and no thread hop. A miss crosses to the reactor with `crossing.wait_on_reactor` under the
  caller's deadline, holding a place in the reads' wait budget and no runner role of the handler
  pool; past the deadline a read answers None (the caller then answers the fallback).
- `fetch`, `reload_entry`, `apply_usage_result`, ... run on the reactor: they own the in-flight
  fetch table (single flight: concurrent misses for one customer share one upstream request) and
  every cache change.

Writes (usage, events) and the handler side of reloads live in `stigg_sidecar.delivery`.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from stigg_sidecar import spans
from stigg_sidecar.cache.memory import EntitlementCache, earliest_expiry
from stigg_sidecar.cache.redis import RedisMirror
from stigg_sidecar.contracts import UsageReport
from stigg_sidecar.crossing.wait import BudgetExhausted, WaitBudget, wait_on_reactor
from stigg_sidecar.entitlements.records import (
    CustomerEntry,
    MalformedState,
    Usage,
    apply_usage,
    cache_key,
    entry_from_state,
    parse_time,
)
from stigg_sidecar.quoting import clipped, quoted
from stigg_sidecar.upstream.api import StiggApi, UpstreamError

if TYPE_CHECKING:
    from stigg_sidecar.delivery.pending import PendingUsage

log = Logger()

# Malformed entitlements from Stigg are logged once per customer per interval (seconds), for at
# most this many customers remembered at once, naming at most this many items per line.
_MALFORMED_LOG_INTERVAL = 60.0
_MALFORMED_LOG_KEYS = 10_000
_MALFORMED_LOG_ITEMS = 5


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


class OnlineSidecar:
    def __init__(
        self,
        reactor,
        api: StiggApi,
        cache: EntitlementCache,
        fetch_timeout: float,
        max_waiting_reads: int = 512,
        max_waiting_writes: int = 256,
    ) -> None:
        self._reactor = reactor
        # How many handler threads may wait on Stigg at once, reads and writes apart so neither
        # takes the other's places. A waiting thread gives its runner role to another (the
        # handler pool's blocking()), so these bound blocked threads, not the threads that serve.
        self.waiting_reads = WaitBudget(max_waiting_reads, "reads")
        self._background_fetches = 0  # fetches for reads that answered a fallback (reactor only)
        self.waiting_writes = WaitBudget(max_waiting_writes, "writes")  # used by delivery's WriteGate
        self._on_hit: Callable[[], None] = lambda: None
        self._on_miss: Callable[[], None] = lambda: None
        self._on_fast_failed: Callable[[str], None] = lambda reason: None
        self._api = api
        self.cache = cache
        self._fetch_timeout = fetch_timeout
        self._inflight: dict[tuple[str, str], list[Deferred]] = {}
        self.mirror: RedisMirror | None = None  # set when REDIS_ENVIRONMENT_PREFIX is
        self.key_rejected = False  # set by the key check: no network, fallbacks only
        # Spooled usage not yet delivered, applied on top of what Stigg says (SPOOL_WRITES).
        self.pending: PendingUsage | None = None
        self._fallback_log = _ThrottledWarning(interval=10.0)
        # Entitlements Stigg sent malformed (each left out of its entry, answered by fallbacks):
        # counted, and logged once per customer per interval (reactor only).
        self.malformed_entitlements = 0
        self._malformed_logged: dict[str, float] = {}

    def set_counters(
        self,
        on_hit: Callable[[], None],
        on_miss: Callable[[], None],
        on_fast_failed: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """Count cache hits, misses, and misses answered at once without waiting on Stigg, by
        reason: "overloaded" (MAX_WAITING_READS reached), "upstream_down" (its breaker is open).
        Called on handler threads, so thread-safe."""
        self._on_hit, self._on_miss, self._on_fast_failed = on_hit, on_miss, on_fast_failed

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    # -- handler threads --------------------------------------------------------------------------

    def peek(self, customer_id: str, resource_id: str | None) -> CustomerEntry | None:
        entry = self.cache.get_fresh(cache_key(customer_id, resource_id), self.now_ms())
        if entry is not None:
            self._on_hit()
        return entry

    def memo_grew(self, entry: CustomerEntry, nbytes: int) -> None:
        self._reactor.callFromThread(self.cache.charge, entry, nbytes)

    def lookup(self, customer_id: str, resource_id: str | None, timeout: float) -> CustomerEntry | None:
        """Memory, else (crossing to the reactor under `timeout`) Redis and the API; None: fallback."""
        entry = self.peek(customer_id, resource_id)
        if entry is not None:
            return entry
        self._on_miss()
        if self.key_rejected:
            return None
        with spans.tracer.start_as_current_span("entitlements miss", attributes=spans.ids(customer_id, resource_id)) as span:
            entry = self._wait_for_fetch(customer_id, resource_id, timeout)
            span.set_attribute("stigg.fallback", entry is None)
            return entry

    def _wait_for_fetch(self, customer_id: str, resource_id: str | None, timeout: float) -> CustomerEntry | None:
        try:
            return wait_on_reactor(self._reactor, self.waiting_reads, self.fetch, customer_id, resource_id, timeout=timeout)
        except BudgetExhausted:
            # MAX_WAITING_READS reads already wait (Stigg is slow and very many customers are
            # cold): fetch in the background and answer the fallback now.
            self._on_fast_failed("overloaded")
            self._reactor.callFromThread(self._fetch_quietly, customer_id, resource_id)
            self._fallback_log.warn(customer_id, "too many reads already waiting on Stigg")
        except TimeoutError:
            self._fallback_log.warn(customer_id, "not fetched in time")
        except UpstreamError as e:
            if e.fast_failed:
                self._on_fast_failed("upstream_down")
            self._fallback_log.warn(customer_id, e.message)
        except MalformedState as e:
            self._fallback_log.warn(customer_id, f"malformed: {clipped(str(e))}")
        return None

    def _fetch_quietly(self, customer_id: str, resource_id: str | None) -> None:
        # Bounded like the reads that wait: unbounded, a burst past MAX_WAITING_READS started a
        # fetch per fallback answered, the client raced ahead of Stigg, and thousands of fetches in
        # flight at once (connections, buffers, parsed answers) left the heap several times the
        # size of a steady warm-up. Past the bound the customer is fetched on a later read.
        if self._background_fetches >= self.waiting_reads.limit:
            return
        self._background_fetches += 1

        def landed(_: object) -> None:
            self._background_fetches -= 1

        self.fetch(customer_id, resource_id).addBoth(landed)

    # -- reactor ----------------------------------------------------------------------------------

    def fetch(self, customer_id: str, resource_id: str | None, mode: str = "miss") -> Deferred:
        """The customer's entry, stored in the cache; one request per key and mode at a time.

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

    def fetching(self, key: str) -> bool:
        """Whether a fetch for `key` is in flight (reactor only)."""
        return any(flight_key == key for flight_key, _ in self._inflight)

    def _landed(self, result: Any, flight: tuple[str, str]) -> None:
        for waiter in self._inflight.pop(flight):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    @inlineCallbacks
    def _fetch(self, customer_id: str, resource_id: str | None, mode: str):
        mirror = self.mirror
        token = None
        if mirror is not None and mode == "miss":
            shared = yield spans.span_until("redis read", mirror.read, customer_id, resource_id,
                                            kind=spans.SpanKind.CLIENT, attributes={"db.system": "redis"})
            if self._usable(shared):
                return self.store(shared)
            lock_ms = int(self._fetch_timeout * 1000) + 1000  # held as long as our fetch may take
            token = yield spans.span_until(
                "fleet fetch lock", lambda: mirror.acquire_fetch_lock(customer_id, resource_id, ttl_ms=lock_ms)
            )
            if token is not None and mirror.connected:
                # The read above may predate a peer's whole fetch: it wrote Redis and released the
                # lock between our read and our lock. Looked at again under the lock, the fleet
                # fetches a customer once.
                shared = yield spans.span_until("redis read", mirror.read, customer_id, resource_id,
                                                kind=spans.SpanKind.CLIENT, attributes={"db.system": "redis"})
                if self._usable(shared):
                    mirror.release_fetch_lock(customer_id, resource_id, token)
                    return self.store(shared)
            # Another sidecar of the fleet is fetching this customer: wait for its result.
            if token is None and (yield spans.span_until(
                "wait for the fleet's fetch", mirror.wait_for_fetch, customer_id, resource_id, self._fetch_timeout + 0.5
            )):
                shared = yield spans.span_until("redis read", mirror.read, customer_id, resource_id,
                                                kind=spans.SpanKind.CLIENT, attributes={"db.system": "redis"})
                if self._usable(shared):
                    return self.store(shared)
        try:
            use_edge = False if mode == "reload" else None
            state = yield self._api.fetch_state(customer_id, resource_id, self._fetch_timeout, use_edge)
            fetched = entry_from_state(customer_id, resource_id, state, self.now_ms())
            self.count_malformed(fetched, throttled=(mode != "reload"))
        except Exception:
            if mirror is not None and token is not None:
                mirror.release_fetch_lock(customer_id, resource_id, token, error="fetch failed")
            raise
        # An explicit reload is the caller saying "this is the truth now": it replaces memory even
        # when Stigg's entry timestamp went backwards (an entitlement removed); usage still newer wins.
        current = self.store(fetched, force=(mode == "reload"))
        if mirror is not None:
            yield mirror.write(fetched)  # before the lock goes, so waiters find it
            if token is not None:
                mirror.release_fetch_lock(customer_id, resource_id, token)
        return current

    def count_malformed(self, entry: CustomerEntry, throttled: bool = True) -> None:
        """Count the entitlements Stigg sent malformed in `entry` and say which and why: once per
        customer per MALFORMED_LOG_INTERVAL, or every time when not `throttled` (a reload is
        someone asking what Stigg has)."""
        if not entry.malformed:
            return
        self.malformed_entitlements += len(entry.malformed)
        key, now = entry.key, self._reactor.seconds()
        logged = self._malformed_logged
        if throttled and logged.get(key, -math.inf) > now:
            return
        if len(logged) >= _MALFORMED_LOG_KEYS:
            logged.clear()  # bounded: at worst a customer is logged again early
        logged[key] = now + _MALFORMED_LOG_INTERVAL
        problems = "; ".join(clipped(m.problem) for m in entry.malformed[:_MALFORMED_LOG_ITEMS])
        more = len(entry.malformed) - _MALFORMED_LOG_ITEMS
        log.warn(
            "Stigg sent {n} malformed entitlement(s) for {customer}: {problems}{more}. Reads of those answer"
            " fallbacks; the customer's other entitlements are Stigg's data",
            n=len(entry.malformed),
            customer=quoted(entry.customer_id),
            problems=problems,
            more=f" (and {more} more)" if more > 0 else "",
        )

    def store(self, entry: CustomerEntry, force: bool = False) -> CustomerEntry:
        """Cache `entry` unless a newer one is cached (or `force`); return whichever is current.

        Usage acknowledged but not yet delivered (the write spool) is applied on top of it."""
        if self.pending is not None:
            entry = self.pending.adjust_entry(entry)
        if self.cache.put(entry, force=force):
            return self.cache.get_entry(entry.key) or entry
        return self.cache.get_entry(entry.key) or entry

    def _usable(self, shared: CustomerEntry | None) -> bool:
        """A Redis copy is used unless an entitlement in it is past its validUntil."""
        if shared is None:
            return False
        expires = earliest_expiry(shared)
        return expires is None or expires > self.now_ms()

    def reload_entry(self, customer_id: str, resource_id: str | None, timeout: float) -> Deferred:
        """Refetch through GraphQL (never Edge, which may lag); fires with the entry."""
        return spans.span_until("reload entitlements", self.fetch, customer_id, resource_id, "reload",
                                attributes=spans.ids(customer_id, resource_id))

    def apply_usage_result(self, usage: UsageReport, result: dict) -> None:
        """Stigg's answer to a usage report is authoritative: it updates the cached usage."""
        stamp = parse_time(result.get("timestamp")) or self.now_ms()
        current = _float(result.get("currentUsage"))
        if current is not None:
            start, end = parse_time(result.get("usagePeriodStart")), parse_time(result.get("usagePeriodEnd"))
            self.update_usage(usage.customer_id, usage.resource_id, "FEATURE", usage.feature_id, current, start, end, stamp)
        credit = result.get("credit")
        if isinstance(credit, dict) and credit.get("currencyId") and _float(credit.get("currentUsage")) is not None:
            self.update_usage(
                usage.customer_id,
                usage.resource_id,
                "CREDIT",
                str(credit["currencyId"]),
                float(credit["currentUsage"]),
                None,
                parse_time(credit.get("usagePeriodEnd")),
                parse_time(credit.get("timestamp")) or stamp,
            )

    def update_usage(
        self,
        customer_id: str,
        resource_id: str | None,
        kind: str,
        ref_id: str,
        current: float,
        start: int | None,
        end: int | None,
        stamp: int,
    ) -> None:
        """One entitlement's usage changed upstream: apply it in memory and in Redis if newer."""
        key = cache_key(customer_id, resource_id)
        shown = Usage(current, start, end, stamp)
        if self.pending is not None:
            shown = self.pending.adjust_usage(key, kind, ref_id, shown)
        self.cache.update(key, lambda e: apply_usage(
            e, kind, ref_id, shown.current_usage, shown.usage_period_start, shown.usage_period_end, shown.updated_at))
        if self.mirror is not None:
            self.mirror.write_usage(customer_id, resource_id, kind, ref_id, current, start, end, stamp)

    def peer_changed(self, key: str, kind: str) -> None:
        """Another sidecar of the fleet changed `key` in Redis: refresh (or drop) our copy."""
        if kind == "purge":
            self.cache.purge(key)
            return
        entry = self.cache.get_entry(key)
        if entry is not None and self.mirror is not None:
            self.mirror.read(entry.customer_id, entry.resource_id).addCallback(
                lambda shared: self.store(shared) if shared is not None else None
            )


def _float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class CacheUpdates:
    """Applies real-time updates to the cache (the socket's UpdateSink), on the reactor.

    entitlementsUpdatedV2 replaces a cached customer's entry (newer wins) or purges it when it
    carries neither entitlements nor a reason; usageUpdatedV2 updates one entitlement's usage if
    newer; packagePublished for ALL_CUSTOMERS drops everything. Customers this sidecar has not
    cached are left alone: it never fills memory with customers nobody here asked about.
    The socket going down starts the poller; coming back stands it down and revalidates the
    cache in the background instead of wiping it, so reads never go cold on a blip.
    """

    def __init__(self, backend: OnlineSidecar, poller, refresher) -> None:
        self._backend = backend
        self._poller = poller
        self._refresher = refresher
        self._ups = 0

    def socket_up(self) -> None:
        self._ups += 1
        self._poller.stand_down()
        if self._ups > 1 or len(self._backend.cache):
            self._refresher.refresh()

    def socket_down(self) -> None:
        self._poller.activate()

    def entitlements_updated(self, payload: Any) -> None:
        customer_id = payload["customerId"]
        resource_id = payload.get("resourceId") or None
        key = cache_key(customer_id, resource_id)
        mirror = self._backend.mirror
        entitlements = payload.get("entitlements") or []
        reason = payload.get("accessDeniedReason")
        if not entitlements and reason is None:
            self._backend.cache.purge(key)
            if mirror is not None:
                mirror.purge(customer_id, resource_id)
            return
        state = {"entitlementsV2": entitlements, "accessDeniedReason": reason}
        entry = entry_from_state(customer_id, resource_id, state, self._backend.now_ms())
        self._backend.count_malformed(entry)
        if self._backend.cache.get_entry(key) is not None or self._backend.fetching(key):
            # (A fetch in flight may carry older data, e.g. from a lagging Edge: the push lands
            # first and newer wins when the fetch does.)
            # Pushed in order on one socket: the latest push is the truth even when its
            # timestamp is older (an entitlement removed); usage still newer wins.
            self._backend.store(entry, force=True)
        if mirror is not None:
            # Redis may hold customers this sidecar never read (a peer's, or from before a restart).
            mirror.write(entry, only_if_cached=True)

    def usage_updated(self, payload: Any) -> None:
        reference = payload["entitlementReference"]
        usage = payload["usage"]
        current = _float(usage.get("currentUsage"))
        if current is None:
            raise ValueError("usageUpdatedV2 without a numeric currentUsage")
        stamp = parse_time(usage.get("usageUpdatedAt")) or self._backend.now_ms()
        start, end = parse_time(usage.get("usagePeriodStart")), parse_time(usage.get("usagePeriodEnd"))
        self._backend.update_usage(
            payload["customerId"], payload.get("resourceId") or None,
            str(reference.get("type")), str(reference["id"]), current, start, end, stamp,
        )

    def package_published(self, payload: Any) -> None:
        if payload.get("migrationType") == "ALL_CUSTOMERS":
            log.info("A package was published for all customers; dropping the cache")
            self._backend.cache.clear()
