"""RedisMirror: the memory cache mirrored to Redis in Stigg's key layout (REDIS_ENVIRONMENT_PREFIX).

Owns two connections to one Redis (commands, and pub/sub: `links.py`), each kept alive by a
ClientService with backoff that is a child service of the mirror, to REDIS_HOST or to the master
that Redis Sentinel names (`sentinel.py`: asked again on every connect, and a connection to a
server that is not, or no longer, the master is dropped, so a failover is followed by itself);
reads and the newer-wins writes (`scripts.py`); the cross-instance fetch lock (`locks.py`); peer
change notifications; the error policy. The key names and the JSON live in `format/`
(docs/redis-format.md). It never touches the memory cache: its owner calls it and applies what
it answers.

Reactor only. Every public call returns a Deferred that never fails and fires within `timeout`
(REDIS_TIMEOUT_MS): when Redis is down, slow, rejecting us or holding something unreadable, a
read answers None, a write False, and `errors` counts it. Nothing is logged per call: one line
when Redis becomes unreachable or reachable again, when it rejects the credentials, and the
first time each kind of error shows up (`errors.py`). The passwords (Redis's and the Sentinels')
never reach a log line (ARCHITECTURE 7): AUTH is sent by the links and the Sentinel lookup, its
error text is never logged, and logged texts are scrubbed.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from stigg_sidecar.cache.redis.errors import RedisErrors
from stigg_sidecar.cache.redis.format import (
    FEATURE,
    EntryKeys,
    changes_channel,
    decode_change,
    encode_change,
    encode_entry,
    encode_usage,
    fetch_succeeded,
    timestamp_key,
)
from stigg_sidecar.cache.redis.links import CommandProtocol, Handshake, Link, SubscriberProtocol
from stigg_sidecar.cache.redis.locks import FetchLocks
from stigg_sidecar.cache.redis.reads import read_entry
from stigg_sidecar.cache.redis.scripts import PURGE, WRITE
from stigg_sidecar.cache.redis.sentinel import SentinelEndpoint, Sentinels
from stigg_sidecar.entitlements.records import CustomerEntry, Usage
from stigg_sidecar.lifecycle.reactor import IReactor

log = Logger()

# A `#timestamp` further in the future than this (ms) is not trusted: such an entry is a miss, and
# writes replace it (a clock far ahead or a planted denial would otherwise stand for the keys' TTL).
FUTURE_SKEW_MS = 60_000
# The largest entitlements value read (bytes); past it the entry is a miss, and the value never
# leaves Redis. A customer's entitlements take a few KB (hundreds of KB for the very largest).
MAX_VALUE_BYTES = 4 * 1024 * 1024
_SENTINEL_MAX_RECONNECT_DELAY = 0.5  # after a failover the new master is used within this


class RedisMirror(MultiService):
    """The cache mirrored to Redis under `prefix`; see the module docstring and
    docs/redis-format.md. Construct with `from_settings` in the service tree; its children are
    the two links' ClientServices."""

    def __init__(
        self,
        reactor: IReactor,
        prefix: str,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        username: str = "",
        password: str = "",
        tls: bool = False,
        ttl_secs: int = 604800,
        timeout_ms: int = 250,
        on_peer_change: Callable[[str, str], None] | None = None,
        *,
        require_customer_entry: bool = True,
        max_reconnect_delay: float = 10.0,
        health_interval: float = 15.0,
        tls_trust_root: Any = None,
        sentinels: Sequence[tuple[str, int]] = (),
        sentinel_master: str = "mymaster",
        sentinel_username: str = "",
        sentinel_password: str = "",
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        max_value_bytes: int = MAX_VALUE_BYTES,
    ) -> None:
        """`on_peer_change(cache_key, kind)` hears the entries other sidecars changed ("entry",
        "usage", "purge"). `require_customer_entry`: a resource read misses unless the
        customer-level entry is cached and not newer (Stigg's rule §3.4 Read 3).
        `tls_trust_root` (a twisted.internet.ssl trust root) replaces the platform's CAs.
        With `sentinels` ((host, port), ...), `host` and `port` are ignored: every connect asks
        the Sentinels, in order, for the address of `sentinel_master`, authenticating with
        `sentinel_password` (and `sentinel_username`) when given: Sentinels have their own
        credentials, separate from the data servers' `username`/`password`."""
        if not prefix:
            raise ValueError("RedisMirror needs a key prefix (REDIS_ENVIRONMENT_PREFIX)")
        super().__init__()
        self.reactor = reactor
        self.prefix = prefix
        self.host, self.port, self.db = host, port, db
        self.username = username
        self.tls = tls
        self.tls_trust_root = tls_trust_root
        self.sentinels = tuple(sentinels)
        self.sentinel_master = sentinel_master
        self.sentinel_username = sentinel_username
        self.ttl_secs = ttl_secs
        self.timeout = timeout_ms / 1000
        # The time `#timestamp`s are checked against (Stigg's when the local clock is off), and
        # the largest entitlements value read: see `read`.
        self._now_ms = now_ms
        self.max_value_bytes = max_value_bytes
        self.require_customer_entry = require_customer_entry
        self.instance_id = secrets.token_hex(8)
        self._errors = RedisErrors(reactor, (password, sentinel_password), timeout=self.timeout)
        self._on_peer_change = on_peer_change
        self._changes = changes_channel(prefix)
        self._reachable: bool | None = None  # None: not yet known
        self._rejected: set[str] = set()  # handshake stages already logged as rejected
        self._sentinels: Sentinels | None = None
        if self.sentinels:
            self._sentinels = Sentinels(
                reactor, self.sentinels, sentinel_master, sentinel_username, sentinel_password,
                self.timeout, logging=lambda: bool(self.running),
            )
            # Reconnecting asks the Sentinels, which is cheap; the sooner, the shorter a failover.
            max_reconnect_delay = min(max_reconnect_delay, _SENTINEL_MAX_RECONNECT_DELAY)
        handshake = Handshake(username, password, check_role=bool(self.sentinels), db=db)
        self._commands = self._link("commands", CommandProtocol, handshake, max_reconnect_delay)
        self._subscriber = self._link("subscriber", SubscriberProtocol, handshake, max_reconnect_delay)
        self._subscriber.prepare = self._subscribe_all
        self._subscriber.on_message = self._message
        self._locks = FetchLocks(
            prefix, reactor, self.timeout, self._call, self._subscriber,
            ready=lambda: self.connected and self.subscribed and bool(self.running),
        )
        self._health = LoopingCall(self._probe_links)
        self._health.clock = reactor
        self._health_interval = health_interval

    @classmethod
    def from_settings(
        cls, reactor: IReactor, settings: Any, on_peer_change: Callable[[str, str], None] | None = None, **options: Any
    ) -> RedisMirror:
        return cls(
            reactor,
            prefix=settings.redis_environment_prefix,
            host=settings.redis_host,
            port=settings.redis_port,
            db=settings.redis_db,
            username=settings.redis_username,
            password=settings.redis_password,
            tls=settings.redis_tls,
            ttl_secs=settings.redis_keys_ttl_in_secs,
            timeout_ms=settings.redis_timeout_ms,
            on_peer_change=on_peer_change,
            sentinels=settings.redis_sentinels,
            sentinel_master=settings.redis_sentinel_master,
            sentinel_username=settings.redis_sentinel_username,
            sentinel_password=settings.redis_sentinel_password,
            **options,
        )

    def __repr__(self) -> str:
        return f"<RedisMirror {self.address} prefix={self.prefix!r} connected={self.connected}>"

    @property
    def address(self) -> str:
        """The Redis connected to (with Sentinel: the master it last named)."""
        return f"{self.host}:{self.port}"

    @property
    def errors(self) -> int:
        """Calls that failed or found something unreadable (each a miss or a skipped write)."""
        return self._errors.count

    @property
    def connected(self) -> bool:
        """The command connection is up (and authenticated)."""
        return self._commands.protocol is not None

    @property
    def subscribed(self) -> bool:
        """The pub/sub connection is up: peer notifications and fetch waits work."""
        return self._subscriber.protocol is not None

    def _link(self, name: str, protocol_class: type, handshake: Handshake, max_delay: float) -> Link:
        link = Link(name, protocol_class, self.endpoint(), handshake, self, self.reactor, self.timeout, max_delay)
        link.service.setServiceParent(self)
        return link

    def endpoint(self) -> IStreamClientEndpoint:
        """Where the links connect: REDIS_HOST, or whichever master the Sentinels name."""
        if self.sentinels:
            return SentinelEndpoint(self.find_master, self.server_endpoint)
        return self.server_endpoint(self.host, self.port)

    def server_endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, host, port, timeout=max(1.0, 4 * self.timeout)
        )
        if self.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=self.tls_trust_root), endpoint)
        return endpoint

    def find_master(self) -> Deferred:
        """Deferred[(host, port)]: the master the Sentinels name now, which `address` then says."""
        assert self._sentinels is not None

        def found(address: tuple[str, int]) -> tuple[str, int]:
            self.host, self.port = address
            return address

        return self._sentinels.find_master(lambda: (self.host, self.port)).addCallback(found)

    # -- service ----------------------------------------------------------------------------------

    def startService(self) -> None:
        """Starts connecting (the links, children) and returns at once: the sidecar runs while
        Redis is down."""
        super().startService()
        self._health.start(self._health_interval, now=False)

    def stopService(self) -> Deferred:
        # Not running first, so that what the answered waiters do next is skipped as while Redis
        # is down; then the children (the links) close their connections.
        Service.stopService(self)
        if self._health.running:
            self._health.stop()
        self._locks.resolve_all(False)
        return super().stopService()

    # -- entries ----------------------------------------------------------------------------------

    def read(self, customer_id: str, resource_id: str | None = None) -> Deferred:
        """Deferred[CustomerEntry | None]: the entry as Redis holds it, or None on a miss:
        entitlements or their timestamp missing, any usage key missing, an unknown format, a
        resource whose customer-level entry is missing or newer (`require_customer_entry`), or
        Redis down/slow."""
        keys = EntryKeys(self.prefix, customer_id, resource_id or None)
        return self._call(lambda p: read_entry(
            p, keys, self.require_customer_entry, self._errors.unreadable,
            max_bytes=self.max_value_bytes, trusted_until=self._now_ms() + FUTURE_SKEW_MS, offload=self._offload,
        ), None)

    def _offload(self, work: Callable[..., Any], *args: Any) -> Deferred:
        """`work(*args)` on the reactor's thread pool (a large value's decoding)."""
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), work, *args)

    def write(self, entry: CustomerEntry, only_if_cached: bool = False, force: bool = False) -> Deferred:
        """Deferred[bool]: store `entry`, each key only if not older than what Redis holds
        (newer wins, atomically) or what it holds is stamped in the future past FUTURE_SKEW_MS, or
        `force`d; True when the entitlements key was written. With `only_if_cached`, nothing is
        written unless Redis already holds the entry."""
        keys = EntryKeys(self.prefix, entry.customer_id, entry.resource_id)
        message = encode_change(keys.cache_key, self.instance_id, "entry")

        def work(p: Any) -> Deferred:
            items = [(i.key, i.value, i.timestamp) for i in encode_entry(self.prefix, entry)]
            return self._eval_write(p, keys, items, only_if_cached, message, force)

        return self._call(work, []).addCallback(lambda written: bool(written) and written[0] == 1)

    def write_usage(self, customer_id: str, resource_id: str | None, kind: str, ref_id: str, usage: Usage) -> Deferred:
        """Deferred[bool]: store one entitlement's usage ("FEATURE" refId or "CREDIT" currency
        id) if Redis holds the entry and its stored usage is not newer. Credits have no period
        start: store None there."""
        keys = EntryKeys(self.prefix, customer_id, resource_id or None)
        message = encode_change(keys.cache_key, self.instance_id, "usage")
        start = usage.usage_period_start if kind == FEATURE else None

        def work(p: Any) -> Deferred:
            key = keys.usage(kind, ref_id)  # ValueError for an unknown kind: counted, skipped
            value = encode_usage(float(usage.current_usage), start, usage.usage_period_end)
            return self._eval_write(p, keys, [(key, value, usage.updated_at)], True, message)

        return self._call(work, []).addCallback(lambda written: bool(written) and written[0] == 1)

    def _eval_write(
        self, p: Any, keys: EntryKeys, items: list[tuple[str, str, int]], guarded: bool, message: str,
        force: bool = False,
    ) -> Deferred:
        names = [timestamp_key(keys.entitlements)]
        args = [str(self.ttl_secs), "1" if guarded else "0", self._changes, message,
                str(self._now_ms() + FUTURE_SKEW_MS), "1" if force else "0"]
        for key, value, stamp in items:
            names.extend((key, timestamp_key(key)))
            args.extend((value, str(int(stamp))))
        return p.eval(WRITE, names, args)

    def purge(self, customer_id: str, resource_id: str | None = None) -> Deferred:
        """Deferred[bool]: delete the entry's entitlements and metadata keys (usage keys stay,
        as in Stigg); True when Redis answered."""
        keys = EntryKeys(self.prefix, customer_id, resource_id or None)
        names = [
            keys.entitlements,
            timestamp_key(keys.entitlements),
            keys.metadata,
            timestamp_key(keys.metadata),
        ]
        message = encode_change(keys.cache_key, self.instance_id, "purge")
        d = self._call(lambda p: p.eval(PURGE, names, [self._changes, message]), None)
        return d.addCallback(lambda n: n is not None)

    # -- cross-instance single flight -------------------------------------------------------------

    def acquire_fetch_lock(self, customer_id: str, resource_id: str | None = None, ttl_ms: int = 5000) -> Deferred:
        """Deferred[str | None]: a token when this caller should fetch (it got the lock, or
        Redis could not be asked); None when another instance holds the lock: `wait_for_fetch`."""
        return self._locks.acquire_fetch_lock(customer_id, resource_id, ttl_ms)

    def release_fetch_lock(
        self, customer_id: str, resource_id: str | None, token: str, error: str | None = None
    ) -> Deferred:
        """Deferred[bool]: delete the lock if `token` still holds it, and publish the outcome
        (`{}`, or `{"error": error}`) to the instances waiting. Call after `write`."""
        return self._locks.release_fetch_lock(customer_id, resource_id, token, error)

    def wait_for_fetch(self, customer_id: str, resource_id: str | None, timeout: float) -> Deferred:
        """Deferred[bool]: True when the lock holder reports success (or has already released
        the lock): read Redis again. False on its error, after `timeout` seconds, or at once when
        Redis is unreachable: fetch yourself."""
        return self._locks.wait_for_fetch(customer_id, resource_id, timeout)

    # -- pub/sub ----------------------------------------------------------------------------------

    @inlineCallbacks
    def _subscribe_all(self, p: Any) -> Generator[Deferred, Any, None]:
        # One channel per command: SubscriberProtocol pairs one reply with each command.
        if self._on_peer_change is not None:
            yield p.subscribe(self._changes)
        for channel in self._locks.channels:
            yield p.subscribe(channel)

    def _message(self, channel: Any, message: Any) -> None:
        if channel == self._changes:
            change = decode_change(message)
            if change is None or change[1] == self.instance_id or self._on_peer_change is None:
                return
            try:
                self._on_peer_change(change[0], change[2])
            except Exception:
                log.failure("on_peer_change failed for {key}", key=change[0])
        elif self._locks.waiting_on(channel):
            self._locks.resolve_channel(channel, fetch_succeeded(message))

    def _probe_links(self) -> None:
        self._commands.probe()
        self._subscriber.probe()

    # -- calls ------------------------------------------------------------------------------------

    def _call(self, work: Callable[[Any], Deferred], default: Any) -> Deferred:
        """`work(protocol)`, bounded by the timeout; `default` (and errors + 1) on any failure."""
        p = self._commands.protocol
        if p is None or not self.running:
            self._errors.count += 1
            return succeed(default)
        try:
            d = work(p)
        except Exception:
            return succeed(self._failed(Failure(), default))
        d.addTimeout(self.timeout, self.reactor)
        return d.addErrback(self._failed, default)

    def _failed(self, failure: Failure, default: Any) -> Any:
        outcome = self._errors.failed(failure)
        if outcome == "timeout":
            self._commands.probe()
        elif outcome == "READONLY" and self.sentinels:
            # The master was demoted under us: reconnect, which asks the Sentinels again.
            self._commands.drop()
        return default

    # -- link state (LinkEvents, called by the links) ----------------------------------------------------------

    def link_up(self, link: Link) -> None:
        if link is not self._commands:
            self._rejected.discard(link.name)
            return
        self._rejected.clear()
        self._errors.reconnected()
        if self._reachable is False:
            log.info("Redis at {address} is reachable again", address=self.address)
        elif self._reachable is None:
            log.info("Redis mirror connected to {address} (prefix {prefix})", address=self.address, prefix=self.prefix)
        self._reachable = True

    def link_down(self, link: Link) -> None:
        if link is self._subscriber:
            # Messages may be missed until it reconnects: let the waiters fetch for themselves.
            self._locks.resolve_all(False)
        elif self.running:
            self.link_unreachable(link)

    def link_unreachable(self, link: Link) -> None:
        if link is not self._commands or not self.running:
            return
        # After a rejection (credentials, TLS, db) the failures that follow are that, not news.
        if self._reachable is not False and not self._rejected & {"credentials", "SELECT", "TLS"}:
            log.warn(
                "Redis at {address} is unreachable; reads miss and writes are skipped until it is back",
                address=self.address,
            )
        self._reachable = False

    def link_rejected(self, link: Link, stage: str, text: str) -> None:
        if stage in ("AUTH", "PING"):
            kind = "credentials"
        elif stage in ("SELECT", "TLS"):
            kind = stage
        else:
            kind = link.name
        if kind in self._rejected:
            return
        self._rejected.add(kind)
        if kind == "credentials":
            log.error(
                "Redis rejected the credentials (REDIS_USERNAME/REDIS_PASSWORD) at {address}; "
                "retrying with backoff",
                address=self.address,
            )
        elif kind == "SELECT":
            log.error("Redis rejected REDIS_DB={db} ({error})", db=self.db, error=self._errors.scrub(text))
        elif kind == "TLS":
            log.error(
                "TLS with Redis at {address} failed ({error}); retrying with backoff",
                address=self.address,
                error=self._errors.scrub(text),
            )
        else:
            log.error(
                "Redis refused the subscription ({error}); peer notifications and waits for other "
                "instances' fetches are off until it accepts",
                error=self._errors.scrub(text),
            )
