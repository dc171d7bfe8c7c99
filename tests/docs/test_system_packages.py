"""The test command installs all the suite runs: scripts/system-packages is the one list of the
programs tests start as real processes, scripts/test and .ci/run both install from it, and a
machine without apt-get is told in one line what to install."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.fixtures.paths import ROOT
from tests.fixtures.tools import require_tool, system_packages

# Commands tests look up: shutil.which("x"), require_tool("x", ...), and the fixtures' tool tuples.
_LOOKUPS = re.compile(r"""(?:which|require_tools?)\(\s*((?:"[^"]+"\s*,?\s*)+)\)|TOOLS = \(((?:"[^"]+"\s*,?\s*)+)\)""")


def commands_tests_need() -> set[str]:
    found: set[str] = set()
    paths = [path for path in (ROOT / "tests").rglob("*.py") if path.resolve() != Path(__file__).resolve()]
    for path in paths:
        for match in _LOOKUPS.finditer(path.read_text()):
            found.update(re.findall(r'"([^"]+)"', match.group(1) or match.group(2)))
    for path in paths:  # loops over a tuple of tool names
        for match in re.finditer(r"for tool in \(((?:\"[^\"]+\"\s*,?\s*)+)\)", path.read_text()):
            found.update(re.findall(r'"([^"]+)"', match.group(1)))
    return found


class SystemPackagesTests(SynchronousTestCase):
    def test_every_program_a_test_looks_up_is_listed_with_its_package(self):
        needed = commands_tests_need()
        self.assertTrue({"redis-server", "h2load", "node"} <= needed, needed)  # the scan finds them
        self.assertEqual(sorted(needed - set(system_packages())), [])

    def test_the_test_command_and_ci_install_from_the_one_list(self):
        for script in ("scripts/test", ".ci/run"):
            text = (ROOT / script).read_text()
            self.assertIn("scripts/install-system-packages", text, script)
            self.assertNotIn("apt-get install", text, script)

    def test_without_apt_get_one_line_names_what_to_install(self):
        with tempfile.TemporaryDirectory() as tmp:
            listed = Path(tmp) / "packages"
            listed.write_text("# comment\nno-such-command-here  some-debian-package  # why\nsh  dash\n")
            bin_dir = Path(tmp) / "bin"
            bin_dir.mkdir()
            for tool in ("dirname", "id", "sh"):
                (bin_dir / tool).symlink_to(require_tool(tool)[0])
            result = subprocess.run(
                [require_tool("bash")[0], str(ROOT / "scripts" / "install-system-packages")],
                env={"PATH": str(bin_dir), "SYSTEM_PACKAGES_FILE": str(listed), "HOME": os.environ.get("HOME", "/")},
                capture_output=True, text=True, timeout=30,
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr.splitlines(), [
            "scripts/install-system-packages: no apt-get here; install these (Debian names) for the whole suite:"
            " some-debian-package"
        ])

    def test_a_missing_program_fails_under_ci_and_names_its_package(self):
        saved = os.environ.get("CI")
        os.environ["CI"] = "1"
        try:
            with self.assertRaises(AssertionError) as caught:
                require_tool("no-such-command-here")
        finally:
            if saved is None:
                del os.environ["CI"]
            else:
                os.environ["CI"] = saved
        self.assertIn("not on PATH", str(caught.exception))
