"""GrpcService: grpcio's threaded server as a Twisted service.

Owns the grpc.Server: its handler pool (`executor.HandlerPool`: `max_workers` threads run calls,
more while calls block on Stigg), its connection limits (`ConnectionLimits`), its port and its
graceful stop. Start binds and serves. Stop drains the way gRPC servers do: readiness and gRPC
health have already turned NOT_SERVING (the parent does that first), so clients watching them
send their calls elsewhere; calls still arriving are served until none came for a moment (at
most `DRAIN_MAX_SECS`); then `server.stop` sends GOAWAY, refuses new calls (UNAVAILABLE, which
clients retry elsewhere) and lets in-flight ones finish within what is left of the stop's
budget. Returns a Deferred the parent MultiService waits on. Knows nothing of entitlements.

Why the wait before GOAWAY: grpc-core cancels (CANCELLED, which clients do not retry) the calls
that arrived but were not yet handed to Python when the server shuts down.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, cast

import grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from stigg_sidecar.crossing.pool import HandlerPool
from stigg_sidecar.grpc.timing import Behaviour, Timed, TimedServer
from stigg_sidecar.grpc.unsent import UnsentAnswers
from stigg_sidecar.lifecycle.listening import ListenError, probe_bind
from stigg_sidecar.lifecycle.reactor import IReactor, default_reactor
from stigg_sidecar.lifecycle.stopping import StopBudget

log = Logger()

Registration = Callable[[grpc.Server], None]


# Clients may ping this often without calls (grpc-java's and grpc-go's smallest keepalive time is
# 10 s); more often is abuse, and grpc-core answers it with GOAWAY "too_many_pings".
MIN_CLIENT_PING_INTERVAL_MS = 10_000

# Stopping: calls still arriving after NOT_SERVING are served until none came for QUIET_SECS,
# for at most DRAIN_MAX_SECS (and at most a quarter of the stop's budget), before GOAWAY.
QUIET_SECS = 0.1
DRAIN_MAX_SECS = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a gRPC connection may stay idle or silent, and how many calls it may carry at once.

    Without these grpc-core keeps a connection (even a half-open one) open forever. The values are
    the settings' (the assembly's `connection_limits(settings)`): this package never reads settings.
    """

    keepalive_secs: float
    keepalive_timeout_secs: float
    max_connection_idle_secs: float
    max_concurrent_streams: int
    max_connections: int = 0  # connections at once (0: no cap); grpc-core closes more as they come

    def options(self) -> list[tuple[str, int]]:
        """grpc-core channel arguments (milliseconds, at least 1)."""

        def ms(seconds: float) -> int:
            return max(1, round(seconds * 1000))

        return [
            # Ping a connection after this long without traffic; no ack within the timeout closes it,
            # so a peer that vanished (half-open TCP) does not hold a connection forever.
            ("grpc.keepalive_time_ms", ms(self.keepalive_secs)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_secs)),
            # grpcio 1.85's transport waits on this one for the ack of any ping, keepalives included
            # (default 60 s, and keepalive_timeout_ms alone did not close a silent peer).
            ("grpc.http2.ping_timeout_ms", ms(self.keepalive_timeout_secs)),
            # Those pings go to connections without calls too (they are the ones that go stale), and
            # clients' own keepalive pings without calls are accepted down to the interval below.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
            # GOAWAY to a connection without calls for this long; clients reconnect on their next call.
            ("grpc.max_connection_idle_ms", ms(self.max_connection_idle_secs)),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
        ] + ([("grpc.max_allowed_incoming_connections", self.max_connections)] if self.max_connections > 0 else [])


