"""RedisMirror: the memory cache mirrored to Redis in Stigg's key layout (REDIS_ENVIRONMENT_PREFIX).

Owns two connections to one Redis (commands, and pub/sub), each kept alive by a ClientService
with backoff, to REDIS_HOST or to the master that Redis Sentinel names (REDIS_SENTINELS: asked
again on every connect, and a connection to a server that is not, or no longer, the master is
dropped, so a failover is followed by itself); the newer-wins Lua scripts; the cross-instance fetch lock and its channel; peer
change notifications. The key names and the JSON live in `redis_format` (docs/redis-format.md).
It never touches the memory cache: its owner calls it and applies what it answers.

Reactor only. Every public call returns a Deferred that never fails and fires within `timeout`
(REDIS_TIMEOUT_MS): when Redis is down, slow, rejecting us or holding something unreadable, a
read answers None, a write False, and `errors` counts it. Nothing is logged per call: one line
when Redis becomes unreachable or reachable again, when it rejects the credentials, and the
first time each kind of error shows up. The passwords (Redis's and the Sentinels') never reach
a log line (ARCHITECTURE 7): AUTH is sent by this module, its error text is never logged, and
logged texts are scrubbed.
"""

from __future__ import annotations

import random
import secrets
from typing import Any, Callable, Generator, Sequence

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import error as net_error
from twisted.internet import protocol as net_protocol
from twisted.internet.defer import Deferred, TimeoutError, gatherResults, inlineCallbacks, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer, provider

from stigg_sidecar.cache.redis_format import (
    FEATURE,
    EntryKeys,
    FormatError,
    LegacyFormat,
    MissingUsage,
    changes_channel,
    decode_change,
    decode_entitlements,
    decode_entry,
    decode_timestamp,
    encode_change,
    encode_entry,
    encode_fetch_result,
    encode_usage,
    fetch_succeeded,
    timestamp_key,
)
from stigg_sidecar.entitlements.records import CustomerEntry

try:
    from OpenSSL import SSL
except ImportError:  # TLS needs pyOpenSSL; without it REDIS_TLS fails at construction
    SSL = None  # type: ignore[assignment]

log = Logger()

_FIRST_RECONNECT_DELAY = 0.1  # backoffPolicy doubles it before the first retry
FORMAT_LOG_INTERVAL = 300.0  # seconds between two log lines about the same unreadable key
_FORMAT_LOG_KEYS = 1000  # unreadable keys remembered for that, at most
_SENTINEL_MAX_RECONNECT_DELAY = 0.5  # after a failover the new master is used within this

# Newer wins (STIGG_REFERENCE §3.4 Writes 3-4), atomically for every item of one call.
# KEYS[1]: the entry's entitlements#timestamp (the guard), then key, key#timestamp per item.
# ARGV: ttl (<= 0: no expiry), guarded ("1": write nothing unless KEYS[1] exists), channel,
#       message (published when anything was written; "" channel: none), then value, stamp per item.
# Returns 1/0 per item: written or skipped as stale.
_WRITE = """
local ttl = tonumber(ARGV[1])
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local written, changed = {}, false
for i = 1, (#KEYS - 1) / 2 do
  local key, stamp_key = KEYS[2 * i], KEYS[2 * i + 1]
  local value, stamp = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  local incoming = tonumber(stamp)
  local stored = tonumber(redis.call('GET', stamp_key))
  if stored == nil or incoming == 0 or stored <= incoming then
    if ttl > 0 then
      redis.call('SET', key, value, 'EX', ttl)
      redis.call('SET', stamp_key, stamp, 'EX', ttl)
    else
      redis.call('SET', key, value)
      redis.call('SET', stamp_key, stamp)
    end
    written[i] = 1
    changed = true
  else
    written[i] = 0
  end
end
if changed and ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return written
"""

