"""Liveness and readiness over a real HTTP port: DOWN with reasons until the gRPC server serves,
UP after, DOWN again the moment shutdown starts while gRPC drains."""

from __future__ import annotations

import json

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from stigg_sidecar.process.assembly import assemble
from stigg_sidecar.settings import load_settings
from tests.fixtures.clients import http_client
from tests.fixtures.reactor import reactor


class HealthTests(TestCase):
    timeout = 30

    def setUp(self):
        settings = load_settings(
            {"OFFLINE": "1", "BIND_ADDRESS": "127.0.0.1", "PORT": "0", "HTTP_PORT": "0",
             "HEALTH_ENDPOINT_URL": "healthy", "READY_ENDPOINT_URL": "/ready/"}
        )
        assembled = assemble(settings, reactor)
        self.sidecar = assembled.service
        self.http = assembled.parts.http
        self.http.privilegedStartService()
        self.client = http_client(self, reactor)

    def tearDown(self):
        if self.sidecar.running:
            return self.sidecar.stopService()
        return self.http.stopService()

    @inlineCallbacks
    def get(self, path):
        response = yield self.client.get(f"http://127.0.0.1:{self.http.port}/{path}")
        body = yield response.text()
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        return response.code, json.loads(body)

    @inlineCallbacks
    def test_ready_follows_grpc_then_shutdown(self):
        code, body = yield self.get("healthy")
        self.assertEqual((code, body), (200, {"status": "UP"}))
        code, body = yield self.get("ready")
        self.assertEqual(code, 503)
        self.assertEqual(body, {"status": "DOWN", "reasons": ["gRPC server is not serving yet"]})

        self.sidecar.startService()
        code, body = yield self.get("ready")
        self.assertEqual((code, body), (200, {"status": "UP"}))

        stopping = self.sidecar.stopService()
        code, body = yield self.get("ready")
        self.assertEqual(code, 503)
        self.assertIn("shutting down", body["reasons"])
        code, body = yield self.get("healthy")
        self.assertEqual(code, 200)
        yield stopping

    @inlineCallbacks
    def test_unknown_path_is_a_json_404(self):
        code, body = yield self.get("nope")
        self.assertEqual(code, 404)
