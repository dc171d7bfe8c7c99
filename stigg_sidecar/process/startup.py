"""Start-up as an operator sees it: the version text, the first log line, and one-line start-up errors.

Owns what the process says before it serves: `--version`, the line naming the version and the mode,
and turning a port that cannot be bound (or any other start-up failure) into one line on stderr and
a non-zero exit instead of a traceback. Never says a secret: only settings' names and non-secret
values appear.
"""

from __future__ import annotations

import errno
import platform
import socket
import sys
from typing import TYPE_CHECKING, NoReturn

from twisted.internet.error import CannotListenError

import stigg_sidecar

if TYPE_CHECKING:
    from stigg_sidecar.settings import Settings


def version_text() -> str:
    """`stigg-sidecar X.Y.Z (grpcio A, Twisted B, Python C)`: what `--version` prints."""
    import grpc
    from twisted.copyright import version as twisted_version

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


class ListenError(Exception):
    """A server could not listen. The message is one line naming the setting, safe to print."""

    def __init__(self, setting: str, address: str, port: int, reason: str) -> None:
        self.setting = setting
        host = f"[{address}]" if ":" in address else address
        super().__init__(f"{setting}: {host}:{port} {reason}")


def _reason(error_number: int | None, text: str, address_setting: str) -> str:
    if error_number == errno.EADDRINUSE:
        return "is already in use"
    if error_number == errno.EACCES:
        return "cannot be bound: permission denied (ports below 1024 need privileges)"
    if error_number == errno.EADDRNOTAVAIL:
        return f"cannot be bound: {address_setting} is not an address of this machine"
    return f"cannot be bound: {text}"


def listen_error(
    setting: str, address: str, port: int, error: BaseException, address_setting: str = "BIND_ADDRESS"
) -> ListenError:
    """A ListenError from an OSError or Twisted's CannotListenError; `address_setting` names where
    `address` came from."""
    if isinstance(error, CannotListenError) and isinstance(error.socketError, BaseException):
        error = error.socketError
    if isinstance(error, OSError):
        return ListenError(setting, address, port, _reason(error.errno, error.strerror or str(error), address_setting))
    return ListenError(setting, address, port, f"cannot be bound: {error}")


def probe_bind(setting: str, address: str, port: int) -> None:
    """Bind `address:port` with a throwaway socket (as a server would, SO_REUSEADDR) and release it.

    grpcio reports a taken port with a generic error and a C-level log line; asking the kernel
    first gives the real reason in one line. Port 0 always binds.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(address or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise ListenError(setting, address, port, f"cannot be bound: BIND_ADDRESS does not resolve ({e})") from None
    family, kind, proto, _, sockaddr = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(sockaddr)
    except OSError as e:
        raise listen_error(setting, address, port, e) from None
    finally:
        probe.close()


def exit_with(message: str) -> NoReturn:
    """End start-up with one line on the real stderr (twistd may have redirected sys.stderr to the log)."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"stigg-sidecar: {message}\n")
    stream.flush()
    raise SystemExit(1)
