"""Regenerate the protobuf and gRPC modules in this package from protos/.

Run `.venv/bin/python -m stigg_sidecar._proto.regenerate` after changing the .proto file, in the
development environment (`scripts/venv dev`): it needs grpcio-tools, a development dependency
that the runtime lock and the image leave out. A test fails while the checked-in modules are stale.

protoc names the import of the message module after the .proto path (`stigg.sidecar.v1`), which
would collide with Stigg's own `stigg` package; the import is rewritten to point here.
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent.parent / "protos"
PROTO_FILE = "stigg/sidecar/v1/sidecar.proto"
GENERATED = ("sidecar_pb2.py", "sidecar_pb2.pyi", "sidecar_pb2_grpc.py")

_PROTOC_IMPORT = "from stigg.sidecar.v1 import sidecar_pb2 as"
_OUR_IMPORT = "from stigg_sidecar._proto import sidecar_pb2 as"


def generate() -> dict[str, str]:
    """Run protoc on the .proto and return {file name: text} of what it generates."""
    from grpc_tools import protoc  # noqa: PLC0415 - a development dependency, checked for in main()

    well_known = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as out:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                PROTO_FILE,
            ]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed with status {status}")
        produced = Path(out) / "stigg" / "sidecar" / "v1"
        texts = {name: (produced / name).read_text() for name in GENERATED}
    texts["sidecar_pb2_grpc.py"] = texts["sidecar_pb2_grpc.py"].replace(_PROTOC_IMPORT, _OUR_IMPORT)
    return texts


def main() -> int:
    try:
        import grpc_tools  # noqa: F401, PLC0415 - whether the development dependency is there
    except ImportError:
        print("stigg_sidecar._proto.regenerate: needs grpcio-tools, a development dependency: run scripts/venv dev,"
              " then .venv/bin/python -m stigg_sidecar._proto.regenerate", file=sys.stderr)
        return 1
    for name, text in generate().items():
        (PACKAGE_DIR / name).write_text(text)
        print(f"wrote {PACKAGE_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
