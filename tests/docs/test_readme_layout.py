"""The README's Layout names what the tree holds, and nothing it does not.

A package or top-level module added, moved or removed under stigg_sidecar/ (or a folder of tests/,
or a folder at the root) must show in the Layout, which is where a newcomer looks first: the
layout moved twice in one day and the README kept the old one.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from tests.fixtures.paths import ROOT


def layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("```\n", 2)[1]


def listed(block: str, under: str) -> set[str]:
    """The names listed indented under the line `under` (`stigg_sidecar/`, `tests/`), up to the
    next unindented line: `name/` and `name.py` entries (`cache/memory.py` lists `cache`)."""
    names: set[str] = set()
    inside = False
    for line in block.splitlines():
        if not line.startswith(" "):
            inside = line.startswith(under)
            continue
        m = re.match(r"  (\S+)", line)
        if inside and m:
            names.add(m.group(1).split("/")[0] if "/" in m.group(1) else m.group(1))
    return names


def roots(block: str) -> set[str]:
    return {line.split()[0].rstrip("/") for line in block.splitlines() if line and not line.startswith(" ")}


class ReadmeLayoutTests(SynchronousTestCase):
    def test_every_package_and_top_level_module_is_listed(self) -> None:
        package = ROOT / "stigg_sidecar"
        present = {p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
        present |= {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
        self.assertGreater(len(present), 15)  # the walk found the package
        self.assertEqual(listed(layout_block(), "stigg_sidecar/"), present)

    def test_every_folder_of_tests_is_listed(self) -> None:
        present = {p.name for p in (ROOT / "tests").iterdir() if (p / "__init__.py").exists()}
        self.assertIn("unit", present)
        listed_names = {name.split("/")[0] for name in listed(layout_block(), "tests/")}
        self.assertEqual(listed_names, present)

    def test_every_root_folder_listed_exists_and_the_main_ones_are_listed(self) -> None:
        named = roots(layout_block())
        for name in named:
            self.assertTrue((ROOT / name).is_dir(), f"the Layout lists {name}/, which is not a folder")
        for name in ("stigg_sidecar", "tests", "bench", "deploy", "scripts", "docs", "examples", "protos"):
            self.assertIn(name, named)

    def test_a_module_missing_from_the_layout_is_found(self) -> None:
        block = "stigg_sidecar/\n  tap.py   x\n  grpc/    y\n  cache/memory.py  z\ntests/\n  unit/<package>/ u\n"
        self.assertEqual(listed(block, "stigg_sidecar/"), {"tap.py", "grpc", "cache"})
        self.assertEqual(listed(block, "tests/"), {"unit"})
        self.assertEqual(roots(block), {"stigg_sidecar", "tests"})
