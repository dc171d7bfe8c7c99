"""scripts/venv on a machine whose python3 cannot make virtual environments (Debian or Ubuntu
without python3-venv): one line naming the package, nothing half-made left behind; and a .venv an
earlier run left without pip is made again instead of failing "No module named pip".

The script runs in a copy of its own small tree (never on this checkout's .venv), with a python3
that fails `-m venv` as Debian's does without python3-venv: after making the directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.fixtures.paths import ROOT

DEBIAN_PYTHON_WITHOUT_VENV = f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  "{sys.executable}" -m venv --without-pip "$3"
  echo "The virtual environment was not created successfully because ensurepip is not"
  echo "available.  On Debian/Ubuntu systems, you need to install the python3-venv"
  echo "package using the following command."
  echo ""
  echo "    apt install python3.11-venv"
  exit 1
fi
exec "{sys.executable}" "$@"
"""

ONE_LINE = ("scripts/venv: {python} cannot make a virtual environment; on Debian or Ubuntu install python3-venv"
            " (sudo apt-get install python3-venv) and run this again")


class VenvScriptTests(SynchronousTestCase):
    def setUp(self):
        self.tree = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tree)
        (self.tree / "scripts").mkdir()
        shutil.copy(ROOT / "scripts" / "venv", self.tree / "scripts" / "venv")
        for name in ("pyproject.toml", "requirements.lock", "requirements-dev.lock"):
            (self.tree / name).write_text("")
        for name in ("stigg_sidecar", "twisted"):
            (self.tree / name).mkdir()
        self.python = self.tree / "python3-without-venv"
        self.python.write_text(DEBIAN_PYTHON_WITHOUT_VENV)
        self.python.chmod(0o755)

    def run_venv(self) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.tree / "scripts" / "venv")], env={"PATH": "/usr/bin:/bin",
                              "PYTHON": str(self.python)}, capture_output=True, text=True, timeout=120)

    def test_without_python3_venv_one_line_names_the_package_and_nothing_is_left(self):
        result = self.run_venv()
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.splitlines(), [ONE_LINE.format(python=self.python)])
        self.assertFalse((self.tree / ".venv").exists())

    def test_a_half_made_venv_is_made_again_not_used(self):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.tree / ".venv")], check=True,
                       timeout=120)
        result = self.run_venv()
        self.assertNotIn("No module named pip", result.stderr)
        self.assertEqual(result.stderr.splitlines(), [
            "scripts/venv: .venv is incomplete (no pip in it); making it again",
            ONE_LINE.format(python=self.python),
        ])
        self.assertFalse((self.tree / ".venv").exists())
