"""The write spool in one process: flush and backoff driven by a Clock, the local effect of a
spooled write, poison records, a full spool and a locked STATE_DIR.

Real parts throughout: the emulator as Stigg, the SQLite spool on disk, StiggApi over loopback.
The delivery's own timers run on a `Clock`, so "not before the interval" is exact, never a sleep.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from typing import Any, cast

import grpc
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.cache.memory import EntitlementCache
from stigg_sidecar.contracts import UsageReport, WriteError, WriteFailure
from stigg_sidecar.crossing.gate import WriteGate
from stigg_sidecar.delivery.spool import SpoolFile
from stigg_sidecar.delivery.spooled import SpooledDelivery
from stigg_sidecar.delivery.upstream import UpstreamWrites
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from stigg_sidecar.online.pending import PendingUsage
from stigg_sidecar.online.store import EntitlementStore
from stigg_sidecar.upstream.api import RetryPolicy, StiggApi
from stigg_sidecar.upstream.breaker import BreakerPolicy
from tests.fixtures import data
from tests.fixtures.logs import log_events
from tests.fixtures.online import OnlineHarness
from tests.fixtures.polling import until
from tests.fixtures.processes import base_env, run_twistd
from tests.fixtures.reactor import reactor


def usage(value: float = 1, feature: str = "api-calls", customer: str = "acme") -> UsageReport:
    return UsageReport(customer, feature, value, update_behavior="DELTA")


class DeliveryTimingTests(TestCase):
    """Flush and backoff with the delivery's timers on a Clock."""

    timeout = 30

    async def start(self, batch_size: int = 3, flush: float = 1.0, backoff: RetryPolicy | None = None,
                    rng=lambda: 1.0) -> None:
        self.emulator = await start_emulator(reactor, data.SEED)
        self.addCleanup(stop_emulator, self.emulator)
        url = self.emulator.url
        # The spool's own backoff is under test, on the Clock: the API's breaker (real time) stays out of it.
        api = StiggApi(reactor, "test-key", url, url, edge_enabled=True, retry=RetryPolicy(max_attempts=1),
                       breaker=BreakerPolicy(threshold=1000))
        self.addCleanup(api.close)
        cache = EntitlementCache(10_000_000)
        # Budgets far above what a loaded machine needs over loopback: a send that timed out
        # would be retried on the Clock, which only the test advances, and never be delivered.
        store = EntitlementStore(cache, pending=PendingUsage())
        self.clock = Clock()
        self.delivery = SpooledDelivery(
            self.clock, cast(WriteGate, None), UpstreamWrites(api, store), SpoolFile(reactor, f"{tempfile.mkdtemp()}/spool.sqlite3"),
            store, max_bytes=1 << 20, batch_size=batch_size, flush_interval=flush,
            send_timeout=10.0, grace=0.0, backoff=backoff or RetryPolicy(initial=1.0, max_delay=4.0), rng=rng,
        )
        self.delivery.startService()
        self.addCleanup(self.delivery.stopService)
        await until(lambda: self.delivery._loaded, what="spool loaded")

    def sent(self) -> int:
        counts = self.emulator.state.request_counts()
        return counts.get("ReportUsage", 0) + counts.get("ReportUsageBulk", 0)

    async def test_a_partial_batch_waits_for_the_flush_interval_a_full_one_goes_at_once(self):
        await self.start(batch_size=3, flush=1.0)
        acks = await self.delivery._accept_usage([usage(), usage()], 1.0)
        self.assertEqual(len(acks), 2)
        await deferLater(reactor, 0.1, lambda: None)  # the network has time; the flush timer has not fired
        self.assertEqual(self.sent(), 0)
        self.clock.advance(0.99)
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(self.sent(), 0)
        self.clock.advance(0.01)
        await until(lambda: self.delivery.delivered == 2, what="the partial batch delivered")
        self.assertEqual(self.emulator.state.request_counts().get("ReportUsageBulk"), 1)

        await self.delivery._accept_usage([usage(), usage(), usage()], 1.0)  # a full batch: no waiting
        await until(lambda: self.delivery.delivered == 5, what="the full batch delivered")
        self.assertEqual(self.emulator.state.request_counts().get("ReportUsageBulk"), 2)
        self.assertEqual(self.delivery.records, 0)
        self.assertEqual(self.delivery.bytes, 0)

    async def test_retries_back_off_capped_then_deliver_once_stigg_is_back(self):
        await self.start(batch_size=1, backoff=RetryPolicy(initial=1.0, factor=2.0, max_delay=4.0), rng=lambda: 1.0)
        self.emulator.state.faults.update({"down": True})
        await self.delivery._accept_usage([usage()], 1.0)  # a full batch of one: sent at once
        await until(lambda: self.sent() == 1 and self.delivery._waiting["usage"] is not None, what="first failure")
        for expected_delay, attempts in ((1.0, 2), (2.0, 3), (4.0, 4), (4.0, 5)):  # doubling, capped at 4
            self.clock.advance(expected_delay - 0.01)
            await deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(self.sent(), attempts - 1, f"retried before {expected_delay}s")
            self.clock.advance(0.01)

            def retried(n: int = attempts) -> bool:
                return self.sent() == n and self.delivery._waiting["usage"] is not None

            await until(retried, what=f"attempt {attempts}")
        self.emulator.state.faults.update({"down": False})
        self.clock.advance(4.0)
        await until(lambda: self.delivery.delivered == 1, what="delivered after the outage")
        self.assertEqual(len(self.emulator.state.usage_log()), 1)
        self.assertEqual(self.delivery._failures["usage"], 0)

    async def test_a_stop_with_no_time_left_keeps_the_record_and_says_so_in_the_singular(self):
        await self.start(batch_size=10, flush=60.0)
        events = log_events(self)
        await self.delivery._accept_usage([usage()], 1.0)
        await self.delivery.stopService()  # grace 0: nothing is sent
        self.assertEqual(self.sent(), 0)
        lines = [formatEvent(e) for e in events if "on disk for the next start" in formatEvent(e)]
        self.assertEqual(lines, ["1 spooled record stays on disk for the next start"])

    def test_the_backoff_is_jittered_between_half_and_all_of_the_step(self):
        policy = RetryPolicy(initial=0.5, factor=2.0, max_delay=30.0)
        self.assertEqual(policy.delay(1, lambda: 0.0), 0.25)
        self.assertEqual(policy.delay(1, lambda: 1.0), 0.5)
        self.assertEqual(policy.delay(20, lambda: 0.0), 15.0)
        self.assertEqual(policy.delay(20, lambda: 1.0), 30.0)

    async def test_a_full_spool_refuses_with_resource_exhausted_and_keeps_what_it_has(self):
        await self.start(batch_size=1000, flush=60.0)
        # SPOOL_MAX_BYTES counts what the files take on disk: room for a few commits past the empty spool's.
        limit = self.delivery.spool.disk_bytes + 200_000
        self.delivery._max_bytes = limit
        accepted = 0
        with self.assertRaises(WriteError) as refused:
            for _ in range(100):
                await self.delivery._accept_usage([usage()], 1.0)
                accepted += 1
        self.assertEqual(refused.exception.failure, WriteFailure.RESOURCE_EXHAUSTED)
        self.assertIn("write spool full", refused.exception.message)
        self.assertIn(str(limit), refused.exception.message)
        self.assertGreater(accepted, 5)
        self.assertEqual(self.delivery.records, accepted)
        self.clock.advance(60.0)
        await until(lambda: self.delivery.delivered == accepted, what="the spool delivered")
        await self.delivery._accept_usage([usage()], 1.0)  # room again


