"""Connections time out (issue 10, finding 10): over real sockets on 127.0.0.1, the HTTP port closes
idle connections and ones whose headers come too slowly; the gRPC port closes connections without
calls and ones whose peer stops answering pings, and tells clients its stream limit. Real clients
(grpcio, Stigg's official SDK) keep working across keepalives and idle closes.

Timeouts are configured to fractions of a second; every wait is bounded by `BOUND` seconds, far
above them, so the tests assert that a connection closes, never how fast.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import cast

import grpc
import stigg_sidecar_sdk as sdk
from twisted.internet import tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from stigg_sidecar.process.assembly import assemble
from stigg_sidecar.settings import Settings, SettingsError, load_settings
from tests.fixtures.clients import run_async
from tests.fixtures.reactor import reactor

BOUND = 10.0  # seconds any one wait may take before the test fails
REQUEST = b"GET /livez HTTP/1.1\r\nHost: sidecar\r\n\r\n"

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
ACK = 0x1
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3


def _sidecar(**env: str):
    settings = load_settings({"OFFLINE": "1", "BIND_ADDRESS": "127.0.0.1", "PORT": "0", "HTTP_PORT": "0", **env})
    return assemble(settings, reactor).parts


class _Peer(Protocol):
    """A raw TCP client: what it received, and `closed`, fired when the server closes it."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred = Deferred()
        self._waiting: list[tuple[bytes, Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for wanted, d in list(self._waiting):
            if wanted in self.received:
                self._waiting.remove((wanted, d))
                d.callback(self.received)

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)

    def until_received(self, wanted: bytes) -> Deferred:
        d: Deferred = Deferred()
        if wanted in self.received:
            d.callback(self.received)
        else:
            self._waiting.append((wanted, d))
        return d.addTimeout(BOUND, reactor)


class HttpTimeoutTests(TestCase):
    timeout = 60

    def start(self, **env: str) -> int:
        http = _sidecar(**env).http
        http.privilegedStartService()
        self.addCleanup(http.stopService)
        return http.port

    @inlineCallbacks
    def connect(self, port: int):
        peer = _Peer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), peer)
        transport = cast(tcp.Client, peer.transport)
        self.addCleanup(lambda: transport.abortConnection() if transport.connected else None)
        return peer

    @inlineCallbacks
    def test_idle_connections_are_closed(self):
        port = self.start(HTTP_IDLE_TIMEOUT_SECS="0.3", HTTP_HEADER_TIMEOUT_SECS="600")
        # Between two requests of a kept-alive connection...
        kept = yield self.connect(port)
        kept.transport.write(REQUEST)
        yield kept.until_received(b'{"status": "UP"}')
        # ...and on a connection that never sent a byte.
        silent = yield self.connect(port)
        yield kept.closed.addTimeout(BOUND, reactor)
        yield silent.closed.addTimeout(BOUND, reactor)
        self.assertEqual(silent.received, b"")

    @inlineCallbacks
    def test_silent_connection_is_closed_by_the_header_timeout(self):
        port = self.start(HTTP_IDLE_TIMEOUT_SECS="600", HTTP_HEADER_TIMEOUT_SECS="0.3")
        silent = yield self.connect(port)
        yield silent.closed.addTimeout(BOUND, reactor)

    @inlineCallbacks
    def test_stalled_request_line_is_closed(self):
        port = self.start(HTTP_IDLE_TIMEOUT_SECS="600", HTTP_HEADER_TIMEOUT_SECS="0.3")
        peer = yield self.connect(port)
        peer.transport.write(b"GET /liv")
        yield peer.closed.addTimeout(BOUND, reactor)
        self.assertEqual(peer.received, b"")

    @inlineCallbacks
    def test_dribbled_headers_are_cut_off(self):
        # A header line every 50 ms keeps restarting the idle timeout; only the header deadline ends it.
        port = self.start(HTTP_IDLE_TIMEOUT_SECS="0.3", HTTP_HEADER_TIMEOUT_SECS="0.5")
        peer = yield self.connect(port)
        peer.transport.write(b"GET /livez HTTP/1.1\r\n")
        lines = iter(range(10_000))
        dribble = LoopingCall(lambda: peer.transport.write(b"X-Slow-%d: 1\r\n" % next(lines)))
        dribble.clock = reactor
        dribble.start(0.05)
        try:
            yield peer.closed.addTimeout(BOUND, reactor)
        finally:
            dribble.stop()
        self.assertEqual(peer.received, b"")

    @inlineCallbacks
    def test_requests_in_time_are_answered(self):
        port = self.start(HTTP_IDLE_TIMEOUT_SECS="5", HTTP_HEADER_TIMEOUT_SECS="5")
        peer = yield self.connect(port)
        # Headers in pieces, then a second request on the same connection: both answered.
        for piece in (b"GET /livez HTTP/1.1\r\n", b"Host: sidecar\r\n", b"\r\n"):
            peer.transport.write(piece)
            yield deferLater(reactor, 0.05, lambda: None)
        yield peer.until_received(b'{"status": "UP"}')
        peer.received = b""
        peer.transport.write(REQUEST)
        received = yield peer.until_received(b'{"status": "UP"}')
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        self.assertFalse(peer.closed.called)


