"""Ports that cannot be bound, said in one line naming the setting (`ListenError`).

A leaf (it imports nothing of ours): the servers (`grpc/server.py`, `ops/web.py`) raise these and
`process/service.py` turns them into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import errno
import socket

from twisted.internet.error import CannotListenError


class ListenError(Exception):
    """A server could not listen. The message is one line naming the setting, safe to print."""

    def __init__(self, setting: str, address: str, port: int, reason: str) -> None:
        self.setting = setting
        host = f"[{address}]" if ":" in address else address
        super().__init__(f"{setting}: {host}:{port} {reason}")


def _reason(error_number: int | None, text: str, address_setting: str = "BIND_ADDRESS") -> str:
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
    """A ListenError from an OSError or Twisted's CannotListenError; `address_setting` names the
    setting `address` came from."""
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
