"""Start-up as an operator meets it, with real `twistd stigg-sidecar` processes: `--version`, the
first log line (version and mode), boolean options as flags, secrets read from files, one line and a
non-zero exit for a port that cannot be bound, and no traceback in any start-up error."""

from __future__ import annotations

import os
import re
import socket

from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

import stigg_sidecar
from stigg_sidecar.process.logs import is_library_chatter
from stigg_sidecar.process.startup import mode_summary
from stigg_sidecar.settings import SettingsError, load_settings
from stigg_sidecar.tap import flags_as_values
from tests.fixtures.processes import SidecarProcess, base_env, run_twistd

KEY = "sk-from-a-file-never-printed"
PASSWORD = "redis-pass-from-a-file-never-printed"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(**more: str) -> dict[str, str]:
    return base_env(OFFLINE="1", **more)


class StartupTestCase(SynchronousTestCase):
    def assertOneLineFailure(self, result, line: str) -> None:
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        # Exactly one line says what is wrong, on stderr, prefixed with the program's name.
        self.assertEqual([text for text in result.stderr.splitlines() if text.strip()], [f"stigg-sidecar: {line}"], output)
        for secret in (KEY, PASSWORD):
            self.assertNotIn(secret, output)


class VersionTests(SynchronousTestCase):
    def test_version_names_the_sidecar_grpcio_and_twisted(self):
        result = run_twistd("stigg-sidecar", base_env(), "--version")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(
            result.stdout,
            rf"^stigg-sidecar {re.escape(stigg_sidecar.__version__)} \(grpcio [0-9.]+, Twisted [0-9.]+, Python [0-9.]+\)\n$",
        )

    def test_first_log_line_says_version_and_offline_mode(self):
        sidecar = SidecarProcess(offline_env())
        try:
            first = sidecar.output[0]
        finally:
            self.assertEqual(sidecar.stop(), 0)
        self.assertIn(f"stigg-sidecar {stigg_sidecar.__version__} starting, offline", first)

    def test_first_log_line_says_online_mode_with_what(self):
        api = f"http://127.0.0.1:{closed_port()}"
        sidecar = SidecarProcess(base_env(SERVER_API_KEY=KEY, API_URL=api, EDGE_API_URL=api, WS_ENABLED="0"))
        try:
            first = sidecar.output[0]
        finally:
            sidecar.stop()
        self.assertIn(
            f"stigg-sidecar {stigg_sidecar.__version__} starting, online: Edge, socket off (polling), Redis off", first
        )
        self.assertNotIn(KEY, sidecar.text)

    def test_mode_summary_names_redis_and_graphql(self):
        settings = load_settings(
            {"SERVER_API_KEY": KEY, "EDGE_ENABLED": "0", "REDIS_ENVIRONMENT_PREFIX": "p", "REDIS_HOST": "cache"}
        )
        self.assertEqual(
            mode_summary(settings), "online: GraphQL (Edge off), socket on, Redis cache:6379, spool off"
        )


