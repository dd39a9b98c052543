"""Client-side helpers the gRPC tests share: a mutual-TLS channel as a development
identity, a call's status code, and the ErrorInfo an error carries."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

CALL_TIMEOUT = 10.0


def channel_as(address: str, pki, name: str | None, ca: str = "ca.crt") -> grpc.Channel:
    """A TLS channel trusting `pki/ca`, presenting `pki/name.crt` (none when name is None)."""
    root = (pki / ca).read_bytes()
    if name is None:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root))
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(
        root, (pki / f"{name}.key").read_bytes(), (pki / f"{name}.crt").read_bytes()))


def code_of(call, request, timeout: float = CALL_TIMEOUT) -> grpc.StatusCode:
    """The status code `call(request)` ends with: OK or the error's."""
    try:
        call(request, timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call; fails the test when there is none."""
    for detail in rpc_status.from_call(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo")
