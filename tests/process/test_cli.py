"""stigg-sidecar-cli as a real subprocess (`python -m stigg_sidecar.cli`) against real sidecars:
offline (fallbacks) for every command's plumbing, text and --json; online against the Stigg API
emulator for real usage numbers and denial reasons; and nothing listening for the one-line
failure and its exit status. Every subprocess is bounded by a timeout."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.fixtures.paths import ROOT
from tests.fixtures.processes import SidecarProcess, base_env, shared_emulator, shared_sidecar

FALLBACKS = {
    "feature-seats": {"hasAccess": True, "value": 5},
    "feature-api-calls": {"hasAccess": True, "usageLimit": 100},
    "feature-sso": {"hasAccess": False},
    "feature-region": {"hasAccess": True, "enumValues": ["us", "eu"]},
}
CLI_TIMEOUT = 30
GRANTED, ERROR, USAGE, DENIED = 0, 1, 2, 3


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stigg_sidecar.cli", *args],
        env=base_env(**(env or {})), cwd=ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False,
    )


def closed_port() -> int:
    """A loopback port nothing listens on (bound, noted, closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CliTestCase(SynchronousTestCase):
    """Runs the CLI against one shared offline sidecar (or `online_sidecar()`)."""

    def setUp(self) -> None:
        self.sidecar = shared_sidecar("cli-offline", base_env(OFFLINE="1", ENTITLEMENTS_FALLBACK=json.dumps(FALLBACKS)))

    def cli(self, *args: str, sidecar: SidecarProcess | None = None) -> subprocess.CompletedProcess:
        sidecar = sidecar or self.sidecar
        return run_cli("--target", f"127.0.0.1:{sidecar.grpc_port}", "--http", f"127.0.0.1:{sidecar.http_port}", *args)

    def assertAnswer(self, result: subprocess.CompletedProcess, status: int, stdout: str) -> None:
        self.assertEqual((result.returncode, result.stdout, result.stderr), (status, stdout, ""))

    def json_of(self, result: subprocess.CompletedProcess) -> dict:
        self.assertEqual(result.stderr, "")
        self.assertEqual(len(result.stdout.splitlines()), 1, "one JSON object, one line")
        return json.loads(result.stdout)


class CheckTests(CliTestCase):
    def test_metered_granted_shows_usage_and_request_and_exits_0(self):
        self.assertAnswer(
            self.cli("check", "acme", "feature-api-calls", "--usage", "10"),
            GRANTED,
            "ACCESS GRANTED  customer=acme feature=feature-api-calls (metered: 0 of 100 used, requesting 10) (fallback)\n",
        )

    def test_denied_shows_reason_and_exits_3(self):
        self.assertAnswer(
            self.cli("check", "acme", "feature-sso"),
            DENIED,
            "ACCESS DENIED  customer=acme feature=feature-sso reason=UNKNOWN (boolean) (fallback)\n",
        )

    def test_numeric_shows_value(self):
        self.assertAnswer(
            self.cli("check", "acme", "feature-seats"),
            GRANTED,
            "ACCESS GRANTED  customer=acme feature=feature-seats (numeric: value 5) (fallback)\n",
        )

    def test_enum_shows_values_and_requested_values(self):
        self.assertAnswer(
            self.cli("check", "acme", "feature-region", "--values", "us, eu", "--resource", "site-1"),
            GRANTED,
            "ACCESS GRANTED  customer=acme resource=site-1 feature=feature-region (enum: us, eu; requesting us, eu) (fallback)\n",
        )

    def test_json_is_the_response_with_has_access_even_when_false(self):
        result = self.cli("--json", "check", "acme", "feature-sso")
        self.assertEqual(result.returncode, DENIED)
        entitlement = self.json_of(result)["entitlement"]
        self.assertIs(entitlement["has_access"], False)
        self.assertIs(entitlement["is_fallback"], True)
        self.assertEqual(entitlement["access_denied_reason"], "ACCESS_DENIED_REASON_UNKNOWN")
        self.assertEqual(entitlement["boolean"]["feature"]["id"], "feature-sso")

    def test_connection_options_also_work_after_the_command(self):
        result = run_cli(
            "check", "acme", "feature-api-calls", "--usage", "2.5", "--json",
            "--target", f"127.0.0.1:{self.sidecar.grpc_port}",
        )
        self.assertEqual(result.returncode, GRANTED)
        metered = self.json_of(result)["entitlement"]["metered"]
        self.assertEqual((metered["usage_limit"], metered["current_usage"]), (100, 0))

    def test_target_from_the_environment(self):
        result = run_cli("check", "acme", "feature-seats", env={"STIGG_SIDECAR_TARGET": f"127.0.0.1:{self.sidecar.grpc_port}"})
        self.assertEqual((result.returncode, result.stderr), (GRANTED, ""))

    def test_invalid_argument_is_one_line_with_the_code(self):
        result = self.cli("check", "", "feature-sso")
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr),
            (ERROR, "", "stigg-sidecar-cli: INVALID_ARGUMENT: customer_id must not be empty\n"),
        )


