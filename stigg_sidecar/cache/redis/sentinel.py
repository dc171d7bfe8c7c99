"""Redis Sentinel (REDIS_SENTINELS): which server is the master right now.

Every connect of a link asks again (`SentinelEndpoint`), the Sentinels in order, so a failover is
followed by itself. A Sentinel has its own credentials, separate from the data servers'; its
password is sent here and no reply text is ever logged (it may quote what was sent).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import txredisapi
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from stigg_sidecar.lifecycle.reactor import IReactor

log = Logger()

Address = tuple[str, int]


class SentinelRejected(Exception):
    """A Sentinel refused our credentials (or wants some and we have none)."""


class Sentinels:
    """Asks `sentinels` for the address of `master`, authenticating with `password` (and
    `username`) when given. `logging()` says whether failures are worth a line (not while the
    owner is stopping)."""

    def __init__(
        self,
        reactor: IReactor,
        sentinels: Sequence[Address],
        master: str,
        username: str,
        password: str,
        timeout: float,
        logging: Callable[[], bool],
    ) -> None:
        self.reactor = reactor
        self.addresses = tuple(sentinels)
        self.master = master
        self.username = username
        self._password = password
        self._timeout = timeout
        self._logging = logging
        self._answering: bool | None = None
        self._rejecting: set[Address] = set()  # logged as refusing our credentials

    @inlineCallbacks
    def find_master(self, current: Callable[[], Address]) -> Generator[Deferred, Any, Address]:
        """The master's (host, port) as the first Sentinel that knows it says; ConnectError when
        none does (the link retries with backoff). Logs when the answer differs from `current()`,
        the address last named."""
        for host, port in self.addresses:
            try:
                address = yield self._ask(host, port)
            except SentinelRejected:
                if (host, port) not in self._rejecting and self._logging():
                    self._rejecting.add((host, port))
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
            self._rejecting.discard((host, port))
            if address is None:
                continue
            if address != current() or self._answering is None:
                log.info(
                    "Redis Sentinel names {address} as master {name}",
                    address=f"{address[0]}:{address[1]}",
                    name=self.master,
                )
            self._answering = True
            return address
        if self._answering is not False and self._logging():
            log.warn(
                "No Redis Sentinel ({sentinels}) named a master {name}; retrying with backoff",
                sentinels=",".join(f"{h}:{p}" for h, p in self.addresses),
                name=self.master,
            )
        self._answering = False
        raise net_error.ConnectError(string="no Redis Sentinel named the master")

    @inlineCallbacks
    def _ask(self, host: str, port: int) -> Generator[Deferred, Any, Address | None]:
        bound = max(1.0, 4 * self._timeout)
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=bound)
        protocol = txredisapi.RedisProtocol(charset="utf-8", replyTimeout=None, convertNumbers=False)
        p = yield connectProtocol(endpoint, protocol)
        try:
            if self._password:
                user = (self.username,) if self.username else ()
                auth = p.execute_command("AUTH", *user, self._password)
                try:
                    yield auth.addTimeout(bound, self.reactor)
                except txredisapi.ResponseError:
                    raise SentinelRejected() from None
            d = p.execute_command("SENTINEL", "get-master-addr-by-name", self.master)
            try:
                reply = yield d.addTimeout(bound, self.reactor)
            except txredisapi.ResponseError as e:
                if str(e).startswith("NOAUTH"):  # it has a password we were not given
                    raise SentinelRejected() from None
                raise
        finally:
            p.transport.abortConnection()
        if not isinstance(reply, list) or len(reply) != 2:
            return None  # nil: the Sentinel does not monitor that name
        return str(reply[0]), int(reply[1])


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """Connects to whichever server `find_master()` names right now, through `server_endpoint`."""

    def __init__(
        self,
        find_master: Callable[[], Deferred],
        server_endpoint: Callable[[str, int], IStreamClientEndpoint],
    ) -> None:
        self._find_master = find_master
        self._server_endpoint = server_endpoint

    def connect(self, factory: Any) -> Deferred:
        d = self._find_master()
        return d.addCallback(lambda address: self._server_endpoint(*address).connect(factory))
