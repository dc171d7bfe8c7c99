"""`stigg-sidecar-cli`: ask a running sidecar from a shell, for people and for scripts.

Owns the command line only: it is a plain gRPC client of stigg.sidecar.v1.SidecarService (grpcio's
sync API, every call bounded by --timeout) and an HTTP client of the health endpoints. It never
imports the server side and never touches Stigg itself.

Exit status, so scripts can branch:
    0  success: access granted, entity exists, sidecar ready, usage reported
    1  error: the sidecar is unreachable or answered an error (one line on stderr, no traceback)
    2  usage error (bad arguments)
    3  the sidecar answered "no": access denied, entity does not exist, not ready

With --json, stdout holds exactly one JSON object: the gRPC response as protobuf's JSON mapping
with proto field names (fields without presence always printed, so `has_access` is there even
when false), or for `health` the live/ready status. Errors go to stderr only, as without --json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

PROG = "stigg-sidecar-cli"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO = 0, 1, 2, 3
DEFAULT_TARGET = "localhost:8443"
DEFAULT_HTTP = "localhost:8080"
DEFAULT_TIMEOUT = 5.0

_REASON_PREFIX = "ACCESS_DENIED_REASON_"


class CliError(Exception):
    """Something that ends the command with one line on stderr and exit status 1."""


@dataclass
class Outcome:
    """What a command produced: the JSON object, the lines for people, and the exit status."""

    data: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    status: int = EXIT_OK


# -- formatting -----------------------------------------------------------------------------------


def _number(value: float) -> str:
    """90.0 -> '90', 1.5 -> '1.5': usage is a double on the wire but usually whole."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _reason_name(value: int) -> str:
    return pb.AccessDeniedReason.Name(value).removeprefix(_REASON_PREFIX)


def _kind_and_name(e: pb.EntitlementV2) -> tuple[str, str]:
    kind = e.WhichOneof("entitlement") or "unknown"
    if kind == "credit":
        return kind, e.credit.currency.currency_id
    if kind == "unknown":
        return kind, "?"
    return kind, getattr(e, kind).feature.id


def _detail(e: pb.EntitlementV2) -> str:
    """The entitlement's numbers in a few words: usage of limit, value, or enum values."""
    kind = e.WhichOneof("entitlement")
    if kind == "numeric":
        n = e.numeric
        return "unlimited" if n.is_unlimited else (f"value {n.value}" if n.HasField("value") else "no value")
    if kind == "metered":
        m = e.metered
        used = _number(m.current_usage)
        if m.is_unlimited:
            return f"{used} used, unlimited"
        if not m.HasField("usage_limit"):
            return f"{used} used, no limit"
        soft = ", soft limit" if m.HasField("has_soft_limit") and m.has_soft_limit else ""
        return f"{used} of {_number(m.usage_limit)} used{soft}"
    if kind == "enum":
        return ", ".join(e.enum.enum_values) or "no values"
    if kind == "credit":
        c = e.credit
        return f"{_number(c.current_usage)} of {_number(c.usage_limit)} used, {_number(c.remaining)} remaining"
    return ""


def _to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _ids(customer: str, resource: str | None, **more: str) -> str:
    parts = [f"customer={customer}"] + ([f"resource={resource}"] if resource else [])
    return " ".join(parts + [f"{k}={v}" for k, v in more.items()])


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]


# -- gRPC commands --------------------------------------------------------------------------------


def check(stub: SidecarServiceStub, args: argparse.Namespace) -> Outcome:
    options = pb.GetEntitlementOptions(requested_values=args.values)
    if args.usage is not None:
        options.requested_usage = args.usage
    request = pb.GetEntitlementV2Request(customer_id=args.customer, feature_id=args.feature, options=options)
    if args.resource:
        request.resource_id = args.resource
    response = stub.GetEntitlementV2(request, timeout=args.timeout)
    e = response.entitlement

    kind, _ = _kind_and_name(e)
    requesting = []
    if args.usage is not None:
        requesting.append(f"requesting {_number(args.usage)}")
    if args.values:
        requesting.append(f"requesting {', '.join(args.values)}")
    detail = ("; " if kind == "enum" else ", ").join(filter(None, [_detail(e), *requesting]))
    verdict = "ACCESS GRANTED" if e.has_access else "ACCESS DENIED"
    words = [_ids(args.customer, args.resource, feature=args.feature)]
    if e.HasField("access_denied_reason"):
        words.append(f"reason={_reason_name(e.access_denied_reason)}")
    words.append(f"({kind}: {detail})" if detail else f"({kind})")
    if e.is_fallback:
        words.append("(fallback)")
    line = f"{verdict}  {' '.join(words)}"
    return Outcome(_to_dict(response), [line], EXIT_OK if e.has_access else EXIT_NO)


