"""Log lines keep the sidecar's own wording whole: only the caller's or Stigg's text inside them is
clipped, never the sentence around it (issue 20, finding 11).

A whole sidecar in this process whose Stigg is unreachable (a closed port on 127.0.0.1), called
over gRPC until its circuit breaker opens; its log events are formatted by the sidecar's own
observers, in both LOG_FORMATs.
"""

from __future__ import annotations

import io
import json
import socket

from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.process.logs import make_observer
from tests.fixtures import data
from tests.fixtures.online import OnlineHarness


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LogWordingTests(TestCase):
    timeout = 60

    async def test_a_reload_failing_on_an_open_breaker_is_logged_whole(self):
        text, records = io.StringIO(), io.StringIO()
        for out, fmt in ((text, "text"), (records, "json")):
            observer = make_observer("info", fmt, out)
            globalLogPublisher.addObserver(observer)
            self.addCleanup(globalLogPublisher.removeObserver, observer)
        nowhere = f"http://127.0.0.1:{closed_port()}"
        h = await OnlineHarness(self, reactor).start(data.SEED, API_URL=nowhere, EDGE_API_URL=nowhere)
        for _ in range(8):
            await h.call("ReloadEntitlements", pb.ReloadEntitlementsRequest(customer_id="acme"), timeout=5)
        lines = [line for line in text.getvalue().splitlines() if "Reload of 'acme' failed" in line]
        self.assertTrue(any("calls fail at once until a probe succeeds (next in " in line for line in lines), lines)
        for line in lines:
            self.assertNotIn("more characters)", line)
            self.assertRegex(line, r"(\(next in \d+\.\ds\)|\))$")
        messages = [json.loads(line)["message"] for line in records.getvalue().splitlines()]
        reloads = [m for m in messages if m.startswith("Reload of 'acme' failed")]
        self.assertEqual(len(reloads), len(lines))
        for message in reloads:
            self.assertNotIn("more characters)", message)
