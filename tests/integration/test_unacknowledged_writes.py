"""A spooled write is delivered only if it was acknowledged (issue 20, finding 6).

A whole sidecar in this process with SPOOL_WRITES=1 against the emulator, called over gRPC. The
spool's writer thread is held (a job that waits on an event, as a frozen filesystem would hold its
sync), so writes miss their deadline or are cancelled by the caller; once the thread runs again,
none of them may reach Stigg, while a write acknowledged afterwards is delivered once.
"""

from __future__ import annotations

import shutil
import tempfile
import threading

import grpc
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness
from tests.fixtures.polling import until


class UnacknowledgedWriteTests(TestCase):
    timeout = 60

    async def setUp(self):  # type: ignore[override]  # trial waits on what setUp/tearDown return
        self.state_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.state_dir, True)
        self.h = await OnlineHarness(self, reactor).start(
            data.SEED, STATE_DIR=self.state_dir, SPOOL_WRITES="1", SPOOL_FLUSH_MS="20"
        )
        self.delivery = self.h.parts.writer
        await until(lambda: self.delivery.loaded, what="spool loaded")
        self.released = threading.Event()
        self.addCleanup(self.released.set)

    def hold_the_writer(self) -> None:
        """Keep the spool's writer thread busy until `released` is set (bounded: 30 s)."""
        self.delivery.spool._submit(lambda db: self.released.wait(30))

    async def settle(self) -> None:
        """The held jobs have run and whatever the spool would deliver has had time to go."""
        self.released.set()
        await self.delivery.spool._submit(lambda db: None)  # every job queued before it is done
        await deferLater(reactor, 0.5, lambda: None)
        await until(lambda: self.delivery.records == 0, what="nothing left to deliver")

    def usage(self, value: float) -> pb.ReportUsageRequest:
        return pb.ReportUsageRequest(customer_id="acme", feature_id="api-calls", value=value)

    async def test_writes_past_their_deadline_while_the_disk_is_frozen_are_never_delivered(self):
        metered = pb.GetMeteredEntitlementRequest(customer_id="acme", feature_id="api-calls")
        before = (await self.h.call("GetMeteredEntitlement", metered)).entitlement.current_usage
        self.hold_the_writer()
        answers = []
        for _ in range(30):
            try:
                await self.h.call("ReportUsage", self.usage(1), timeout=0.3)
                answers.append("OK")
            except grpc.RpcError as e:
                answers.append(e.code().name)
        self.assertEqual(answers, ["DEADLINE_EXCEEDED"] * 30)
        await self.settle()
        self.assertEqual(self.h.emulator.state.usage_log(), [])

        ack = await self.h.call("ReportUsage", self.usage(7), timeout=5)  # the disk is back
        self.assertTrue(ack.measurement_id)
        await until(lambda: len(self.h.emulator.state.usage_log()) == 1, what="the acknowledged write delivered")
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual([u["currentUsage"] for u in self.h.emulator.state.usage_log()], [before + 7])
        self.assertEqual((await self.h.call("GetMeteredEntitlement", metered)).entitlement.current_usage, before + 7)
        self.assertEqual(self.delivery.unacknowledged, 30)

    async def test_a_write_the_caller_cancelled_is_never_delivered(self):
        self.hold_the_writer()
        future = self.h.stub.ReportUsage.future(self.usage(3), timeout=10)
        await deferLater(reactor, 0.3, lambda: None)  # it waits on the held spool
        self.assertTrue(future.cancel())
        await deferLater(reactor, 0.5, lambda: None)  # the cancellation has reached the sidecar
        await self.settle()
        self.assertEqual(self.h.emulator.state.usage_log(), [])