# KEYS: the keys to delete. ARGV: channel, message (always published).
_PURGE = """
local n = redis.call('DEL', unpack(KEYS))
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""

# KEYS[1]: the lock. ARGV: token, channel, message. Deletes the lock only if it is still ours,
# and tells the waiters either way: the fetch is over.
_RELEASE = """
local n = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then n = redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return n
"""


@provider(ILogObserver)
def _warnings_only(event: dict) -> None:
    if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
        globalLogPublisher(event)


class _NotMaster(Exception):
    """The server Sentinel named answers ROLE with something else than master."""


class _SentinelRejected(Exception):
    """A Sentinel refused our credentials (or wants some and we have none)."""


@implementer(IStreamClientEndpoint)
class _SentinelEndpoint:
    """Connects to whichever server the mirror's Sentinels name as the master right now."""

    def __init__(self, mirror: RedisMirror) -> None:
        self.mirror = mirror

    def connect(self, factory: Any) -> Deferred:
        d = self.mirror.find_master()
        return d.addCallback(lambda address: self.mirror.server_endpoint(*address).connect(factory))


class _QuietClientService(ClientService):
    # ClientService logs every retry at info level; the mirror logs each state change once.
    _log = Logger(observer=_warnings_only)


class _Hooks:
    """Mixed into txredisapi's protocols: tells the link when a connection opens and closes."""

    factory: _LinkFactory

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[misc]  # no password/db given: ready at once
        _keep_alive(self.transport)  # type: ignore[attr-defined]
        self.factory.link.connection_made(self)

    def connectionLost(self, reason: Failure) -> None:
        # The link hears first, so that the replies failing next find the state already known.
        self.factory.link.connection_lost(self, reason)
        super().connectionLost(reason)  # type: ignore[misc]  # fails the pending replies


class _CommandProtocol(_Hooks, txredisapi.RedisProtocol):
    pass


