"""The container's HEALTHCHECK asks the HTTP server where it listens: HTTP_BIND_ADDRESS when set
(probes kept on an internal interface), else BIND_ADDRESS; a wildcard means loopback."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.healthcheck import liveness_url


class LivenessUrlTests(SynchronousTestCase):
    def test_bind_address_and_its_wildcards(self):
        self.assertEqual(liveness_url({}), "http://127.0.0.1:8080/livez")
        self.assertEqual(liveness_url({"BIND_ADDRESS": "10.1.2.3"}), "http://10.1.2.3:8080/livez")
        self.assertEqual(liveness_url({"BIND_ADDRESS": "::"}), "http://[::1]:8080/livez")

    def test_http_bind_address_wins(self):
        env = {"BIND_ADDRESS": "10.1.2.3", "HTTP_BIND_ADDRESS": "127.0.0.1", "HTTP_PORT": "9080"}
        self.assertEqual(liveness_url(env), "http://127.0.0.1:9080/livez")
        self.assertEqual(liveness_url({"BIND_ADDRESS": "10.1.2.3", "HTTP_BIND_ADDRESS": "0.0.0.0"}),
                         "http://127.0.0.1:8080/livez")
