"""The assembly's phases: the tree is edge, sources, delivery, serving, and stopping it stops them
in reverse, one at a time (serving first, draining; the edge last, so probes keep answering).

The tree is assembled from real settings (nothing listens until it starts); the stop order is
watched on a tree of services that note when they stop, since a real part stopping (a gRPC
drain, the spool's flush) says nothing about its neighbours.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.lifecycle.reactor import IReactor
from stigg_sidecar.ops.readiness import Readiness
from stigg_sidecar.process.assembly import PHASES, assemble
from stigg_sidecar.process.service import Phase, SidecarService
from stigg_sidecar.settings import load_settings


def _settings(**env: str):
    return load_settings({"SERVER_API_KEY": "test-key", "BIND_ADDRESS": "127.0.0.1", "PORT": "0", "HTTP_PORT": "0",
                          "API_URL": "http://127.0.0.1:9", "EDGE_API_URL": "http://127.0.0.1:9",
                          "WS_URL": "ws://127.0.0.1:9", **env})


def _tree(service) -> list[tuple[str, list[str]]]:
    return [(phase.name, [type(part).__name__ for part in phase]) for phase in service]



def _clock() -> IReactor:
    """A Clock where the assembly wants a reactor: building the tree only schedules, never runs."""
    return cast(IReactor, Clock())


class AssembledTreeTests(SynchronousTestCase):
    def test_an_online_sidecar_with_every_source_is_built_in_the_four_phases(self):
        state_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, state_dir, True)
        sidecar = assemble(_settings(STATE_DIR=state_dir, SPOOL_WRITES="1", REDIS_ENVIRONMENT_PREFIX="p"), _clock())
        self.assertEqual([phase.name for phase in sidecar.service], list(PHASES))
        self.assertEqual(_tree(sidecar.service), [
            ("edge", ["HttpService"]),
            # Stopped bottom up: the last snapshot after the spool delivered, Stigg's pools
            # closed after the socket and the poller, the mirror last.
            ("sources", ["RedisMirror", "KeyCheck", "Poller", "RealtimeService", "SnapshotService", "ClockSkewCheck"]),
            ("delivery", ["SpooledDelivery"]),
            ("serving", ["GrpcService"]),
        ])
        self.assertIs(sidecar.parts.http, sidecar.service.getServiceNamed("edge").getServiceNamed("http"))
        self.assertIs(sidecar.parts.grpc, sidecar.service.getServiceNamed("serving").getServiceNamed("grpc"))
        self.assertIs(sidecar.parts.writer, sidecar.service.getServiceNamed("delivery").getServiceNamed("delivery"))

    def test_an_offline_sidecar_has_empty_sources_and_delivery(self):
        sidecar = assemble(load_settings({"OFFLINE": "1", "PORT": "0", "HTTP_PORT": "0"}), _clock())
        self.assertEqual(_tree(sidecar.service), [
            ("edge", ["HttpService"]), ("sources", []), ("delivery", []), ("serving", ["GrpcService"]),
        ])
        self.assertIsNone(sidecar.parts.online)

    def test_direct_writes_need_no_service(self):
        sidecar = assemble(_settings(WS_ENABLED="0"), _clock())
        self.assertEqual(_tree(sidecar.service)[1:3], [("sources", ["KeyCheck", "Poller", "ClockSkewCheck"]), ("delivery", [])])


class _Noting(Service):
    """A part that notes when it starts and stops; its stop ends when the test says so."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.setName(name)
        self._log = log
        self.stopping: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._log.append(f"start {self.name}")

    def stopService(self) -> Deferred:
        super().stopService()
        self._log.append(f"stop {self.name}")
        self.stopping = Deferred()
        return self.stopping


class StopOrderTests(SynchronousTestCase):
    def test_phases_stop_in_reverse_one_part_at_a_time_serving_first_edge_last(self):
        log: list[str] = []
        readiness = Readiness()
        top = SidecarService(readiness)
        parts = {}
        for phase_name, names in zip(PHASES, (["http"], ["mirror", "key-check", "snapshot"], ["spool"], ["grpc"]),
                                     strict=True):
            phase = Phase(phase_name)
            for name in names:
                parts[name] = _Noting(name, log)
                parts[name].setServiceParent(phase)
            phase.setServiceParent(top)
        top.startService()
        self.assertEqual(log, ["start http", "start mirror", "start key-check", "start snapshot", "start spool",
                               "start grpc"])
        del log[:]
        self.assertTrue(readiness.ready)
        stopped = top.stopService()
        self.assertFalse(readiness.ready)  # DOWN the moment stopping begins
        for name in ("grpc", "spool", "snapshot", "key-check", "mirror", "http"):
            # Each part starts stopping only once the one before it finished.
            self.assertEqual(log[-1], f"stop {name}")
            self.assertFalse(stopped.called)
            stopping = parts[name].stopping
            assert stopping is not None
            stopping.callback(None)
        self.assertEqual(log, ["stop grpc", "stop spool", "stop snapshot", "stop key-check", "stop mirror", "stop http"])
        self.successResultOf(stopped)
