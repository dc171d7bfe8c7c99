"""README "Running as a standalone service": its three client examples (Stigg's official client
with the token as metadata; the official client's stub over TLS; grpcio with TLS and the token as
call credentials) run as written against a sidecar with caller tokens (and TLS for the last two),
and are answered; without a valid token each is refused UNAUTHENTICATED.

An offline sidecar in this reactor on 127.0.0.1:0; each example runs as `python -c` on a thread.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import trustme
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from stigg_sidecar.grpc.callers import CallerTokensError, parse_callers
from tests.fixtures.kustomize import workload
from tests.fixtures.lockdown import (
    READ_TOKEN,
    TOKENS_TEXT,
    SecretVolume,
    server_cert,
    start_offline_sidecar,
    tls_env,
    tls_files,
)
from tests.fixtures.paths import ROOT


def examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Running as a standalone service", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT), **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


class StandaloneExamplesTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        (self.dir / "tokens").write_text(TOKENS_TEXT)

    def start(self, **env: str) -> int:
        sidecar = start_offline_sidecar(self, reactor, CALLER_TOKENS_FILE=str(self.dir / "tokens"), **env)
        return sidecar.parts.grpc.port

    async def check(self, code: str, port: int, **env: str) -> None:
        base = {"STIGG_SIDECAR_HOST": "127.0.0.1", "STIGG_SIDECAR_PORT": str(port), **env}
        answered = await deferToThread(run, code, STIGG_SIDECAR_TOKEN=READ_TOKEN, **base)
        self.assertEqual((answered.returncode, answered.stdout), (0, "has access: False\n"), answered.stderr)
        refused = await deferToThread(run, code, STIGG_SIDECAR_TOKEN="not-a-caller-token-000000", **base)
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("UNAUTHENTICATED", refused.stderr)

    def test_there_are_three_examples(self):
        self.assertEqual(len(examples()), 3)

    async def test_the_official_client_with_the_token_as_metadata(self):
        await self.check(examples()[0], self.start())

    async def test_the_official_stub_and_grpcio_over_tls(self):
        ca = trustme.CA()
        volume = SecretVolume(self.dir / "tls", tls_files(server_cert(ca)))
        port = self.start(**tls_env(volume))
        ca_file = self.dir / "ca.crt"
        ca.cert_pem.write_to_path(str(ca_file))
        for code in examples()[1:]:
            await self.check(code, port, STIGG_SIDECAR_CA=str(ca_file))


class StandaloneOverlayTests(TestCase):
    """deploy/kubernetes/overlays/standalone wires the files as this code reads them: the TLS pair
    from the cert-manager Certificate's Secret, the callers Secret's `tokens` in the format
    `grpc.callers` parses."""

    def test_tls_and_tokens_come_from_the_secrets_the_readme_names(self):
        pod = workload("standalone")
        env: dict[str, Any] = {name: entry.get("value") for name, entry in pod.env.items()}
        self.assertEqual(env["TLS_CERT_FILE"], "/etc/stigg-sidecar/tls/tls.crt")
        self.assertEqual(env["TLS_KEY_FILE"], "/etc/stigg-sidecar/tls/tls.key")
        self.assertEqual(env["CALLER_TOKENS_FILE"], "/etc/stigg-sidecar/callers/tokens")
        (certificate,) = pod.of_kind("Certificate")
        for setting, key in (("TLS_CERT_FILE", "tls.crt"), ("TLS_KEY_FILE", "tls.key")):
            volume, path = pod.mounted_file(env[setting])
            self.assertEqual((volume["secret"]["secretName"], path), (certificate["spec"]["secretName"], key))
        volume, path = pod.mounted_file(env["CALLER_TOKENS_FILE"])
        secret = pod.named("Secret", volume["secret"]["secretName"])
        shipped = secret["stringData"][path]
        # No caller as shipped (a published token would be everyone's); the example line parses.
        with self.assertRaisesRegex(CallerTokensError, "has no callers"):
            parse_callers(shipped, "the overlay's callers Secret")
        example = shipped.strip().removeprefix("# ").replace("<a random token of at least 16 characters>", "1" * 64)
        self.assertTrue(parse_callers(example, "the overlay's callers Secret").names)
