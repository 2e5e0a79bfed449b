"""The gateway's Open Inference Protocol (KServe v2) gRPC definitions: wire-compatible with
tritonclient's, and the checked-in generated code is what the .proto produces.

Our generated module and tritonclient's ``service_pb2`` both put ``inference.*`` into protobuf's
default descriptor pool under different file names, so they cannot be imported into one process
(the second raises "duplicate symbol"). This test therefore imports neither: each is imported in a
subprocess that hands back its serialized file descriptors, which are compared in private pools.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterable, Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FileDescriptor

REPO = Path(__file__).resolve().parents[2]
PROTO = "servemesh/gateway/proto/grpc_predict_v2.proto"
PROTO_DIR = REPO / "servemesh/gateway/proto"
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")
RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")

# Imports the given modules and prints a FileDescriptorSet of their files, dependencies first.
_DUMP = """
import importlib, sys
from google.protobuf import descriptor_pb2
files, seen = descriptor_pb2.FileDescriptorSet(), set()
def add(fd):
    if fd.name in seen:
        return
    for dep in fd.dependencies:
        add(dep)
    seen.add(fd.name)
    files.file.add().ParseFromString(fd.serialized_pb)
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    if hasattr(module, "DESCRIPTOR"):  # a _pb2_grpc module has none
        add(module.DESCRIPTOR)
sys.stdout.buffer.write(files.SerializeToString())
"""


def _pool_from_modules(*modules: str) -> descriptor_pool.DescriptorPool:
    done = subprocess.run(
        [sys.executable, "-c", _DUMP, *modules], cwd=REPO, capture_output=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    files = descriptor_pb2.FileDescriptorSet.FromString(done.stdout)
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


@pytest.fixture(scope="module")
def ours() -> FileDescriptor:
    # The _pb2_grpc import also checks that it finds its _pb2 by package path and that grpcio is new enough.
    pool = _pool_from_modules(
        "servemesh.gateway.proto.grpc_predict_v2_pb2", "servemesh.gateway.proto.grpc_predict_v2_pb2_grpc"
    )
    return pool.FindFileByName(PROTO)


@pytest.fixture(scope="module")
def triton() -> descriptor_pool.DescriptorPool:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (the dev extra)")
    return _pool_from_modules("tritonclient.grpc.service_pb2")


def _messages(
    prefix: str, messages: Iterable[descriptor_pb2.DescriptorProto]
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    """(full name, DescriptorProto) of these messages and all nested ones (map entries included)."""
    for message in messages:
        full_name = f"{prefix}.{message.name}"
        yield full_name, message
        yield from _messages(full_name, message.nested_type)


def _as_proto(message: Descriptor) -> descriptor_pb2.DescriptorProto:
    # Through DescriptorProto, as protobuf 7 dropped FieldDescriptor.label.
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    return proto


def _field_shape(
    message: descriptor_pb2.DescriptorProto, field: descriptor_pb2.FieldDescriptorProto
) -> tuple[object, ...]:
    """What the wire and the generated classes see of a field: name, type, label, message type, oneof."""
    oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
    labels, types = descriptor_pb2.FieldDescriptorProto.Label, descriptor_pb2.FieldDescriptorProto.Type
    return field.name, types.Name(field.type), labels.Name(field.label), field.type_name, oneof


def test_package_and_file(ours: FileDescriptor) -> None:
    assert ours.package == "inference"
    proto = descriptor_pb2.FileDescriptorProto()
    ours.CopyToProto(proto)
    assert proto.syntax == "proto3"
    assert set(ours.services_by_name) == {"GRPCInferenceService"}


def test_messages_match_tritonclient(ours: FileDescriptor, triton: descriptor_pool.DescriptorPool) -> None:
    checked = 0
    for top in ours.message_types_by_name.values():
        for full_name, message in _messages(ours.package, [_as_proto(top)]):
            other = _as_proto(triton.FindMessageTypeByName(full_name))  # KeyError: tritonclient lacks it
            assert message.options.map_entry == other.options.map_entry, full_name
            theirs = {field.number: field for field in other.field}
            for field in message.field:
                where = f"{full_name}.{field.name} = {field.number}"
                assert field.number in theirs, f"{where}: no such field number in tritonclient's"
                assert _field_shape(message, field) == _field_shape(other, theirs[field.number]), where
                checked += 1
    assert checked > 50  # the recursion reached the nested tensors and map entries


def test_service_matches_tritonclient(ours: FileDescriptor, triton: descriptor_pool.DescriptorPool) -> None:
    service = ours.services_by_name["GRPCInferenceService"]
    theirs = triton.FindServiceByName("inference.GRPCInferenceService")
    assert service.full_name == theirs.full_name
    assert [method.name for method in service.methods] == list(RPCS)
    for method in service.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name, method.name
        assert method.output_type.full_name == other.output_type.full_name, method.name
        assert (method.client_streaming, method.server_streaming) == (other.client_streaming, other.server_streaming)
        assert (method.client_streaming, method.server_streaming) == (False, False)


def test_grpc_module_imports_pb2_by_package_path() -> None:
    source = (PROTO_DIR / "grpc_predict_v2_pb2_grpc.py").read_text()
    assert "from servemesh.gateway.proto import grpc_predict_v2_pb2 as" in source
    assert "\nimport grpc_predict_v2_pb2" not in source


def _protoc(*args: str) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (the dev extra)")
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", *args, PROTO],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_checked_in_descriptor_is_the_proto(ours: FileDescriptor, tmp_path: Path) -> None:
    """Independent of the grpcio-tools version: the compiled-in descriptor is today's .proto."""
    out = tmp_path / "set.pb"
    _protoc(f"--descriptor_set_out={out}")
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for _, message in _messages("", compiled.message_type):
        for field in message.field:
            field.ClearField("json_name")  # protoc's set has it, the descriptor compiled into _pb2.py not
    checked_in = descriptor_pb2.FileDescriptorProto()
    ours.CopyToProto(checked_in)
    assert checked_in == compiled, "the .proto changed without regenerating: run servemesh/gateway/proto/regenerate.sh"


def test_regenerating_gives_the_checked_in_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (the dev extra)")
    grpc_source = (PROTO_DIR / "grpc_predict_v2_pb2_grpc.py").read_text()
    generated_with = grpc_source.split("GRPC_GENERATED_VERSION = '", 1)[1].split("'", 1)[0]
    if version("grpcio-tools") != generated_with:
        pytest.skip(f"checked-in code is from grpcio-tools {generated_with}, installed is {version('grpcio-tools')}")
    _protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    for name in GENERATED:
        fresh = (tmp_path / "servemesh/gateway/proto" / name).read_bytes()
        assert fresh == (PROTO_DIR / name).read_bytes(), f"{name} is stale: run servemesh/gateway/proto/regenerate.sh"
