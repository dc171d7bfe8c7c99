"""The cache snapshot: its file format (round trip, truncation, corruption, versions) and warm
restarts of a real `twistd -n stigg-sidecar` with Stigg down: after SIGTERM, after kill -9 past
one snapshot interval, and from a corrupt file (one log line, an empty start, still serving)."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import tempfile
import urllib.request

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.contracts import UsageReport
from stigg_sidecar.emulator.data import parse_data
from stigg_sidecar.emulator.state import EmulatorState
from stigg_sidecar.emulator.state import UsageReport as EmulatorUsage
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from stigg_sidecar.online.pending import PendingUsage
from stigg_sidecar.online.store import EntitlementStore
from stigg_sidecar.state.snapshot import (
    FILE_NAME,
    SnapshotError,
    SnapshotMissing,
    read_snapshot,
    write_snapshot,
)
from stigg_sidecar.upstream.wire import entry_from_state
from tests.fixtures import data
from tests.fixtures.clients import grpc_deferred
from tests.fixtures.polling import until
from tests.fixtures.processes import SidecarProcess, StubbedSidecar, base_env, sidecar_with_stub, until_ready

KEY = "snapshot-test-key"
CUSTOMERS = [f"cust-{i}" for i in range(50)]


def seed() -> dict:
    return {"apiKeys": [KEY], "customers": {c: data.ACME for c in CUSTOMERS}}


def entries() -> list:
    """What the sidecar caches for these customers, built from the emulator's own answers."""
    state = EmulatorState(parse_data(seed()), clock=Clock())
    return [entry_from_state(c, None, state.entitlements_state(c), 1_000) for c in CUSTOMERS[:5]]


class SnapshotFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(), FILE_NAME)

    def test_round_trip(self):
        written = entries()
        write_snapshot(self.path, written, written_ms=123)
        snapshot = read_snapshot(self.path)
        self.assertEqual(snapshot.written_ms, 123)
        self.assertEqual(snapshot.entries, written)
        self.assertFalse(os.path.exists(self.path + ".partial"))

    def test_missing(self):
        with self.assertRaises(SnapshotMissing):
            read_snapshot(self.path)

    def test_truncated_anywhere(self):
        write_snapshot(self.path, entries(), written_ms=1)
        whole = open(self.path, "rb").read()
        for cut in (10, len(whole) // 2, len(whole) - 4):
            with open(self.path, "wb") as f:
                f.write(whole[:cut])
            with self.assertRaises(SnapshotError, msg=cut):
                read_snapshot(self.path)

    def test_lines_missing_inside_a_valid_gzip(self):
        write_snapshot(self.path, entries(), written_ms=1)
        lines = gzip.open(self.path).read().split(b"\n")
        with gzip.open(self.path, "wb") as f:
            f.write(b"\n".join(lines[:3] + lines[-2:]))
        with self.assertRaisesRegex(SnapshotError, "truncated"):
            read_snapshot(self.path)

    def test_corrupt_bytes(self):
        write_snapshot(self.path, entries(), written_ms=1)
        raw = bytearray(open(self.path, "rb").read())
        raw[len(raw) // 2] ^= 0xFF
        with open(self.path, "wb") as f:
            f.write(raw)
        with self.assertRaises(SnapshotError):
            read_snapshot(self.path)

    def test_unknown_version_and_not_a_snapshot(self):
        with gzip.open(self.path, "wb") as f:
            f.write(json.dumps({"format": "stigg-sidecar-snapshot", "version": 99, "entries": 0}).encode() + b"\n")
        with self.assertRaisesRegex(SnapshotError, "version 99"):
            read_snapshot(self.path)
        with open(self.path, "wb") as f:
            f.write(b"hello")
        with self.assertRaises(SnapshotError):
            read_snapshot(self.path)

    def test_undelivered_spooled_usage_is_written_as_stiggs_value(self):
        cache = EntitlementCache(10_000_000)
        store = EntitlementStore(cache, pending=PendingUsage())
        entry = entries()[0]
        store.put(entry)
        before = entry.features["api-calls"].usage.current_usage
        store.pending_added(1, UsageReport(entry.customer_id, "api-calls", 7, update_behavior="DELTA"))
        cached = cache.get_entry(entry.key)
        assert cached is not None
        self.assertEqual(cached.features["api-calls"].usage.current_usage, before + 7)
        (captured,) = store.snapshot_entries()  # what SnapshotService.write writes
        self.assertEqual(captured.features["api-calls"].usage.current_usage, before)


class WarmRestartTests(TestCase):
    timeout = 90

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.emulator = await start_emulator(reactor, seed())
        self.addCleanup(stop_emulator, self.emulator)
        self.state_dir = tempfile.mkdtemp()

    def sidecar(self, **settings: str) -> StubbedSidecar:
        env = base_env(SERVER_API_KEY=KEY, API_URL=self.emulator.url, EDGE_API_URL=self.emulator.url, WS_ENABLED="0",
                       STATE_DIR=self.state_dir, ENTITLEMENTS_TIMEOUT_MS="500", **settings)
        return sidecar_with_stub(self, env)

    async def ready(self, process: SidecarProcess) -> None:
        await until_ready(process)

    async def check_all(self, process) -> list:
        """Every customer's metered check, a few at a time (cold reads past the handler pool's
        waiting slots would answer fallbacks, which is not what this test is about)."""
        answers = []
        for start in range(0, len(CUSTOMERS), 5):
            calls = [
                grpc_deferred(reactor, process.stub.GetMeteredEntitlement.future(
                    pb.GetMeteredEntitlementRequest(customer_id=c, feature_id="api-calls"), timeout=5))
                for c in CUSTOMERS[start:start + 5]
            ]
            answers += [(a.is_fallback, a.entitlement.current_usage) for a in await gatherResults(calls)]
        return answers

    def metric(self, process, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{process.http_port}/metrics", timeout=2) as r:
            text = r.read().decode()
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        assert found is not None, f"{name} is not in /metrics"
        return float(found.group(1))

    async def terminate(self, process) -> int:
        process.process.send_signal(signal.SIGTERM)
        await until(lambda: process.process.poll() is not None, 30, "exit after SIGTERM")
        return process.stop()

    async def test_warm_restart_after_sigterm_serves_the_cache_with_stigg_down(self):
        first = self.sidecar()
        await self.ready(first)
        self.assertEqual(await self.check_all(first), [(False, 90)] * len(CUSTOMERS))
        self.assertEqual(await self.terminate(first), 0)

        self.emulator.state.faults.update({"down": True})
        second = self.sidecar()
        await self.ready(second)
        self.assertEqual(await self.check_all(second), [(False, 90)] * len(CUSTOMERS))
        second.wait_for(re.compile(r"Loaded 50 cached customers from the snapshot"), 5)
        self.assertGreaterEqual(self.metric(second, "sidecar_snapshot_loaded_age_seconds"), 0)

    async def test_loaded_entries_are_revalidated_in_the_background_once_stigg_answers(self):
        first = self.sidecar()
        await self.ready(first)
        await self.check_all(first)
        self.assertEqual(await self.terminate(first), 0)
        # While no sidecar runs, Stigg's usage of one customer moves: the snapshot is now stale.
        self.emulator.state.report_usage([EmulatorUsage("cust-7", "api-calls", 5)])

        second = self.sidecar()
        await self.ready(second)

        async def revalidated() -> bool:
            answer = await grpc_deferred(reactor, second.stub.GetMeteredEntitlement.future(
                pb.GetMeteredEntitlementRequest(customer_id="cust-7", feature_id="api-calls"), timeout=5))
            return (answer.is_fallback, answer.entitlement.current_usage) == (False, 95)

        await until(revalidated, 20, "the stale entry revalidated", interval=0.1)

    async def test_warm_restart_after_kill_9_past_one_interval(self):
        first = self.sidecar(SNAPSHOT_INTERVAL_SECS="0.3")
        await self.ready(first)
        await self.check_all(first)
        path = os.path.join(self.state_dir, FILE_NAME)

        def has_all() -> bool:
            try:
                return len(read_snapshot(path).entries) == len(CUSTOMERS)
            except SnapshotError:
                return False

        await until(has_all, 10, "a snapshot with every customer")
        first.kill()  # SIGKILL: no shutdown snapshot

        self.emulator.state.faults.update({"down": True})
        second = self.sidecar()
        await self.ready(second)
        self.assertEqual(await self.check_all(second), [(False, 90)] * len(CUSTOMERS))

    async def test_a_corrupt_snapshot_is_one_line_and_an_empty_start(self):
        with open(os.path.join(self.state_dir, FILE_NAME), "wb") as f:
            f.write(gzip.compress(b'{"format": "stigg-sidecar-snapshot", "version": 1, "entries": 3}\n[1, 2'))
        self.emulator.state.faults.update({"down": True})
        sidecar = self.sidecar()
        await self.ready(sidecar)
        answers = await self.check_all(sidecar)
        self.assertEqual({fallback for fallback, _ in answers}, {True})  # empty, Stigg down: fallbacks
        self.assertEqual(await self.terminate(sidecar), 0)
        lines = [line for line in sidecar.output if "snapshot" in line.lower()]
        self.assertEqual(len([line for line in lines if "not used" in line]), 1, lines)
