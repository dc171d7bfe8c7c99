"""File descriptors: the open-files limit raised at start, and what of it gRPC connections may use.

Every connection, to a client or to Stigg, Redis, the spool's files and the HTTP port's probes,
is a file descriptor. gRPC clients are the only ones who decide how many of theirs there are, so
they get the limit less a reserve for everything else (`grpc_connection_cap`): clients that open
thousands of connections are refused by grpc-core past the cap, while the sidecar still reaches
Stigg and answers its probes. Reads the process's limits; never touches a socket.
"""

from __future__ import annotations

import resource

# Descriptors kept for everything but gRPC clients: Stigg's connection pools (Edge, GraphQL, the
# socket), Redis and Sentinel, the spool and snapshot files, HTTP probes and scrapes, grpc-core's
# and Python's own (epoll, wake-up pipes, logs), with room to spare.
RESERVED_DESCRIPTORS = 256
# The cap never goes below this, however low the limit (then the reserve shrinks instead).
MIN_GRPC_CONNECTIONS = 16


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft `nofile` limit to the hard one (a process may, unprivileged); (before, now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, hard
    return soft, soft


def open_files_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def grpc_connection_cap(configured: int, limit: int) -> int:
    """gRPC connections allowed at once: `configured` (GRPC_MAX_CONNECTIONS) when set, else the
    open-files `limit` less RESERVED_DESCRIPTORS (at least MIN_GRPC_CONNECTIONS)."""
    if configured > 0:
        return configured
    return max(MIN_GRPC_CONNECTIONS, limit - RESERVED_DESCRIPTORS)
