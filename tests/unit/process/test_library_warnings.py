"""Library warnings the sidecar reports in its own words go to debug (issue 20, finding 11):
autobahn's "dropping connection to peer ... with abort=True: None", logged by autobahn itself."""

from __future__ import annotations

import io

import txaio
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.process.logs import make_observer


class LibraryWarningTests(SynchronousTestCase):
    def log_autobahn_drop(self, level: str) -> str:
        txaio.use_twisted()
        from autobahn.twisted.websocket import WebSocketClientProtocol

        out = io.StringIO()
        observer = make_observer(level, "text", out)
        globalLogPublisher.addObserver(observer)
        try:
            protocol = WebSocketClientProtocol()
            protocol.log.warn("dropping connection to peer {peer} with abort={abort}: {reason}",
                              peer="tcp:127.0.0.1:1", abort=True, reason=None)
        finally:
            globalLogPublisher.removeObserver(observer)
        return out.getvalue()

    def test_autobahn_dropping_a_connection_is_not_a_warning(self):
        self.assertEqual(self.log_autobahn_drop("info"), "")

    def test_it_still_shows_at_debug(self):
        self.assertIn("abort=True", self.log_autobahn_drop("debug"))