class QuietLogTests(SynchronousTestCase):
    def test_library_info_lines_are_chatter_but_ours_and_shutdown_signals_are_not(self):
        self.assertTrue(is_library_chatter({"log_level": LogLevel.info, "log_namespace": "log_legacy",
                                            "log_format": "Starting factory {factory!r}"}))
        self.assertTrue(is_library_chatter({"log_level": LogLevel.info,
                                            "log_namespace": "twisted.application.internet.ClientService",
                                            "log_format": "Scheduling retry {attempt} to connect {endpoint} in {delay} seconds."}))
        self.assertFalse(is_library_chatter({"log_level": LogLevel.info, "log_namespace": "stigg_sidecar.ops.web",
                                             "log_format": "HTTP listening"}))
        self.assertFalse(is_library_chatter({"log_level": LogLevel.info, "log_namespace": "twisted.internet.base",
                                             "log_format": "Received SIGTERM, shutting down."}))
        self.assertFalse(is_library_chatter({"log_level": LogLevel.warn, "log_namespace": "log_legacy",
                                             "log_format": "something went wrong"}))

    def test_an_offline_start_and_stop_says_only_what_an_operator_needs(self):
        sidecar = SidecarProcess(offline_env())
        self.assertEqual(sidecar.stop(), 0)
        messages = [re.sub(r"^\S+ \[[^\]]*\] ", "", line).rstrip("\n") for line in sidecar.output]
        self.assertEqual(messages[0].split(",")[0], f"stigg-sidecar {stigg_sidecar.__version__} starting")
        self.assertEqual(
            [re.sub(r"\d+", "N", m) for m in messages[1:]],
            [
                "HTTP listening on N.N.N.N:N",
                "gRPC listening on N.N.N.N:N",
                "Ready",
                "stigg-sidecar running",
                "Received SIGTERM, shutting down.",
                "Not ready: shutting down",
                "Stopping",
                "gRPC stopping: GOAWAY, new calls refused, N.Ns for in-flight ones",
                "gRPC stopped",
                "stigg-sidecar stopped in N.Ns (SHUTDOWN_GRACE_SECS Ns)",
            ],
        )

    def test_debug_still_shows_the_library_lines(self):
        sidecar = SidecarProcess(offline_env(LOG_LEVEL="debug"))
        self.assertEqual(sidecar.stop(), 0)
        self.assertIn("twistd", sidecar.text)
        self.assertIn("starting up", sidecar.text)


class BooleanFlagTests(StartupTestCase):
    def test_rewriting(self):
        self.assertEqual(flags_as_values(["--offline"]), ["--offline=1"])
        self.assertEqual(flags_as_values(["--no-offline"]), ["--offline=0"])
        self.assertEqual(flags_as_values(["--offline", "0", "--port=1"]), ["--offline=0", "--port=1"])
        self.assertEqual(flags_as_values(["--offline", "--port", "5"]), ["--offline=1", "--port", "5"])
        self.assertEqual(flags_as_values(["--offline=yes"]), ["--offline=yes"])
        self.assertEqual(flags_as_values(["--port", "5"]), ["--port", "5"])

    def test_offline_as_a_flag_starts_offline_without_a_key(self):
        sidecar = SidecarProcess(base_env(), "--offline")
        try:
            self.assertIn("starting, offline", sidecar.output[0])
        finally:
            self.assertEqual(sidecar.stop(), 0)

    def test_no_flag_turns_a_variable_off(self):
        result = run_twistd("stigg-sidecar", base_env(OFFLINE="1"), "--no-offline")
        self.assertOneLineFailure(result, "SERVER_API_KEY (or SERVER_API_KEY_FILE) is required unless OFFLINE is set")

    def test_flag_with_a_bad_value_names_the_setting(self):
        result = run_twistd("stigg-sidecar", base_env(), "--offline=perhaps")
        self.assertOneLineFailure(result, "OFFLINE: must be one of 1/0, true/false, yes/no")