class StateTests(CliTestCase):
    def test_table_lists_every_entitlement(self):
        self.assertAnswer(
            self.cli("state", "acme"),
            GRANTED,
            "customer=acme\n"
            "FEATURE/CURRENCY   TYPE     ACCESS              USAGE/VALUE    REASON\n"
            "feature-seats      numeric  granted (fallback)  value 5        -\n"
            "feature-api-calls  metered  granted (fallback)  0 of 100 used  -\n"
            "feature-sso        boolean  denied (fallback)   -              UNKNOWN\n"
            "feature-region     enum     granted (fallback)  us, eu         -\n",
        )

    def test_json(self):
        result = self.cli("state", "acme", "--resource", "site-1", "--json")
        self.assertEqual(result.returncode, GRANTED)
        entitlements = self.json_of(result)["entitlements"]
        self.assertEqual([e["has_access"] for e in entitlements], [True, True, False, True])
        self.assertEqual(entitlements[3]["enum"]["enum_values"], ["us", "eu"])


class ReportUsageTests(CliTestCase):
    def test_delta_prints_measurement_id(self):
        result = self.cli("report-usage", "acme", "feature-api-calls", "5")
        self.assertEqual((result.returncode, result.stderr), (GRANTED, ""))
        self.assertRegex(
            result.stdout,
            r"^USAGE REPORTED  customer=acme feature=feature-api-calls \(added 5\) measurement=\S+ current_usage=not returned\n$",
        )

    def test_set_with_negative_value_and_json(self):
        result = self.cli("report-usage", "acme", "feature-api-calls", "-1.5", "--set", "--resource", "r", "--json")
        self.assertEqual(result.returncode, GRANTED)
        ack = self.json_of(result)
        self.assertEqual((ack["customer_id"], ack["feature_id"], ack["resource_id"]), ("acme", "feature-api-calls", "r"))
        self.assertTrue(ack["measurement_id"])
        self.assertNotIn("current_usage", ack)


class ReloadTests(CliTestCase):
    def test_existing_entity_exits_0(self):
        self.assertAnswer(self.cli("reload", "acme"), GRANTED, "RELOADED  customer=acme\n")

    def test_json(self):
        self.assertEqual(self.json_of(self.cli("--json", "reload", "acme", "--resource", "r")), {"entitled_entity_exists": True})


