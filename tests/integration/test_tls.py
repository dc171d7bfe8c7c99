"""gRPC over TLS (issue 18): with TLS_CERT_FILE and TLS_KEY_FILE set, a client trusting the CA is
answered and a plaintext one refused; a certificate rotated on disk (as Kubernetes swaps a Secret
volume) reaches new connections without a restart while an open connection keeps working; a bad
pair at rotation keeps the last good one and is logged once; TLS_CLIENT_CA_FILE requires client
certificates from that CA, and a rotated client CA is required of new connections.

Test CAs from trustme; an offline sidecar in this reactor on 127.0.0.1:0; grpcio clients on threads.
Every wait is bounded by `BOUND` seconds; the files are polled every second.
"""

from __future__ import annotations

import grpc
import trustme
from twisted.trial.unittest import TestCase

from stigg_sidecar.grpc.tls import TlsError, TlsFiles, load_material
from stigg_sidecar.process.assembly import assemble
from stigg_sidecar.settings import load_settings
from tests.fixtures.lockdown import (
    LogLines,
    SecretVolume,
    channel,
    check,
    server_cert,
    start_offline_sidecar,
    status_of,
    tls_env,
    tls_files,
)
from tests.fixtures.polling import until
from tests.fixtures.reactor import reactor

BOUND = 10.0


class TlsTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.ca = trustme.CA()
        self.volume = SecretVolume(self.tmp("tls"), tls_files(server_cert(self.ca)))

    def tmp(self, name: str):
        from pathlib import Path

        return Path(self.mktemp()) / name

    def start(self, **env: str) -> int:
        sidecar = start_offline_sidecar(self, reactor, **tls_env(self.volume), **env)
        return sidecar.parts.grpc.port

    def channel(self, port: int, ca=None, client=None) -> grpc.Channel:
        made = channel(port, ca, client)
        self.addCleanup(made.close)
        return made

    async def new_connection_status(self, port: int, ca, client=None) -> grpc.StatusCode:
        return await status_of(check, self.channel(port, ca, client))

    async def test_a_client_trusting_the_ca_is_answered_and_plaintext_is_refused(self):
        port = self.start()
        self.assertEqual(await self.new_connection_status(port, self.ca), grpc.StatusCode.OK)
        self.assertEqual(await self.new_connection_status(port, None), grpc.StatusCode.UNAVAILABLE)
        # ...and a client trusting another CA is refused too: the server's certificate is checked.
        self.assertEqual(await self.new_connection_status(port, trustme.CA()), grpc.StatusCode.UNAVAILABLE)
        # The refusals cost nothing: TLS clients are still answered.
        self.assertEqual(await self.new_connection_status(port, self.ca), grpc.StatusCode.OK)

    async def test_a_rotated_certificate_reaches_new_connections_while_an_open_one_keeps_working(self):
        port = self.start()
        old = self.channel(port, self.ca)
        self.assertEqual(await status_of(check, old), grpc.StatusCode.OK)

        new_ca = trustme.CA()  # a new CA, so each client can tell which certificate it was shown
        self.volume.write(tls_files(server_cert(new_ca)))
        seen: list[grpc.StatusCode] = []

        async def new_certificate_served() -> bool:
            seen.append(await self.new_connection_status(port, new_ca))
            return seen[-1] == grpc.StatusCode.OK

        await until(new_certificate_served, BOUND, "a new connection shown the new certificate", interval=0.2)
        # New connections get only the new certificate now...
        self.assertEqual(await self.new_connection_status(port, self.ca), grpc.StatusCode.UNAVAILABLE)
        # ...while the connection opened before goes on being answered (a reconnect would have
        # been shown the new certificate, which it does not trust, and failed).
        for _ in range(3):
            self.assertEqual(await status_of(check, old), grpc.StatusCode.OK)

    async def test_a_bad_pair_at_rotation_keeps_the_last_good_one_and_is_logged_once(self):
        logs = LogLines(self)
        port = self.start()
        stranger = server_cert(trustme.CA())
        mismatched = tls_files(server_cert(self.ca))
        mismatched["tls.key"] = stranger.private_key_pem.bytes()
        self.volume.write(mismatched)
        complaint = "is not the key of the certificate in TLS_CERT_FILE"
        await until(lambda: logs.matching(complaint), BOUND, "the bad pair logged")
        # Several polls later, still one line, and the last good certificate is served.
        await self.sleep(2.5)
        self.assertEqual(len(logs.matching(complaint)), 1, logs.lines)
        self.assertIn("still serving the last good certificate", logs.matching(complaint)[0])
        self.assertEqual(await self.new_connection_status(port, self.ca), grpc.StatusCode.OK)

        # A half-written certificate is refused the same way.
        self.volume.write({"tls.crt": b"-----BEGIN CERTIFICATE-----\nMIIB", "tls.key": stranger.private_key_pem.bytes()})
        await until(lambda: logs.matching("holds no valid PEM certificate"), BOUND, "the truncated file logged")
        self.assertEqual(await self.new_connection_status(port, self.ca), grpc.StatusCode.OK)

        # The next good pair is taken.
        new_ca = trustme.CA()
        self.volume.write(tls_files(server_cert(new_ca)))

        async def new_served() -> bool:
            return await self.new_connection_status(port, new_ca) == grpc.StatusCode.OK

        await until(new_served, BOUND, "the next good pair served", interval=0.2)
        self.assertEqual(len(logs.matching("TLS certificate reloaded")), 1, logs.lines)
        key_body = stranger.private_key_pem.bytes().decode().splitlines()[1]
        self.assertFalse([line for line in logs.lines if key_body in line], "a key's content was logged")

    async def test_mutual_tls_refuses_a_client_without_a_certificate_and_answers_one_from_the_client_ca(self):
        client_ca = trustme.CA()
        self.volume.write(tls_files(server_cert(self.ca), client_ca=client_ca))
        volume = SecretVolume(self.tmp("mtls"), tls_files(server_cert(self.ca), client_ca=client_ca))
        sidecar = start_offline_sidecar(self, reactor, **tls_env(volume, mutual=True))
        port = sidecar.parts.grpc.port

        self.assertEqual(await self.new_connection_status(port, self.ca), grpc.StatusCode.UNAVAILABLE)
        stranger = trustme.CA().issue_cert("client.example")
        self.assertEqual(await self.new_connection_status(port, self.ca, stranger), grpc.StatusCode.UNAVAILABLE)
        member = client_ca.issue_cert("client.example")
        self.assertEqual(await self.new_connection_status(port, self.ca, member), grpc.StatusCode.OK)
        self.assertEqual(await self.new_connection_status(port, None), grpc.StatusCode.UNAVAILABLE)

    async def test_a_rotated_client_ca_is_required_of_new_connections(self):
        old_clients, new_clients = trustme.CA(), trustme.CA()
        volume = SecretVolume(self.tmp("mtls"), tls_files(server_cert(self.ca), client_ca=old_clients))
        sidecar = start_offline_sidecar(self, reactor, **tls_env(volume, mutual=True))
        port = sidecar.parts.grpc.port
        old_member, new_member = old_clients.issue_cert("old.example"), new_clients.issue_cert("new.example")
        self.assertEqual(await self.new_connection_status(port, self.ca, old_member), grpc.StatusCode.OK)
        self.assertEqual(await self.new_connection_status(port, self.ca, new_member), grpc.StatusCode.UNAVAILABLE)

        volume.write(tls_files(server_cert(self.ca), client_ca=new_clients))

        async def new_ca_required() -> bool:
            return await self.new_connection_status(port, self.ca, new_member) == grpc.StatusCode.OK

        await until(new_ca_required, BOUND, "a client of the new CA answered", interval=0.2)
        self.assertEqual(await self.new_connection_status(port, self.ca, old_member), grpc.StatusCode.UNAVAILABLE)

    async def sleep(self, seconds: float) -> None:
        from twisted.internet.task import deferLater

        await deferLater(reactor, seconds, lambda: None)


