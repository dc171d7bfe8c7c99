"""twistd entry point: `twistd -n stigg-sidecar` options, and `makeService`.

`Options` has one option per setting, each defaulting to its environment variable; `makeService`
validates them into Settings (exiting with one clear line on a bad value), hands them to the
assembly (`process.assembly`, which builds the service tree in phases) and installs the process's
garbage-collector policy.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import IO, Any

from twisted.logger import Logger
from twisted.python import usage

from stigg_sidecar.grpc.callers import CallerTokensError
from stigg_sidecar.grpc.tls import TlsError
from stigg_sidecar.lifecycle import gcpolicy
from stigg_sidecar.lifecycle.reactor import default_reactor
from stigg_sidecar.ops import tracing as tracing_setup
from stigg_sidecar.process import descriptors
from stigg_sidecar.process.assembly import assemble
from stigg_sidecar.process.clock import use_monotonic_time
from stigg_sidecar.process.native_output import route_native_output
from stigg_sidecar.process.service import SidecarService
from stigg_sidecar.process.startup import exit_with, starting_line, version_text
from stigg_sidecar.settings import SPECS, SettingsError, Spec, load_settings, parse_bool
from stigg_sidecar.state.directory import StateDirectoryError

log = Logger()


_COMPUTED_DEFAULTS = {
    "CACHE_MAX_SIZE_BYTES": "half the available memory",
    "GRPC_MAX_CONCURRENT_STREAMS": "MAX_WAITING_READS + MAX_WAITING_WRITES + GRPC_MAX_WORKERS",
    "HTTP_BIND_ADDRESS": "BIND_ADDRESS",
}


def _help(spec: Spec[Any]) -> str:
    default = _COMPUTED_DEFAULTS.get(spec.env, spec.default)
    shown = "none" if default in (None, "") else default
    flag = f"; a flag: --{spec.option} or --no-{spec.option}" if spec.parse is parse_bool else ""
    return f"{spec.help} [env {spec.env}; default: {shown}{flag}]"


_BOOLEAN_OPTIONS = frozenset(spec.option for spec in SPECS if spec.parse is parse_bool)


def flags_as_values(args: Sequence[str]) -> list[str]:
    """Boolean options given as flags (`--offline`, `--no-offline`) rewritten as `--offline=1`/`=0`.

    `--offline=0` and `--offline 0` still work: the options take no positional arguments, so a
    word after a boolean option can only be its value.
    """
    rewritten: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        name, has_value, _ = arg.partition("=")
        negated = name.startswith("--no-") and name[5:] in _BOOLEAN_OPTIONS
        if not has_value and (negated or (name.startswith("--") and name[2:] in _BOOLEAN_OPTIONS)):
            if negated:
                arg = f"--{name[5:]}=0"
            elif rest and not rest[0].startswith("-"):
                arg = f"{name}={rest.pop(0)}"
            else:
                arg = f"{name}=1"
        rewritten.append(arg)
    return rewritten


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Answer Stigg entitlement checks over gRPC from a local cache. Every option can also be set by the environment variable named in its help; an option wins over the variable."
    optParameters = [[spec.option, None, None, _help(spec)] for spec in SPECS]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        try:
            super().parseOptions(flags_as_values(sys.argv[1:] if options is None else options))
        except usage.UsageError as e:
            # twistd would print the whole help (some 200 lines) above the one that matters.
            exit_with(f"{str(e).rstrip('.')}; see twistd stigg-sidecar --help")

    def opt_version(self) -> None:
        """Display the sidecar's version (and grpcio's, Twisted's, Python's) and exit."""
        print(version_text())
        sys.exit(0)

    def overrides(self) -> Mapping[str, str | None]:
        return {spec.env: self[spec.option] for spec in SPECS}


def _log_stream(options: Options) -> IO[str] | None:
    """Where the log goes: twistd's --logfile when given (`-` is standard output); else, when
    twistd daemonizes (no -n), `twistd.log` as twistd's own log would (standard output is gone
    then); else standard output. Opened now: the file stays open across the daemon's fork."""
    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    path = parent.get("logfile") or (None if parent.get("nodaemon") else "twistd.log")
    if path in (None, "-"):
        return None
    try:
        return open(path, "a", buffering=1, encoding="utf-8")
    except OSError as e:
        exit_with(f"--logfile: {path}: {e.strerror}")


def makeService(options: Options) -> SidecarService:
    try:
        settings = load_settings(os.environ, options.overrides())
    except SettingsError as e:
        exit_with(str(e))
    log_stream = _log_stream(options)
    # Logged before twistd starts logging: the log replays it first, ahead of twistd's own lines.
    log.info("{line}", line=starting_line(settings))
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("nodaemon"):
        # grpc-core's lines in this log, in LOG_FORMAT. A daemon's descriptor 2 is /dev/null (and
        # must not keep its starter's stderr open), so there they are silenced instead.
        route_native_output(default_reactor())
    before, limit = descriptors.raise_open_files_limit()
    cap = descriptors.grpc_connection_cap(settings.grpc_max_connections, limit)
    log.debug("Open files: limit {limit} (was {before}); at most {cap} gRPC connections at once",
             limit=limit, before=before, cap=cap)
    if cap > limit - descriptors.RESERVED_DESCRIPTORS:
        log.warn("GRPC_MAX_CONNECTIONS {cap} leaves fewer than {reserved} of the {limit} open files for Stigg,"
                 " Redis, the spool and HTTP: many clients could starve them", cap=cap,
                 reserved=descriptors.RESERVED_DESCRIPTORS, limit=limit)
    try:
        tracing = tracing_setup.install()
    except tracing_setup.TracingConfigError as e:
        exit_with(str(e))
    if tracing is not None:
        log.info("OpenTelemetry {where}", where=tracing_setup.describe())
    # Every timer on elapsed time: a wall clock stepped back must not freeze them (issue 20, 12).
    reactor = default_reactor()
    use_monotonic_time(reactor)
    try:
        sidecar = assemble(settings, reactor, tracing=tracing, log_stream=log_stream).service
    except (StateDirectoryError, TlsError, CallerTokensError) as e:
        exit_with(str(e))
    except Exception as e:
        # A bug or an environment this code did not foresee: one line; the traceback at LOG_LEVEL=debug.
        if settings.log_level == "debug":
            traceback.print_exc()
        exit_with(f"cannot start: {type(e).__name__}: {e}")
    # The process's own collector policy, not the assembly's (tests build many sidecars in one
    # process): what exists now (modules, the services, the cache's containers) lasts as long as
    # the process and is frozen out of every later collection (see gcpolicy).
    gcpolicy.install()
    return sidecar
