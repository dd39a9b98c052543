"""Builds the gRPC server: servicers, health checking, reflection, limits."""

from __future__ import annotations

import weakref
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from keysvc.approvals import Approvals
from keysvc.audit import AuditTrail
from keysvc.authz import Policy
from keysvc.keys import KeyManager
from keysvc.limits import RateLimiter
from keysvc.masterkey import MasterKeyAdmin
from keysvc.policies import PolicyBook
from keysvc.replicas import Replica
from keysvc.rpc.approvals_servicer import ApprovalServicer
from keysvc.rpc.audit_servicer import AuditServicer
from keysvc.rpc.auth import AuthInterceptor
from keysvc.rpc.interceptors import ObservingInterceptor
from keysvc.rpc.keys_servicer import KeyServicer
from keysvc.rpc.masterkey_servicer import DELIVER_METHOD, MasterKeyServicer
from keysvc.rpc.policy_servicer import PROPOSE_POLICY_METHOD, PolicyServicer
from keysvc.rpc.replicas_servicer import ReplicaServicer
from keysvc.rpc.seals_servicer import SealServicer
from keysvc.rpc.signing_servicer import SigningServicer
from keysvc.rpc.tokens_servicer import TokenServicer
from keysvc.seals import Sealer
from keysvc.signing import Signer
from keysvc.tokens import Tokenizer
from keysvc.v1 import (
    approvals_pb2,
    approvals_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    masterkey_pb2,
    masterkey_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    replicas_pb2,
    replicas_pb2_grpc,
    seals_pb2,
    seals_pb2_grpc,
    signing_pb2,
    signing_pb2_grpc,
    tokens_pb2,
    tokens_pb2_grpc,
)

SERVICE_NAMES = (
    keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
    seals_pb2.DESCRIPTOR.services_by_name["SealService"].full_name,
    signing_pb2.DESCRIPTOR.services_by_name["SigningService"].full_name,
)
TOKEN_SERVICE_NAME = tokens_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name
AUDIT_SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
APPROVAL_SERVICE_NAME = approvals_pb2.DESCRIPTOR.services_by_name["ApprovalService"].full_name
MASTER_KEY_SERVICE_NAME = masterkey_pb2.DESCRIPTOR.services_by_name["MasterKeyService"].full_name
REPLICA_SERVICE_NAME = replicas_pb2.DESCRIPTOR.services_by_name["ReplicaService"].full_name
POLICY_SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


def _undecorated(servicer, name: str):
    """servicer.name without its @translated wrapper: an approval runs it inside its own
    call, whose wrapper then turns the operation's errors into that call's status."""
    function = getattr(type(servicer), name)
    return lambda request, context: function.__wrapped__(servicer, request, context)


@dataclass(frozen=True)
class ServerOptions:
    # Whole request messages above this are refused by gRPC with RESOURCE_EXHAUSTED.
    max_message_bytes: int = 4 * 1024 * 1024
    # The HSM is serialised per process and python-pkcs11 drops the GIL twice per
    # call (keysvc's own HMAC path keeps it): past a few threads, more threads only
    # add switching (measured with make bench).
    max_threads: int = 4
    reflection: bool = True
    # Lets several worker processes listen on one port.
    reuse_port: bool = True
    # Access log events: "all" calls, the calls not OK ("errors"), or "off" (see interceptors).
    access_log: str = "errors"


def new_grpc_server(options: ServerOptions, interceptors: Sequence[grpc.ServerInterceptor] = ()) -> grpc.Server:
    """An empty gRPC server with keysvc's thread pool and limits (the benchmark's echo
    server is built with it too, so that both are the same kind of server)."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_threads, thread_name_prefix="keysvc-rpc"),
        interceptors=tuple(interceptors),
        options=[
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.so_reuseport", 1 if options.reuse_port else 0),
        ],
    )


def listen(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Binds `address` ('host:0' picks a port), with TLS when given credentials, and
    returns the port. Raises OSError."""
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


@dataclass(frozen=True)
class Security:
    """Mutual TLS and who may call what. None of it in the --insecure-loopback mode."""

    credentials: grpc.ServerCredentials
    policy: Policy


