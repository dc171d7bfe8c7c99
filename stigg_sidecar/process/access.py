"""Who may reach the gRPC port: TLS credentials and caller tokens assembled from settings.

Owns the wiring only: `grpc.tls.ServerTls` and `grpc.callers.CallerTokens` read and check their
files; a `FileWatcher` each re-reads them when they change on disk. Everything off (the sidecar
shape: the app and the sidecar share a pod's loopback) builds nothing: no credentials, no
interceptor, no watcher, so a call costs what it always did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from stigg_sidecar.grpc.callers import CallerTokens
from stigg_sidecar.grpc.interceptors import TokenInterceptor
from stigg_sidecar.grpc.tls import ServerTls, TlsFiles
from stigg_sidecar.process.watch import FileWatcher
from stigg_sidecar.settings import Settings

log = Logger()


@dataclass
class GrpcAccess:
    credentials: grpc.ServerCredentials | None = None  # None: plaintext
    interceptors: list[grpc.ServerInterceptor] = field(default_factory=list)  # outermost first
    watchers: list[FileWatcher] = field(default_factory=list)  # services to start with the sidecar
    tls: ServerTls | None = None
    tokens: CallerTokens | None = None


def grpc_access(
    settings: Settings, clock: IReactorTime, count_caller: Callable[[str, str], None] | None = None
) -> GrpcAccess:
    """TLS and caller tokens as the settings ask. Raises an error whose message is one line naming
    the setting: TlsError, CallerTokensError) when a file is missing or wrong at start."""
    access = GrpcAccess()
    if settings.tls_cert_file:
        files = TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        # The watcher first: it remembers the files as they were before the first read.
        tls_watcher = FileWatcher(clock, files.paths, lambda: tls.reload(), name="tls-files")
        tls = ServerTls(files)
        access.tls = tls
        access.credentials = tls.credentials()
        access.watchers.append(tls_watcher)
    if settings.caller_tokens_file:
        tokens_watcher = FileWatcher(clock, [settings.caller_tokens_file], lambda: tokens.reload(), name="caller-tokens")
        tokens = CallerTokens(settings.caller_tokens_file)
        access.tokens = tokens
        access.interceptors.append(
            TokenInterceptor(tokens, on_call=count_caller) if count_caller else TokenInterceptor(tokens)
        )
        access.watchers.append(tokens_watcher)
        if not settings.tls_cert_file:
            log.warn("caller tokens are sent in the clear: set TLS_CERT_FILE and TLS_KEY_FILE unless the network is trusted")
    return access
