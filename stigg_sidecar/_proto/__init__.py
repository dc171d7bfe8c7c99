"""Generated protobuf and gRPC modules for stigg.sidecar.v1 (see regenerate.py)."""