def state(stub: SidecarServiceStub, args: argparse.Namespace) -> Outcome:
    request = pb.GetEntitlementsStateV2Request(customer_id=args.customer)
    if args.resource:
        request.resource_id = args.resource
    response = stub.GetEntitlementsStateV2(request, timeout=args.timeout)

    lines = [_ids(args.customer, args.resource)]
    if response.HasField("access_denied_reason"):
        lines[0] += f" reason={_reason_name(response.access_denied_reason)}"
    rows = []
    for e in response.entitlements:
        kind, name = _kind_and_name(e)
        access = ("granted" if e.has_access else "denied") + (" (fallback)" if e.is_fallback else "")
        reason = _reason_name(e.access_denied_reason) if e.HasField("access_denied_reason") else ""
        rows.append([name, kind, access, _detail(e) or "-", reason or "-"])
    if rows:
        lines += _table(["FEATURE/CURRENCY", "TYPE", "ACCESS", "USAGE/VALUE", "REASON"], rows)
    else:
        lines.append("no entitlements")
    return Outcome(_to_dict(response), lines)


def report_usage(stub: SidecarServiceStub, args: argparse.Namespace) -> Outcome:
    behavior = pb.USAGE_UPDATE_BEHAVIOR_SET if args.set else pb.USAGE_UPDATE_BEHAVIOR_DELTA
    request = pb.ReportUsageRequest(
        customer_id=args.customer, feature_id=args.feature, value=args.value, update_behavior=behavior
    )
    if args.resource:
        request.resource_id = args.resource
    ack = stub.ReportUsage(request, timeout=args.timeout)

    current = _number(ack.current_usage) if ack.HasField("current_usage") else "not returned"
    mode = "set to" if args.set else "added"
    line = (
        f"USAGE REPORTED  {_ids(args.customer, args.resource, feature=args.feature)} "
        f"({mode} {_number(args.value)}) measurement={ack.measurement_id or '-'} current_usage={current}"
    )
    return Outcome(_to_dict(ack), [line])


def reload(stub: SidecarServiceStub, args: argparse.Namespace) -> Outcome:
    request = pb.ReloadEntitlementsRequest(customer_id=args.customer)
    if args.resource:
        request.resource_id = args.resource
    response = stub.ReloadEntitlements(request, timeout=args.timeout)
    exists = response.entitled_entity_exists
    verdict = "RELOADED  " if exists else "NOT FOUND  "
    note = "" if exists else " (unknown to Stigg, or the reload failed)"
    return Outcome(_to_dict(response), [verdict + _ids(args.customer, args.resource) + note], EXIT_OK if exists else EXIT_NO)


def _unreachable_reason(error: grpc.RpcError, timeout: float) -> str | None:
    """Why the call never reached the sidecar, or None when the sidecar itself answered the error.

    The sidecar can answer UNAVAILABLE or DEADLINE_EXCEEDED itself (Stigg down or slow); those keep
    their own message. grpcio's transport failures have recognisable texts.
    """
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
        return f"no answer within {_number(timeout)}s"
    if code != grpc.StatusCode.UNAVAILABLE:
        return None
    if details.startswith("errors resolving") or "DNS resolution failed" in details:
        return "cannot resolve the host name"
    if "Connection refused" in details:
        return "connection refused"
    if "http1.x server" in details:
        return "that port speaks HTTP/1.x, not gRPC"
    transport = ("failed to connect", "Socket closed", "Connection reset", "connections to all backends failing")
    if any(text in details for text in transport):
        last = details.rsplit(": ", 1)[-1].strip()
        return last[:1].lower() + last[1:] if last else "connection failed"
    return None


def _run_grpc(command: Callable[[SidecarServiceStub, argparse.Namespace], Outcome], args: argparse.Namespace) -> Outcome:
    with grpc.insecure_channel(args.target) as channel:
        try:
            return command(SidecarServiceStub(channel), args)
        except grpc.RpcError as e:
            reason = _unreachable_reason(e, args.timeout)
            if reason is not None:
                raise CliError(f"cannot reach the sidecar at {args.target} ({reason})") from None
            raise CliError(f"{e.code().name}: {e.details()}") from None


# -- HTTP health ----------------------------------------------------------------------------------


