"""Tokens across the worker processes of `keysvc serve --workers 2`, sharing PostgreSQL."""

from __future__ import annotations

import time

import grpc
import pytest

from keysvc.v1 import tokens_pb2, tokens_pb2_grpc
from tests.conftest import run_together
from tests.servers import WORKERS, close_clients, open_clients_per_worker, start_keysvc_server, stop_keysvc_server
from tests.test_tokens import random_pan

TIMEOUT = 30


def wait_until(condition, what: str, within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        time.sleep(0.02)


def test_workers_share_one_token_per_pan_and_see_rotation_and_shredding(token, postgres_url, tmp_path, merchant,
                                                                          monkeypatch):
    monkeypatch.setenv("KEYSVC_ALLOW_DETOKENIZE", "true")
    server = start_keysvc_server(token, postgres_url, tmp_path / "serve.log", workers=WORKERS)
    try:
        clients = open_clients_per_worker(server, 2)
        stubs = [tokens_pb2_grpc.TokenServiceStub(client.channel) for client in clients]
        assert len({client.worker_pid for client in clients}) == WORKERS
        try:
            pans = [random_pan() for _ in range(20)]

            def tokenize(index: int) -> dict[str, str]:
                order = pans[index:] + pans[:index]
                response = stubs[index % len(stubs)].Tokenize(
                    tokens_pb2.TokenizeRequest(domain=merchant, pans=order), timeout=TIMEOUT)
                return {pan: result.token.token for pan, result in zip(order, response.results)}

            answers = run_together(8, tokenize)
            assert all(answer == answers[0] for answer in answers)
            made = [answers[0][pan] for pan in pans]
            for stub in stubs:
                response = stub.Detokenize(tokens_pb2.DetokenizeRequest(domain=merchant, tokens=made),
                                           timeout=TIMEOUT)
                assert [result.token.pan for result in response.results] == pans

            rotated = stubs[0].RotateTokenKey(tokens_pb2.RotateTokenKeyRequest(domain=merchant), timeout=TIMEOUT)
            for stub in stubs:
                wait_until(lambda: stub.Tokenize(
                    tokens_pb2.TokenizeRequest(domain=merchant, pans=[random_pan()]), timeout=TIMEOUT
                ).results[0].token.key_version == rotated.key_version, "new tokens under the new data key")

            stubs[1].ShredTokenDomain(tokens_pb2.ShredTokenDomainRequest(domain=merchant), timeout=TIMEOUT)

            def refused(stub) -> bool:
                try:
                    stub.Detokenize(tokens_pb2.DetokenizeRequest(domain=merchant, tokens=made[:1]), timeout=TIMEOUT)
                except grpc.RpcError as error:
                    return error.code() is grpc.StatusCode.FAILED_PRECONDITION
                return False

            for stub in stubs:
                wait_until(lambda: refused(stub), "detokenization refused after the shred")
        finally:
            close_clients(clients)
    finally:
        stop_keysvc_server(server)
    log = server.log()
    assert not any(pan in log for pan in pans)