def _frame(kind: int, flags: int = 0, payload: bytes = b"", stream: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


class RawHttp2Client:
    """A bare HTTP/2 connection: preface and an empty SETTINGS, then no calls. It acknowledges the
    server's SETTINGS (so it breaks no rule) and, if `answer_pings`, its PINGs."""

    def __init__(self, port: int, answer_pings: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
        self.answer_pings = answer_pings
        self.pings = 0
        self.server_settings: dict[int, int] = {}
        self.sock.sendall(PREFACE + _frame(SETTINGS))

    def run_until_closed(self) -> str:
        """Read frames until GOAWAY or EOF (answering as above); which one came, or raise after BOUND."""
        buffer = b""
        deadline = time.monotonic() + BOUND
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    chunk = self.sock.recv(65536)
                except ConnectionResetError:
                    return "EOF"
                except TimeoutError:
                    break
                if not chunk:
                    return "EOF"
                buffer += chunk
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags, payload = buffer[3], buffer[4], buffer[9:9 + length]
                    buffer = buffer[9 + length:]
                    if kind == GOAWAY:
                        return "GOAWAY"
                    if kind == SETTINGS and not flags & ACK:
                        for at in range(0, len(payload), 6):
                            key, value = struct.unpack(">HI", payload[at:at + 6])
                            self.server_settings[key] = value
                        self.sock.sendall(_frame(SETTINGS, ACK))
                    elif kind == PING and not flags & ACK:
                        self.pings += 1
                        if self.answer_pings:
                            self.sock.sendall(_frame(PING, ACK, payload))
            raise AssertionError(f"connection still open after {BOUND}s")
        finally:
            self.sock.close()


class GrpcConnectionTests(TestCase):
    timeout = 60

    def start(self, **env: str) -> int:
        grpc_service = _sidecar(**env).grpc
        grpc_service.privilegedStartService()
        grpc_service.startService()
        self.addCleanup(grpc_service.stopService)
        return grpc_service.port

    @inlineCallbacks
    def test_connection_without_calls_gets_goaway(self):
        port = self.start(GRPC_MAX_CONNECTION_IDLE_SECS="0.5", GRPC_MAX_CONCURRENT_STREAMS="1000")
        client = RawHttp2Client(port, answer_pings=True)
        ended = yield deferToThread(client.run_until_closed)
        self.assertEqual(ended, "GOAWAY")
        self.assertEqual(client.server_settings.get(SETTINGS_MAX_CONCURRENT_STREAMS), 1000)

    @inlineCallbacks
    def test_peer_that_stops_answering_pings_is_dropped(self):
        # A vanished client: its connection has no calls, but it is not idle long enough to be closed as idle.
        port = self.start(GRPC_KEEPALIVE_SECS="0.2", GRPC_KEEPALIVE_TIMEOUT_SECS="0.3", GRPC_MAX_CONNECTION_IDLE_SECS="600")
        client = RawHttp2Client(port, answer_pings=False)
        ended = yield deferToThread(client.run_until_closed)
        self.assertIn(ended, ("GOAWAY", "EOF"))
        self.assertGreaterEqual(client.pings, 1)

    @inlineCallbacks
    def test_grpc_channel_keeps_its_connection_across_keepalives(self):
        port = self.start(GRPC_KEEPALIVE_SECS="0.1", GRPC_KEEPALIVE_TIMEOUT_SECS="2", GRPC_MAX_CONNECTION_IDLE_SECS="600")
        states: list[grpc.ChannelConnectivity] = []
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.addCleanup(channel.close)
        channel.subscribe(states.append)
        stub = SidecarServiceStub(channel)

        def calls() -> None:
            for _ in range(4):
                stub.GetBooleanEntitlement(pb.GetBooleanEntitlementRequest(customer_id="c", feature_id="f"), timeout=BOUND)
                time.sleep(0.4)  # several keepalive intervals without calls

        yield deferToThread(calls)
        ready = states.index(grpc.ChannelConnectivity.READY)
        # One connection throughout: the server's pings were answered and nothing closed it.
        self.assertEqual(states[ready:], [grpc.ChannelConnectivity.READY])

    @inlineCallbacks
    def test_official_client_calls_again_after_an_idle_close(self):
        port = self.start(GRPC_MAX_CONNECTION_IDLE_SECS="0.3")

        async def calls():
            client = sdk.Stigg(sdk.ApiConfig(api_key="unused-offline"), remote_sidecar_host="127.0.0.1", remote_sidecar_port=port)
            request = sdk.GetBooleanEntitlementRequest(customer_id="c", feature_id="f")
            try:
                first = await client.get_boolean_entitlement(request)
                import asyncio

                await asyncio.sleep(1.0)  # past the idle limit: the server has sent GOAWAY
                second = await client.get_boolean_entitlement(request)
            finally:
                client.close()
            return first, second

        first, second = yield deferToThread(run_async, calls(), BOUND)
        self.assertEqual((first.is_fallback, second.is_fallback), (True, True))


class ConnectionSettingsTests(SynchronousTestCase):
    def test_defaults(self):
        s = load_settings({"OFFLINE": "1"})
        self.assertEqual(
            (s.http_idle_timeout_secs, s.http_header_timeout_secs, s.grpc_keepalive_secs,
             s.grpc_keepalive_timeout_secs, s.grpc_max_connection_idle_secs),
            (60, 10, 60, 20, 300),
        )
        self.assertEqual(s.grpc_max_concurrent_streams, s.max_waiting_reads + s.max_waiting_writes + s.grpc_max_workers)
        # Settings() (what a GrpcService built without settings uses) agrees with the loaded defaults.
        self.assertEqual(Settings().grpc_max_concurrent_streams, s.grpc_max_concurrent_streams)

    def test_stream_limit_follows_the_capacity(self):
        s = load_settings({"OFFLINE": "1", "MAX_WAITING_READS": "2000", "MAX_WAITING_WRITES": "100", "GRPC_MAX_WORKERS": "8"})
        self.assertEqual(s.grpc_max_concurrent_streams, 2108)

    def test_stream_limit_below_the_capacity_is_refused(self):
        with self.assertRaises(SettingsError) as caught:
            load_settings({"OFFLINE": "1", "GRPC_MAX_CONCURRENT_STREAMS": "100"})
        self.assertEqual(
            str(caught.exception),
            "GRPC_MAX_CONCURRENT_STREAMS (100) must be at least MAX_WAITING_READS + MAX_WAITING_WRITES"
            " + GRPC_MAX_WORKERS (784), so one client connection can use the whole capacity",
        )

    def test_zero_timeouts_are_refused(self):
        for name in ("HTTP_IDLE_TIMEOUT_SECS", "HTTP_HEADER_TIMEOUT_SECS", "GRPC_KEEPALIVE_SECS",
                     "GRPC_KEEPALIVE_TIMEOUT_SECS", "GRPC_MAX_CONNECTION_IDLE_SECS"):
            with self.assertRaises(SettingsError) as caught:
                load_settings({"OFFLINE": "1", name: "0"})
            self.assertEqual(str(caught.exception), f"{name}: must be more than 0 seconds")