def _get_json(url: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """GET a health endpoint: (HTTP status, JSON body or {}). Non-2xx answers are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    return status, parsed if isinstance(parsed, dict) else {}


def _http_failure(error: BaseException, timeout: float) -> str:
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {_number(timeout)}s"
    if isinstance(reason, socket.gaierror):
        return "cannot resolve the host name"
    return str(getattr(reason, "strerror", None) or reason)


def _grpc_serving(args: argparse.Namespace) -> str:
    """The gRPC health status (grpc.health.v1, which follows readiness) of the sidecar at --target."""
    with grpc.insecure_channel(args.target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as e:
            reason = _unreachable_reason(e, args.timeout) or f"{e.code().name}: {e.details()}"
            raise CliError(f"cannot reach the sidecar at {args.target} ({reason})") from None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def health(args: argparse.Namespace) -> Outcome:
    # The gRPC side is what applications call: a sidecar whose HTTP port answers but whose --target
    # does not is not healthy for them.
    serving = _grpc_serving(args)
    data: dict[str, Any] = {"http": args.http, "target": args.target, "grpc": {"status": serving, "ok": serving == "SERVING"}}
    lines = [f"{'grpc':<5}  {serving}  {args.target}"]
    for name, path in (("live", args.health_path), ("ready", args.ready_path)):
        url = f"http://{args.http}/{path.strip('/')}"
        try:
            code, body = _get_json(url, args.timeout)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise CliError(f"cannot reach the sidecar's HTTP server at {args.http} ({_http_failure(e, args.timeout)})") from None
        reasons = [str(r) for r in body.get("reasons", [])]
        status = str(body.get("status") or ("UP" if code == 200 else "DOWN"))
        data[name] = {"url": url, "http_status": code, "ok": code == 200, "status": status, "reasons": reasons}
        why = f"  ({'; '.join(reasons)})" if reasons else ""
        lines.append(f"{name:<5}  {status:<4}  HTTP {code}  {url}{why}")
    ready = data["live"]["ok"] and data["ready"]["ok"] and data["grpc"]["ok"]
    data["ready_ok"] = ready
    return Outcome(data, lines, EXIT_OK if ready else EXIT_NO)


# -- command line ---------------------------------------------------------------------------------


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number: {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def _value_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _common_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The connection options: on the main parser with defaults, and again on each command with
    none (SUPPRESS), so `--json` works before or after the command name."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    target = os.environ.get("STIGG_SIDECAR_TARGET") or DEFAULT_TARGET
    http = os.environ.get("STIGG_SIDECAR_HTTP") or DEFAULT_HTTP
    parser.add_argument("--target", metavar="HOST:PORT", default=default(target),
                        help=f"the sidecar's gRPC address (env STIGG_SIDECAR_TARGET; default {DEFAULT_TARGET})")
    parser.add_argument("--http", metavar="HOST:PORT", default=default(http),
                        help=f"the sidecar's HTTP address, for health (env STIGG_SIDECAR_HTTP; default {DEFAULT_HTTP})")
    parser.add_argument("--timeout", metavar="S", type=_positive_seconds, default=default(DEFAULT_TIMEOUT),
                        help=f"give up on each call after S seconds (default {_number(DEFAULT_TIMEOUT)})")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print one JSON object on stdout instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Ask a running Stigg sidecar: entitlement checks, state, usage, reloads, health.",
        epilog="exit status: 0 success/granted/ready, 1 unreachable or error, 2 bad arguments, "
        "3 denied / not found / not ready",
    )
    _common_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[common])

    p = command("check", "check one feature for a customer (GetEntitlementV2)")
    p.add_argument("customer", metavar="CUSTOMER", help="customer id")
    p.add_argument("feature", metavar="FEATURE", help="feature id")
    p.add_argument("--usage", metavar="N", type=_finite_float, help="usage the caller is about to consume")
    p.add_argument("--values", metavar="A,B", type=_value_list, default=[], help="enum values requested")
    p.add_argument("--resource", metavar="R", help="resource id")
    p.set_defaults(run=lambda args: _run_grpc(check, args))

    p = command("state", "every entitlement of a customer (GetEntitlementsStateV2)")
    p.add_argument("customer", metavar="CUSTOMER", help="customer id")
    p.add_argument("--resource", metavar="R", help="resource id")
    p.set_defaults(run=lambda args: _run_grpc(state, args))

    p = command("report-usage", "report usage of a metered feature (ReportUsage)")
    p.add_argument("customer", metavar="CUSTOMER", help="customer id")
    p.add_argument("feature", metavar="FEATURE", help="feature id")
    p.add_argument("value", metavar="VALUE", type=_finite_float, help="usage to add (may be negative), or to set with --set")
    p.add_argument("--set", action="store_true", help="set the usage to VALUE instead of adding VALUE")
    p.add_argument("--resource", metavar="R", help="resource id")
    p.set_defaults(run=lambda args: _run_grpc(report_usage, args))

    p = command("reload", "refetch a customer's entitlements from Stigg (ReloadEntitlements)")
    p.add_argument("customer", metavar="CUSTOMER", help="customer id")
    p.add_argument("--resource", metavar="R", help="resource id")
    p.set_defaults(run=lambda args: _run_grpc(reload, args))

    p = command("health", "gRPC health at --target, liveness and readiness over HTTP; exit 0 only when all say ready")
    p.add_argument("--health-path", metavar="PATH", default="livez", help="liveness path (default livez)")
    p.add_argument("--ready-path", metavar="PATH", default="readyz", help="readiness path (default readyz)")
    p.set_defaults(run=health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        outcome: Outcome = args.run(args)
    except CliError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(outcome.data))
    else:
        print("\n".join(outcome.lines))
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
