"""The client library (keysvc.client) against a real server: typed calls, errors carrying
their ErrorInfo reason, retries on UNAVAILABLE only, mutual TLS from a PKI folder."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from keysvc.client import KeysvcCallError, KeysvcClient, TlsIdentity
from keysvc.model import KeyAlgorithm, KeyPurpose
from keysvc.rpc.server import ServerOptions, create_server
from keysvc.v1 import keys_pb2


def test_seal_verify_and_batch_through_the_client(server, merchant):
    key = server.domain.keys.create_key(merchant, "k", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)

    with KeysvcClient(server.address) as client:
        sealed = client.seal(key.key_id, b"amount=1")
        verified = client.verify(key.key_id, b"amount=1", sealed.seal)
        batch = client.batch_seal(key.key_id, [b"a", b"x" * 70_000, b"b"])

    assert verified.valid and verified.version == 1
    assert batch[0].seal and batch[2].seal
    assert isinstance(batch[1], KeysvcCallError) and batch[1].code == grpc.StatusCode.INVALID_ARGUMENT


def test_errors_carry_code_reason_and_are_not_retried(server, merchant):
    calls = []

    def counted(request, timeout):
        calls.append(request)
        return server.keys.GetKey(request, timeout=timeout)

    with KeysvcClient(server.address) as client:
        with pytest.raises(KeysvcCallError) as raised:
            client.call(counted, keys_pb2.GetKeyRequest(key_id=f"{merchant}/missing"))

    assert (raised.value.code, raised.value.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert len(calls) == 1


def test_unavailable_is_retried_until_the_server_answers(domain, merchant):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = []

    def start_later():
        time.sleep(0.4)
        grpc_server, _, _ = create_server(f"127.0.0.1:{port}", domain.keys, domain.sealer,
                                          ServerOptions(reuse_port=False), signer=domain.signer)
        grpc_server.start()
        started.append(grpc_server)

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        with KeysvcClient(f"127.0.0.1:{port}", timeout=10, retries=10) as client:
            created = client.call(client.keys.CreateKey, keys_pb2.CreateKeyRequest(
                merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256))
    finally:
        thread.join()
        for grpc_server in started:
            grpc_server.stop(None)

    assert created.key.key_id == f"{merchant}/k"


def test_a_server_that_never_comes_is_unavailable_within_the_deadline():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    began = time.monotonic()

    with KeysvcClient(f"127.0.0.1:{port}", timeout=2) as client:
        with pytest.raises(KeysvcCallError) as raised:
            client.seal("m/k", b"m")

    assert raised.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - began < 3


def test_tls_identity_from_a_pki_folder(tmp_path):
    from keysvc.pki import make_dev_pki

    make_dev_pki(tmp_path)
    identity = TlsIdentity.from_pki(tmp_path, "gateway")

    assert identity.ca.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" in identity.key
