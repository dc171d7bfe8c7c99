"""The write spool against the disk it really uses (issue 20, finding 7).

A whole sidecar in this process with SPOOL_WRITES=1, Stigg (the emulator) down so nothing leaves
the spool: SPOOL_MAX_BYTES bounds the files on disk (database and write-ahead log), not just the
bodies; and on a disk that is really full (a 2 MB tmpfs, mounted when this process may), refused
writes are logged once per interval with a count, not once each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Any

import grpc
from twisted.internet import reactor
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import provider

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness
from tests.fixtures.polling import until


def disk_use(directory: str) -> int:
    """Bytes the spool's files take on disk (allocated blocks)."""
    return sum(os.stat(os.path.join(directory, name)).st_blocks * 512
               for name in os.listdir(directory) if name.startswith("spool"))


class SpoolDiskTests(TestCase):
    timeout = 120

    async def start(self, state_dir: str, **settings: Any) -> OnlineHarness:
        h = await OnlineHarness(self, reactor).start(
            data.SEED, STATE_DIR=state_dir, SPOOL_WRITES="1", SPOOL_FLUSH_MS="20", **settings)
        self.delivery = h.parts.writer
        await until(lambda: self.delivery._loaded, what="spool loaded")
        await h.faults(down=True)
        return h

    async def fill(self, h: OnlineHarness, most: int) -> tuple[int, list[str]]:
        """Write usage in bulks of 50 until `most` calls or 300 refusals; (acknowledged records, refusals)."""
        bulk = pb.ReportUsageBulkRequest(usages=[
            pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=1) for _ in range(50)])
        acknowledged, refused = 0, []
        for _ in range(most):
            try:
                acknowledged += len((await h.call("ReportUsageBulk", bulk, timeout=5)).usages)
            except grpc.RpcError as e:
                refused.append(f"{e.code().name}: {e.details()}")
                if len(refused) >= 300:
                    break
        return acknowledged, refused

    async def test_spool_max_bytes_bounds_what_the_files_take_on_disk(self):
        state_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, state_dir, True)
        limit = 2 * 1024 * 1024
        h = await self.start(state_dir, SPOOL_MAX_BYTES=str(limit))
        acknowledged, refused = await self.fill(h, 2_000)
        self.assertTrue(refused and refused[0].startswith("RESOURCE_EXHAUSTED: write spool full"), refused[:1])
        self.assertGreater(acknowledged, 100)
        self.assertLessEqual(disk_use(state_dir), limit * 1.25, acknowledged)

    async def test_a_full_disk_is_logged_once_per_interval_with_a_count(self):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise SkipTest("mounting a small tmpfs needs root")
        state_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, state_dir, True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", state_dir], capture_output=True)
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", state_dir], capture_output=True)
        lines: list[str] = []

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace", "").startswith("stigg_sidecar.delivery"):
                lines.append(str(event.get("log_format")))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        h = await self.start(state_dir)
        acknowledged, refused = await self.fill(h, 2_000)
        self.assertEqual(len(refused), 300, acknowledged)
        self.assertTrue(refused[-1].startswith("RESOURCE_EXHAUSTED: write spool full"), refused[-1])
        self.assertGreater(acknowledged, 0)
        refusal_lines = [line for line in lines if "refused" in line or "spool failed" in line]
        self.assertGreaterEqual(len(refusal_lines), 1)
        self.assertLessEqual(len(refusal_lines), 2, refusal_lines)
