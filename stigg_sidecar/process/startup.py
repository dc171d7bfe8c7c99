"""Start-up as an operator sees it: the version text, the first log line, and one-line start-up errors.

Owns what the process says before it serves: `--version`, the line naming the version and the mode,
and turning a start-up failure (a port that cannot be bound: `listening.py`) into one line on stderr
and a non-zero exit instead of a traceback. Never says a secret: only settings' names and non-secret
values appear.
"""

from __future__ import annotations

import platform
import sys
from typing import TYPE_CHECKING, NoReturn

import grpc
from twisted.copyright import version as twisted_version

import stigg_sidecar

if TYPE_CHECKING:
    from stigg_sidecar.settings import Settings


def version_text() -> str:
    """`stigg-sidecar X.Y.Z (grpcio A, Twisted B, Python C)`: what `--version` prints."""
    return (
        f"stigg-sidecar {stigg_sidecar.__version__} "
        f"(grpcio {grpc.__version__}, Twisted {twisted_version}, Python {platform.python_version()})"
    )


def mode_summary(settings: Settings) -> str:
    """The mode in a few words, for the first log line: offline, or online and with what."""
    if settings.offline:
        return "offline (fallbacks only, writes acknowledged without being recorded)"
    parts = [
        "Edge" if settings.edge_enabled else "GraphQL (Edge off)",
        "socket on" if settings.ws_enabled else "socket off (polling)",
        f"Redis {settings.redis_host}:{settings.redis_port}" if settings.redis_enabled else "Redis off",
        "spool on" if settings.spool_writes else "spool off",
    ]
    return "online: " + ", ".join(parts)


def access_summary(settings: Settings) -> str:
    """How the gRPC port is guarded, for the first log line ("" when it is open plaintext)."""
    parts = []
    if settings.tls_cert_file:
        parts.append("mutual TLS" if settings.tls_client_ca_file else "TLS")
    if settings.caller_tokens_file:
        parts.append("caller tokens")
    return f" ({', '.join(parts)})" if parts else ""


def starting_line(settings: Settings) -> str:
    return (
        f"stigg-sidecar {stigg_sidecar.__version__} starting, {mode_summary(settings)}; "
        f"gRPC on {settings.bind_address}:{settings.port}{access_summary(settings)}, "
        f"HTTP on {settings.http_bind_address}:{settings.http_port}"
    )


def exit_with(message: str) -> NoReturn:
    """End start-up with one line on the real stderr (twistd may have redirected sys.stderr to the log)."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"stigg-sidecar: {message}\n")
    stream.flush()
    raise SystemExit(1)