class HealthTests(CliTestCase):
    def test_ready_sidecar_exits_0(self):
        base = f"http://127.0.0.1:{self.sidecar.http_port}"
        self.assertAnswer(
            self.cli("health"),
            GRANTED,
            f"grpc   SERVING  127.0.0.1:{self.sidecar.grpc_port}\n"
            f"live   UP    HTTP 200  {base}/livez\nready  UP    HTTP 200  {base}/readyz\n",
        )

    def test_json(self):
        report = self.json_of(self.cli("health", "--json"))
        self.assertIs(report["ready_ok"], True)
        self.assertEqual((report["live"]["http_status"], report["ready"]["status"]), (200, "UP"))
        self.assertEqual(report["grpc"], {"status": "SERVING", "ok": True})

    def test_wrong_ready_path_is_not_ready_and_exits_3(self):
        result = self.cli("health", "--ready-path", "/not-here")
        self.assertEqual(result.returncode, DENIED)
        self.assertIn(f"ready  DOWN  HTTP 404  http://127.0.0.1:{self.sidecar.http_port}/not-here", result.stdout)

    def test_not_ready_sidecar_shows_reasons(self):
        # Stigg's API is a listener that never answers: the key check stays pending (for
        # ENTITLEMENTS_TIMEOUT_MS, 10 s) and readiness stays blocked on it meanwhile.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            url = f"http://127.0.0.1:{silent.getsockname()[1]}"
            sidecar = SidecarProcess(base_env(SERVER_API_KEY="k", API_URL=url, EDGE_API_URL=url, WS_ENABLED="0"))
            try:
                result = self.cli("health", sidecar=sidecar)
            finally:
                sidecar.stop()
        self.assertEqual((result.returncode, result.stderr), (DENIED, ""))
        self.assertIn("ready  DOWN  HTTP 503", result.stdout)
        self.assertIn("grpc   NOT_SERVING", result.stdout)
        self.assertIn("(validating the API key with Stigg)", result.stdout)


class OnlineTests(CliTestCase):
    """Against an online sidecar fed by the emulator (examples/emulator-data.json)."""

    def setUp(self) -> None:
        url = shared_emulator()
        self.sidecar = shared_sidecar(
            "cli-online", base_env(SERVER_API_KEY="local-dev-key", API_URL=url, EDGE_API_URL=url, WS_ENABLED="0")
        )

    def test_usage_over_the_limit_is_denied_with_the_reason(self):
        self.assertAnswer(
            self.cli("check", "customer-acme", "feature-api-calls", "--usage", "99999"),
            DENIED,
            "ACCESS DENIED  customer=customer-acme feature=feature-api-calls reason=REQUESTED_USAGE_EXCEEDING_LIMIT "
            "(metered: 1234 of 10000 used, requesting 99999)\n",
        )

    def test_enum_mismatch_is_denied(self):
        result = self.cli("check", "customer-acme", "feature-regions", "--values", "ap-south-1")
        self.assertEqual(result.returncode, DENIED)
        self.assertIn("reason=REQUESTED_VALUES_MISMATCH (enum: us-east-1, eu-west-1; requesting ap-south-1)", result.stdout)

    def test_state_shows_credits_and_customer_reasons(self):
        result = self.cli("state", "customer-acme")
        self.assertEqual(result.returncode, GRANTED)
        self.assertRegex(result.stdout, r"\nai-tokens +credit +granted +1200 of 5000 used, 3800 remaining +-\n")
        self.assertRegex(result.stdout, r"\nfeature-beta-ai +boolean +denied +- +REVOKED\n")
        self.assertAnswer(
            self.cli("state", "customer-no-subscription"),
            GRANTED,
            "customer=customer-no-subscription reason=NO_ACTIVE_SUBSCRIPTION\nno entitlements\n",
        )

    def test_report_usage_set_prints_current_usage(self):
        result = self.cli("report-usage", "customer-acme", "feature-seats", "9", "--set")
        self.assertEqual((result.returncode, result.stderr), (GRANTED, ""))
        self.assertRegex(result.stdout, r"\(set to 9\) measurement=\S+ current_usage=9\n$")

    def test_write_errors_keep_the_sidecar_code_and_message(self):
        result = self.cli("report-usage", "customer-acme", "feature-nope", "1")
        self.assertEqual((result.returncode, result.stdout), (ERROR, ""))
        self.assertRegex(result.stderr, r"^stigg-sidecar-cli: NOT_FOUND: .*feature-nope\n$")

    def test_reload_of_unknown_customer_exits_3(self):
        self.assertAnswer(
            self.cli("reload", "customer-nobody"),
            DENIED,
            "NOT FOUND  customer=customer-nobody (unknown to Stigg, or the reload failed)\n",
        )


