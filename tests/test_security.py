"""Mutual TLS, roles and the audit trail through a real gRPC server with TLS on a
loopback port: a development PKI made for the test, real client certificates per role,
and certificates the server must refuse."""

from __future__ import annotations

import datetime
import os
import subprocess

import grpc
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keysvc.audit import AuditTrail
from keysvc.authz import ROLES, Policy, roles_for
from keysvc.masterkey import MasterKeyAdmin
from keysvc.pki import dev_identity, issue_client_certificate, make_dev_pki
from keysvc.replicas import Replica
from keysvc.rpc.server import Security, ServerOptions, create_server, server_credentials
from keysvc.store.audit import AuditStore
from keysvc.store.schema import audit_records
from keysvc.store.tokens import TokenStore
from keysvc.tokens import Tokenizer
from keysvc.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    masterkey_pb2,
    masterkey_pb2_grpc,
    replicas_pb2,
    replicas_pb2_grpc,
    seals_pb2,
    seals_pb2_grpc,
    signing_pb2,
    signing_pb2_grpc,
    tokens_pb2,
    tokens_pb2_grpc,
)
from tests.grpc_helpers import channel_as, code_of
from tests.servers import KEYSVC

TIMEOUT = 10.0
SERVICES = {
    "KeyService": (keys_pb2, keys_pb2_grpc.KeyServiceStub),
    "SealService": (seals_pb2, seals_pb2_grpc.SealServiceStub),
    "SigningService": (signing_pb2, signing_pb2_grpc.SigningServiceStub),
    "TokenService": (tokens_pb2, tokens_pb2_grpc.TokenServiceStub),
    "AuditService": (audit_pb2, audit_pb2_grpc.AuditServiceStub),
    "MasterKeyService": (masterkey_pb2, masterkey_pb2_grpc.MasterKeyServiceStub),
    "ReplicaService": (replicas_pb2, replicas_pb2_grpc.ReplicaServiceStub),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    make_dev_pki(directory)
    # A grant limited to one merchant, and a certificate whose identity has no grant.
    issue_client_certificate(directory, "client-limited", "spiffe://keysvc.dev/limited-gateway")
    issue_client_certificate(directory, "client-stranger", "spiffe://keysvc.dev/stranger")
    with open(directory / "policy.toml", "a") as policy:
        policy.write('\n[[grant]]\nidentity = "spiffe://keysvc.dev/limited-gateway"\nroles = ["gateway"]\n'
                     'merchants = ["m-allowed"]\n')
    return directory


@pytest.fixture
def secure_server(domain, pki):
    trail = AuditTrail(domain.hsm, AuditStore(domain.store.engine))
    security = Security(server_credentials(pki / "server.crt", pki / "server.key", pki / "ca.crt"),
                        Policy.load(pki / "policy.toml"))
    # With mutual TLS the detokenizer role decides who sees PANs (as keysvc serve does).
    tokenizer = Tokenizer(domain.hsm, TokenStore(domain.store.engine), detokenize_allowed=True)
    grpc_server, port, _ = create_server("127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False),
                                         signer=domain.signer, tokenizer=tokenizer, audit_trail=trail,
                                         security=security,
                                         master_keys=MasterKeyAdmin(domain.hsm, domain.store.engine),
                                         replicas=Replica(domain.store, domain.ring, database_url=""))
    grpc_server.start()
    yield f"localhost:{port}", trail
    grpc_server.stop(None)






def every_rpc():
    for service, (module, stub_class) in SERVICES.items():
        descriptor = module.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            request_class = getattr(module, method.input_type.name, None) or getattr(
                seals_pb2, method.input_type.name)
            yield service, stub_class, method.name, request_class


def test_every_rpc_for_every_role_is_allowed_or_permission_denied_as_the_policy_says(secure_server, pki):
    address, _trail = secure_server
    checked = 0
    for role in ROLES:
        with channel_as(address, pki, f"client-{role}") as channel:
            for service, stub_class, method, request_class in every_rpc():
                code = code_of(getattr(stub_class(channel), method), request_class())
                allowed = role in roles_for(f"/keysvc.v1.{service}/{method}")
                if allowed:
                    assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), \
                        (role, method, code)
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (role, method, code)
                checked += 1
    assert checked > 5 * 25


