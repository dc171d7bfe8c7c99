"""HTTP_BIND_ADDRESS (issue 18): probes and metrics listen on their own interface while gRPC
listens on BIND_ADDRESS; unset, both share BIND_ADDRESS. Over real sockets on loopback addresses
(Linux routes all of 127.0.0.0/8 to the loopback interface)."""

from __future__ import annotations

import socket

from twisted.trial.unittest import TestCase

from stigg_sidecar.process.assembly import assemble
from stigg_sidecar.settings import load_settings
from tests.fixtures.clients import http_client
from tests.fixtures.reactor import reactor


def refused(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class HttpBindAddressTests(TestCase):
    timeout = 30

    def start(self, **env: str):
        settings = load_settings({"OFFLINE": "1", "PORT": "0", "HTTP_PORT": "0", "SHUTDOWN_GRACE_SECS": "0.5", **env})
        sidecar = assemble(settings, reactor)
        sidecar.service.privilegedStartService()
        sidecar.service.startService()
        self.addCleanup(sidecar.service.stopService)
        return sidecar.parts.http.port, sidecar.parts.grpc.port

    async def test_probes_on_their_own_interface(self):
        http_port, grpc_port = self.start(BIND_ADDRESS="127.0.0.1", HTTP_BIND_ADDRESS="127.0.0.2")
        response = await http_client(self, reactor).get(f"http://127.0.0.2:{http_port}/livez")
        self.assertEqual(response.code, 200)
        await response.text()
        self.assertTrue(refused("127.0.0.1", http_port))  # not on gRPC's interface
        self.assertTrue(refused("127.0.0.2", grpc_port))  # and gRPC not on the probes'
        self.assertFalse(refused("127.0.0.1", grpc_port))

    async def test_unset_it_is_bind_address(self):
        http_port, _ = self.start(BIND_ADDRESS="127.0.0.3")
        response = await http_client(self, reactor).get(f"http://127.0.0.3:{http_port}/livez")
        self.assertEqual(response.code, 200)
        await response.text()
        self.assertTrue(refused("127.0.0.1", http_port))
