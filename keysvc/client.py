"""A typed Python client for keysvc, for the gateway and the command line.

    from keysvc.client import KeysvcClient, TlsIdentity
    client = KeysvcClient("keysvc.internal:50051", tls=TlsIdentity.from_pki("data/pki", "gateway"))
    seal = client.seal("002001000000001/sips", b"amount=100|keyVersion=1", scheme="SIPS_POST")
    assert client.verify("002001000000001/sips", b"...", seal.seal, scheme="SIPS_POST").valid

Every call has a deadline (`timeout`); a call that ends UNAVAILABLE (and only that one:
anything else is an answer) is tried again with exponential backoff and jitter within
the same deadline. Errors are KeysvcCallError, carrying the status code, the ErrorInfo
reason and metadata, and the message.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from keysvc.v1 import (
    approvals_pb2_grpc,
    audit_pb2_grpc,
    keys_pb2_grpc,
    masterkey_pb2_grpc,
    policy_pb2_grpc,
    replicas_pb2_grpc,
    seals_pb2,
    seals_pb2_grpc,
    signing_pb2,
    signing_pb2_grpc,
    tokens_pb2,
    tokens_pb2_grpc,
)

DEFAULT_TIMEOUT = 10.0
RETRIES = 4
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 1.0


class KeysvcCallError(Exception):
    """A call keysvc refused or could not serve."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", metadata: dict | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}

    @classmethod
    def of(cls, error: grpc.RpcError) -> "KeysvcCallError":
        reason, metadata = "", {}
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
        for detail in status.details if status else ():
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
        return cls(error.code(), error.details() or "", reason, metadata)


@dataclass(frozen=True)
class TlsIdentity:
    """The CA to trust and the client certificate and key to present (PEM bytes)."""

    ca: bytes
    certificate: bytes
    key: bytes

    @classmethod
    def from_pki(cls, directory: str | Path, role: str) -> "TlsIdentity":
        """From a folder as `keysvc dev-pki` makes it: ca.crt, client-<role>.crt/.key."""
        directory = Path(directory)
        return cls((directory / "ca.crt").read_bytes(), (directory / f"client-{role}.crt").read_bytes(),
                   (directory / f"client-{role}.key").read_bytes())


class KeysvcClient:
    """The stubs of every keysvc service over one channel, and typed helpers."""

    def __init__(self, target: str, *, tls: TlsIdentity | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = RETRIES, options: Sequence[tuple[str, object]] = ()) -> None:
        """`target` is one address, or several replicas' (`ipv4:HOST:PORT,HOST:PORT`, with
        options `[("grpc.lb_policy_name", "round_robin")]` to spread calls over them)."""
        options = list(options)
        if tls is None:  # only for a server run with --insecure-loopback
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(
                target, grpc.ssl_channel_credentials(tls.ca, tls.key, tls.certificate), options=options)
        self.timeout = timeout
        self.retries = retries
        self.keys = keys_pb2_grpc.KeyServiceStub(self.channel)
        self.seals = seals_pb2_grpc.SealServiceStub(self.channel)
        self.signing = signing_pb2_grpc.SigningServiceStub(self.channel)
        self.tokens = tokens_pb2_grpc.TokenServiceStub(self.channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        self.approvals = approvals_pb2_grpc.ApprovalServiceStub(self.channel)
        self.replicas = replicas_pb2_grpc.ReplicaServiceStub(self.channel)
        self.master_keys = masterkey_pb2_grpc.MasterKeyServiceStub(self.channel)
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "KeysvcClient":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def call(self, method, request, *, timeout: float | None = None):
        """method(request) within one deadline, retried on UNAVAILABLE only. Raises
        KeysvcCallError."""
        deadline = time.monotonic() + (timeout or self.timeout)
        backoff = FIRST_BACKOFF
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=max(0.001, deadline - time.monotonic()))
            except grpc.RpcError as error:
                retry = error.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries
                pause = backoff * (0.5 + random.random())  # jitter: retrying clients spread out
                if not retry or time.monotonic() + pause >= deadline:
                    raise KeysvcCallError.of(error) from None
                time.sleep(pause)
                backoff = min(backoff * 2, MAX_BACKOFF)
        raise AssertionError("unreachable")

    # -- seals ---------------------------------------------------------------------------------

    @staticmethod
    def _seal_fields(key_id: str, message: bytes, scheme: str, fields, version: int) -> dict:
        return dict(
            key_id=key_id, message=message, version=version,
            scheme=seals_pb2.SealScheme.Value(f"SEAL_SCHEME_{scheme}"),
            fields=[seals_pb2.Field(name=name, value=value) for name, value in (fields or ())],
        )

    def seal(self, key_id: str, message: bytes = b"", *, scheme: str = "HMAC",
             fields: list[tuple[str, str]] | None = None, version: int = 0) -> seals_pb2.SealResponse:
        return self.call(self.seals.Seal, seals_pb2.SealRequest(**self._seal_fields(key_id, message, scheme,
                                                                                    fields, version)))

    def verify(self, key_id: str, message: bytes = b"", seal: str = "", *, scheme: str = "HMAC",
               fields: list[tuple[str, str]] | None = None, version: int = 0) -> seals_pb2.VerifyResponse:
        return self.call(self.seals.Verify, seals_pb2.VerifyRequest(
            seal=seal, **self._seal_fields(key_id, message, scheme, fields, version)))

    def batch_seal(self, key_id: str, messages: list[bytes], *, scheme: str = "HMAC",
                   chunk: int = 1000) -> list[seals_pb2.SealResponse | KeysvcCallError]:
        """One result per message, in order: a SealResponse, or the item's own error."""
        results: list[seals_pb2.SealResponse | KeysvcCallError] = []
        for start in range(0, len(messages), chunk):
            response = self.call(self.seals.BatchSeal, seals_pb2.BatchSealRequest(requests=[
                seals_pb2.SealRequest(**self._seal_fields(key_id, message, scheme, None, 0))
                for message in messages[start:start + chunk]
            ]))
            for result in response.results:
                if result.WhichOneof("outcome") == "response":
                    results.append(result.response)
                else:
                    results.append(KeysvcCallError(_code_of(result.error.code), result.error.message,
                                                   result.error.reason))
        return results

    # -- signatures and tokens ----------------------------------------------------------------

    def sign(self, key_id: str, message: bytes, algorithm: str = "RSA_PSS_SHA256") -> signing_pb2.SignResponse:
        return self.call(self.signing.Sign, signing_pb2.SignRequest(
            key_id=key_id, message=message,
            algorithm=signing_pb2.SignatureAlgorithm.Value(f"SIGNATURE_ALGORITHM_{algorithm}")))

    def tokenize(self, domain: str, pans: list[str]) -> tokens_pb2.TokenizeResponse:
        return self.call(self.tokens.Tokenize, tokens_pb2.TokenizeRequest(domain=domain, pans=pans))


def _code_of(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
