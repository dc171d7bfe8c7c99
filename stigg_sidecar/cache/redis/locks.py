"""The fleet's fetch lock: one instance fetches a customer from Stigg, the others wait for it.

The lock is a Redis key set NX with a TTL; its holder writes the entry, then releases the lock
and publishes the outcome on the entry's fetch channel (`format.EntryKeys.fetch_channel`), which
the waiting instances are subscribed to through the mirror's pub/sub link. Everything answers
within the mirror's bounds: when Redis cannot be asked, the caller fetches itself.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from stigg_sidecar.cache.redis.format import EntryKeys, encode_fetch_result
from stigg_sidecar.cache.redis.links import Link
from stigg_sidecar.cache.redis.scripts import ACQUIRE, RELEASE

Call = Callable[[Callable[[Any], Deferred], Any], Deferred]


class FetchLocks:
    """The lock and the waits, under `prefix`. `call(work, default)` runs a command on the
    mirror's command link (bounded, `default` on failure); `link` is the pub/sub link;
    `ready()` says whether both links are up and the mirror running."""

    def __init__(self, prefix: str, reactor: IReactorTime, timeout: float, call: Call, link: Link,
                 ready: Callable[[], bool]) -> None:
        self.prefix = prefix
        self.reactor = reactor
        self.timeout = timeout
        self._call = call
        self._link = link
        self._ready = ready
        self._waiters: dict[str, list[Deferred]] = {}

    @property
    def channels(self) -> list[str]:
        """The fetch channels waited on now (subscribed again when the link reconnects)."""
        return list(self._waiters)

    def waiting_on(self, channel: str) -> bool:
        return channel in self._waiters

    def resolve_all(self, result: bool) -> None:
        """Answer every waiter (False: the link went down or the mirror stops)."""
        for channel in list(self._waiters):
            self.resolve_channel(channel, result)

    def acquire_fetch_lock(self, customer_id: str, resource_id: str | None = None, ttl_ms: int = 5000) -> Deferred:
        """Deferred[str | None]: a token when this caller should fetch (it got the lock, or
        Redis could not be asked); None when another instance holds the lock: `wait_for_fetch`."""
        keys = EntryKeys(self.prefix, customer_id, resource_id or None)
        token = secrets.token_hex(16)
        # A lock without an expiry is taken over: every lock carries one (ACQUIRE).
        d = self._call(lambda p: p.eval(ACQUIRE, [keys.fetch_lock], [token, str(int(ttl_ms))]), "OK")
        return d.addCallback(lambda reply: token if reply == "OK" else None)

    def release_fetch_lock(
        self, customer_id: str, resource_id: str | None, token: str, error: str | None = None
    ) -> Deferred:
        """Deferred[bool]: delete the lock if `token` still holds it, and publish the outcome
        (`{}`, or `{"error": error}`) to the instances waiting. Call after `write`."""
        keys = EntryKeys(self.prefix, customer_id, resource_id or None)
        args = [token, keys.fetch_channel, encode_fetch_result(error)]
        d = self._call(lambda p: p.eval(RELEASE, [keys.fetch_lock], args), 0)
        return d.addCallback(lambda n: n == 1)

    def wait_for_fetch(self, customer_id: str, resource_id: str | None, timeout: float) -> Deferred:
        """Deferred[bool]: True when the lock holder reports success (or has already released
        the lock): read Redis again. False on its error, after `timeout` seconds, or at once when
        Redis is unreachable: fetch yourself."""
        if not self._ready():
            return succeed(False)
        keys = EntryKeys(self.prefix, customer_id, resource_id or None)
        channel = keys.fetch_channel
        waiter: Deferred = Deferred(lambda cancelled: self._forget(channel, cancelled))
        self._waiters.setdefault(channel, []).append(waiter)
        timer = self.reactor.callLater(timeout, self._resolve, channel, waiter, False)

        def stop_timer(result: bool) -> bool:
            if timer.active():
                timer.cancel()
            return result

        waiter.addBoth(stop_timer)
        # Subscribed first, then the lock: a release between the two is not missed.
        try:
            subscribed = self._link.protocol.subscribe(channel)
        except Exception:
            self._resolve(channel, waiter, False)
            return waiter

        def check_lock(_: Any) -> Deferred:
            return self._call(lambda p: p.execute_command("GET", keys.fetch_lock), "held")

        def released_already(lock: Any) -> None:
            if lock is None:
                self._resolve(channel, waiter, True)

        def not_subscribed(failure: Failure) -> None:
            if failure.check(TimeoutError):
                self._link.probe()
            self._resolve(channel, waiter, False)

        subscribed.addTimeout(self.timeout, self.reactor).addCallback(check_lock)
        subscribed.addCallbacks(released_already, not_subscribed)
        return waiter

    def _resolve(self, channel: str, waiter: Deferred, result: bool) -> None:
        self._forget(channel, waiter)
        if not waiter.called:
            waiter.callback(result)

    def _forget(self, channel: str, waiter: Deferred) -> None:
        """Stop waiting with `waiter` (resolved, timed out or cancelled by the caller); the last
        waiter of a channel unsubscribes from it."""
        waiting = self._waiters.get(channel)
        if waiting is None or waiter not in waiting:
            return
        waiting.remove(waiter)
        if waiting:
            return
        del self._waiters[channel]
        sub = self._link.protocol
        if sub is not None:
            try:
                sub.unsubscribe(channel).addErrback(lambda failure: None)
            except Exception:
                pass  # the connection is going; so is the subscription

    def resolve_channel(self, channel: str, result: bool) -> None:
        """Answer every waiter on `channel` with `result`."""
        for waiter in list(self._waiters.get(channel, [])):
            self._resolve(channel, waiter, result)
