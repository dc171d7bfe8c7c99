"""The spool keeps each record's traceparent in a column added to format 1: a file written
before the column existed opens (the column is added, its rows load with None), and a record
appended with a traceparent loads with it after a reopen. Real SQLite files in a temp directory."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from stigg_sidecar.delivery.spool import FORMAT_VERSION, SpoolFile
from tests.fixtures.reactor import reactor

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "spool" / "v1.sqlite3"
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class SpoolTraceColumnTests(TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)

    async def open(self, path: str) -> tuple[SpoolFile, list]:
        spool = SpoolFile(reactor, path)
        stored = await spool.open()
        self.addCleanup(spool.close)
        return spool, stored

    async def test_a_file_from_before_the_column_loads_and_gains_it(self):
        path = f"{self.dir}/spool.sqlite3"
        shutil.copyfile(FIXTURE, path)
        db = sqlite3.connect(path)
        before = [row[1] for row in db.execute("PRAGMA table_info(spool)")]
        rows_before = db.execute("SELECT seq, kind, body, created_ms FROM spool ORDER BY seq").fetchall()
        db.close()
        self.assertNotIn("trace", before)

        spool, stored = await self.open(path)
        self.assertEqual([(r.seq, r.kind, r.body, r.created_ms) for r in stored], rows_before)
        self.assertEqual({r.trace for r in stored}, {None})
        await spool.close()

        db = sqlite3.connect(path)
        try:
            self.assertEqual([row[1] for row in db.execute("PRAGMA table_info(spool)")], [*before, "trace"])
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], FORMAT_VERSION)
            # An older sidecar's statements (they name their columns) still work on the file.
            db.execute("INSERT INTO spool (kind, body, created_ms) VALUES ('event', '{}', 1)")
        finally:
            db.close()

    async def test_a_records_traceparent_survives_a_reopen(self):
        path = f"{self.dir}/spool.sqlite3"
        spool, stored = await self.open(path)
        self.assertEqual(stored, [])
        seqs = await spool.append([("usage", '{"a": 1}', 5, TRACE), ("event", '{"b": 2}', 6)])
        await spool.close()
        _, stored = await self.open(path)
        self.assertEqual([(r.seq, r.trace) for r in stored], [(seqs[0], TRACE), (seqs[1], None)])
