"""The mirror's connections to Redis: one `Link` per connection (commands, pub/sub), each kept
alive by a ClientService with backoff, with its handshake (AUTH, PING, ROLE under Sentinel,
SELECT, then the owner's `prepare`) and its wedge probe. A link reports what happens to it to
its `LinkEvents` (the mirror), which decides what to log; it never logs a password (AUTH is
sent here, and no reply text is logged here).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import protocol as net_protocol
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

try:
    from OpenSSL import SSL
except ImportError:  # TLS needs pyOpenSSL; without it REDIS_TLS fails at construction
    SSL = None  # type: ignore[assignment]

FIRST_RECONNECT_DELAY = 0.1  # backoffPolicy doubles it before the first retry


@provider(ILogObserver)
def _warnings_only(event: dict) -> None:
    if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
        globalLogPublisher(event)


class NotMaster(Exception):
    """The server Sentinel named answers ROLE with something else than master."""


@dataclass(frozen=True)
class Handshake:
    """What a new connection sends before it is usable: AUTH when there is a password, PING,
    ROLE when the address came from Sentinel (`check_role`), SELECT `db` on the commands link."""

    username: str = ""
    password: str = field(default="", repr=False)
    check_role: bool = False
    db: int = 0


class LinkEvents(Protocol):
    """What a link tells its owner (the mirror), which logs each state change once."""

    def link_up(self, link: Link) -> None: ...

    def link_down(self, link: Link) -> None: ...

    def link_unreachable(self, link: Link) -> None: ...

    def link_rejected(self, link: Link, stage: str, text: str) -> None: ...


class QuietClientService(ClientService):
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


class CommandProtocol(_Hooks, txredisapi.RedisProtocol):
    pass


class SubscriberProtocol(_Hooks, txredisapi.SubscriberProtocol):
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

    def __init__(self, link: Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> Any:
        p = self.link.protocol_class(
            # No replyTimeout: calls are bounded by the mirror, wedges found by `Link.probe`.
            charset="utf-8", replyTimeout=None, convertNumbers=False
        )
        p.factory = self
        return p



class Link:
    """One connection to Redis, kept alive by a ClientService (`service`, a child of the mirror).
    `protocol` is set while it is usable: connected, authenticated, on the right database, and
    prepared (`prepare`). What happens to it is told to `events` (the mirror), which logs it."""

    def __init__(
        self,
        name: str,
        protocol_class: type,
        endpoint: IStreamClientEndpoint,
        handshake: Handshake,
        events: LinkEvents,
        reactor: IReactorTime,
        timeout: float,
        max_delay: float,
    ) -> None:
        self.events = events
        self.reactor = reactor
        self.name = name
        self.protocol_class = protocol_class
        self._handshake_steps = handshake
        self.wedge_timeout = max(2.0, 10 * timeout)
        self.handshake_timeout = max(1.0, 4 * timeout)
        self.protocol: Any = None
        self.on_message: Callable[[Any, Any], None] = lambda channel, message: None
        self.prepare: Callable[[Any], Deferred] = lambda p: succeed(None)
        self._probing = False
        self._made = False  # a TCP connection was made since the last retry was scheduled
        self._rejections = 0  # failed handshakes in a row
        policy = backoffPolicy(
            initialDelay=min(FIRST_RECONNECT_DELAY, max_delay),
            maxDelay=max_delay,
            factor=2.0,
            jitter=lambda: random.random() * FIRST_RECONNECT_DELAY,
        )
        self._policy = policy
        self.service = QuietClientService(
            endpoint, _LinkFactory(self), retryPolicy=self._retry_delay, clock=self.reactor
        )

    def _retry_delay(self, attempt: int) -> float:
        if not self._made:
            self.events.link_unreachable(self)  # the connect itself failed
        self._made = False
        return self._policy(max(attempt, self._rejections))

    def connection_made(self, p: Any) -> None:
        self._made = True
        self._handshake(p)

    def connection_lost(self, p: Any, reason: Failure) -> None:
        if p is self.protocol:
            self.protocol = None
            self.events.link_down(self)
        elif SSL is not None and reason.check(SSL.Error):
            self._rejections += 1
            self.events.link_rejected(self, "TLS", reason.getErrorMessage())

    @inlineCallbacks
    def _handshake(self, p: Any) -> Generator[Deferred, Any, None]:
        steps = self._handshake_steps
        events = self.events
        stage = "AUTH"
        try:
            if steps.password:
                user = (steps.username,) if steps.username else ()
                yield self._bounded(p.execute_command("AUTH", *user, steps.password))
            stage = "PING"  # NOAUTH here: Redis wants a password we were not given
            yield self._bounded(p.execute_command("PING"))
            if steps.check_role:
                stage = "ROLE"
                role = yield self._bounded(p.execute_command("ROLE"))
                if not role or role[0] != "master":
                    # Sentinel named a master that is not (yet, or any more) one: ask again.
                    raise NotMaster()
            if steps.db and self.name == "commands":
                stage = "SELECT"
                yield self._bounded(p.execute_command("SELECT", steps.db))
            stage = "prepare"
            yield self._bounded(self.prepare(p))
        except txredisapi.ResponseError as e:
            self._rejections += 1  # a refused handshake backs off like a refused connect
            if str(e).startswith(("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")):
                events.link_unreachable(self)  # there, but not serving yet
            else:
                events.link_rejected(self, stage, str(e))
            p.transport.loseConnection()
            return
        except Exception:
            self._rejections += 1
            events.link_unreachable(self)  # timed out or dropped mid-handshake
            p.transport.abortConnection()
            return
        if not p.connected:
            return
        self._rejections = 0
        self.protocol = p
        events.link_up(self)

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
