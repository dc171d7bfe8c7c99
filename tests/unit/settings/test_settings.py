"""Settings: names, defaults, parsing and the one-line messages of every validation error."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.entitlements.fallback import FallbackValues
from stigg_sidecar.settings import SPECS, SettingsError, default_cache_max_size_bytes, load_settings

KEY = "secret-api-key-value"


class DefaultsTests(SynchronousTestCase):
    def test_stigg_documented_defaults(self):
        s = load_settings({"SERVER_API_KEY": KEY})
        self.assertEqual(s.api_url, "https://api.stigg.io")
        self.assertTrue(s.edge_enabled)
        self.assertEqual(s.edge_api_url, "https://edge.api.stigg.io")
        self.assertTrue(s.ws_enabled)
        self.assertEqual(s.ws_url, "wss://api.stigg.io")
        self.assertEqual(s.redis_host, "localhost")
        self.assertEqual(s.redis_port, 6379)
        self.assertEqual(s.redis_db, 0)
        self.assertFalse(s.redis_tls)
        self.assertEqual(s.redis_keys_ttl_in_secs, 604800)
        self.assertEqual(s.port, 8443)
        self.assertEqual(s.http_port, 8080)
        self.assertEqual(s.health_endpoint_url, "livez")
        self.assertEqual(s.ready_endpoint_url, "readyz")
        self.assertEqual(s.entitlements_fallback, {})
        self.assertFalse(s.offline)
        self.assertFalse(s.redis_enabled)
        self.assertEqual(s.log_level, "info")
        self.assertEqual(s.cache_max_size_bytes, default_cache_max_size_bytes())

    def test_default_cache_size_is_half_of_a_real_limit(self):
        size = default_cache_max_size_bytes()
        self.assertGreater(size, 0)
        import os

        self.assertLessEqual(size, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)

    def test_every_setting_has_an_option_name(self):
        options = {spec.option for spec in SPECS}
        self.assertIn("server-api-key", options)
        self.assertIn("entitlements-fallback", options)
        self.assertEqual(len(options), len(SPECS))


class ParsingTests(SynchronousTestCase):
    def test_booleans_accept_the_usual_words(self):
        for text, expected in [("1", True), ("true", True), ("YES", True), ("0", False), ("false", False), ("no", False)]:
            s = load_settings({"SERVER_API_KEY": KEY, "EDGE_ENABLED": text})
            self.assertEqual(s.edge_enabled, expected, text)

    def test_offline_needs_no_key(self):
        self.assertTrue(load_settings({"OFFLINE": "true"}).offline)

    def test_option_overrides_environment(self):
        s = load_settings({"SERVER_API_KEY": KEY, "PORT": "1234"}, {"PORT": "4321"})
        self.assertEqual(s.port, 4321)

    def test_unset_option_leaves_environment(self):
        s = load_settings({"SERVER_API_KEY": KEY, "PORT": "1234"}, {"PORT": None})
        self.assertEqual(s.port, 1234)

    def test_fallback_is_parsed(self):
        s = load_settings({"OFFLINE": "1", "ENTITLEMENTS_FALLBACK": '{"f": {"hasAccess": true, "value": 3}}'})
        self.assertEqual(s.entitlements_fallback, {"f": FallbackValues(has_access=True, value=3)})

    def test_key_is_not_in_repr(self):
        self.assertNotIn(KEY, repr(load_settings({"SERVER_API_KEY": KEY, "REDIS_PASSWORD": "pw-secret"})))
        self.assertNotIn("pw-secret", repr(load_settings({"SERVER_API_KEY": KEY, "REDIS_PASSWORD": "pw-secret"})))
        self.assertNotIn("pw-sentinel", repr(load_settings({"SERVER_API_KEY": KEY, "REDIS_SENTINEL_PASSWORD": "pw-sentinel"})))


class SecretFileTests(SynchronousTestCase):
    def test_sentinel_password_from_a_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("pw-from-file\n")
        s = load_settings({"SERVER_API_KEY": KEY, "REDIS_SENTINEL_PASSWORD_FILE": path})
        self.assertEqual(s.redis_sentinel_password, "pw-from-file")
        self.assertNotIn("pw-from-file", repr(s))


class ValidationMessageTests(SynchronousTestCase):
    def message(self, env):
        with self.assertRaises(SettingsError) as caught:
            load_settings(env)
        text = str(caught.exception)
        self.assertNotIn("\n", text)
        self.assertNotIn(KEY, text)
        return text

    def test_missing_key(self):
        self.assertEqual(self.message({}), "SERVER_API_KEY (or SERVER_API_KEY_FILE) is required unless OFFLINE is set")

    def test_unparsable_number_names_the_setting(self):
        self.assertEqual(
            self.message({"SERVER_API_KEY": KEY, "PORT": "eighty"}), "PORT: must be a whole number, got 'eighty'"
        )

    def test_out_of_range_port(self):
        self.assertEqual(self.message({"SERVER_API_KEY": KEY, "PORT": "70000"}), "PORT: must be at most 65535, got 70000")

    def test_bad_boolean(self):
        self.assertEqual(
            self.message({"SERVER_API_KEY": KEY, "WS_ENABLED": "maybe"}),
            "WS_ENABLED: must be one of 1/0, true/false, yes/no",
        )

    def test_malformed_fallback_json(self):
        self.assertIn("ENTITLEMENTS_FALLBACK: not valid JSON", self.message({"OFFLINE": "1", "ENTITLEMENTS_FALLBACK": "{nope"}))

    def test_fallback_with_bad_value_names_the_place(self):
        self.assertEqual(
            self.message({"OFFLINE": "1", "ENTITLEMENTS_FALLBACK": '{"seats": {"hasAccess": "yes"}}'}),
            "ENTITLEMENTS_FALLBACK: seats.hasAccess: must be true or false",
        )

    def test_fallback_that_is_not_an_object(self):
        self.assertIn("must be a JSON object", self.message({"OFFLINE": "1", "ENTITLEMENTS_FALLBACK": "[1]"}))
        # The setting named once, not "ENTITLEMENTS_FALLBACK: ENTITLEMENTS_FALLBACK: ...".
        self.assertEqual(self.message({"OFFLINE": "1", "ENTITLEMENTS_FALLBACK": "[1]"}),
                         "ENTITLEMENTS_FALLBACK: must be a JSON object of featureId -> values")
        self.assertEqual(self.message({"OFFLINE": "1", "ENTITLEMENTS_FALLBACK": '{"": {}}'}),
                         "ENTITLEMENTS_FALLBACK: a feature id is empty")

    def test_bad_url(self):
        self.assertIn("API_URL: must be a http/https URL", self.message({"SERVER_API_KEY": KEY, "API_URL": "ftp://x"}))

    def test_bad_log_level(self):
        self.assertIn("LOG_LEVEL: must be one of", self.message({"OFFLINE": "1", "LOG_LEVEL": "loud"}))

    def test_same_ports(self):
        self.assertIn("HTTP_PORT must differ from PORT", self.message({"OFFLINE": "1", "PORT": "9000", "HTTP_PORT": "9000"}))