def test_health_is_open_to_any_client_of_the_ca(secure_server, pki):
    address, _trail = secure_server
    with channel_as(address, pki, "client-auditor") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _foreign_and_expired_certificates(pki):
    """A client certificate from another CA, and an expired one from the right CA."""
    other = pki / "other"
    other.mkdir(exist_ok=True)
    make_dev_pki(other)
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    expired = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")]))
               .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(past).not_valid_after(past + datetime.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(dev_identity("gateway"))]),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    (pki / "client-expired.crt").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    (pki / "client-expired.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for suffix in ("crt", "key"):
        (pki / f"client-foreign.{suffix}").write_bytes((other / f"client-gateway.{suffix}").read_bytes())


@pytest.mark.parametrize("client", [None, "client-foreign", "client-expired"])
def test_no_certificate_one_from_another_ca_or_an_expired_one_is_refused(secure_server, pki, client):
    address, _trail = secure_server
    _foreign_and_expired_certificates(pki)
    request = seals_pb2.SealRequest(key_id="m/k", message=b"m")

    with channel_as(address, pki, client) as channel:
        code = code_of(seals_pb2_grpc.SealServiceStub(channel).Seal, request)

    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def test_an_identity_without_a_grant_and_a_grant_outside_its_merchants_are_denied(secure_server, pki, domain):
    address, _trail = secure_server
    from keysvc.model import KeyAlgorithm, KeyPurpose

    for merchant in ("m-allowed", "m-other"):
        domain.keys.create_key(merchant, "k", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)

    with channel_as(address, pki, "client-stranger") as channel:
        stranger = code_of(seals_pb2_grpc.SealServiceStub(channel).Seal,
                           seals_pb2.SealRequest(key_id="m-allowed/k", message=b"m"))
    with channel_as(address, pki, "client-limited") as channel:
        stub = seals_pb2_grpc.SealServiceStub(channel)
        own = code_of(stub.Seal, seals_pb2.SealRequest(key_id="m-allowed/k", message=b"m"))
        other = code_of(stub.Seal, seals_pb2.SealRequest(key_id="m-other/k", message=b"m"))
        mixed = code_of(stub.BatchSeal, seals_pb2.BatchSealRequest(requests=[
            seals_pb2.SealRequest(key_id="m-allowed/k", message=b"m"),
            seals_pb2.SealRequest(key_id="m-other/k", message=b"m")]))

    assert stranger == other == mixed == grpc.StatusCode.PERMISSION_DENIED
    assert own == grpc.StatusCode.OK


def test_key_changes_and_denied_calls_are_audited_with_the_caller_identity(secure_server, pki, merchant):
    address, trail = secure_server
    with channel_as(address, pki, "client-key-admin") as channel:
        keys_pb2_grpc.KeyServiceStub(channel).CreateKey(keys_pb2.CreateKeyRequest(
            merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=TIMEOUT)
    with channel_as(address, pki, "client-gateway") as channel:
        denied = code_of(keys_pb2_grpc.KeyServiceStub(channel).RotateKey,
                         keys_pb2.RotateKeyRequest(key_id=f"{merchant}/k"))

    records = [(r.identity, r.operation, r.target, r.outcome) for r in trail.read(limit=100)]
    assert denied == grpc.StatusCode.PERMISSION_DENIED
    assert (dev_identity("key-admin"), "/keysvc.v1.KeyService/CreateKey", f"{merchant}/k", "STARTED") in records
    assert (dev_identity("key-admin"), "/keysvc.v1.KeyService/CreateKey", f"{merchant}/k", "OK") in records
    assert (dev_identity("gateway"), "/keysvc.v1.KeyService/RotateKey", f"{merchant}/k", "PERMISSION_DENIED") \
        in records
    assert trail.verify().intact


def test_a_failing_audit_write_blocks_the_operation(secure_server, pki, merchant, domain):
    address, _trail = secure_server
    with domain.store.engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE audit_records"))

    with channel_as(address, pki, "client-key-admin") as channel:
        code = code_of(keys_pb2_grpc.KeyServiceStub(channel).CreateKey, keys_pb2.CreateKeyRequest(
            merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256))

    assert code == grpc.StatusCode.UNAVAILABLE
    assert domain.store.load_key(f"{merchant}/k") is None


def test_audit_cli_verifies_the_trail_and_names_a_tampered_record(secure_server, pki, merchant, domain):
    address, _trail = secure_server
    with channel_as(address, pki, "client-key-admin") as channel:
        for name in ("a", "b", "c"):
            keys_pb2_grpc.KeyServiceStub(channel).CreateKey(keys_pb2.CreateKeyRequest(
                merchant_id=merchant, name=name, algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=TIMEOUT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSVC_")}

    def audit(*args):
        return subprocess.run([KEYSVC, "--server", address, "--pki", str(pki), "audit", *args],
                              capture_output=True, text=True, env=env, timeout=60)

    intact = audit("verify")
    listed = audit("list")
    with domain.store.engine.begin() as connection:
        connection.execute(sa.update(audit_records).where(audit_records.c.seq == 3).values(outcome="OK"))
    tampered = audit("verify")

    assert intact.returncode == 0 and "intact: 6 records, 6 signed checkpoints" in intact.stdout, intact.stderr
    assert "/keysvc.v1.KeyService/CreateKey" in listed.stdout
    assert tampered.returncode == 1 and "TAMPERED at record 3" in tampered.stdout


# -- dual control -------------------------------------------------------------------------------------


@pytest.fixture
def dual_control_server(domain, pki):
    from keysvc.approvals import Approvals

    # A second key-admin identity, so that two distinct admins exist.
    issue_client_certificate(pki, "client-key-admin-2", "spiffe://keysvc.dev/key-admin-2")
    policy = pki / "policy-dual.toml"
    policy.write_text((pki / "policy.toml").read_text()
                      + '\n[[grant]]\nidentity = "spiffe://keysvc.dev/key-admin-2"\nroles = ["key-admin"]\n')
    trail = AuditTrail(domain.hsm, AuditStore(domain.store.engine))
    approvals = Approvals(domain.store.engine, domain.hsm, audit=trail)
    security = Security(server_credentials(pki / "server.crt", pki / "server.key", pki / "ca.crt"),
                        Policy.load(policy))
    grpc_server, port, _ = create_server("127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False),
                                         signer=domain.signer, audit_trail=trail, security=security,
                                         approvals=approvals)
    grpc_server.start()
    yield f"localhost:{port}", approvals, trail
    grpc_server.stop(None)


def _destroy_request(domain, merchant):
    from keysvc.model import KeyAlgorithm, KeyPurpose

    key = domain.keys.create_key(merchant, "k", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
    domain.keys.rotate_key(key.key_id)
    return keys_pb2.DestroyKeyVersionRequest(key_id=key.key_id, version=1)


def _pending_id(error: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    for detail in rpc_status.from_call(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.reason == "APPROVAL_REQUIRED"
            return info.metadata["operation_id"]
    raise AssertionError("no ErrorInfo")


def test_dual_control_a_second_admin_approves_then_it_runs_and_nothing_runs_on_one(dual_control_server, pki,
                                                                                   domain, merchant):
    from keysvc.model import KeyVersionState
    from keysvc.v1 import approvals_pb2, approvals_pb2_grpc

    address, _approvals, trail = dual_control_server
    request = _destroy_request(domain, merchant)
    with channel_as(address, pki, "client-key-admin") as first, channel_as(address, pki, "client-key-admin-2") as second:
        with pytest.raises(grpc.RpcError) as asked:
            keys_pb2_grpc.KeyServiceStub(first).DestroyKeyVersion(request, timeout=TIMEOUT)
        operation_id = _pending_id(asked.value)
        assert domain.store.load_key(request.key_id).find_version(1).state is KeyVersionState.ENABLED
        own = code_of(approvals_pb2_grpc.ApprovalServiceStub(first).ApproveOperation,
                      approvals_pb2.DecideOperationRequest(operation_id=operation_id))
        listed = approvals_pb2_grpc.ApprovalServiceStub(second).ListPendingOperations(
            approvals_pb2.ListPendingOperationsRequest(), timeout=TIMEOUT)
        approved = approvals_pb2_grpc.ApprovalServiceStub(second).ApproveOperation(
            approvals_pb2.DecideOperationRequest(operation_id=operation_id), timeout=TIMEOUT)
        again = code_of(approvals_pb2_grpc.ApprovalServiceStub(second).ApproveOperation,
                        approvals_pb2.DecideOperationRequest(operation_id=operation_id))

    assert asked.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert own == grpc.StatusCode.PERMISSION_DENIED
    assert [op.operation_id for op in listed.operations] == [operation_id]
    result = keys_pb2.DestroyKeyVersionResponse()
    assert approved.response.Unpack(result) and result.key.key_id == request.key_id
    assert domain.store.load_key(request.key_id).find_version(1).state is KeyVersionState.DESTROYED
    assert again == grpc.StatusCode.FAILED_PRECONDITION
    outcomes = [(r.operation.rpartition("/")[2], r.outcome) for r in trail.read(limit=100)]
    assert ("DestroyKeyVersion", "APPROVAL_REQUIRED") in outcomes and ("ApproveOperation", "OK") in outcomes


def test_dual_control_covers_only_the_configured_operations(dual_control_server, pki, domain, merchant):
    from keysvc.authz import dual_control_methods
    from keysvc.model import KeyVersionState

    address, approvals, _trail = dual_control_server
    approvals.methods = dual_control_methods(["ImportKey"])  # as `auth.dual_control_operations = "ImportKey"`
    request = _destroy_request(domain, merchant)
    import_request = keys_pb2.ImportKeyRequest(merchant_id=merchant, name="imported", wrapped_secret=b"x" * 40,
                                               algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256)
    with channel_as(address, pki, "client-key-admin") as channel:
        keys = keys_pb2_grpc.KeyServiceStub(channel)
        destroyed = keys.DestroyKeyVersion(request, timeout=TIMEOUT)  # one admin is enough now
        with pytest.raises(grpc.RpcError) as asked:
            keys.ImportKey(import_request, timeout=TIMEOUT)
    assert destroyed.key.versions[-1].state == keys_pb2.KEY_VERSION_STATE_DESTROYED
    assert domain.store.load_key(request.key_id).find_version(1).state is KeyVersionState.DESTROYED
    assert _pending_id(asked.value)


def test_dual_control_a_rejected_or_expired_operation_never_runs(dual_control_server, pki, domain, merchant):
    from datetime import timedelta

    from keysvc.model import KeyVersionState
    from keysvc.v1 import approvals_pb2, approvals_pb2_grpc

    address, approvals, _trail = dual_control_server
    request = _destroy_request(domain, merchant)
    ids = []
    with channel_as(address, pki, "client-key-admin") as first, channel_as(address, pki, "client-key-admin-2") as second:
        for ttl in (approvals.ttl, timedelta(seconds=-1)):  # the second one expired when it was made
            approvals.ttl = ttl
            with pytest.raises(grpc.RpcError) as asked:
                keys_pb2_grpc.KeyServiceStub(first).DestroyKeyVersion(request, timeout=TIMEOUT)
            ids.append(_pending_id(asked.value))
        approvals_pb2_grpc.ApprovalServiceStub(second).RejectOperation(
            approvals_pb2.DecideOperationRequest(operation_id=ids[0]), timeout=TIMEOUT)
        rejected = code_of(approvals_pb2_grpc.ApprovalServiceStub(second).ApproveOperation,
                           approvals_pb2.DecideOperationRequest(operation_id=ids[0]))
        with pytest.raises(grpc.RpcError) as expired:
            approvals_pb2_grpc.ApprovalServiceStub(second).ApproveOperation(
                approvals_pb2.DecideOperationRequest(operation_id=ids[1]), timeout=TIMEOUT)

    assert rejected == expired.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in expired.value.details()
    assert domain.store.load_key(request.key_id).find_version(1).state is KeyVersionState.ENABLED


def test_dual_control_a_decided_operation_set_back_to_pending_in_the_database_never_runs(dual_control_server, pki,
                                                                                         domain, merchant):
    from keysvc.model import KeyVersionState
    from keysvc.store.schema import pending_operations
    from keysvc.v1 import approvals_pb2, approvals_pb2_grpc

    address, _approvals, _trail = dual_control_server
    request = _destroy_request(domain, merchant)
    with channel_as(address, pki, "client-key-admin") as first, channel_as(address, pki, "client-key-admin-2") as second:
        with pytest.raises(grpc.RpcError) as asked:
            keys_pb2_grpc.KeyServiceStub(first).DestroyKeyVersion(request, timeout=TIMEOUT)
        operation_id = _pending_id(asked.value)
        approvals_pb2_grpc.ApprovalServiceStub(second).RejectOperation(
            approvals_pb2.DecideOperationRequest(operation_id=operation_id), timeout=TIMEOUT)
        with domain.store.engine.begin() as connection:
            connection.execute(sa.update(pending_operations).where(pending_operations.c.operation_id == operation_id)
                               .values(state="PENDING", decided_by=""))
        with pytest.raises(grpc.RpcError) as replayed:
            approvals_pb2_grpc.ApprovalServiceStub(second).ApproveOperation(
                approvals_pb2.DecideOperationRequest(operation_id=operation_id), timeout=TIMEOUT)

    assert replayed.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "integrity check failed" in replayed.value.details()
    assert domain.store.load_key(request.key_id).find_version(1).state is KeyVersionState.ENABLED


def test_dual_control_a_pending_import_rewritten_in_the_database_is_refused_and_never_runs(dual_control_server, pki,
                                                                                          domain, merchant):
    """Whoever can write the database swaps the secret of a pending ImportKey for one they
    know (same key id, so the target an approver reads is unchanged): the approval is
    refused, nothing is imported, and the audit trail says why."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from keysvc.store.schema import pending_operations
    from keysvc.v1 import approvals_pb2, approvals_pb2_grpc
    from tests.crypto_helpers import OAEP_SHA1, pem_public_key

    address, approvals, trail = dual_control_server
    parameters = domain.keys.import_parameters()

    def import_request(secret: bytes) -> keys_pb2.ImportKeyRequest:
        return keys_pb2.ImportKeyRequest(
            merchant_id=merchant, name="imported", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256,
            wrapped_secret=pem_public_key(parameters).encrypt(secret, OAEP_SHA1),
            import_key_id=parameters.import_key_id)

    with channel_as(address, pki, "client-key-admin") as first, channel_as(address, pki, "client-key-admin-2") as second:
        with pytest.raises(grpc.RpcError) as asked:
            keys_pb2_grpc.KeyServiceStub(first).ImportKey(import_request(os.urandom(32)), timeout=TIMEOUT)
        operation_id = _pending_id(asked.value)
        with domain.store.engine.begin() as connection:
            connection.execute(sa.update(pending_operations).where(pending_operations.c.operation_id == operation_id)
                               .values(request=import_request(b"the attacker knows this secret!!").SerializeToString()))
        listed = approvals_pb2_grpc.ApprovalServiceStub(second).ListPendingOperations(
            approvals_pb2.ListPendingOperationsRequest(), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as refused:
            approvals_pb2_grpc.ApprovalServiceStub(second).ApproveOperation(
                approvals_pb2.DecideOperationRequest(operation_id=operation_id), timeout=TIMEOUT)

    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in rpc_status.from_call(refused.value).details)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION and info.reason == "PENDING_OPERATION_TAMPERED"
    assert "was not run" in refused.value.details()
    assert operation_id not in [operation.operation_id for operation in listed.operations]
    assert domain.store.load_key(f"{merchant}/imported") is None
    assert approvals.get(operation_id).state == "PENDING"  # refused, not claimed: it only expires
    records = [(r.identity, r.operation.rpartition("/")[2], r.target, r.outcome) for r in trail.read(limit=100)]
    assert ("spiffe://keysvc.dev/key-admin-2", "ImportKey", f"{merchant}/imported op={operation_id}",
            "PENDING_OPERATION_TAMPERED") in records
    assert ("spiffe://keysvc.dev/key-admin-2", "ApproveOperation", f"op={operation_id}",
            "FAILED_PRECONDITION") in records
    assert trail.verify().intact


# -- abuse limits -----------------------------------------------------------------------------------


def test_rate_limiter_buckets_refill_per_identity_and_kind():
    from keysvc.limits import Rate, RateLimited, RateLimiter

    now = [0.0]
    limiter = RateLimiter({"verify": Rate(10, 20)}, clock=lambda: now[0])
    limiter.take("a", "verify", 20)
    with pytest.raises(RateLimited) as refused:
        limiter.take("a", "verify", 5)
    limiter.take("b", "verify", 20)  # another identity has its own bucket
    limiter.take("a", "detokenize", 10_000)  # no limit set for this kind
    now[0] = 0.5
    limiter.take("a", "verify", 5)

    assert refused.value.retry_after == pytest.approx(0.5)


@pytest.fixture
def limited_server(domain, pki):
    from keysvc.limits import Rate, RateLimiter

    security = Security(server_credentials(pki / "server.crt", pki / "server.key", pki / "ca.crt"),
                        Policy.load(pki / "policy.toml"))
    limiter = RateLimiter({"verify": Rate(1, 5)})
    grpc_server, port, _ = create_server("127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False),
                                         signer=domain.signer, security=security, limiter=limiter)
    grpc_server.start()
    yield f"localhost:{port}"
    grpc_server.stop(None)


def test_verify_over_the_rate_limit_is_resource_exhausted_with_a_retry_hint(limited_server, pki, domain, merchant):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from keysvc.model import KeyAlgorithm, KeyPurpose

    key = domain.keys.create_key(merchant, "k", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
    request = seals_pb2.VerifyRequest(key_id=key.key_id, message=b"m", seal="00" * 32)
    with channel_as(limited_server, pki, "client-gateway") as channel:
        stub = seals_pb2_grpc.SealServiceStub(channel)
        answers = [code_of(stub.Verify, request) for _ in range(5)]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Verify(request, timeout=TIMEOUT)
        batch = code_of(stub.BatchVerify, seals_pb2.BatchVerifyRequest(requests=[request] * 3))

    assert answers == [grpc.StatusCode.OK] * 5
    assert refused.value.code() == batch == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in rpc_status.from_call(refused.value).details)
    assert retry.retry_delay.ToNanoseconds() > 0


def test_expensive_calls_need_a_deadline(secure_server, pki, domain, merchant):
    from keysvc.model import KeyAlgorithm, KeyPurpose

    address, _trail = secure_server
    key = domain.keys.create_key(merchant, "k", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
    batch = seals_pb2.BatchSealRequest(requests=[seals_pb2.SealRequest(key_id=key.key_id, message=b"m")])
    with channel_as(address, pki, "client-gateway") as channel:
        stub = seals_pb2_grpc.SealServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.BatchSeal(batch)
        done = stub.BatchSeal(batch, timeout=TIMEOUT)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "deadline" in refused.value.details()
    assert done.results[0].response.seal


# -- leak scan ----------------------------------------------------------------------------------------


def test_no_secret_pin_or_card_number_reaches_logs_errors_the_database_or_the_audit_trail(
        secure_server, pki, domain, merchant, token, sqlite_url):
    import logging
    from pathlib import Path

    from google.protobuf import text_format

    from tests.crypto_helpers import OAEP_SHA1, pem_public_key

    address, trail = secure_server
    secret = b"LEAKCHECK-secret-7f3a9c1e5b2d4f60"
    card = "4111111111111111"
    pin = token.pin_path.read_text().strip()
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    capture = Capture(level=logging.DEBUG)
    root, sql = logging.getLogger(), logging.getLogger("sqlalchemy.engine")
    old_levels = root.level, sql.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    sql.setLevel(logging.INFO)  # every statement and its parameters: what reaches the database
    said: list[str] = []
    try:
        with channel_as(address, pki, "client-key-admin") as admin_channel, \
                channel_as(address, pki, "client-gateway") as gateway_channel, \
                channel_as(address, pki, "client-signer") as signer_channel:
            keys = keys_pb2_grpc.KeyServiceStub(admin_channel)
            seals = seals_pb2_grpc.SealServiceStub(gateway_channel)
            signing = signing_pb2_grpc.SigningServiceStub(signer_channel)
            parameters = keys.GetImportParameters(keys_pb2.GetImportParametersRequest(), timeout=TIMEOUT)
            wrapped = pem_public_key(parameters).encrypt(secret, OAEP_SHA1)
            calls = [
                (keys.ImportKey, keys_pb2.ImportKeyRequest(
                    merchant_id=merchant, name="leak", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256,
                    wrapped_secret=wrapped, import_key_id=parameters.import_key_id, platform=keys_pb2.KEY_PLATFORM_SIPS)),
                (keys.ImportKey, keys_pb2.ImportKeyRequest(  # fails: not wrapped with the import key
                    merchant_id=merchant, name="leak2", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256,
                    wrapped_secret=secret * 12, import_key_id=parameters.import_key_id)),
                (keys.CreateKey, keys_pb2.CreateKeyRequest(
                    merchant_id=merchant, name="rsa", purpose=keys_pb2.KEY_PURPOSE_SIGN,
                    algorithm=keys_pb2.KEY_ALGORITHM_RSA_2048)),
                (seals.Seal, seals_pb2.SealRequest(key_id=f"{merchant}/leak", scheme=seals_pb2.SEAL_SCHEME_SIPS_POST,
                                                   message=f"cardNumber={card}|keyVersion=1".encode())),
                (seals.Seal, seals_pb2.SealRequest(  # fails: '|' in a value
                    key_id=f"{merchant}/leak", scheme=seals_pb2.SEAL_SCHEME_SIPS_POST,
                    fields=[seals_pb2.Field(name="cardNumber", value=f"{card}|x")])),
                (seals.Seal, seals_pb2.SealRequest(  # fails: a boolean
                    key_id=f"{merchant}/leak", scheme=seals_pb2.SEAL_SCHEME_SIPS_JSON_REQUEST,
                    message=f'{{"cardNumber": "{card}", "x": true}}'.encode())),
                (seals.Verify, seals_pb2.VerifyRequest(key_id=f"{merchant}/leak", message=card.encode(),
                                                       seal=card)),
                (seals.ExplainSeal, seals_pb2.SealRequest(key_id=f"{merchant}/leak", message=card.encode())),
                (signing.Sign, signing_pb2.SignRequest(
                    key_id=f"{merchant}/rsa", algorithm=signing_pb2.SIGNATURE_ALGORITHM_RSA_PSS_SHA256,
                    message=card.encode())),
                (signing.Sign, signing_pb2.SignRequest(  # fails: a digest of the wrong length
                    key_id=f"{merchant}/rsa", algorithm=signing_pb2.SIGNATURE_ALGORITHM_RSA_PSS_SHA256,
                    digest=card.encode())),
            ]
            for method, request in calls:
                try:
                    said.append(text_format.MessageToString(method(request, timeout=TIMEOUT)))
                except grpc.RpcError as error:
                    said.append(f"{error.code()} {error.details()}")
    finally:
        root.removeHandler(capture)
        root.setLevel(old_levels[0])
        sql.setLevel(old_levels[1])

    path = Path(sqlite_url.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    audit = "\n".join(str(row) for row in trail.read(limit=1000))
    text = "\n".join(lines + said) + "\n" + audit
    assert any("INSERT INTO key_versions" in line for line in lines), "the capture saw no SQL"
    assert len(said) == 10 and trail.verify().intact
    for value in (secret, secret.hex().encode(), pin.encode(), card.encode()):
        assert value.decode() not in text, value
        assert value not in stored, value


def test_sighup_reloads_the_policy_of_a_running_server(token, tmp_path, merchant):
    import signal
    import time

    from tests.servers import start_keysvc_server, stop_keysvc_server

    pki = tmp_path / "pki"
    make_dev_pki(pki)
    server = start_keysvc_server(token, f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "server.log", extra_args=(
        "--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"),
        "--tls-client-ca", str(pki / "ca.crt"), "--policy", str(pki / "policy.toml")))
    address = "localhost:" + server.address.rpartition(":")[2]
    request = keys_pb2.ListKeysRequest()
    try:
        with channel_as(address, pki, "client-key-admin") as channel:
            stub = keys_pb2_grpc.KeyServiceStub(channel)
            before = code_of(stub.ListKeys, request)
            policy = (pki / "policy.toml").read_text()
            (pki / "policy.toml").write_text(policy.replace('roles = ["key-admin"]', 'roles = ["auditor"]'))
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            after = before
            while after == grpc.StatusCode.OK and time.monotonic() < deadline:
                time.sleep(0.1)
                after = code_of(stub.ListKeys, request)
            (pki / "policy.toml").write_text("not toml [")  # a broken file keeps the policy in force
            server.process.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            still = code_of(stub.ListKeys, request)
    finally:
        stop_keysvc_server(server)

    assert before == grpc.StatusCode.OK
    assert after == still == grpc.StatusCode.PERMISSION_DENIED
    assert "policy not reloaded" in server.log()


def test_access_events_name_the_caller(secure_server, pki, merchant, caplog):
    import logging

    address, _trail = secure_server
    with caplog.at_level(logging.INFO):
        with channel_as(address, pki, "client-gateway") as channel:
            code = code_of(keys_pb2_grpc.KeyServiceStub(channel).RotateKey,
                           keys_pb2.RotateKeyRequest(key_id=f"{merchant}/k"))

    events = [record for record in caplog.records if getattr(record, "rpc", "").endswith("RotateKey")]
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert events and events[0].identity == dev_identity("gateway") and events[0].status == "PERMISSION_DENIED"
