"""The wire schema: generated modules are fresh, and every message, field, number, type,
`optional`, oneof, enum value and RPC equals the official client's (stigg-sidecar-sdk 8.1.0)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

import betterproto
import stigg_sidecar_sdk.generated.stigg.sidecar.v1 as official
from google.protobuf.descriptor import FieldDescriptor
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar._proto import regenerate
from stigg_sidecar._proto import sidecar_pb2 as pb

_SCALARS = {
    FieldDescriptor.TYPE_STRING: betterproto.TYPE_STRING,
    FieldDescriptor.TYPE_INT32: betterproto.TYPE_INT32,
    FieldDescriptor.TYPE_INT64: betterproto.TYPE_INT64,
    FieldDescriptor.TYPE_DOUBLE: betterproto.TYPE_DOUBLE,
    FieldDescriptor.TYPE_BOOL: betterproto.TYPE_BOOL,
    FieldDescriptor.TYPE_ENUM: betterproto.TYPE_ENUM,
    FieldDescriptor.TYPE_MESSAGE: betterproto.TYPE_MESSAGE,
}


def _official_messages() -> dict[str, type]:
    return {
        name: cls
        for name, cls in vars(official).items()
        if inspect.isclass(cls) and issubclass(cls, betterproto.Message) and cls.__module__ == official.__name__
    }


def _official_enums() -> dict[str, type[betterproto.Enum]]:
    return {
        name: cls
        for name, cls in vars(official).items()
        if inspect.isclass(cls) and issubclass(cls, betterproto.Enum) and cls.__module__ == official.__name__
    }


def _our_field(f: FieldDescriptor) -> tuple:
    """(number, type, group, repeated) of one of our fields, in betterproto's terms."""
    is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
    kind = betterproto.TYPE_MAP if is_map else _SCALARS[f.type]
    group = f.containing_oneof.name if f.containing_oneof is not None else None
    repeated = f.is_repeated and not is_map
    return (f.number, kind, group, repeated)


def _official_field(cls: type, field: dataclasses.Field) -> tuple:
    meta = field.metadata["betterproto"]
    annotation = typing.get_type_hints(cls, vars(official))[field.name]
    repeated = typing.get_origin(annotation) is list
    return (meta.number, meta.proto_type, meta.group, repeated)


class GeneratedCodeTests(SynchronousTestCase):
    def test_generated_modules_match_the_proto(self):
        for name, text in regenerate.generate().items():
            with open(regenerate.PACKAGE_DIR / name) as f:
                self.assertEqual(
                    f.read(), text, f"{name} is stale: run python -m stigg_sidecar._proto.regenerate"
                )


class WireCompatibilityTests(SynchronousTestCase):
    def test_same_messages(self):
        self.assertEqual(set(pb.DESCRIPTOR.message_types_by_name), set(_official_messages()))

    def test_every_field_matches(self):
        for name, cls in _official_messages().items():
            ours = {f.name: _our_field(f) for f in pb.DESCRIPTOR.message_types_by_name[name].fields}
            theirs = {f.name: _official_field(cls, f) for f in dataclasses.fields(cls)}
            self.assertEqual(ours, theirs, name)

    def test_every_enum_matches(self):
        for name, cls in _official_enums().items():
            ours = {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name[name].values}
            self.assertEqual(ours, {m.name: m.value for m in cls}, name)
        self.assertEqual(set(pb.DESCRIPTOR.enum_types_by_name), set(_official_enums()))

    def test_every_rpc_matches(self):
        source = inspect.getsource(official.SidecarServiceStub)
        calls = re.findall(r'"/stigg\.sidecar\.v1\.SidecarService/(\w+)",\s*\w+,\s*([\w.]+),', source)
        theirs = {method: response.split(".")[-1] for method, response in calls}
        service = pb.DESCRIPTOR.services_by_name["SidecarService"]
        ours = {m.name: m.output_type.name for m in service.methods}
        self.assertEqual(len(ours), 12)
        self.assertEqual(ours, theirs)
        requests = {
            m.name: m.input_type.name for m in service.methods
        }
        for method, request in requests.items():
            self.assertIn(f'"/stigg.sidecar.v1.SidecarService/{method}",\n            {_snake(request)},', source)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().replace("v2", "_v2").replace("__v2", "_v2")


class RegenerateWithoutToolsTests(SynchronousTestCase):
    def test_without_grpc_tools_one_line_says_how_to_get_them(self):
        import subprocess
        import sys

        from tests.fixtures.paths import ROOT

        # grpc_tools made unimportable, as in the runtime environment (the image, scripts/venv).
        code = ("import sys, runpy; sys.modules['grpc_tools'] = None; "
                "runpy.run_module('stigg_sidecar._proto.regenerate', run_name='__main__')")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr.splitlines(), [
            "stigg_sidecar._proto.regenerate: needs grpcio-tools, a development dependency: run scripts/venv dev,"
            " then .venv/bin/python -m stigg_sidecar._proto.regenerate"
        ])
