"""stigg-sidecar: Stigg entitlement checks over gRPC, answered from a reactor-owned cache."""

import os

__version__ = "0.1.0"

# grpc-core writes an unformatted line to stderr for every failed TLS handshake at its default
# verbosity: anyone reaching a TLS port (a scanner, a plaintext client) could fill the log with
# them, outside LOG_FORMAT. Read once, when grpc is first imported, which is after this package;
# an operator's own GRPC_VERBOSITY (INFO to see handshake failures) wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
