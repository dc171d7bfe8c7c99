"""The dependency locks agree with pyproject.toml: every dependency (and each extra's) is pinned
with `==` to a version its specifier allows, and the dev lock keeps the runtime lock's pins.
A dependency added to pyproject.toml without refreshing the locks (README, "Dependencies")
fails here instead of in a fresh CI machine's install."""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from twisted.trial.unittest import SynchronousTestCase

from tests.fixtures.paths import ROOT


def pins(name: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            if spec.operator != "==":
                raise AssertionError(f"{name}: {line!r} is not pinned with ==")
            found[canonicalize_name(requirement.name)] = spec.version
    return found


class LockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        self.runtime = pins("requirements.lock")
        self.dev = pins("requirements-dev.lock")

    def assertPinned(self, requirements: list[str], lock: dict[str, str], lock_name: str) -> None:
        for text in requirements:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            self.assertIn(name, lock, f"{requirement.name} is not in {lock_name}: refresh the locks")
            self.assertTrue(
                requirement.specifier.contains(lock[name], prereleases=True),
                f"{lock_name} pins {name}=={lock[name]}, outside {requirement.specifier}",
            )

    def test_runtime_dependencies_are_pinned(self):
        self.assertPinned(self.project["dependencies"], self.runtime, "requirements.lock")

    def test_dev_lock_pins_runtime_test_and_lint(self):
        extras = self.project["optional-dependencies"]
        self.assertPinned(self.project["dependencies"] + extras["test"] + extras["lint"], self.dev, "requirements-dev.lock")

    def test_dev_lock_keeps_the_runtime_pins(self):
        self.assertEqual({n: v for n, v in self.dev.items() if n in self.runtime}, self.runtime)
