"""The settings table (SPECS: names, default texts, parsers) and the `Settings` dataclass agree.

Defaults live in the table; `Settings`' own field defaults are what code gets from `Settings()`
(tests, benchmarks, in-process users). These tests make the two provably the same, field by field,
so a default changed in one place and not the other fails here. The README's table is checked
against SPECS by tests/docs/test_readme.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.settings import SPECS, Settings, default_cache_max_size_bytes, load_settings

KEY = "settings-defaults-test-key"


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise AssertionError(f"Settings.{f.name} has no default")


class SettingsDefaultsTests(SynchronousTestCase):
    def test_every_setting_is_a_field_and_every_field_a_setting(self) -> None:
        fields = {f.name for f in dataclasses.fields(Settings)}
        self.assertEqual(fields, {spec.attribute for spec in SPECS})

    def test_each_field_default_is_the_tables_default_parsed(self) -> None:
        fields = {f.name: f for f in dataclasses.fields(Settings)}
        compared = 0
        for spec in SPECS:
            if spec.default is None:
                continue  # computed by load_settings: checked below
            expected = spec.parse(spec.default)
            actual = _field_default(fields[spec.attribute])
            self.assertEqual(actual, expected, spec.env)
            self.assertIs(type(actual), type(expected), spec.env)
            compared += 1
        # Every table entry but the four without a default text (the key, and three computed ones).
        self.assertEqual(compared, len(SPECS) - 4)

    def test_a_bare_settings_is_what_an_empty_environment_loads(self) -> None:
        loaded = load_settings({"SERVER_API_KEY": KEY})
        self.assertEqual(dataclasses.replace(loaded, server_api_key=None), Settings())
        self.assertIsNone(Settings().server_api_key)

    def test_the_computed_defaults(self) -> None:
        settings = Settings()
        self.assertEqual(
            settings.grpc_max_concurrent_streams,
            settings.max_waiting_reads + settings.max_waiting_writes + settings.grpc_max_workers,
        )
        self.assertEqual(settings.cache_max_size_bytes, default_cache_max_size_bytes())
        self.assertGreater(settings.cache_max_size_bytes, 0)
        self.assertEqual(settings.http_bind_address, settings.bind_address)
        self.assertEqual(load_settings({"OFFLINE": "1", "BIND_ADDRESS": "10.0.0.7"}).http_bind_address, "10.0.0.7")
        without_default = {spec.env for spec in SPECS if spec.default is None}
        self.assertEqual(
            without_default,
            {"SERVER_API_KEY", "CACHE_MAX_SIZE_BYTES", "GRPC_MAX_CONCURRENT_STREAMS", "HTTP_BIND_ADDRESS"},
        )