class _SubscriberProtocol(_Hooks, txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.link.on_message(channel, message)


def _keep_alive(transport: Any) -> None:
    # TCP keepalive, so a peer that vanished without a RST is eventually noticed (TLS wraps TCP).
    while transport is not None:
        if hasattr(transport, "setTcpKeepAlive"):
            transport.setTcpKeepAlive(1)
            return
        transport = getattr(transport, "transport", None)


class _LinkFactory(net_protocol.Factory):
    noisy = False

    def __init__(self, link: _Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> Any:
        p = self.link.protocol_class(
            # No replyTimeout: calls are bounded by the mirror, wedges found by `_Link.probe`.
            charset="utf-8", replyTimeout=None, convertNumbers=False
        )
        p.factory = self
        return p


class _Link:
    """One connection to Redis, kept alive by a ClientService. `protocol` is set while it is
    usable: connected, authenticated, on the right database, and prepared (`prepare`)."""

    def __init__(self, mirror: RedisMirror, name: str, protocol_class: type, max_delay: float) -> None:
        self.mirror = mirror
        self.reactor = mirror.reactor
        self.name = name
        self.protocol_class = protocol_class
        self.wedge_timeout = max(2.0, 10 * mirror.timeout)
        self.handshake_timeout = max(1.0, 4 * mirror.timeout)
        self.protocol: Any = None
        self.on_message: Callable[[Any, Any], None] = lambda channel, message: None
        self.prepare: Callable[[Any], Deferred] = lambda p: succeed(None)
        self._probing = False
        self._made = False  # a TCP connection was made since the last retry was scheduled
        self._rejections = 0  # failed handshakes in a row
        policy = backoffPolicy(
            initialDelay=min(_FIRST_RECONNECT_DELAY, max_delay),
            maxDelay=max_delay,
            factor=2.0,
            jitter=lambda: random.random() * _FIRST_RECONNECT_DELAY,
        )
        self._policy = policy
        self.service = _QuietClientService(
            mirror.endpoint(), _LinkFactory(self), retryPolicy=self._retry_delay, clock=self.reactor
        )

    def _retry_delay(self, attempt: int) -> float:
        if not self._made:
            self.mirror.link_unreachable(self)  # the connect itself failed
        self._made = False
        return self._policy(max(attempt, self._rejections))

    def connection_made(self, p: Any) -> None:
        self._made = True
        self._handshake(p)

    def connection_lost(self, p: Any, reason: Failure) -> None:
        if p is self.protocol:
            self.protocol = None
            self.mirror.link_down(self)
        elif SSL is not None and reason.check(SSL.Error):
            self._rejections += 1
            self.mirror.link_rejected(self, "TLS", reason.getErrorMessage())

    @inlineCallbacks
    def _handshake(self, p: Any) -> Generator[Deferred, Any, None]:
        mirror = self.mirror
        stage = "AUTH"
        try:
            if mirror._password:
                user = (mirror.username,) if mirror.username else ()
                yield self._bounded(p.execute_command("AUTH", *user, mirror._password))
            stage = "PING"  # NOAUTH here: Redis wants a password we were not given
            yield self._bounded(p.execute_command("PING"))
            if mirror.sentinels:
                stage = "ROLE"
                role = yield self._bounded(p.execute_command("ROLE"))
                if not role or role[0] != "master":
                    # Sentinel named a master that is not (yet, or any more) one: ask again.
                    raise _NotMaster()
            if mirror.db and self.name == "commands":
                stage = "SELECT"
                yield self._bounded(p.execute_command("SELECT", mirror.db))
            stage = "prepare"
            yield self._bounded(self.prepare(p))
        except txredisapi.ResponseError as e:
            self._rejections += 1  # a refused handshake backs off like a refused connect
            if str(e).startswith(("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")):
                mirror.link_unreachable(self)  # there, but not serving yet
            else:
                mirror.link_rejected(self, stage, str(e))
            p.transport.loseConnection()
            return
        except Exception:
            self._rejections += 1
            mirror.link_unreachable(self)  # timed out or dropped mid-handshake
            p.transport.abortConnection()
            return
        if not p.connected:
            return
        self._rejections = 0
        self.protocol = p
        mirror.link_up(self)

    def _bounded(self, d: Deferred) -> Deferred:
        return d.addTimeout(self.handshake_timeout, self.reactor)

    def drop(self) -> None:
        """Close the connection; the ClientService makes a new one (through `endpoint`)."""
        p = self.protocol
        if p is not None and p.connected:
            p.transport.abortConnection()

    def probe(self) -> None:
        """PING behind whatever is in flight; no answer within `wedge_timeout` means the
        connection is wedged (a stalled server, a silent network): drop it and reconnect.
        Called when a call timed out, and periodically (the subscriber is otherwise silent)."""
        p = self.protocol
        if p is None or self._probing:
            return
        self._probing = True
        try:
            d = p.execute_command("PING")
        except Exception:
            self._probing = False
            return

        def answered(result: Any) -> None:
            self._probing = False
            if isinstance(result, Failure) and result.check(TimeoutError) and p.connected:
                p.transport.abortConnection()

        d.addTimeout(self.wedge_timeout, self.reactor).addBoth(answered)


class RedisMirror(Service):
    """The cache mirrored to Redis under `prefix`; see the module docstring and
    docs/redis-format.md. Construct with `from_settings` in the service tree."""

    def __init__(
        self,
        reactor: Any,
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
        self.reactor = reactor
        self.prefix = prefix
        self.host, self.port, self.db = host, port, db
        self.username = username
        self._password = password
        self.tls = tls
        self.tls_trust_root = tls_trust_root
        self.sentinels = tuple(sentinels)
        self.sentinel_master = sentinel_master
        self.sentinel_username = sentinel_username
        self._sentinel_password = sentinel_password
        self._sentinels_answering: bool | None = None
        self._sentinels_rejecting: set[tuple[str, int]] = set()  # logged as refusing our credentials
        self.ttl_secs = ttl_secs
        self.timeout = timeout_ms / 1000
        self.require_customer_entry = require_customer_entry
        self.instance_id = secrets.token_hex(8)
        self.errors = 0
        self._on_peer_change = on_peer_change
        self._changes = changes_channel(prefix)
        self._waiters: dict[str, list[Deferred]] = {}
        self._reachable: bool | None = None  # None: not yet known
        self._rejected: set[str] = set()  # handshake stages already logged as rejected
        self._logged_errors: set[str] = set()  # error kinds already logged since the last connect
        self._format_logged: dict[str, float] = {}  # unreadable key -> when it was last logged
        if self.sentinels:
            # Reconnecting asks the Sentinels, which is cheap; the sooner, the shorter a failover.
            max_reconnect_delay = min(max_reconnect_delay, _SENTINEL_MAX_RECONNECT_DELAY)
        self._commands = _Link(self, "commands", _CommandProtocol, max_reconnect_delay)
        self._subscriber = _Link(self, "subscriber", _SubscriberProtocol, max_reconnect_delay)
        self._subscriber.prepare = self._subscribe_all
        self._subscriber.on_message = self._message
        self._health = LoopingCall(self._probe_links)
        self._health.clock = reactor
        self._health_interval = health_interval

    @classmethod
    def from_settings(
        cls, reactor: Any, settings: Any, on_peer_change: Callable[[str, str], None] | None = None, **options: Any
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
    def connected(self) -> bool:
        """The command connection is up (and authenticated)."""
        return self._commands.protocol is not None

    @property
    def subscribed(self) -> bool:
        """The pub/sub connection is up: peer notifications and fetch waits work."""
        return self._subscriber.protocol is not None

    def endpoint(self) -> Any:
        """Where the links connect: REDIS_HOST, or whichever master the Sentinels name."""
        if self.sentinels:
            return _SentinelEndpoint(self)
        return self.server_endpoint(self.host, self.port)

    def server_endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, host, port, timeout=max(1.0, 4 * self.timeout)
        )
        if self.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=self.tls_trust_root), endpoint)
        return endpoint

    @inlineCallbacks
    def find_master(self) -> Generator[Deferred, Any, tuple[str, int]]:
        """The master's (host, port) as the first Sentinel that knows it says; ConnectError when
        none does (the link retries with backoff). Logs when the answer changes."""
        for host, port in self.sentinels:
            try:
                address = yield self._ask_sentinel(host, port)
            except _SentinelRejected:
                if (host, port) not in self._sentinels_rejecting and self.running:
                    self._sentinels_rejecting.add((host, port))
                    # Never the reply's text: it may quote what was sent.
                    log.error(
                        "Redis Sentinel at {address} rejected the credentials "
                        "(REDIS_SENTINEL_USERNAME/REDIS_SENTINEL_PASSWORD); trying the others, "
                        "and it again, with backoff",
                        address=f"{host}:{port}",
                    )
                continue
            except Exception:
                continue
            self._sentinels_rejecting.discard((host, port))
            if address is None:
                continue
            if address != (self.host, self.port) or self._sentinels_answering is None:
                log.info(
                    "Redis Sentinel names {address} as master {name}",
                    address=f"{address[0]}:{address[1]}",
                    name=self.sentinel_master,
                )
            self._sentinels_answering = True
            self.host, self.port = address
            return address
        if self._sentinels_answering is not False and self.running:
            log.warn(
                "No Redis Sentinel ({sentinels}) named a master {name}; retrying with backoff",
                sentinels=",".join(f"{h}:{p}" for h, p in self.sentinels),
                name=self.sentinel_master,
            )
        self._sentinels_answering = False
        raise net_error.ConnectError(string="no Redis Sentinel named the master")

    @inlineCallbacks
    def _ask_sentinel(self, host: str, port: int) -> Generator[Deferred, Any, tuple[str, int] | None]:
        bound = max(1.0, 4 * self.timeout)
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=bound)
        protocol = txredisapi.RedisProtocol(charset="utf-8", replyTimeout=None, convertNumbers=False)
        p = yield connectProtocol(endpoint, protocol)
        try:
            if self._sentinel_password:
                user = (self.sentinel_username,) if self.sentinel_username else ()
                auth = p.execute_command("AUTH", *user, self._sentinel_password)
                try:
                    yield auth.addTimeout(bound, self.reactor)
                except txredisapi.ResponseError:
                    raise _SentinelRejected() from None
            d = p.execute_command("SENTINEL", "get-master-addr-by-name", self.sentinel_master)
            try:
                reply = yield d.addTimeout(bound, self.reactor)
            except txredisapi.ResponseError as e:
                if str(e).startswith("NOAUTH"):  # it has a password we were not given
                    raise _SentinelRejected() from None
                raise
        finally:
            p.transport.abortConnection()
        if not isinstance(reply, list) or len(reply) != 2:
            return None  # nil: the Sentinel does not monitor that name
        return str(reply[0]), int(reply[1])

    # -- service ----------------------------------------------------------------------------------

    def startService(self) -> None:
        """Starts connecting and returns at once: the sidecar runs while Redis is down."""
        super().startService()
        self._commands.service.startService()
        self._subscriber.service.startService()
        self._health.start(self._health_interval, now=False)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._health.running:
            self._health.stop()
        for channel in list(self._waiters):
            self._resolve_channel(channel, False)
        return gatherResults(
            [self._commands.service.stopService(), self._subscriber.service.stopService()], consumeErrors=True
        )

    # -- entries ----------------------------------------------------------------------------------

    def read(self, customer_id: str, resource_id: str | None = None) -> Deferred:
        """Deferred[CustomerEntry | None]: the entry as Redis holds it, or None on a miss:
        entitlements or their timestamp missing, any usage key missing, an unknown format, a
        resource whose customer-level entry is missing or newer (`require_customer_entry`), or
        Redis down/slow."""
        keys = EntryKeys(self.prefix, customer_id, resource_id or None)
        return self._call(lambda p: self._read(p, keys), None)

    @inlineCallbacks
    def _read(self, p: Any, keys: EntryKeys) -> Generator[Deferred, Any, CustomerEntry | None]:
        names = [keys.entitlements, keys.metadata, timestamp_key(keys.entitlements)]
        check_customer = bool(keys.resource_id) and self.require_customer_entry
        if check_customer:
            names.append(keys.customer_timestamp)
        values = yield p.execute_command("MGET", *names)
        text, metadata, stamp = values[0], values[1], values[2]
        if text is None or stamp is None:
            return None
        try:
            entry_stamp = decode_timestamp(stamp, "#timestamp")
            if check_customer:
                customer_stamp = values[3]
                if customer_stamp is None:
                    return None
                if decode_timestamp(customer_stamp, "customer #timestamp") > entry_stamp:
                    return None
            stored = decode_entitlements(text, entry_stamp)
            usages: dict[str, tuple[str | None, str | None]] = {}
            refs = stored.usage_refs
            if refs:
                names = []
                for ref in refs:
                    names.extend((f"{keys.entitlements}:{ref}", timestamp_key(f"{keys.entitlements}:{ref}")))
                values = yield p.execute_command("MGET", *names)
                usages = {ref: (values[2 * i], values[2 * i + 1]) for i, ref in enumerate(refs)}
            return decode_entry(keys.customer_id, keys.resource_id, stored, metadata, stamp, usages)
        except MissingUsage:
            return None
        except FormatError as e:
            self._unreadable(keys.entitlements, e)
            return None

    def _unreadable(self, key: str, error: FormatError) -> None:
        """Count an entry that cannot be read (a miss) and log it at most once per key per
        `FORMAT_LOG_INTERVAL`: a fleet reading one bad key must not flood the log."""
        self.errors += 1
        now = self.reactor.seconds()
        last = self._format_logged.get(key)
        if last is not None and now - last < FORMAT_LOG_INTERVAL:
            return
        if len(self._format_logged) >= _FORMAT_LOG_KEYS:
            self._format_logged = {k: t for k, t in self._format_logged.items() if now - t < FORMAT_LOG_INTERVAL}
        if len(self._format_logged) >= _FORMAT_LOG_KEYS:
            return  # more bad keys than worth a line each within one interval
        self._format_logged[key] = now
        if isinstance(error, LegacyFormat):
            log.warn(
                "Redis key {key} holds this sidecar's earlier format; treated as a miss, and the "
                "refetch writes it in Stigg's format",
                key=key,
            )
        else:
            log.warn(
                "Redis key {key} holds an entry this sidecar cannot read ({error}); treated as a miss",
                key=key,
                error=self._scrub(str(error)),
            )

    def write(self, entry: CustomerEntry, only_if_cached: bool = False) -> Deferred:
        """Deferred[bool]: store `entry`, each key only if not older than what Redis holds
        (newer wins, atomically); True when the entitlements key was written. With
        `only_if_cached`, nothing is written unless Redis already holds the entry."""
        keys = EntryKeys(self.prefix, entry.customer_id, entry.resource_id)
        message = encode_change(keys.cache_key, self.instance_id, "entry")

        def work(p: Any) -> Deferred:
            items = [(i.key, i.value, i.timestamp) for i in encode_entry(self.prefix, entry)]
            return self._eval_write(p, keys, items, only_if_cached, message)

        return self._call(work, []).addCallback(lambda written: bool(written) and written[0] == 1)

    def write_usage(
        self,
        customer_id: str,
        resource_id: str | None,
        kind: str,
        ref_id: str,
        current_usage: float,
        usage_period_start: int | None,
        usage_period_end: int | None,
        updated_at: int,
    ) -> Deferred:
        """Deferred[bool]: store one entitlement's usage ("FEATURE" refId or "CREDIT" currency
        id) if Redis holds the entry and its stored usage is not newer. Credits have no period
        start: store None there."""
        keys = EntryKeys(self.prefix, customer_id, resource_id or None)
        message = encode_change(keys.cache_key, self.instance_id, "usage")
        start = usage_period_start if kind == FEATURE else None

        def work(p: Any) -> Deferred:
            key = keys.usage(kind, ref_id)  # ValueError for an unknown kind: counted, skipped
            value = encode_usage(float(current_usage), start, usage_period_end)
            return self._eval_write(p, keys, [(key, value, updated_at)], True, message)

        return self._call(work, []).addCallback(lambda written: bool(written) and written[0] == 1)

    def _eval_write(
        self, p: Any, keys: EntryKeys, items: list[tuple[str, str, int]], guarded: bool, message: str
    ) -> Deferred:
        names = [timestamp_key(keys.entitlements)]
        args = [str(self.ttl_secs), "1" if guarded else "0", self._changes, message]
        for key, value, stamp in items:
            names.extend((key, timestamp_key(key)))
            args.extend((value, str(int(stamp))))
        return p.eval(_WRITE, names, args)

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
        d = self._call(lambda p: p.eval(_PURGE, names, [self._changes, message]), None)
        return d.addCallback(lambda n: n is not None)

    # -- cross-instance single flight -------------------------------------------------------------

    def acquire_fetch_lock(self, customer_id: str, resource_id: str | None = None, ttl_ms: int = 5000) -> Deferred:
        """Deferred[str | None]: a token when this caller should fetch (it got the lock, or
        Redis could not be asked); None when another instance holds the lock: `wait_for_fetch`."""
        keys = EntryKeys(self.prefix, customer_id, resource_id or None)
        token = secrets.token_hex(16)
        d = self._call(lambda p: p.execute_command("SET", keys.fetch_lock, token, "NX", "PX", int(ttl_ms)), "OK")
        return d.addCallback(lambda reply: token if reply == "OK" else None)

    def release_fetch_lock(
        self, customer_id: str, resource_id: str | None, token: str, error: str | None = None
    ) -> Deferred:
        """Deferred[bool]: delete the lock if `token` still holds it, and publish the outcome
        (`{}`, or `{"error": error}`) to the instances waiting. Call after `write`."""
        keys = EntryKeys(self.prefix, customer_id, resource_id or None)
        args = [token, keys.fetch_channel, encode_fetch_result(error)]
        d = self._call(lambda p: p.eval(_RELEASE, [keys.fetch_lock], args), 0)
        return d.addCallback(lambda n: n == 1)

    def wait_for_fetch(self, customer_id: str, resource_id: str | None, timeout: float) -> Deferred:
        """Deferred[bool]: True when the lock holder reports success (or has already released
        the lock): read Redis again. False on its error, after `timeout` seconds, or at once when
        Redis is unreachable: fetch yourself."""
        if not (self.connected and self.subscribed and self.running):
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
            subscribed = self._subscriber.protocol.subscribe(channel)
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
                self._subscriber.probe()
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
        sub = self._subscriber.protocol
        if sub is not None:
            try:
                sub.unsubscribe(channel).addErrback(lambda failure: None)
            except Exception:
                pass  # the connection is going; so is the subscription

    def _resolve_channel(self, channel: str, result: bool) -> None:
        for waiter in list(self._waiters.get(channel, [])):
            self._resolve(channel, waiter, result)

    # -- pub/sub ----------------------------------------------------------------------------------

    @inlineCallbacks
    def _subscribe_all(self, p: Any) -> Generator[Deferred, Any, None]:
        # One channel per command: SubscriberProtocol pairs one reply with each command.
        if self._on_peer_change is not None:
            yield p.subscribe(self._changes)
        for channel in list(self._waiters):
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
        elif channel in self._waiters:
            self._resolve_channel(channel, fetch_succeeded(message))

    def _probe_links(self) -> None:
        self._commands.probe()
        self._subscriber.probe()

    # -- calls ------------------------------------------------------------------------------------

    def _call(self, work: Callable[[Any], Deferred], default: Any) -> Deferred:
        """`work(protocol)`, bounded by the timeout; `default` (and errors + 1) on any failure."""
        p = self._commands.protocol
        if p is None or not self.running:
            self.errors += 1
            return succeed(default)
        try:
            d = work(p)
        except Exception:
            return succeed(self._failed(Failure(), default))
        d.addTimeout(self.timeout, self.reactor)
        return d.addErrback(self._failed, default)

    def _failed(self, failure: Failure, default: Any) -> Any:
        self.errors += 1
        if failure.check(TimeoutError, txredisapi.TimeoutError):
            self._commands.probe()
            self._log_once(
                "timeout",
                "Redis did not answer within {ms} ms (REDIS_TIMEOUT_MS); such reads miss and writes "
                "are skipped (counted, not logged again until it reconnects)",
                ms=int(self.timeout * 1000),
            )
        elif failure.check(txredisapi.ResponseError):
            text = self._scrub(str(failure.value))
            code = text.split(" ", 1)[0] if text else "error"
            if code == "READONLY" and self.sentinels:
                # The master was demoted under us: reconnect, which asks the Sentinels again.
                self._commands.drop()
            self._log_once(
                code,
                "Redis answered an error ({error}); the call was skipped (further {code} errors are "
                "counted, not logged)",
                error=text,
                code=code,
            )
        elif failure.check(FormatError):
            self._log_once(
                "format",
                "Redis holds an entry this sidecar cannot read ({error}); treated as a miss",
                error=self._scrub(str(failure.value)),
            )
        elif not failure.check(txredisapi.ConnectionError, net_error.ConnectionLost, net_error.ConnectionDone):
            self._log_once(
                type(failure.value).__name__,
                "Redis call failed unexpectedly ({error}); treated as a miss",
                error=self._scrub(failure.getErrorMessage()),
            )
        return default

    def _scrub(self, text: str) -> str:
        for secret in (self._password, self._sentinel_password):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _log_once(self, kind: str, format: str, **fields: Any) -> None:
        if kind not in self._logged_errors:
            self._logged_errors.add(kind)
            log.warn(format, **fields)

    # -- link state (called by _Link) -------------------------------------------------------------

    def link_up(self, link: _Link) -> None:
        if link is not self._commands:
            self._rejected.discard(link.name)
            return
        self._rejected.clear()
        self._logged_errors.clear()
        if self._reachable is False:
            log.info("Redis at {address} is reachable again", address=self.address)
        elif self._reachable is None:
            log.info("Redis mirror connected to {address} (prefix {prefix})", address=self.address, prefix=self.prefix)
        self._reachable = True

    def link_down(self, link: _Link) -> None:
        if link is self._subscriber:
            # Messages may be missed until it reconnects: let the waiters fetch for themselves.
            for channel in list(self._waiters):
                self._resolve_channel(channel, False)
        elif self.running:
            self.link_unreachable(link)

    def link_unreachable(self, link: _Link) -> None:
        if link is not self._commands or not self.running:
            return
        # After a rejection (credentials, TLS, db) the failures that follow are that, not news.
        if self._reachable is not False and not self._rejected & {"credentials", "SELECT", "TLS"}:
            log.warn(
                "Redis at {address} is unreachable; reads miss and writes are skipped until it is back",
                address=self.address,
            )
        self._reachable = False

    def link_rejected(self, link: _Link, stage: str, text: str) -> None:
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
            log.error("Redis rejected REDIS_DB={db} ({error})", db=self.db, error=self._scrub(text))
        elif kind == "TLS":
            log.error(
                "TLS with Redis at {address} failed ({error}); retrying with backoff",
                address=self.address,
                error=self._scrub(text),
            )
        else:
            log.error(
                "Redis refused the subscription ({error}); peer notifications and waits for other "
                "instances' fetches are off until it accepts",
                error=self._scrub(text),
            )
