"""Every method a gRPC server serves, as its reflection service tells it, and raw bytes
sent to any of them: what the decode-guard tests (issue 19) aim garbage at, so that a
service added to a server is covered without touching a list."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

# Bytes no protobuf message parses: a length-delimited field 1 that claims 127 bytes and
# holds one, and a varint cut short.
GARBAGE = (b"\x0a\x7fx", b"\x80")


@dataclass(frozen=True, slots=True)
class Method:
    path: str  # /package.Service/Method
    client_streaming: bool
    server_streaming: bool


def served_methods(channel: grpc.Channel) -> list[Method]:
    """Every method of every service the server lists, reflection's own included."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    listed = next(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    ))  # fmt: skip
    methods = []
    for service in listed.list_services_response.service:
        reply = next(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=service.name)]),
            timeout=10,
        ))  # fmt: skip
        package, _, name = service.name.rpartition(".")
        for raw in reply.file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(raw)
            if file.package != package:
                continue
            for svc in file.service:
                if svc.name == name:
                    methods += [
                        Method(f"/{service.name}/{m.name}", m.client_streaming,
                               m.server_streaming)
                        for m in svc.method
                    ]  # fmt: skip
    return methods


def send_raw(channel: grpc.Channel, method: Method, payload: bytes, timeout: float = 10) -> None:
    """Call ``method`` with ``payload`` as its (only) request message, unparsed; read the
    first answer. Raises grpc.RpcError with the server's status."""
    shape = ("stream" if method.client_streaming else "unary") + (
        "_stream" if method.server_streaming else "_unary"
    )
    call = getattr(channel, shape)(method.path)  # no serializers: bytes as they are
    request = iter([payload]) if method.client_streaming else payload
    result = call(request, timeout=timeout)
    if method.server_streaming:
        next(result, None)
        result.cancel()