def server_options(max_message_bytes: int, limits: ConnectionLimits) -> list[tuple[str, int]]:
    """Every channel argument of the sidecar's server (bench/bare_server.py uses the same)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        *limits.options(),
    ]


class GrpcBindError(ListenError):
    """PORT could not be bound; the message is one line naming the setting."""


class GrpcService(Service):
    """Serve gRPC on `address:port`; `port` is the bound port once running (useful with port 0)."""

    name = "grpc"

    def __init__(
        self,
        registrations: Sequence[Registration],
        address: str,
        port: int,
        max_workers: int,
        max_message_bytes: int,
        grace: float,
        limits: ConnectionLimits,
        reactor: IReactor | None = None,
        on_serving: Callable[[int], None] | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        budget: StopBudget | None = None,
        credentials: grpc.ServerCredentials | None = None,
        timed: Timed | None = None,
    ) -> None:
        """`budget`: the stop's deadline shared with the other parts (else `grace` seconds of its own).
        `timed(method, behaviour)`: wraps every unary handler registered, to count and time its calls
        (`timing.TimedServer`; no interceptor)."""
        self._reactor = reactor if reactor is not None else default_reactor()
        self._registrations = registrations
        self._address = address
        self._requested_port = port
        self._max_workers = max_workers
        self._max_message_bytes = max_message_bytes
        self._budget = budget if budget is not None else StopBudget(grace, self._reactor)
        self._on_serving = on_serving
        self._interceptors = list(interceptors)
        self._limits = limits
        self._credentials = credentials  # TLS only when given: plaintext is then refused
        self._timed = timed
        # Innermost wrapper of every unary handler: it sees the handler return, and cancels calls
        # whose client does not take the answer (grpc/unsent.py).
        self.unsent = UnsentAnswers()
        self._server: grpc.Server | None = None
        self.pool: HandlerPool | None = None
        self.port: int | None = None

    def _build(self) -> grpc.Server:
        self.pool = HandlerPool(self._max_workers, thread_name_prefix="grpc-handler")
        server = grpc.server(
            # grpcio's stubs say ThreadPoolExecutor; the server only ever calls submit().
            cast(futures.ThreadPoolExecutor, self.pool),
            options=server_options(self._max_message_bytes, self._limits),
            maximum_concurrent_rpcs=None,
            interceptors=self._interceptors,
        )
        target = cast(grpc.Server, TimedServer(server, self._wrap))
        for register in self._registrations:
            register(target)
        return server

    def _wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        """Each unary handler: watched for unsent answers, then counted and timed (`timed`)."""
        watched = self.unsent.wrap(method, behaviour)
        return watched if self._timed is None else self._timed(method, watched)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # grpcio says only "Failed to bind" (plus a C-level log line): ask the kernel first for the reason.
        probe_bind("PORT", self._address, self._requested_port)
        server = self._build()
        target = f"{self._address}:{self._requested_port}"
        if ":" in self._address and not self._address.startswith("["):
            target = f"[{self._address}]:{self._requested_port}"
        try:
            if self._credentials is not None:
                port = server.add_secure_port(target, self._credentials)
            else:
                port = server.add_insecure_port(target)
        except RuntimeError:
            port = 0
        if port == 0:
            raise GrpcBindError("PORT", self._address, self._requested_port, "cannot be bound by gRPC")
        self._server = server
        self.port = port

    def startService(self) -> None:
        super().startService()
        if self._server is None:
            self.privilegedStartService()
        assert self._server is not None
        self._server.start()
        log.info("gRPC listening on {address}:{port}{tls}", address=self._address, port=self.port,
                 tls=" (TLS)" if self._credentials is not None else "")
        if self._on_serving is not None:
            assert self.port is not None  # bound by privilegedStartService
            self._on_serving(self.port)

    def stopService(self) -> Deferred | None:
        super().stopService()
        server, self._server = self._server, None
        if server is None:
            return None
        self._budget.begin()
        return self._drain(server)

    @inlineCallbacks
    def _drain(self, server: grpc.Server) -> Generator[Deferred[Any], Any, None]:
        pool, self.pool = self.pool, None
        yield self._until_quiet(pool, min(DRAIN_MAX_SECS, self._budget.remaining() / 4))
        grace = self._budget.remaining()
        log.info("gRPC stopping: GOAWAY, new calls refused, {grace:.1f}s for in-flight ones", grace=grace)
        done = server.stop(grace)
        # Waiting on the event blocks, so it happens on the reactor's thread pool (still running
        # while "before shutdown" triggers, which stop services, are pending).
        yield deferToThreadPool(self._reactor, self._reactor.getThreadPool(), done.wait, grace + 1)
        if pool is not None:
            pool.shutdown(wait=False)  # parked threads exit now, any still waiting after their call
        log.info("gRPC stopped")

    @inlineCallbacks
    def _until_quiet(self, pool: HandlerPool | None, at_most: float) -> Generator[Deferred[Any], Any, None]:
        """Serve on until no call arrived for QUIET_SECS, or for `at_most` seconds."""
        if pool is None:
            return
        ends = self._reactor.seconds() + at_most
        seen = pool.submitted
        while self._reactor.seconds() < ends:
            yield deferLater(self._reactor, min(QUIET_SECS, max(0.0, ends - self._reactor.seconds())), lambda: None)
            if pool.submitted == seen:
                return
            seen = pool.submitted