class SpooledSidecarTests(TestCase):
    """A whole sidecar in this process with SPOOL_WRITES=1 against the emulator."""

    timeout = 60

    async def start(self, **settings: Any) -> OnlineHarness:
        self.state_dir = tempfile.mkdtemp()
        harness = await OnlineHarness(self, reactor).start(
            data.SEED, STATE_DIR=self.state_dir, SPOOL_WRITES="1", SPOOL_FLUSH_MS="20", **settings
        )
        self.delivery = harness.parts.writer
        await until(lambda: harness.sidecar.readiness.ready, what="ready")
        return harness

    def metered(self, h: OnlineHarness):
        return h.call("GetMeteredEntitlement", pb.GetMeteredEntitlementRequest(customer_id="acme", feature_id="api-calls"))

    async def test_a_metered_check_during_an_outage_shows_the_spooled_usage(self):
        h = await self.start()
        self.assertEqual((await self.metered(h)).entitlement.current_usage, 90)
        await h.faults(down=True)
        ack = await h.call("ReportUsage", pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=5))
        self.assertEqual(ack.current_usage, 95)
        self.assertTrue(ack.measurement_id)
        answer = await self.metered(h)
        self.assertEqual((answer.entitlement.current_usage, answer.is_fallback), (95, False))
        bulk = pb.ReportUsageBulkRequest(usages=[
            pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=10,
                                  update_behavior=pb.USAGE_UPDATE_BEHAVIOR_SET),
            pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=2),
        ])
        acks = await h.call("ReportUsageBulk", bulk)
        self.assertEqual([a.current_usage for a in acks.usages], [10, 12])
        self.assertEqual((await self.metered(h)).entitlement.current_usage, 12)
        self.assertEqual(h.emulator.state.usage_log(), [])

        await h.faults(down=False)
        await until(lambda: self.delivery.records == 0, what="delivered after the outage")
        self.assertEqual([u["currentUsage"] for u in h.emulator.state.usage_log()], [95, 10, 12])
        self.assertEqual((await self.metered(h)).entitlement.current_usage, 12)  # not 12 + what was delivered
        metrics = await (await h.http.get(f"http://127.0.0.1:{h.http_port}/metrics")).text()
        self.assertIn("sidecar_spool_delivered_total 3.0", metrics)
        self.assertIn("sidecar_spool_records 0.0", metrics)

    async def test_a_poison_record_is_dead_lettered_and_the_rest_delivered(self):
        h = await self.start()
        await h.faults(down=True)
        usages = [pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=1) for _ in range(6)]
        usages[3] = pb.ReportUsageRequest(customer_id="acme", feature_id="no-such-feature", value=1)
        await h.call("ReportUsageBulk", pb.ReportUsageBulkRequest(usages=usages))
        await h.call("ReportEvents", pb.ReportEventsRequest(events=[
            pb.Event(event_name="login", customer_id="acme", idempotency_key="e1")]))
        await h.faults(down=False)
        await until(lambda: self.delivery.records == 0, what="spool drained")
        log = h.emulator.state.usage_log()
        self.assertEqual(len(log), 5)
        self.assertEqual(log[-1]["currentUsage"], 95)
        self.assertEqual([e["idempotencyKey"] for e in h.emulator.state.event_log()], ["e1"])
        dead = await self.delivery.spool.dead_letters()
        self.assertEqual(len(dead), 1)
        self.assertEqual(json.loads(dead[0][2])["featureId"], "no-such-feature")
        self.assertIn("no-such-feature", dead[0][3])
        self.assertEqual(self.delivery.dead_lettered, 1)
        # Refused once as a batch, then halved until alone: never retried after its own refusal.
        counts = h.emulator.state.request_counts()
        self.assertLessEqual(counts.get("ReportUsageBulk", 0) + counts.get("ReportUsage", 0), 8)
        metrics = await (await h.http.get(f"http://127.0.0.1:{h.http_port}/metrics")).text()
        self.assertIn("sidecar_spool_dead_letters_total 1.0", metrics)

    async def test_a_second_sidecar_on_the_same_state_dir_exits_with_one_line(self):
        h = await self.start()
        env = base_env(SERVER_API_KEY="k", API_URL=h.emulator.url, EDGE_API_URL=h.emulator.url, WS_ENABLED="0",
                       STATE_DIR=self.state_dir, SPOOL_WRITES="1")
        done = await deferLater(reactor, 0, run_twistd, "stigg-sidecar", env)
        self.assertNotEqual(done.returncode, 0)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"STATE_DIR {self.state_dir} is in use by another sidecar", lines[0])
        # The first one is unaffected.
        ack = await h.call("ReportUsage", pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=1))
        self.assertTrue(ack.measurement_id)

    async def test_spool_writes_without_state_dir_is_a_start_up_error(self):
        done = await deferLater(reactor, 0, run_twistd, "stigg-sidecar",
                                base_env(SERVER_API_KEY="k", SPOOL_WRITES="1"))
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("SPOOL_WRITES needs STATE_DIR", done.stdout + done.stderr)

    async def test_writes_are_refused_with_unavailable_never_lost_when_the_spool_cannot_be_written(self):
        h = await self.start()
        await self.delivery.spool.close()  # the disk is gone, as far as the spool can tell
        with self.assertRaises(grpc.RpcError) as caught:
            await h.call("ReportUsage", pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=1))
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(self.delivery.records, 0)


