"""The standalone service locked down, as a real `twistd stigg-sidecar` process at LOG_LEVEL=debug
(issue 18): through TLS with mutual TLS, caller tokens, refused callers, a certificate rotation,
a bad rotation and a tokens file changed and broken, no log line carries a token, a private key,
the API key or a password; no metric label carries a customer id, a token or a key; and readiness
reasons (with a key Stigg rejects) carry no key either.

The emulator runs in this reactor; the sidecar is a child process on 127.0.0.1:0; calls run on
threads; every wait is bounded.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import grpc
import trustme
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from tests.fixtures import data
from tests.fixtures.lockdown import (
    CALL_TIMEOUT,
    OTHER_TOKEN,
    READ_TOKEN,
    TOKENS_TEXT,
    WRITE_TOKEN,
    SecretVolume,
    bearer,
    channel,
    server_cert,
    tls_env,
    tls_files,
)
from tests.fixtures.polling import until
from tests.fixtures.processes import SidecarProcess, base_env, run_twistd

BOUND = 15.0
API_KEY = "sk-lockdown-api-key-7f3e9a1c5b"
WRONG_KEY = "sk-lockdown-wrong-key-0d2b4f6a8c"
REDIS_PASSWORD = "redis-password-lockdown-91c3"
SENTINEL_PASSWORD = "sentinel-password-lockdown-44e1"
UNKNOWN_TOKEN = "unknown-token-lockdown-8b8b8b8b"
CUSTOMERS = [f"cust-lockdown-{i}" for i in range(3)]
# Label values are quoted strings after `name=` inside `{...}`.
LABEL_VALUE = re.compile(r'[a-zA-Z_][a-zA-Z0-9_]*="((?:[^"\\]|\\.)*)"')


def key_lines(leaf: trustme.LeafCert) -> list[str]:
    """The base64 lines of a private key's PEM: any of them in a log is key material leaked."""
    return [line for line in leaf.private_key_pem.bytes().decode().splitlines() if line and not line.startswith("-----")]


