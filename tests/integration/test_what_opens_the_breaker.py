"""What opens the circuit breaker: StiggApi against the emulator over loopback, where only the
failures that say Stigg is down count (server errors), not answers (a rejected key) nor timeouts
the caller cut short."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from stigg_sidecar.upstream.api import RetryPolicy, StiggApi, UpstreamError
from stigg_sidecar.upstream.breaker import BreakerPolicy
from tests.fixtures import data
from tests.fixtures.reactor import reactor

POLICY = BreakerPolicy(threshold=3, initial=1.0, factor=2.0, max_delay=5.0)


class WhatOpensTheBreakerTests(TestCase):
    """StiggApi against the emulator over loopback: only failures that say Stigg is down count."""

    timeout = 30

    async def api(self, **faults):
        emulator = await start_emulator(reactor, data.SEED)
        self.addCleanup(stop_emulator, emulator)
        emulator.state.faults.update(faults)
        api = StiggApi(reactor, "test-key", emulator.url, emulator.url, edge_enabled=True,
                       retry=RetryPolicy(max_attempts=1), breaker=POLICY)
        self.addCleanup(api.close)
        return api, emulator

    async def fetch_times(self, api, n: int) -> list[str]:
        errors = []
        for _ in range(n):
            try:
                await api.fetch_state("acme", None, 2.0)
            except UpstreamError as e:
                errors.append(e.message)
        return errors

    async def test_server_errors_open_it(self):
        api, emulator = await self.api(error_status=503)
        errors = await self.fetch_times(api, 5)
        self.assertTrue(api.breakers["edge"].is_open)
        self.assertFalse(api.breakers["graphql"].is_open)
        self.assertEqual(emulator.state.request_counts().get("/v1/c/{customerId}/entitlements-state.json"), 3)
        self.assertTrue(errors[-1].startswith("not sent: Stigg's Edge API failed 3 times in a row"))

    async def test_a_rejected_key_is_an_answer_and_does_not_open_it(self):
        api, _ = await self.api(error_status=401)
        errors = await self.fetch_times(api, 5)
        self.assertEqual(errors, ["Stigg rejected the API key"] * 5)
        self.assertFalse(api.breakers["edge"].is_open)

    async def test_a_timeout_the_caller_cut_short_does_not_count(self):
        api, _ = await self.api(latency_ms=1000)
        for _ in range(4):
            with self.assertRaises(UpstreamError):
                await api.fetch_state("acme", None, 0.05)
        self.assertFalse(api.breakers["edge"].is_open)
        self.assertEqual(api.breakers["edge"].failures, 0)