class SecretFileTests(StartupTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_values_are_read_from_the_files_and_trailing_newlines_dropped(self):
        settings = load_settings({
            "SERVER_API_KEY_FILE": self.write("key", KEY + "\n"),
            "REDIS_PASSWORD_FILE": self.write("password", PASSWORD + "\r\n"),
        })
        self.assertEqual((settings.server_api_key, settings.redis_password), (KEY, PASSWORD))
        self.assertNotIn(KEY, repr(settings))
        self.assertNotIn(PASSWORD, repr(settings))

    def test_an_option_names_the_file_too(self):
        settings = load_settings({}, {"SERVER_API_KEY_FILE": self.write("key", KEY)})
        self.assertEqual(settings.server_api_key, KEY)

    def test_value_and_file_together_is_an_error(self):
        with self.assertRaises(SettingsError) as caught:
            load_settings({"SERVER_API_KEY": KEY, "SERVER_API_KEY_FILE": self.write("key", KEY)})
        self.assertEqual(str(caught.exception), "SERVER_API_KEY and SERVER_API_KEY_FILE are both set; set one of them")

    def test_missing_file_is_one_line(self):
        missing = os.path.join(self.dir, "nope")
        result = run_twistd("stigg-sidecar", base_env(SERVER_API_KEY_FILE=missing))
        self.assertOneLineFailure(result, f"SERVER_API_KEY_FILE: {missing} does not exist")

    def test_unreadable_file_is_one_line(self):
        # Root reads any file whatever its mode: a directory is unreadable as a file for everyone.
        result = run_twistd("stigg-sidecar", base_env(OFFLINE="1", REDIS_PASSWORD_FILE=self.dir))
        self.assertOneLineFailure(result, f"REDIS_PASSWORD_FILE: {self.dir} is a directory, not a file")
        if os.geteuid() != 0:
            path = self.write("locked", PASSWORD)
            os.chmod(path, 0)
            result = run_twistd("stigg-sidecar", base_env(OFFLINE="1", REDIS_PASSWORD_FILE=path))
            self.assertOneLineFailure(result, f"REDIS_PASSWORD_FILE: {path} is not readable by this process")

    def test_empty_file_is_one_line(self):
        path = self.write("empty", "\n")
        result = run_twistd("stigg-sidecar", base_env(SERVER_API_KEY_FILE=path))
        self.assertOneLineFailure(result, f"SERVER_API_KEY_FILE: {path} is empty")

    def test_values_from_files_are_never_logged_even_at_debug(self):
        # Stigg and Redis are ports nothing listens on: the key and password are used (and fail).
        api = f"http://127.0.0.1:{closed_port()}"
        sidecar = SidecarProcess(base_env(
            SERVER_API_KEY_FILE=self.write("key", KEY), API_URL=api, EDGE_API_URL=api, WS_ENABLED="0",
            REDIS_ENVIRONMENT_PREFIX="test", REDIS_HOST="127.0.0.1", REDIS_PORT=str(closed_port()),
            REDIS_PASSWORD_FILE=self.write("password", PASSWORD), LOG_LEVEL="debug",
        ))
        sidecar.stop()
        self.assertIn("Redis", sidecar.text)
        self.assertNotIn(KEY, sidecar.text)
        self.assertNotIn(PASSWORD, sidecar.text)


class BindErrorTests(StartupTestCase):
    def setUp(self) -> None:
        self.taken = socket.socket()
        self.taken.bind(("127.0.0.1", 0))
        self.taken.listen()
        self.addCleanup(self.taken.close)
        self.port = self.taken.getsockname()[1]

    def test_busy_grpc_port(self):
        result = run_twistd("stigg-sidecar", offline_env(PORT=str(self.port)))
        self.assertOneLineFailure(result, f"PORT: 127.0.0.1:{self.port} is already in use")
        self.assertNotIn("add_port", result.stdout + result.stderr)  # grpcio's own C-level line

    def test_busy_http_port(self):
        result = run_twistd("stigg-sidecar", offline_env(HTTP_PORT=str(self.port)))
        self.assertOneLineFailure(result, f"HTTP_PORT: 127.0.0.1:{self.port} is already in use")

    def test_busy_port_given_as_an_option_online(self):
        result = run_twistd("stigg-sidecar", base_env(SERVER_API_KEY=KEY, API_URL="http://127.0.0.1:9"),
                            f"--port={self.port}")
        self.assertOneLineFailure(result, f"PORT: 127.0.0.1:{self.port} is already in use")

    def test_address_not_on_this_machine(self):
        # 192.0.2.0/24 is TEST-NET-1: never assigned to a host; only bind() is tried, nothing is sent.
        result = run_twistd("stigg-sidecar", offline_env(BIND_ADDRESS="192.0.2.1"))
        self.assertOneLineFailure(
            result, "HTTP_PORT: 192.0.2.1:0 cannot be bound: BIND_ADDRESS is not an address of this machine"
        )