class TlsStartTests(TestCase):
    """A bad pair at start is one error naming the setting (twistd prints it as one line)."""

    def setUp(self) -> None:
        from pathlib import Path

        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.ca = trustme.CA()
        self.leaf = server_cert(self.ca)
        self.cert = self.dir / "tls.crt"
        self.key = self.dir / "tls.key"
        self.cert.write_bytes(self.leaf.cert_chain_pems[0].bytes())
        self.key.write_bytes(self.leaf.private_key_pem.bytes())

    def build(self, **env: str):
        settings = load_settings({"OFFLINE": "1", "TLS_CERT_FILE": str(self.cert), "TLS_KEY_FILE": str(self.key), **env})
        return assemble(settings, reactor)

    def error(self, **env: str) -> str:
        with self.assertRaises(TlsError) as raised:
            self.build(**env)
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertNotIn(self.leaf.private_key_pem.bytes().decode().splitlines()[1], message)
        return message

    def test_a_key_of_another_certificate(self):
        self.key.write_bytes(server_cert(self.ca).private_key_pem.bytes())
        self.assertEqual(
            self.error(),
            f"TLS_KEY_FILE: {self.key} is not the key of the certificate in TLS_CERT_FILE ({self.cert})",
        )

    def test_missing_and_garbled_files(self):
        self.assertEqual(self.error(TLS_CERT_FILE=str(self.dir / "nope")), f"TLS_CERT_FILE: {self.dir / 'nope'} does not exist")
        self.cert.write_bytes(b"not a certificate")
        self.assertEqual(self.error(), f"TLS_CERT_FILE: {self.cert} holds no valid PEM certificate")
        self.cert.write_bytes(self.leaf.cert_chain_pems[0].bytes())
        self.key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        self.assertEqual(self.error(), f"TLS_KEY_FILE: {self.key} holds no valid PEM private key")
        self.key.write_bytes(self.leaf.private_key_pem.bytes())
        ca_file = self.dir / "ca.crt"
        ca_file.write_bytes(b"")
        self.assertEqual(self.error(TLS_CLIENT_CA_FILE=str(ca_file)), f"TLS_CLIENT_CA_FILE: {ca_file} holds no valid PEM certificate")

    def test_a_chain_is_accepted(self):
        intermediate = self.ca.create_child_ca()
        leaf = server_cert(intermediate)
        self.cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        self.key.write_bytes(leaf.private_key_pem.bytes())
        material = load_material(TlsFiles(str(self.cert), str(self.key)))
        self.assertIn("(localhost, 127.0.0.1)", material.summary)
        self.assertNotIn("PRIVATE", repr(material))

    def test_settings_go_together(self):
        from stigg_sidecar.settings import SettingsError

        with self.assertRaises(SettingsError) as raised:
            load_settings({"OFFLINE": "1", "TLS_CERT_FILE": str(self.cert)})
        self.assertIn("TLS_CERT_FILE and TLS_KEY_FILE go together", str(raised.exception))
        with self.assertRaises(SettingsError) as raised:
            load_settings({"OFFLINE": "1", "TLS_CLIENT_CA_FILE": str(self.cert)})
        self.assertIn("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE", str(raised.exception))
