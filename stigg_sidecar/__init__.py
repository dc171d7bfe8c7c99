"""stigg-sidecar: Stigg entitlement checks over gRPC, answered from a reactor-owned cache."""

__version__ = "0.1.0"
