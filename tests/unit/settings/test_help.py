"""`twistd stigg-sidecar --help`: each option's line names its variable and its default once.

tap.py appends `[env NAME; default: ...]` to every setting's help from the settings table; a
help text that also spelled out its own default showed it twice, in two wordings.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.settings import SPECS
from stigg_sidecar.tap import Options


class OptionHelpTests(SynchronousTestCase):
    def test_each_option_names_its_variable_and_default_once(self) -> None:
        helps = {option: str(text) for option, _short, _default, text in Options.optParameters}
        self.assertEqual(set(helps), {spec.option for spec in SPECS})
        for spec in SPECS:
            text = helps[spec.option]
            self.assertEqual(text.count("default:"), 1, f"--{spec.option}: {text}")
            self.assertEqual(text.count(f"env {spec.env};"), 1, f"--{spec.option}: {text}")
            if spec.default:
                self.assertIn(f"default: {spec.default}", text)

    def test_computed_defaults_are_said_in_words(self) -> None:
        helps = {option: str(text) for option, _short, _default, text in Options.optParameters}
        self.assertIn("default: half the available memory]", helps["cache-max-size-bytes"])
        self.assertIn("default: BIND_ADDRESS]", helps["http-bind-address"])
        self.assertIn(
            "default: MAX_WAITING_READS + MAX_WAITING_WRITES + GRPC_MAX_WORKERS]",
            helps["grpc-max-concurrent-streams"],
        )