class TornTailTests(TestCase):
    """A crash in the middle of a commit leaves a torn write-ahead log: what was committed (and
    so acknowledged) is read back, the torn transaction is dropped, and the spool opens."""

    timeout = 30

    def crashed_copy(self, rows: int, tear) -> str:
        """A spool with `rows` committed rows as a crash leaves it (the log not yet folded into
        the database), with `tear(wal_bytes) -> wal_bytes` applied to its log."""
        live, crashed = tempfile.mkdtemp(), tempfile.mkdtemp()
        db = sqlite3.connect(f"{live}/spool.sqlite3")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,"
                   " body TEXT NOT NULL, created_ms INTEGER NOT NULL)")
        db.commit()
        for n in range(rows):
            db.execute("INSERT INTO spool (kind, body, created_ms) VALUES ('event', ?, 0)", (f'{{"n": {n}}}',))
            db.commit()
        shutil.copy(f"{live}/spool.sqlite3", f"{crashed}/spool.sqlite3")
        with open(f"{live}/spool.sqlite3-wal", "rb") as f:
            wal = f.read()
        db.close()
        with open(f"{crashed}/spool.sqlite3-wal", "wb") as f:
            f.write(tear(wal))
        return f"{crashed}/spool.sqlite3"

    async def read_back(self, path: str) -> list[str]:
        spool = SpoolFile(reactor, path)
        try:
            return [row.body for row in await spool.open()]
        finally:
            await spool.close()

    async def test_garbage_after_the_last_commit_is_ignored(self):
        path = self.crashed_copy(10, lambda wal: wal + b"\x07" * 3000)
        self.assertEqual(await self.read_back(path), [f'{{"n": {n}}}' for n in range(10)])

    async def test_a_last_transaction_cut_short_is_dropped_the_rest_kept(self):
        path = self.crashed_copy(10, lambda wal: wal[:-100])
        bodies = await self.read_back(path)
        self.assertEqual(bodies, [f'{{"n": {n}}}' for n in range(9)])
