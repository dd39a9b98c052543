"""Fuzzing every RPC: hypothesis builds request messages field by field from the
protobuf descriptors (odd strings, bytes, out-of-range numbers, unknown enum values,
batches, nested messages; key ids of real keys now and then) and sends them to a real
server. Whatever comes in, the answer is a deliberate status: never INTERNAL or UNKNOWN,
and never a hang (each call has a deadline)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keysvc.model import KeyAlgorithm, KeyPlatform, KeyPurpose
from keysvc.keys import KeyProfile
from keysvc.rpc.server import ServerOptions, create_server
from keysvc.store.tokens import TokenStore
from keysvc.tokens import Tokenizer
from keysvc.v1 import keys_pb2, keys_pb2_grpc, seals_pb2, seals_pb2_grpc, signing_pb2, signing_pb2_grpc
from keysvc.v1 import tokens_pb2, tokens_pb2_grpc

KNOWN_KEYS = ["fuzz/hmac", "fuzz/sips", "fuzz/rsa"]
SERVICES = [
    (keys_pb2, "KeyService", keys_pb2_grpc.KeyServiceStub),
    (seals_pb2, "SealService", seals_pb2_grpc.SealServiceStub),
    (signing_pb2, "SigningService", signing_pb2_grpc.SigningServiceStub),
    (tokens_pb2, "TokenService", tokens_pb2_grpc.TokenServiceStub),
]
INT_LIMITS = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}


def _value(field: FieldDescriptor, depth: int):
    if field.name == "key_id":
        return st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=20))
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=200)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([value.number for value in field.enum_type.values]),
                         st.integers(-5, 50))
    if field.type in INT_LIMITS:
        low, high = INT_LIMITS[field.type]
        return st.one_of(st.integers(0, 5), st.integers(low, high))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name.startswith("google.protobuf"):
            return st.none()
        return message_of(field.message_type, depth + 1)
    return st.none()


def message_of(descriptor, depth: int = 0):
    if depth > 2:
        return st.just({})
    fields = {}
    for field in descriptor.fields:
        value = _value(field, depth)
        fields[field.name] = st.lists(value, max_size=3) if field.is_repeated else value
    return st.fixed_dictionaries({}, optional=fields)


def _fill(message, values: dict):
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if value is None:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                for item in value:
                    _fill(getattr(message, name).add(), item)
            else:
                _fill(getattr(message, name), value)
        elif field.is_repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


CALLS = [(module, service, stub, method) for module, service, stub in SERVICES
         for method in module.DESCRIPTOR.services_by_name[service].methods]


@pytest.fixture(scope="module")
def fuzz_server(hsm_token, tmp_path_factory):
    from tests.conftest import make_domain

    domain = make_domain(hsm_token, f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'k.db'}")
    domain.keys.create_key("fuzz", "hmac", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
    domain.keys.create_key("fuzz", "sips", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256, KeyProfile(KeyPlatform.SIPS))
    domain.keys.create_key("fuzz", "rsa", KeyPurpose.SIGN, KeyAlgorithm.RSA_2048)
    tokenizer = Tokenizer(domain.hsm, TokenStore(domain.store.engine), detokenize_allowed=True)
    grpc_server, port, _ = create_server("127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False),
                                         signer=domain.signer, tokenizer=tokenizer)
    grpc_server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    channel.close()
    grpc_server.stop(None)
    domain.store.close()


@pytest.mark.parametrize("module, service, stub_class, method", CALLS,
                         ids=[f"{service}.{method.name}" for _, service, _, method in CALLS])
def test_any_request_gets_a_deliberate_status(fuzz_server, module, service, stub_class, method):
    request_class = getattr(module, method.input_type.name)
    call = getattr(stub_class(fuzz_server), method.name)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(message_of(request_class.DESCRIPTOR))
    def check(values):
        request = _fill(request_class(), values)
        try:
            call(request, timeout=10)
        except grpc.RpcError as error:
            assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), \
                f"{method.name}: {error.code()} {error.details()} for {request}"
            assert error.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method.name} hung on {request}"

    check()
