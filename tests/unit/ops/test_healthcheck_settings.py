"""The container's HEALTHCHECK (`python -m stigg_sidecar.healthcheck`) with a bad setting: exit 1
and one line that names the setting."""

from __future__ import annotations

import contextlib
import io

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar import healthcheck


class HealthcheckSettingsTests(SynchronousTestCase):
    def check(self, environ: dict[str, str]) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = healthcheck.main(environ, timeout=0.5)
        return code, err.getvalue()

    def test_a_bad_port_is_named(self):
        self.assertEqual(self.check({"HTTP_PORT": "x"}),
                         (1, "stigg-sidecar healthcheck: bad setting: HTTP_PORT: must be a whole number, got 'x'\n"))

    def test_a_port_out_of_range_is_named(self):
        code, line = self.check({"HTTP_PORT": "70000"})
        self.assertEqual(code, 1)
        self.assertTrue(line.startswith("stigg-sidecar healthcheck: bad setting: HTTP_PORT: must be at most 65535"), line)