def label_values(metrics_text: str) -> list[str]:
    values = []
    for line in metrics_text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        values.extend(LABEL_VALUE.findall(line[line.index("{") : line.rindex("}") + 1]))
    return values


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=CALL_TIMEOUT) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def status(function, *args, **kwargs) -> grpc.StatusCode:
    try:
        function(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


class LockdownSecretsTests(TestCase):
    timeout = 120

    async def start(self, api_key: str, **env: str) -> SidecarProcess:
        self.emulator = await start_emulator(
            reactor, {"apiKeys": [API_KEY], "customers": {c: data.ACME for c in CUSTOMERS}}
        )
        self.addCleanup(stop_emulator, self.emulator)
        process = await deferToThread(
            SidecarProcess,
            base_env(
                SERVER_API_KEY=api_key,
                API_URL=self.emulator.url,
                EDGE_API_URL=self.emulator.url,
                WS_URL=self.emulator.url.replace("http://", "ws://"),
                LOG_LEVEL="debug",
                SHUTDOWN_GRACE_SECS="1",
                ENTITLEMENTS_TIMEOUT_MS="3000",
                REDIS_PASSWORD=REDIS_PASSWORD,
                REDIS_SENTINEL_PASSWORD=SENTINEL_PASSWORD,
                **env,
            ),
        )
        self.addCleanup(process.kill)
        return process

    def assert_no_secret_in(self, text: str, secrets: list[str], where: str) -> None:
        for secret in secrets:
            self.assertNotIn(secret, text, f"a secret in {where}")

    async def test_no_secret_in_any_log_line_metric_label_or_readiness_reason(self):
        root = Path(self.mktemp()).absolute()
        ca, client_ca = trustme.CA(), trustme.CA()
        first, second = server_cert(ca), server_cert(ca)
        volume = SecretVolume(root / "tls", tls_files(first, client_ca=client_ca))
        root.mkdir(parents=True, exist_ok=True)
        tokens = root / "tokens"
        tokens.write_text(TOKENS_TEXT)
        process = await self.start(API_KEY, CALLER_TOKENS_FILE=str(tokens), **tls_env(volume, mutual=True))
        client = client_ca.issue_cert("app.example")
        ch = channel(process.grpc_port, ca, client)
        self.addCleanup(ch.close)
        stub = SidecarServiceStub(ch)

        def traffic() -> None:
            for customer in CUSTOMERS:
                answer = stub.GetMeteredEntitlement(
                    pb.GetMeteredEntitlementRequest(customer_id=customer, feature_id="api-calls"),
                    timeout=CALL_TIMEOUT, metadata=bearer(READ_TOKEN),
                )
                assert answer.has_access and not answer.is_fallback, answer
                stub.ReportUsage(pb.ReportUsageRequest(customer_id=customer, feature_id="api-calls", value=1),
                                 timeout=CALL_TIMEOUT, metadata=bearer(WRITE_TOKEN))
            read = pb.GetBooleanEntitlementRequest(customer_id=CUSTOMERS[0], feature_id="sso")
            write = pb.ReportUsageRequest(customer_id=CUSTOMERS[0], feature_id="api-calls", value=1)
            assert status(stub.ReportUsage, write, timeout=CALL_TIMEOUT, metadata=bearer(READ_TOKEN)) \
                == grpc.StatusCode.PERMISSION_DENIED
            assert status(stub.GetBooleanEntitlement, read, timeout=CALL_TIMEOUT, metadata=bearer(UNKNOWN_TOKEN)) \
                == grpc.StatusCode.UNAUTHENTICATED
            assert status(stub.GetBooleanEntitlement, read, timeout=CALL_TIMEOUT) == grpc.StatusCode.UNAUTHENTICATED
            for refused in (channel(process.grpc_port), channel(process.grpc_port, ca)):  # plaintext; no client cert
                try:
                    assert status(SidecarServiceStub(refused).GetBooleanEntitlement, read, timeout=CALL_TIMEOUT,
                                  metadata=bearer(READ_TOKEN)) == grpc.StatusCode.UNAVAILABLE
                finally:
                    refused.close()

        await deferToThread(traffic)

        # A bad rotation (another certificate's key), then a good one; a tokens file broken, then changed.
        mismatched = tls_files(second, client_ca=client_ca)
        mismatched["tls.key"] = first.private_key_pem.bytes()
        volume.write(mismatched)
        await deferToThread(process.wait_for, re.escape("is not the key of the certificate"), BOUND)  # the bad pair logged
        volume.write(tls_files(second, client_ca=client_ca))
        await deferToThread(process.wait_for, re.escape("TLS certificate reloaded"), BOUND)  # the rotation logged
        tokens.write_text(f"app-reader read {READ_TOKEN}\nbilling write\n")
        await deferToThread(process.wait_for, re.escape("expected 'name scope token'"), BOUND)  # the broken tokens file logged
        tokens.write_text(TOKENS_TEXT + f"newcomer write {OTHER_TOKEN}\n")
        await deferToThread(process.wait_for, re.escape("caller tokens reloaded"), BOUND)  # the tokens reload logged
        await deferToThread(traffic)  # again, on the rotated certificate and the new tokens

        assert process.http_port is not None  # it serves HTTP
        code, metrics_text = await deferToThread(http_get, process.http_port, "metrics")
        self.assertEqual(code, 200)
        values = label_values(metrics_text)
        self.assertIn("app-reader", values)  # callers are labelled by name...
        secrets = [READ_TOKEN, WRITE_TOKEN, OTHER_TOKEN, UNKNOWN_TOKEN, API_KEY, REDIS_PASSWORD, SENTINEL_PASSWORD,
                   *key_lines(first), *key_lines(second), *key_lines(client)]
        for value in values:  # ...and no label carries a customer id, a token or a key
            self.assertFalse(any(c in value for c in CUSTOMERS), f"a customer id in a metric label: {value}")
            self.assert_no_secret_in(value, secrets, "a metric label")
        self.assert_no_secret_in(metrics_text, secrets, "/metrics")

        self.assertEqual(process.stop(), 0)
        log = process.text
        self.assertIn("refused ReportUsage to caller app-reader", log)  # the caller's name is logged
        self.assert_no_secret_in(log, secrets, "the log")
        # Nothing in the log that looks like a PEM block either.
        self.assertNotIn("PRIVATE KEY", log)
        # Refused handshakes (plaintext, no client certificate) are grpc-core's lines: they come
        # through the log's own format at debug, folded, never as raw glog lines a scanner could
        # fill the log with.
        self.assertEqual([line for line in log.splitlines() if re.match(r"[EWIF]\d{4} ", line)], [])
        handshakes = [line for line in log.splitlines() if "Handshake failed" in line]
        self.assertTrue(handshakes)
        self.assertTrue(all("#debug] grpc-core: " in line for line in handshakes), handshakes)
        self.assertLessEqual(len(handshakes), 2)  # two kinds of refusal, each twice: repeats folded

    async def test_a_rejected_key_is_a_readiness_reason_without_the_key(self):
        process = await self.start(WRONG_KEY, CALLER_TOKENS_FILE=self.tokens_file())
        port = process.http_port
        assert port is not None  # it serves HTTP

        async def down_with_a_reason() -> bool:
            code, body = await deferToThread(http_get, port, "readyz")
            self.reasons = json.loads(body).get("reasons", [])
            return code == 503 and any("rejected the API key" in r for r in self.reasons)

        await until(down_with_a_reason, BOUND, "readiness DOWN naming the rejected key", interval=0.2)
        await deferLater(reactor, 0.5, lambda: None)
        for reason in self.reasons:
            self.assert_no_secret_in(reason, [WRONG_KEY, API_KEY, READ_TOKEN, WRITE_TOKEN], "a readiness reason")
            self.assertFalse(any(c in reason for c in CUSTOMERS))
        self.assertEqual(process.stop(), 0)
        self.assert_no_secret_in(process.text, [WRONG_KEY, API_KEY, READ_TOKEN, WRITE_TOKEN, REDIS_PASSWORD], "the log")

    def tokens_file(self) -> str:
        path = Path(self.mktemp()).absolute()
        path.write_text(TOKENS_TEXT)
        return str(path)


class LockdownStartFailureTests(TestCase):
    """`twistd stigg-sidecar` with a bad TLS pair or a broken tokens file exits 1 with one line on
    stderr naming the setting, no traceback, no key material and no token."""

    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        ca = trustme.CA()
        self.leaf, self.other = server_cert(ca), server_cert(ca)
        self.cert, self.key = self.dir / "tls.crt", self.dir / "tls.key"
        self.cert.write_bytes(self.leaf.cert_chain_pems[0].bytes())
        self.key.write_bytes(self.other.private_key_pem.bytes())
        self.tokens = self.dir / "tokens"

    def assert_one_line(self, env: dict[str, str], line: str) -> None:
        result = run_twistd("stigg-sidecar", base_env(OFFLINE="1", **env))
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        self.assertEqual([text for text in result.stderr.splitlines() if text.strip()], [f"stigg-sidecar: {line}"])
        for secret in (*key_lines(self.leaf), *key_lines(self.other), READ_TOKEN, WRITE_TOKEN):
            self.assertNotIn(secret, output)

    def test_a_key_of_another_certificate(self):
        self.assert_one_line(
            {"TLS_CERT_FILE": str(self.cert), "TLS_KEY_FILE": str(self.key)},
            f"TLS_KEY_FILE: {self.key} is not the key of the certificate in TLS_CERT_FILE ({self.cert})",
        )

    def test_a_tokens_file_with_a_bad_line(self):
        self.tokens.write_text(f"app-reader read {READ_TOKEN}\nbilling writer {WRITE_TOKEN}\n")
        self.assert_one_line(
            {"CALLER_TOKENS_FILE": str(self.tokens)},
            f"CALLER_TOKENS_FILE: {self.tokens} line 2 (caller billing): the scope must be read or write",
        )
