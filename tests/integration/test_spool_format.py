"""A spool file written by an earlier sidecar (format 1, `tests/fixtures/spool/v1.sqlite3`, made
by `write_v1.py` before the write path was rebuilt) is read and delivered by this one, each record
exactly once: the on-disk records keep their format byte for byte.

Real parts: the emulator as Stigg, the sidecar in this process with SPOOL_WRITES on a STATE_DIR
holding a copy of the fixture.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.fixtures import data
from tests.fixtures.online import OnlineHarness

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "spool" / "v1.sqlite3"
SEED = {
    "apiKeys": ["test-key"],
    "customers": {
        "acme": data.customer(
            data.metered("api-calls", 100, 90),
            data.metered("exports", 10, 50, hasSoftLimit=True),
            resources={"site-1": data.customer(data.metered("api-calls", 100, 10))},
        ),
    },
}
USAGE_KEYS = ["fixture-usage-1", "fixture-usage-2", "fixture-usage-3", "fixture-usage-4"]
EVENT_KEYS = ["fixture-event-1", "fixture-event-2"]


def _rows(path: str, table: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT seq, kind, body FROM {table} ORDER BY seq").fetchall()
    finally:
        db.close()


class SpoolFormatOneTests(TestCase):
    timeout = 60

    async def start(self, state_dir: str, emulator=None) -> OnlineHarness:
        h = OnlineHarness(self, reactor)
        return await h.start(SEED, emulator=emulator, STATE_DIR=state_dir, SPOOL_WRITES="1", SPOOL_FLUSH_MS="20")

    async def test_a_format_one_spool_is_delivered_exactly_once(self):
        state_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, state_dir, True)
        spool = f"{state_dir}/spool.sqlite3"
        shutil.copyfile(FIXTURE, spool)
        stored = _rows(spool, "spool")
        self.assertEqual([kind for _, kind, _ in stored], ["usage", "usage", "event", "event", "usage", "usage"])

        h = await self.start(state_dir)
        state = h.emulator.state

        async def delivered() -> bool:
            return len(state.usage_log()) >= 4 and len(state.event_log()) >= 2

        await h.wait_until(delivered, timeout=20)
        await h.sidecar.stopService()

        usage = state.usage_log()
        self.assertEqual(sorted(u["idempotencyKey"] for u in usage), USAGE_KEYS)
        by_key = {u["idempotencyKey"]: u for u in usage}
        self.assertEqual(by_key["fixture-usage-1"]["value"], 3)
        self.assertEqual(by_key["fixture-usage-2"]["dimensions"], {"region": "eu", "n": 2, "on": True})
        self.assertEqual(by_key["fixture-usage-2"]["updateBehavior"], "DELTA")
        self.assertEqual(by_key["fixture-usage-2"]["timestamp"], "2025-11-24T13:13:20.000Z")
        self.assertEqual(by_key["fixture-usage-3"]["updateBehavior"], "SET")
        self.assertEqual(by_key["fixture-usage-4"]["resourceId"], "site-1")
        events = state.event_log()
        self.assertEqual(sorted(e["idempotencyKey"] for e in events), EVENT_KEYS)
        second = next(e for e in events if e["idempotencyKey"] == "fixture-event-2")
        self.assertEqual((second["resourceId"], second["dimensions"]), ("site-1", {"path": "/ünï", "ms": 12.5}))
        self.assertEqual(second["timestamp"], "2025-11-24T13:13:20.000Z")
        # What Stigg counted: 90 + 3 + 2.5; exports set to 7; the resource's 10 + 1.
        acme = state.entitlements_v1("acme")
        usages = {e["feature"]["refId"]: e["currentUsage"] for e in acme if e.get("feature")}
        self.assertEqual((usages["api-calls"], usages["exports"]), (95.5, 7))
        site = state.entitlements_v1("acme", "site-1")
        self.assertEqual([e["currentUsage"] for e in site if e.get("feature")], [11])
        # Nothing left to send again, nothing refused.
        self.assertEqual(_rows(spool, "spool"), [])
        self.assertEqual(_rows(spool, "dead_letters"), [])

        # A second sidecar on what the first left (a copy: the first keeps its directory's lock
        # for as long as this process runs) sends nothing more.
        restart_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, restart_dir, True)
        shutil.copyfile(spool, f"{restart_dir}/spool.sqlite3")
        counts = state.request_counts()
        again = await self.start(restart_dir, emulator=h.emulator)

        async def ready() -> bool:
            return (await again.readiness())[0] == 200

        await again.wait_until(ready, timeout=20)  # the spool is loaded before readiness
        await again.sidecar.stopService()
        self.assertEqual([len(state.usage_log()), len(state.event_log())], [4, 2])
        for op in ("ReportUsage", "ReportUsageBulk", "ReportEvent"):
            self.assertEqual(state.request_counts().get(op, 0), counts.get(op, 0), op)