def server_credentials(certificate: Path, key: Path, client_ca: Path) -> grpc.ServerCredentials:
    """TLS with the server's certificate, requiring client certificates from `client_ca`."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), certificate.read_bytes())], root_certificates=client_ca.read_bytes(),
        require_client_auth=True,
    )


def create_server(
    address: str, keys: KeyManager, sealer: Sealer, options: ServerOptions = ServerOptions(),
    *, signer: Signer, tokenizer: Tokenizer | None = None, on_unavailable: Callable[[], None] | None = None,
    audit_trail: AuditTrail | None = None, security: Security | None = None, approvals: Approvals | None = None,
    limiter: RateLimiter | None = None, replicas: Replica | None = None,
    master_keys: MasterKeyAdmin | None = None, policies: PolicyBook | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A server bound to `address` ('host:0' picks a port), not yet started; it offers
    TokenService when given a tokenizer, AuditService when given an audit trail,
    ReplicaService when given this process's replica and MasterKeyService when given
    `master_keys`.
    Returns the server, the bound port and its health servicer.

    Every unary call is observed (request id, access log, metrics: see
    rpc/interceptors.py), then authorised and audited (rpc/auth.py); `on_unavailable`
    is called after a call ends UNAVAILABLE. Without `security` the server listens
    in plain text and lets every caller do everything: for loopback development only.
    With security and `approvals`, the methods approvals.requires (by default ImportKey,
    DestroyKeyVersion, ShredTokenDomain, ProposePolicy; always DeliverMasterKey) need a
    second key-admin (ApprovalService), and DeliverMasterKey and
    ProposePolicy are checked before they wait for it; with security, `limiter` limits each
    identity's Verify and Detokenize rates and expensive calls need a deadline.
    With security and `policies` (the book of security.policy), PolicyService changes
    the policy: under dual control when given `approvals`."""
    if security is None:
        approvals = None  # dual control needs identities
        policies = None  # no policy to change
    policy_servicer = PolicyServicer(policies) if policies is not None else None
    master_key_servicer = MasterKeyServicer(master_keys) if master_keys is not None else None
    # Requests that wait for approval are checked first, so one that cannot run fails now.
    prechecks = {}
    if policy_servicer is not None:
        prechecks[PROPOSE_POLICY_METHOD] = policy_servicer.check_proposal
    if master_key_servicer is not None:
        prechecks[DELIVER_METHOD] = master_key_servicer.check_delivery
    server = new_grpc_server(options, [
        ObservingInterceptor(on_unavailable, access_log=options.access_log),
        AuthInterceptor(security.policy if security else None, audit_trail, approvals, limiter, prechecks),
    ])
    key_servicer = KeyServicer(keys)
    keys_pb2_grpc.add_KeyServiceServicer_to_server(key_servicer, server)
    runners = {
        "/keysvc.v1.KeyService/ImportKey": (keys_pb2.ImportKeyRequest, _undecorated(key_servicer, "ImportKey")),
        "/keysvc.v1.KeyService/DestroyKeyVersion": (
            keys_pb2.DestroyKeyVersionRequest, _undecorated(key_servicer, "DestroyKeyVersion")),
    }
    seals_pb2_grpc.add_SealServiceServicer_to_server(SealServicer(sealer), server)
    service_names = SERVICE_NAMES
    if tokenizer is not None:
        token_servicer = TokenServicer(tokenizer)
        tokens_pb2_grpc.add_TokenServiceServicer_to_server(token_servicer, server)
        runners["/keysvc.v1.TokenService/ShredTokenDomain"] = (
            tokens_pb2.ShredTokenDomainRequest, _undecorated(token_servicer, "ShredTokenDomain"))
        service_names = (*SERVICE_NAMES, TOKEN_SERVICE_NAME)
    signing_pb2_grpc.add_SigningServiceServicer_to_server(SigningServicer(signer), server)
    if audit_trail is not None:
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(audit_trail), server)
        service_names = (*service_names, AUDIT_SERVICE_NAME)
    if master_key_servicer is not None:
        # DeliverMasterKey runs only as an approved operation (see MasterKeyServicer).
        masterkey_pb2_grpc.add_MasterKeyServiceServicer_to_server(master_key_servicer, server)
        runners[DELIVER_METHOD] = (masterkey_pb2.DeliverMasterKeyRequest, master_key_servicer.deliver_approved)
        service_names = (*service_names, MASTER_KEY_SERVICE_NAME)
    if policy_servicer is not None:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(policy_servicer, server)
        runners[PROPOSE_POLICY_METHOD] = (policy_pb2.ProposePolicyRequest,
                                          _undecorated(policy_servicer, "ProposePolicy"))
        service_names = (*service_names, POLICY_SERVICE_NAME)
    if approvals is not None:
        approvals_pb2_grpc.add_ApprovalServiceServicer_to_server(ApprovalServicer(approvals, runners), server)
        service_names = (*service_names, APPROVAL_SERVICE_NAME)
    if replicas is not None:
        replicas_pb2_grpc.add_ReplicaServiceServicer_to_server(ReplicaServicer(replicas), server)
        service_names = (*service_names, REPLICA_SERVICE_NAME)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if options.reflection:
        reflection.enable_server_reflection(
            (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    _SERVED[health_servicer] = service_names
    return server, listen(server, address, security.credentials if security else None), health_servicer


# The keysvc services each health servicer answers for (set_serving marks those).
_SERVED: "weakref.WeakKeyDictionary[health.HealthServicer, tuple[str, ...]]" = weakref.WeakKeyDictionary()


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    """Marks the whole server and each keysvc service SERVING or NOT_SERVING (ignored
    once the servicer is shutting down)."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *_SERVED.get(health_servicer, SERVICE_NAMES)):
        health_servicer.set(name, status)
