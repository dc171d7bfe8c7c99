"""Start-up as a real `twistd stigg-sidecar` process: bad settings exit non-zero before listening
with one clear line; options override the environment; --help lists every setting."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.settings import SPECS
from tests.fixtures.processes import SidecarProcess, base_env, run_twistd

KEY = "sk-live-do-not-print-me"


class StartupFailureTests(SynchronousTestCase):
    def assertFailsWith(self, env, line, *args):
        result = run_twistd("stigg-sidecar", env, *args)
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertIn(f"stigg-sidecar: {line}", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("listening", output)
        self.assertNotIn(KEY, output)
        self.assertEqual([text for text in output.splitlines() if "stigg-sidecar:" in text], [f"stigg-sidecar: {line}"])

    def test_missing_api_key(self):
        self.assertFailsWith(base_env(), "SERVER_API_KEY (or SERVER_API_KEY_FILE) is required unless OFFLINE is set")

    def test_unparsable_number(self):
        self.assertFailsWith(base_env(SERVER_API_KEY=KEY, HTTP_PORT="http"), "HTTP_PORT: must be a whole number, got 'http'")

    def test_bad_boolean(self):
        self.assertFailsWith(base_env(OFFLINE="perhaps"), "OFFLINE: must be one of 1/0, true/false, yes/no")

    def test_malformed_fallback(self):
        self.assertFailsWith(
            base_env(OFFLINE="1", ENTITLEMENTS_FALLBACK='{"f": {"hasAccess": true, "value": "five"}}'),
            "ENTITLEMENTS_FALLBACK: f.value: must be a whole number that fits in 32 bits",
        )

    def test_an_unknown_option_is_one_line_and_a_pointer_to_help(self):
        for args, line in [
            (("--bogus",), "option --bogus not recognized; see twistd stigg-sidecar --help"),
            (("--port",), "option --port requires argument; see twistd stigg-sidecar --help"),
            (("stray",), "Wrong number of arguments; see twistd stigg-sidecar --help"),
        ]:
            self.assertFailsWith(base_env(OFFLINE="1"), line, *args)
            result = run_twistd("stigg-sidecar", base_env(OFFLINE="1"), *args)
            self.assertEqual((result.stdout + result.stderr).splitlines(), [f"stigg-sidecar: {line}"])

    def test_bad_option_value_is_reported_like_a_variable(self):
        self.assertFailsWith(base_env(OFFLINE="1"), "PORT: must be a whole number, got 'x'", "--port=x")


class OptionPrecedenceTests(SynchronousTestCase):
    def test_option_wins_over_a_bad_environment_value(self):
        sidecar = SidecarProcess(base_env(OFFLINE="1", HTTP_PORT="not-a-port"), "--http-port=0")
        try:
            self.assertIsNotNone(sidecar.http_port)
        finally:
            self.assertEqual(sidecar.stop(), 0)

    def test_help_lists_every_setting_with_its_default(self):
        result = run_twistd("stigg-sidecar", base_env(), "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        text = " ".join(result.stdout.split())
        for spec in SPECS:
            self.assertIn(f"--{spec.option}=", text)
            self.assertIn(f"env {spec.env};", text)
        self.assertIn("default: 8443", text)
        self.assertIn("default: livez", text)
