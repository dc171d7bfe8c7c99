"""Settings: every knob of the sidecar, read from the environment or twistd options, validated once.

Owns the names, types, defaults and validation messages of the configuration. Produces one frozen
`Settings`; nothing else in the project reads os.environ. A bad value raises `SettingsError`, whose
message names the setting and what is wrong and never contains a secret's value.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast
from urllib.parse import urlsplit

from stigg_sidecar.entitlements.fallback import FallbackError, FallbackValues, parse_entitlements_fallback
from stigg_sidecar.lifecycle.files import UnreadableFile, read_text

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("text", "json")


class SettingsError(ValueError):
    """A setting has a bad value. The message is one line, safe to print."""


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no")


def _parse_int(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, got {text.strip()!r}") from None
        if low is not None and value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise ValueError(f"must be at most {high}, got {value}")
        return value

    return parse


def _parse_seconds(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {text.strip()!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a non-negative number of seconds, got {text.strip()!r}")
    return value


def _parse_positive_seconds(text: str) -> float:
    value = _parse_seconds(text)
    if value == 0:
        raise ValueError("must be more than 0 seconds")
    return value


def _parse_str(text: str) -> str:
    return text.strip()


def _parse_host_ports(text: str) -> tuple[tuple[str, int], ...]:
    """`host:port` items separated by commas (or spaces); `[::1]:26379` for an IPv6 host."""
    found = []
    for item in text.replace(",", " ").split():
        host, sep, port = item.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port items separated by commas, got {item!r}")
        found.append((host, int(port)))
    return tuple(found)


def _parse_url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        url = text.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"must be a {'/'.join(schemes)} URL with a host, got {url!r}")
        return url

    return parse


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text.strip()!r}")
        return value

    return parse


def _parse_path(text: str) -> str:
    path = text.strip().strip("/")
    if not path or any(c in path for c in "?# "):
        raise ValueError(f"must be a URL path such as 'livez', got {text.strip()!r}")
    return path


def _parse_fallback(text: str) -> Mapping[str, FallbackValues]:
    try:
        return parse_entitlements_fallback(text)
    except FallbackError as e:
        raise ValueError(str(e)) from None


def default_cache_max_size_bytes() -> int:
    """Half of the memory this process may use: the cgroup limit when there is one, else RAM."""
    limits = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) // 2


@dataclass(frozen=True)
class Spec(Generic[T]):
    """One setting: its environment variable, default text, parser and help line."""

    env: str
    default: str | None
    parse: Callable[[str], T]
    help: str
    secret: bool = False

    @property
    def option(self) -> str:
        return self.env.lower().replace("_", "-")

    @property
    def attribute(self) -> str:
        return self.env.lower()


SPECS: tuple[Spec, ...] = (
    Spec("SERVER_API_KEY", None, _parse_str, "Stigg server API key (required unless OFFLINE)", secret=True),
    Spec("SERVER_API_KEY_FILE", "", _parse_str, "file holding the Stigg server API key (instead of SERVER_API_KEY)"),
    Spec("OFFLINE", "0", parse_bool, "answer from fallbacks only, never touch the network"),
    Spec("API_URL", "https://api.stigg.io", _parse_url(("http", "https")), "Stigg API base URL (GraphQL at /graphql)"),
    Spec("EDGE_ENABLED", "1", parse_bool, "fetch entitlements from Stigg's Edge API"),
    Spec("EDGE_API_URL", "https://edge.api.stigg.io", _parse_url(("http", "https")), "Stigg Edge API base URL"),
    Spec("WS_ENABLED", "1", parse_bool, "receive real-time updates over Stigg's WebSocket"),
    Spec("WS_URL", "wss://api.stigg.io", _parse_url(("ws", "wss")), "Stigg WebSocket base URL (socket at /graphql)"),
    Spec("ENTITLEMENTS_TIMEOUT_MS", "10000", _parse_int(1, 600_000), "budget for one entitlements fetch, retries included (ms)"),
    Spec("POLL_INTERVAL_SECS", "30", _parse_seconds, "refresh cached entries this often while the socket is down"),
    Spec("ENTITLEMENTS_FALLBACK", "", _parse_fallback, "JSON object featureId -> {hasAccess, value, usageLimit, isUnlimited, enumValues}"),
    Spec("CACHE_MAX_SIZE_BYTES", None, _parse_int(1), "memory budget of the cache in bytes"),
    Spec("REDIS_ENVIRONMENT_PREFIX", "", _parse_str, "set to mirror the cache to Redis under this key prefix"),
    Spec("REDIS_HOST", "localhost", _parse_str, "Redis host"),
    Spec("REDIS_PORT", "6379", _parse_int(1, 65535), "Redis port"),
    Spec("REDIS_DB", "0", _parse_int(0), "Redis database number"),
    Spec("REDIS_USERNAME", "", _parse_str, "Redis ACL user name"),
    Spec("REDIS_PASSWORD", "", _parse_str, "Redis password", secret=True),
    Spec("REDIS_PASSWORD_FILE", "", _parse_str, "file holding the Redis password (instead of REDIS_PASSWORD)"),
    Spec("REDIS_TLS", "0", parse_bool, "connect to Redis over TLS"),
    Spec("REDIS_KEYS_TTL_IN_SECS", "604800", _parse_int(), "TTL of every Redis key in seconds (negative: none)"),
    Spec("REDIS_TIMEOUT_MS", "250", _parse_int(1, 60_000), "bound on every Redis call (ms)"),
    Spec(
        "REDIS_SENTINELS", "", _parse_host_ports,
        "Redis Sentinels as host:port,host:port; when set, the master is found (and followed) through them",
    ),
    Spec("REDIS_SENTINEL_MASTER", "mymaster", _parse_str, "the master's name in Sentinel"),
    Spec("REDIS_SENTINEL_USERNAME", "", _parse_str, "ACL user name on the Sentinels"),
    Spec("REDIS_SENTINEL_PASSWORD", "", _parse_str, "password of the Sentinels (their requirepass)", secret=True),
    Spec("REDIS_SENTINEL_PASSWORD_FILE", "", _parse_str, "file holding the Sentinels' password (instead of REDIS_SENTINEL_PASSWORD)"),
    Spec("BIND_ADDRESS", "0.0.0.0", _parse_str, "interface the gRPC server (and by default the HTTP server) listens on"),
    Spec("PORT", "8443", _parse_int(0, 65535), "gRPC port"),
    Spec("HTTP_BIND_ADDRESS", None, _parse_str, "interface the HTTP server (probes, metrics) listens on"),
    Spec("HTTP_PORT", "8080", _parse_int(0, 65535), "HTTP port for health, readiness and metrics"),
    Spec("TLS_CERT_FILE", "", _parse_str, "PEM certificate (chain allowed) served on PORT: gRPC over TLS only; re-read when it changes"),
    Spec("TLS_KEY_FILE", "", _parse_str, "PEM private key of TLS_CERT_FILE; re-read when it changes"),
    Spec("TLS_CLIENT_CA_FILE", "", _parse_str, "PEM CA certificates: callers must present a client certificate signed by one (mutual TLS)"),
    Spec("CALLER_TOKENS_FILE", "", _parse_str, "callers allowed, one 'name scope token' a line (scope read or write); re-read when it changes"),
    Spec("HEALTH_ENDPOINT_URL", "livez", _parse_path, "liveness path"),
    Spec("READY_ENDPOINT_URL", "readyz", _parse_path, "readiness path"),
    Spec("GRPC_MAX_WORKERS", "16", _parse_int(1, 1024), "gRPC handler threads running calls at once (calls waiting on Stigg do not count)"),
    Spec("MAX_WAITING_READS", "512", _parse_int(1, 100_000), "cache misses waiting on Stigg at once; past it a miss answers its fallback at once"),
    Spec("MAX_WAITING_WRITES", "256", _parse_int(1, 100_000), "writes waiting on Stigg at once; past it a write fails UNAVAILABLE"),
    Spec("GRPC_MAX_MESSAGE_BYTES", "4194304", _parse_int(1024, 1 << 30), "largest gRPC request accepted (bytes)"),
    Spec("HTTP_IDLE_TIMEOUT_SECS", "60", _parse_positive_seconds, "close an HTTP connection that sent nothing for this long between requests"),
    Spec("HTTP_HEADER_TIMEOUT_SECS", "10", _parse_positive_seconds, "close an HTTP connection whose request headers are not complete this long after they began"),
    Spec("GRPC_KEEPALIVE_SECS", "60", _parse_positive_seconds, "ping a gRPC client after this long without traffic, to find dead connections"),
    Spec("GRPC_KEEPALIVE_TIMEOUT_SECS", "20", _parse_positive_seconds, "close a gRPC connection whose client does not answer a ping within this"),
    Spec("GRPC_MAX_CONNECTION_IDLE_SECS", "300", _parse_positive_seconds, "close a gRPC connection without calls for this long (clients reconnect on their next call)"),
    Spec(
        "GRPC_MAX_CONCURRENT_STREAMS", None, _parse_int(1, 2**31 - 1),
        "calls at once on one gRPC connection",
    ),
    Spec(
        "GRPC_MAX_CONNECTIONS", "0", _parse_int(0, 2**31 - 1),
        "gRPC connections at once; more are closed as they come (0: the open-files limit less 256 kept for Stigg, Redis, the spool and HTTP)",
    ),
    Spec("SHUTDOWN_GRACE_SECS", "8", _parse_seconds,
         "the whole stop on SIGTERM: gRPC drain, spool delivery and the last snapshot, together"),
    Spec("METRICS_ENABLED", "1", parse_bool, "serve Prometheus metrics at /metrics and count on the hot path"),
    Spec("METRICS_MAX_AGE_MS", "1000", _parse_int(0, 60_000), "render /metrics at most once per this many milliseconds; scrapes in between get the same page (0: every scrape)"),
    Spec("LOG_LEVEL", "info", _parse_choice(LOG_LEVELS), "lowest log level written"),
    Spec("LOG_FORMAT", "text", _parse_choice(LOG_FORMATS), "text for people, json for one object per line"),
    Spec("STATE_DIR", "", _parse_str, "a directory this sidecar owns for its cache snapshot and write spool (unset: nothing on disk)"),
    Spec("SPOOL_WRITES", "0", parse_bool, "acknowledge writes once durable in STATE_DIR and deliver them in the background"),
    Spec("SPOOL_MAX_BYTES", "268435456", _parse_int(4096), "size of the write spool; past it writes fail RESOURCE_EXHAUSTED (bytes)"),
    Spec("SPOOL_BATCH_SIZE", "100", _parse_int(1, 1000), "most spooled records delivered in one call to Stigg"),
    Spec("SPOOL_FLUSH_MS", "100", _parse_int(0, 60_000), "how long a spooled record may wait for a fuller batch (ms)"),
    Spec("SNAPSHOT_INTERVAL_SECS", "60", _parse_seconds, "write the cache snapshot this often when it changed (STATE_DIR)"),
)


@dataclass(frozen=True)
class Settings:
    """Validated settings. Every default is SPECS' default as `load_settings` parses it (a test
    compares them field by field), so `Settings()` is what an empty environment gives."""

    server_api_key: str | None = field(default=None, repr=False)
    server_api_key_file: str = ""
    offline: bool = False
    api_url: str = "https://api.stigg.io"
    edge_enabled: bool = True
    edge_api_url: str = "https://edge.api.stigg.io"
    ws_enabled: bool = True
    ws_url: str = "wss://api.stigg.io"
    entitlements_timeout_ms: int = 10000
    poll_interval_secs: float = 30.0
    entitlements_fallback: Mapping[str, FallbackValues] = field(default_factory=dict)
    cache_max_size_bytes: int = field(default_factory=default_cache_max_size_bytes)  # as load_settings computes it
    redis_environment_prefix: str = ""
    redis_host: str = "localhost"
    redis_port: int = 6379
    redis_db: int = 0
    redis_username: str = ""
    redis_password: str = field(default="", repr=False)
    redis_password_file: str = ""
    redis_tls: bool = False
    redis_keys_ttl_in_secs: int = 604800
    redis_timeout_ms: int = 250
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_username: str = ""
    redis_sentinel_password: str = field(default="", repr=False)
    redis_sentinel_password_file: str = ""
    bind_address: str = "0.0.0.0"
    port: int = 8443
    http_bind_address: str = "0.0.0.0"  # BIND_ADDRESS
    http_port: int = 8080
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    caller_tokens_file: str = ""
    health_endpoint_url: str = "livez"
    ready_endpoint_url: str = "readyz"
    grpc_max_workers: int = 16
    max_waiting_reads: int = 512
    max_waiting_writes: int = 256
    grpc_max_message_bytes: int = 4194304
    http_idle_timeout_secs: float = 60.0
    http_header_timeout_secs: float = 10.0
    grpc_keepalive_secs: float = 60.0
    grpc_keepalive_timeout_secs: float = 20.0
    grpc_max_connection_idle_secs: float = 300.0
    grpc_max_concurrent_streams: int = 784  # MAX_WAITING_READS + MAX_WAITING_WRITES + GRPC_MAX_WORKERS
    grpc_max_connections: int = 0
    shutdown_grace_secs: float = 8.0
    metrics_enabled: bool = True
    metrics_max_age_ms: int = 1000
    log_level: str = "info"
    log_format: str = "text"
    state_dir: str = ""
    spool_writes: bool = False
    spool_max_bytes: int = 268435456
    spool_batch_size: int = 100
    spool_flush_ms: int = 100
    snapshot_interval_secs: float = 60.0

    @property
    def redis_enabled(self) -> bool:
        return bool(self.redis_environment_prefix)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file)

    def secrets(self) -> tuple[str, ...]:
        """The secret values, for redaction checks."""
        return tuple(s for s in (self.server_api_key, self.redis_password, self.redis_sentinel_password) if s)


def read_secret_file(setting: str, path: str) -> str:
    """A secret's value from the file `setting` names (read once, at start-up), surrounding whitespace dropped.

    Errors name the setting and the path, never any of the file's content.
    """
    try:
        value = read_text(path).strip()
    except UnreadableFile as e:
        raise SettingsError(f"{setting}: {e}") from None
    if not value:
        raise SettingsError(f"{setting}: {path} is empty")
    return value


def load_settings(environ: Mapping[str, str], overrides: Mapping[str, str | None] | None = None) -> Settings:
    """Build Settings from environment variables, with option values (by env name) taking precedence."""
    values = _parse_each(environ, overrides or {})
    _compute_defaults(values)
    _check_together(values)
    return Settings(**values)  # type: ignore[arg-type]


def _parse_each(environ: Mapping[str, str], overrides: Mapping[str, str | None]) -> dict[str, object]:
    """Every setting given (or with a default text) parsed on its own, by attribute name."""
    values: dict[str, object] = {}

    def given(name: str) -> str | None:
        text = overrides.get(name)
        return environ.get(name) if text is None else text

    for spec in SPECS:
        text = given(spec.env)
        file_setting = f"{spec.env}_FILE"
        if spec.secret and (path := (given(file_setting) or "").strip()):
            if text:
                raise SettingsError(f"{spec.env} and {file_setting} are both set; set one of them")
            text = read_secret_file(file_setting, path)
        if text is None:
            text = spec.default
        if text is None:
            continue
        try:
            values[spec.attribute] = spec.parse(text)
        except ValueError as e:
            if spec.secret:
                raise SettingsError(f"{spec.env}: is invalid") from None
            raise SettingsError(f"{spec.env}: {e}") from None
    return values


def _compute_defaults(values: dict[str, object]) -> None:
    """The defaults that depend on the machine or on other settings."""
    if "cache_max_size_bytes" not in values:
        values["cache_max_size_bytes"] = default_cache_max_size_bytes()
    if not values.get("http_bind_address"):  # unset or empty: the gRPC server's interface
        values["http_bind_address"] = values.get("bind_address", "0.0.0.0")
    capacity = sum(cast(int, values[name]) for name in ("max_waiting_reads", "max_waiting_writes", "grpc_max_workers"))
    values.setdefault("grpc_max_concurrent_streams", capacity)


def _check_together(values: dict[str, object]) -> None:
    """The rules between settings; the first broken one is the error."""
    if not values.get("offline") and not values.get("server_api_key"):
        raise SettingsError("SERVER_API_KEY (or SERVER_API_KEY_FILE) is required unless OFFLINE is set")
    if bool(values.get("tls_cert_file")) != bool(values.get("tls_key_file")):
        raise SettingsError("TLS_CERT_FILE and TLS_KEY_FILE go together: set both (gRPC over TLS) or neither")
    if values.get("tls_client_ca_file") and not values.get("tls_cert_file"):
        raise SettingsError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE: mutual TLS is TLS first")
    if values.get("http_port") == values.get("port") and values.get("port") != 0:
        raise SettingsError(f"HTTP_PORT must differ from PORT (both are {values['port']})")
    capacity = sum(cast(int, values[name]) for name in ("max_waiting_reads", "max_waiting_writes", "grpc_max_workers"))
    streams = cast(int, values["grpc_max_concurrent_streams"])
    if streams < capacity:
        # Fewer streams would queue one client's calls in its own channel while the sidecar has room.
        raise SettingsError(
            f"GRPC_MAX_CONCURRENT_STREAMS ({streams}) must be at least MAX_WAITING_READS + MAX_WAITING_WRITES"
            f" + GRPC_MAX_WORKERS ({capacity}), so one client connection can use the whole capacity"
        )
    if values.get("health_endpoint_url") == values.get("ready_endpoint_url"):
        raise SettingsError("HEALTH_ENDPOINT_URL must differ from READY_ENDPOINT_URL")
    if values.get("spool_writes"):
        if not values.get("state_dir"):
            raise SettingsError("SPOOL_WRITES needs STATE_DIR: the directory the write spool is kept in")
        if values.get("offline"):
            raise SettingsError("SPOOL_WRITES cannot be used with OFFLINE: nothing is delivered offline")
    if values.get("snapshot_interval_secs") == 0:
        raise SettingsError("SNAPSHOT_INTERVAL_SECS must be more than 0")
