"""Every repository path that README.md and deploy/README.md name exists.

A path is a word in backticks or a Markdown link target that looks like one, relative to the
document's folder or to the repository's root: a file name with a known extension, or words with a
slash whose first part is a folder there (`deploy/kubernetes.yaml` is checked; `http/protobuf` is
not a path). Words that only look like paths are left out: absolute paths (inside a container),
URLs and domain names (`cert-manager.io/v1`), paths under a setting (`STATE_DIR/lock`) or a shell
variable, and what exists only once a command ran (`.venv/`)."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.fixtures.paths import ROOT

DOCUMENTS = [ROOT / "README.md", ROOT / "deploy" / "README.md"]
_EXTENSIONS = (".py", ".yaml", ".yml", ".json", ".md", ".lock", ".toml", ".proto", ".ini", ".js", ".cfg")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_CANDIDATE = re.compile(r"`([^`\s]+)`|\]\(([^)\s#]+)\)")
_PATH = re.compile(r"[A-Za-z0-9_.\-/]+")


def looks_like_a_repository_path(word: str, folders: tuple[Path, ...] = (ROOT,)) -> bool:
    if not _PATH.fullmatch(word) or word.startswith("/") or "//" in word:
        return False
    first = word.split("/")[0]
    if "." in first.strip(".") and not first.endswith(_EXTENSIONS):  # a domain name, or a module path
        return False
    if first.isupper() or first == ".venv":  # STATE_DIR/..., or made by scripts/venv
        return False
    if word.endswith(_EXTENSIONS):
        return True
    return "/" in word and any((folder / first).is_dir() for folder in folders)


def mentioned_paths(document: Path) -> list[str]:
    text = _FENCE.sub("", document.read_text())
    words = {w.rstrip(".,:;") for a, b in _CANDIDATE.findall(text) for w in [a or b]}
    return sorted(w for w in words if looks_like_a_repository_path(w, (document.parent, ROOT)))


class MentionedPathsTests(SynchronousTestCase):
    def test_every_path_the_readmes_mention_exists(self):
        for document in DOCUMENTS:
            paths = mentioned_paths(document)
            self.assertGreater(len(paths), 10, document)
            missing = [p for p in paths if not ((document.parent / p).exists() or (ROOT / p).exists())]
            self.assertEqual(missing, [], f"{document.relative_to(ROOT)} names paths that do not exist")

    def test_what_counts_as_a_path(self):
        for word in ("deploy/compose.yaml", "../Dockerfile", "kubernetes/overlays/sidecar", "pyproject.toml",
                     ".ci/run", "scripts/test"):
            self.assertTrue(looks_like_a_repository_path(word, (ROOT / "deploy", ROOT)), word)
        for word in ("cert-manager.io/v1", "app.kubernetes.io/name", "/var/lib/stigg-sidecar", "STATE_DIR/lock",
                     "localhost:8443", ".venv/bin/stigg-sidecar-cli", "grpc.health.v1", "tls.crt", "$STATE_DIR/x",
                     "http/protobuf"):
            self.assertFalse(looks_like_a_repository_path(word, (ROOT / "deploy", ROOT)), word)

    def test_a_missing_path_is_found(self):
        # the slip this test is for: the README once pointed to deploy/kubernetes.yaml
        self.assertFalse((ROOT / "deploy" / "kubernetes.yaml").exists())
        self.assertTrue(looks_like_a_repository_path("deploy/kubernetes.yaml"))
