"""Records delivered but not deleted (the disk was full, or the process died in between) never
count twice in the cached usage after a restart (issue 20, finding 7).

Real parts: the emulator as Stigg, sidecars in this process with SPOOL_WRITES and a snapshot in
STATE_DIR. The first sidecar acknowledges three writes, then delivers them as it stops; its spool
file as it was before the delivery (a copy) is what a full disk would have left. The second
sidecar starts on that spool and the first one's snapshot, with Stigg answering slowly, so the
cached usage can be read before the re-delivery's result arrives.
"""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness
from tests.fixtures.polling import until

METERED = pb.GetMeteredEntitlementRequest(customer_id="acme", feature_id="api-calls")


class RestartCountsOnceTests(TestCase):
    timeout = 60

    def directory(self) -> str:
        path = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, path, True)
        return path

    async def test_records_delivered_before_a_restart_are_not_added_to_stiggs_usage_again(self):
        first_dir = self.directory()
        a = await OnlineHarness(self, reactor).start(
            data.SEED, STATE_DIR=first_dir, SPOOL_WRITES="1", SPOOL_FLUSH_MS="60000", SPOOL_BATCH_SIZE="1000")
        await until(lambda: a.parts.writer.loaded, what="the spool loaded")
        before = (await a.call("GetMeteredEntitlement", METERED)).entitlement.current_usage
        for _ in range(3):
            await a.call("ReportUsage", pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=1))
        delivery = a.parts.writer
        await delivery.spool._submit(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        undeleted = self.directory()
        shutil.copyfile(f"{first_dir}/spool.sqlite3", f"{undeleted}/spool.sqlite3")
        await a.sidecar.stopService()  # delivers the three, then writes the last snapshot
        self.assertEqual(len(a.emulator.state.usage_log()), 3)
        stigg = before + 3

        second_dir = self.directory()
        shutil.copyfile(f"{undeleted}/spool.sqlite3", f"{second_dir}/spool.sqlite3")
        shutil.copyfile(f"{first_dir}/snapshot.gz", f"{second_dir}/snapshot.gz")
        await a.faults(latency_ms=1500)  # the re-delivery's answer comes late
        b = await OnlineHarness(self, reactor).start(
            data.SEED, emulator=a.emulator, STATE_DIR=second_dir, SPOOL_WRITES="1", SPOOL_FLUSH_MS="20")
        again = b.parts.writer
        await until(lambda: again.loaded and again.records == 3, what="the spool loaded")
        shown = (await b.call("GetMeteredEntitlement", METERED)).entitlement.current_usage
        self.assertEqual(shown, stigg)  # not stigg + 3
        await until(lambda: again.records == 0, timeout=20, what="re-delivered")
        self.assertEqual((await b.call("GetMeteredEntitlement", METERED)).entitlement.current_usage, stigg)
        self.assertEqual(len(a.emulator.state.usage_log()), 3)  # Stigg counted each once
