"""The socket's reconnect backoff counts from the last connection_ack, not the last TCP connect
(issue 10, finding 12): a WebSocket upgrade Stigg refuses (HTTP 404 here, from the emulator) has
connected TCP first, and counted from there every retry would be "retry 1", forever.

The emulator serves the socket over loopback; the service's retry timer runs on a task.Clock, so
each delay is read exactly and nothing sleeps."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from stigg_sidecar.upstream.realtime import RealtimeService
from tests.fixtures import data
from tests.fixtures.polling import until
from tests.fixtures.reactor import reactor
from tests.fixtures.realtime import RecordingSink


class HandshakeBackoffTests(TestCase):
    timeout = 30

    async def test_backoff_grows_across_refused_upgrades_and_resets_only_after_an_ack(self):
        emulator = await start_emulator(reactor, data.SEED)
        self.addCleanup(stop_emulator, emulator)
        emulator.state.faults.update({"error_status": 404})
        clock = Clock()
        sink = RecordingSink()
        service = RealtimeService(
            reactor, emulator.url.replace("http://", "ws://"), {"X-API-KEY": "test-key"}, sink,
            max_delay=30.0, jitter=lambda: 0.0, clock=clock,
        )
        service.startService()
        self.addCleanup(service.stopService)

        async def next_retry() -> float:
            await until(lambda: clock.getDelayedCalls(), what="a retry scheduled", interval=0.02)
            (retry,) = clock.getDelayedCalls()
            return retry.getTime() - clock.seconds()

        delays = [await next_retry()]
        for _ in range(4):
            clock.advance(delays[-1])
            delays.append(await next_retry())
        self.assertEqual(delays, [2.0, 4.0, 8.0, 16.0, 30.0])
        self.assertEqual(emulator.state.request_counts()["/graphql (websocket)"], 5)  # each one refused
        self.assertFalse(service.is_connected)

        emulator.state.faults.update({"error_status": 0})
        clock.advance(delays[-1])
        await until(lambda: service.is_connected, what="connected and acknowledged", interval=0.02)
        self.assertEqual(sink.events, ["up"])

        emulator.site.sockets.drop_all()
        await until(lambda: not service.is_connected, what="the drop noticed", interval=0.02)
        self.assertEqual(await next_retry(), 2.0)  # back to the first step after an ack
