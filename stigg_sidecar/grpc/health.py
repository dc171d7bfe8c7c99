"""grpc.health.v1 following readiness (for Kubernetes gRPC probes), and server reflection."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer
from grpc_reflection.v1alpha import reflection

from stigg_sidecar._proto import sidecar_pb2


def add_health_and_reflection(server: grpc.Server, subscribe: Callable[[Callable[[bool], None]], None]) -> None:
    """Register grpc.health.v1, SERVING while ready (`subscribe` hands readiness changes over,
    e.g. `Readiness.subscribe`), and reflection of the sidecar and health services."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    service = sidecar_pb2.DESCRIPTOR.services_by_name["SidecarService"].full_name

    def follow(ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", service):
            health.set(name, status)

    subscribe(follow)
    reflection.enable_server_reflection((service, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
