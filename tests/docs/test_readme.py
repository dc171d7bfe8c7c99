"""The README's configuration table names every setting with its real default."""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.settings import SPECS
from tests.fixtures.paths import ROOT


class ReadmeTests(SynchronousTestCase):
    def test_every_setting_is_documented_with_its_default(self):
        rows = {}
        for line in (ROOT / "README.md").read_text().splitlines():
            m = re.match(r"\| `([A-Z_]+)` \| (.*?) \|", line)
            if m:
                rows[m.group(1)] = m.group(2)
        self.assertEqual(set(rows), {spec.env for spec in SPECS})
        for spec in SPECS:
            if spec.default:
                self.assertEqual(rows[spec.env], f"`{spec.default}`", spec.env)

    def test_setup_commands_exist(self):
        text = (ROOT / "README.md").read_text()
        for script in ("scripts/run", "scripts/test"):
            self.assertIn(f"\n{script}\n", text)
            self.assertTrue((ROOT / script).stat().st_mode & 0o111, script)
        self.assertIn("exec scripts/test", (ROOT / ".ci/run").read_text())
