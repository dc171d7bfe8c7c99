"""`twistd -n stigg-emulator` as a real process: a bad data file stops start-up with one line and
no traceback; the example data is served on a free port to every configured key until SIGTERM,
which stops it cleanly.

Real sockets on 127.0.0.1 port 0; every wait is bounded.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import tempfile
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from tests.fixtures.data import EMULATOR_SEED as SEED
from tests.fixtures.paths import EXAMPLES, ROOT
from tests.fixtures.processes import DrainedProcess, twistd_command

WAIT = 5.0  # seconds: bound on any single network wait
EXAMPLE = str(EXAMPLES / "emulator-data.json")
LISTENING = r"stigg-emulator listening on (http://127\.0\.0\.1:\d+)"


class TwistdPluginTests(TestCase):
    timeout = 30

    def spawn(self, *args: str) -> DrainedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        command = twistd_command("stigg-emulator", *args, options=["--logfile=-"])
        process = DrainedProcess(command, env, cwd=Path(tempfile.gettempdir()))
        self.addCleanup(process.kill)
        return process

    async def test_bad_data_file_stops_start_up_with_one_line(self) -> None:
        data = copy.deepcopy(SEED)
        data["customers"]["acme"]["entitlements"][2]["feature"]["featureType"] = "NUMBR"
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as stream:
            json.dump(data, stream)
        process = self.spawn("--port", "0", "--data", path)
        exit_code = process.wait(20)
        output = process.text
        self.assertEqual(exit_code, 1)
        self.assertNotIn("Traceback", output)
        self.assertEqual(
            output.strip(),
            f"stigg-emulator: {path}: customers.acme.entitlements[2].feature.featureType: "
            "must be one of BOOLEAN, NUMBER, ENUM",
        )

    async def test_serves_the_example_on_a_free_port_and_stops_on_sigterm(self) -> None:
        process = self.spawn("--port", "0", "--data", EXAMPLE, "--api-key", "extra-key")
        url = process.wait_for(LISTENING, 20).group(1)
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        for key in ("local-dev-key", "extra-key"):
            response = await http.get(
                f"{url}/v1/c/customer-acme/entitlements-state.json?resourceId=site-main",
                headers=Headers({"X-API-KEY": [key]}),
            ).addTimeout(WAIT, reactor)
            body = await treq.json_content(response).addTimeout(WAIT, reactor)
            self.assertEqual(response.code, 200)
            (seats,) = body["data"]["entitlementsState"]["entitlementsV2"]
            self.assertEqual(seats["feature"]["refId"], "feature-seats")
        exit_status = process.stop(signal.SIGTERM, 20)
        # twistd stops cleanly, then re-raises SIGTERM on itself to report how it was stopped.
        self.assertIn(exit_status, [0, -signal.SIGTERM])
        self.assertIn("Server Shut Down.", process.text)
        self.assertEqual(process.text.count("stigg-emulator listening on"), 1)
        self.assertNotIn("Traceback", process.text)