class UnreachableTests(SynchronousTestCase):
    """Nothing listening: exit 1, one line on stderr, nothing on stdout, never a traceback."""

    def assertOneLine(self, result: subprocess.CompletedProcess, line: str) -> None:
        self.assertEqual((result.returncode, result.stdout, result.stderr), (ERROR, "", line + "\n"))

    def test_every_grpc_command_says_connection_refused(self):
        target = f"127.0.0.1:{closed_port()}"
        for command in (["check", "c", "f"], ["state", "c"], ["report-usage", "c", "f", "1"], ["reload", "c"]):
            for extra in ([], ["--json"]):
                self.assertOneLine(
                    run_cli("--target", target, *extra, *command),
                    f"stigg-sidecar-cli: cannot reach the sidecar at {target} (connection refused)",
                )

    def test_health_says_connection_refused(self):
        sidecar = shared_sidecar("cli-offline", base_env(OFFLINE="1", ENTITLEMENTS_FALLBACK=json.dumps(FALLBACKS)))
        http = f"127.0.0.1:{closed_port()}"
        self.assertOneLine(
            run_cli("--target", f"127.0.0.1:{sidecar.grpc_port}", "--http", http, "health"),
            f"stigg-sidecar-cli: cannot reach the sidecar's HTTP server at {http} (connection refused)",
        )

    def test_health_asks_the_target_not_only_the_http_port(self):
        # A live HTTP port does not make an unreachable --target healthy.
        sidecar = shared_sidecar("cli-offline", base_env(OFFLINE="1", ENTITLEMENTS_FALLBACK=json.dumps(FALLBACKS)))
        target = f"127.0.0.1:{closed_port()}"
        self.assertOneLine(
            run_cli("--target", target, "--http", f"127.0.0.1:{sidecar.http_port}", "health"),
            f"stigg-sidecar-cli: cannot reach the sidecar at {target} (connection refused)",
        )

    def test_silent_listener_times_out_within_timeout(self):
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            address = f"127.0.0.1:{silent.getsockname()[1]}"
            started = time.monotonic()
            grpc_result = run_cli("--timeout", "0.5", "--target", address, "check", "c", "f")
            sidecar = shared_sidecar("cli-offline", base_env(OFFLINE="1", ENTITLEMENTS_FALLBACK=json.dumps(FALLBACKS)))
            http_result = run_cli("--timeout", "0.5", "--target", f"127.0.0.1:{sidecar.grpc_port}", "--http", address, "health")
            elapsed = time.monotonic() - started
        self.assertOneLine(grpc_result, f"stigg-sidecar-cli: cannot reach the sidecar at {address} (no answer within 0.5s)")
        self.assertOneLine(
            http_result, f"stigg-sidecar-cli: cannot reach the sidecar's HTTP server at {address} (no answer within 0.5s)"
        )
        self.assertLess(elapsed, 20)

    def test_grpc_target_pointing_at_the_http_port_says_so(self):
        sidecar = shared_sidecar("cli-offline", base_env(OFFLINE="1", ENTITLEMENTS_FALLBACK=json.dumps(FALLBACKS)))
        target = f"127.0.0.1:{sidecar.http_port}"
        self.assertOneLine(
            run_cli("--target", target, "reload", "c"),
            f"stigg-sidecar-cli: cannot reach the sidecar at {target} (that port speaks HTTP/1.x, not gRPC)",
        )


class UsageErrorTests(SynchronousTestCase):
    def assertUsageError(self, *args: str, message: str) -> None:
        result = run_cli(*args)
        self.assertEqual((result.returncode, result.stdout), (USAGE, ""))
        self.assertTrue(result.stderr.startswith("usage: stigg-sidecar-cli"), result.stderr)
        self.assertIn(message, result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_missing_command(self):
        self.assertUsageError(message="the following arguments are required: COMMAND")

    def test_missing_feature(self):
        self.assertUsageError("check", "acme", message="the following arguments are required: FEATURE")

    def test_non_finite_usage(self):
        self.assertUsageError("check", "acme", "f", "--usage", "nan", message="argument --usage: must be a finite number")

    def test_zero_timeout(self):
        self.assertUsageError("--timeout", "0", "health", message="argument --timeout: must be more than 0 seconds")

    def test_help_lists_commands_and_exit_statuses(self):
        result = run_cli("--help")
        self.assertEqual(result.returncode, 0)
        for word in ("check", "state", "report-usage", "reload", "health", "exit status: 0"):
            self.assertIn(word, result.stdout)
