"""The master key across HSMs, with real SoftHSM tokens, real PostgreSQL and real gRPC:
shared keys made once per database, a token with another master key refused at start,
enrollment of a second token (dual control, `keysvc replica enroll|deliver`), and
backup / restore under split knowledge (`keysvc master-key ...`)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import nacl.public
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keysvc import deployment, masterkey
from keysvc.approvals import Approvals
from keysvc.audit import AuditTrail
from keysvc.authz import Policy
from keysvc.config import ConfigurationError
from keysvc.errors import FailedPrecondition, InvalidArgument, NotFound
from keysvc.model import KeyAlgorithm, KeyPurpose
from keysvc.pki import issue_client_certificate, make_dev_pki
from keysvc.seals import SealRequest
from keysvc.rpc.server import Security, ServerOptions, create_server, server_credentials
from keysvc.store import KeyStore
from keysvc.store.audit import AuditStore
from keysvc.store.schema import enrollments, shared_keys
from keysvc.store.shared_keys import Enrollment, EnrollmentState, SharedKeyStore
from keysvc.v1 import (
    approvals_pb2,
    approvals_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    masterkey_pb2,
    masterkey_pb2_grpc,
    seals_pb2,
    seals_pb2_grpc,
)
from tests.conftest import REPO, SoftHsmToken, make_domain, new_token
from tests.servers import KEYSVC, start_keysvc_server, stop_keysvc_server
from tests.grpc_helpers import channel_as, error_info

TIMEOUT = 20.0


def keysvc(token: SoftHsmToken, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([KEYSVC, *args], env=token.env, input=input, capture_output=True, text=True,
                          timeout=120)


def shared_rows(engine: sa.Engine) -> dict:
    with engine.connect() as connection:
        return {row.name: tuple(row) for row in connection.execute(sa.select(shared_keys))}


def pending_id(error: grpc.RpcError) -> str:
    info = error_info(error)
    assert info.reason == "APPROVAL_REQUIRED", info.reason
    return info.metadata["operation_id"]


# -- replica 1: this process, on the session token, with TLS and dual control ----------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    make_dev_pki(directory)
    issue_client_certificate(directory, "client-key-admin-2", "spiffe://keysvc.dev/key-admin-2")
    with open(directory / "policy.toml", "a") as policy:
        policy.write('\n[[grant]]\nidentity = "spiffe://keysvc.dev/key-admin-2"\nroles = ["key-admin"]\n')
    return directory


@dataclass
class ReplicaOne:
    address: str
    url: str
    engine: sa.Engine


@pytest.fixture
def replica_one(hsm_token, postgres_url, pki):
    domain = make_domain(hsm_token, postgres_url)
    engine = domain.store.engine
    deployment.prepare_token(hsm_token, engine)
    deployment.load_shared_keys_into(hsm_token, engine)
    security = Security(server_credentials(pki / "server.crt", pki / "server.key", pki / "ca.crt"),
                        Policy.load(pki / "policy.toml"))
    grpc_server, port, _ = create_server(
        "127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False), signer=domain.signer,
        audit_trail=AuditTrail(hsm_token, AuditStore(engine)), security=security,
        approvals=Approvals(engine, hsm_token),
        master_keys=masterkey.MasterKeyAdmin(hsm_token, engine))
    grpc_server.start()
    yield ReplicaOne(f"localhost:{port}", postgres_url, engine)
    grpc_server.stop(None)
    domain.store.close()


def deliver(replica: ReplicaOne, pki, enrollment_id: str, fingerprint: str):
    """Admin 1 asks, admin 2 approves; returns the error code of the ask (a request that
    cannot run is refused then) or of the approval, or the delivered enrollment."""
    request = masterkey_pb2.DeliverMasterKeyRequest(enrollment_id=enrollment_id, transport_key_fingerprint=fingerprint)
    with channel_as(replica.address, pki, "client-key-admin") as first, \
            channel_as(replica.address, pki, "client-key-admin-2") as second:
        with pytest.raises(grpc.RpcError) as asked:
            masterkey_pb2_grpc.MasterKeyServiceStub(first).DeliverMasterKey(request, timeout=TIMEOUT)
        if error_info(asked.value).reason != "APPROVAL_REQUIRED":
            return asked.value.code()
        operation_id = pending_id(asked.value)
        try:
            approved = approvals_pb2_grpc.ApprovalServiceStub(second).ApproveOperation(
                approvals_pb2.DecideOperationRequest(operation_id=operation_id), timeout=TIMEOUT)
        except grpc.RpcError as error:
            return error.code()
    response = masterkey_pb2.DeliverMasterKeyResponse()
    assert approved.response.Unpack(response)
    return response.enrollment


# -- shared keys and the master key check ------------------------------------------------------------------


def test_shared_keys_are_made_once_per_database_and_the_master_key_recorded(hsm_token, postgres_url):
    domain = make_domain(hsm_token, postgres_url)
    try:
        deployment.prepare_token(hsm_token, domain.store.engine)
        first = shared_rows(domain.store.engine)
        deployment.prepare_token(hsm_token, domain.store.engine)
        deployment.load_shared_keys_into(hsm_token, domain.store.engine)
        assert shared_rows(domain.store.engine) == first
        assert set(first) == {"master", "binding", "import"}
        # The database records the long check value; the short one is its first 6 digits.
        assert first["master"][3] == hsm_token.master_key_long_check_value()
        assert len(hsm_token.master_key_check_value()) == 6 and len(first["master"][3]) == 32
        assert first["master"][3].startswith(hsm_token.master_key_check_value())
        # Racing inserts of one name: every replica reads back the same winner.
        store = SharedKeyStore(domain.store.engine)
        from tests.conftest import run_together
        rows = run_together(6, lambda index: store.insert_or_get("race", wrapped_key=bytes([index]) * 8))
        assert len({row.wrapped_key for row in rows}) == 1
    finally:
        domain.store.close()


def test_a_token_whose_master_key_is_not_the_databases_is_refused_at_start(hsm_token, postgres_url, tmp_path):
    domain = make_domain(hsm_token, postgres_url)
    try:
        deployment.prepare_token(hsm_token, domain.store.engine)
    finally:
        domain.store.close()
    ours = hsm_token.master_key_long_check_value()
    serve = ("serve", "--listen", "127.0.0.1:0", "--database", postgres_url, "--insecure-loopback")

    other = new_token(tmp_path / "other", with_master_key=True)
    theirs_short, theirs_long = (line.split()[-1] for line in keysvc(other, "master-key", "check").stdout.splitlines())
    assert theirs_long.startswith(theirs_short) and len(theirs_long) == 32
    refused = keysvc(other, *serve)
    assert refused.returncode != 0
    assert f"this token's master key has check value {theirs_short} (long {theirs_long})" in refused.stderr
    assert f"the database's master key has check value {ours[:6]} (long {ours})" in refused.stderr

    empty = new_token(tmp_path / "empty")
    refused = keysvc(empty, *serve)
    assert refused.returncode != 0
    assert "holds no keysvc master key" in refused.stderr and "keysvc replica enroll" in refused.stderr
    # Refused before anything was made: the empty token still has no master key.
    assert keysvc(empty, "master-key", "check").returncode == 2


# -- enrollment ------------------------------------------------------------------------------------------------


def test_enrollment_of_a_second_hsm_then_both_replicas_serve_the_same_keys(replica_one, pki, tmp_path, merchant):
    before_key = f"{merchant}/before"
    with channel_as(replica_one.address, pki, "client-key-admin") as admin:
        keys_pb2_grpc.KeyServiceStub(admin).CreateKey(keys_pb2.CreateKeyRequest(
            merchant_id=merchant, name="before", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=TIMEOUT)
        # What the new replica's operator is told out of band: the serving replica's long check value.
        check = masterkey_pb2_grpc.MasterKeyServiceStub(admin).GetMasterKeyCheckValue(
            masterkey_pb2.GetMasterKeyCheckValueRequest(), timeout=TIMEOUT)
    assert len(check.long_check_value) == 32 and check.long_check_value.startswith(check.check_value)
    assert check.check_value == check.recorded_check_value
    second = new_token(tmp_path / "second")

    asked = keysvc(second, "replica", "enroll", "--database", replica_one.url, "--name", "replica-2")
    assert asked.returncode == 0, asked.stderr
    lines = dict(line.split(" ", 1) for line in asked.stdout.splitlines()[:2])
    enrollment_id = lines["enrollment"]
    fingerprint = lines["transport"].removeprefix("key fingerprint ")
    stored = SharedKeyStore(replica_one.engine).enrollment(enrollment_id)
    assert stored.state is EnrollmentState.REQUESTED and masterkey.fingerprint_of(stored.transport_public_key) == fingerprint

    complete = ("replica", "enroll", "--database", replica_one.url, "--complete", enrollment_id)
    unchecked = keysvc(second, *complete)
    assert unchecked.returncode == 2 and "--complete needs --check-value" in unchecked.stderr
    short = keysvc(second, *complete, "--check-value", check.check_value)
    assert short.returncode == 2 and "long check value (32 hex digits)" in short.stderr
    not_yet = keysvc(second, *complete, "--check-value", check.long_check_value)
    assert not_yet.returncode == 2 and "not delivered yet" in not_yet.stderr

    # Admin 1 asks (the CLI), cannot approve their own request; admin 2 approves.
    asked_delivery = subprocess.run(
        [KEYSVC, "--server", replica_one.address, "--pki", str(pki), "replica", "deliver", enrollment_id,
         "--fingerprint", fingerprint], capture_output=True, text=True, timeout=60)
    assert asked_delivery.returncode == 0, asked_delivery.stderr
    operation_id = asked_delivery.stdout.split()[2].rstrip(":")
    assert SharedKeyStore(replica_one.engine).enrollment(enrollment_id).state is EnrollmentState.REQUESTED
    with channel_as(replica_one.address, pki, "client-key-admin") as first, \
            channel_as(replica_one.address, pki, "client-key-admin-2") as other:
        with pytest.raises(grpc.RpcError) as own:
            approvals_pb2_grpc.ApprovalServiceStub(first).ApproveOperation(
                approvals_pb2.DecideOperationRequest(operation_id=operation_id), timeout=TIMEOUT)
        assert own.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert SharedKeyStore(replica_one.engine).enrollment(enrollment_id).state is EnrollmentState.REQUESTED
        approvals_pb2_grpc.ApprovalServiceStub(other).ApproveOperation(
            approvals_pb2.DecideOperationRequest(operation_id=operation_id), timeout=TIMEOUT)
    delivered = SharedKeyStore(replica_one.engine).enrollment(enrollment_id)
    assert delivered.state is EnrollmentState.DELIVERED
    assert delivered.master_check_value == check.long_check_value
    assert delivered.delivered_by == "spiffe://keysvc.dev/key-admin-2"

    completed = keysvc(second, *complete, "--check-value", check.long_check_value.lower())
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split()[-1] == check.long_check_value
    assert SharedKeyStore(replica_one.engine).enrollment(enrollment_id).state is EnrollmentState.COMPLETED
    assert "matches the database's record" in keysvc(
        second, "master-key", "check", "--database", replica_one.url).stdout
    again = keysvc(second, "replica", "enroll", "--database", replica_one.url)
    assert again.returncode == 2 and "already holds a keysvc master key" in again.stderr

    rows = shared_rows(replica_one.engine)
    replica_two = start_keysvc_server(second, replica_one.url, tmp_path / "replica-2.log")
    try:
        assert shared_rows(replica_one.engine) == rows  # the second replica made no keys of its own
        with channel_as(replica_one.address, pki, "client-key-admin") as admin, \
                channel_as(replica_one.address, pki, "client-gateway") as gateway, \
                grpc.insecure_channel(replica_two.address) as two:
            keys_one, seals_one = keys_pb2_grpc.KeyServiceStub(admin), seals_pb2_grpc.SealServiceStub(gateway)
            seals_two = seals_pb2_grpc.SealServiceStub(two)
            keys_one.CreateKey(keys_pb2.CreateKeyRequest(
                merchant_id=merchant, name="after", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=TIMEOUT)
            for key_id in (before_key, f"{merchant}/after"):
                message = f"amount=100|key={key_id}".encode()
                sealed_one = seals_one.Seal(seals_pb2.SealRequest(key_id=key_id, message=message), timeout=TIMEOUT)
                assert seals_two.Verify(seals_pb2.VerifyRequest(
                    key_id=key_id, message=message, seal=sealed_one.seal), timeout=TIMEOUT).valid
                sealed_two = seals_two.Seal(seals_pb2.SealRequest(key_id=key_id, message=message), timeout=TIMEOUT)
                assert sealed_two.seal == sealed_one.seal
            # Both hand out the one import key.
            assert (keys_pb2_grpc.KeyServiceStub(two).GetImportParameters(
                keys_pb2.GetImportParametersRequest(), timeout=TIMEOUT).public_key_pem
                == keys_one.GetImportParameters(keys_pb2.GetImportParametersRequest(), timeout=TIMEOUT).public_key_pem)
    finally:
        stop_keysvc_server(replica_two)


def _transport_key(bits: int = 3072) -> bytes:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _enroll_row(engine: sa.Engine, transport_public_key: bytes, *, expires_in: timedelta = timedelta(hours=1)) -> str:
    enrollment_id = os.urandom(8).hex()
    now = datetime.now(timezone.utc)
    SharedKeyStore(engine).insert_enrollment(Enrollment(
        enrollment_id, "elsewhere", transport_public_key, EnrollmentState.REQUESTED, now, now + expires_in))
    return enrollment_id


def test_enrollment_refusals(replica_one, pki, hsm_token):
    engine = replica_one.engine
    transport = _transport_key()
    fingerprint = masterkey.fingerprint_of(transport)

    # One key-admin alone never delivers: a server without dual control refuses outright.
    waiting = _enroll_row(engine, transport)
    alone, port, _ = create_server("127.0.0.1:0", None, None, ServerOptions(reuse_port=False), signer=None,
                                   master_keys=masterkey.MasterKeyAdmin(hsm_token, engine))
    alone.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
            masterkey_pb2_grpc.MasterKeyServiceStub(channel).DeliverMasterKey(masterkey_pb2.DeliverMasterKeyRequest(
                enrollment_id=waiting, transport_key_fingerprint=fingerprint), timeout=TIMEOUT)
    finally:
        alone.stop(None)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "two key-admins" in refused.value.details()
    assert SharedKeyStore(engine).enrollment(waiting).state is EnrollmentState.REQUESTED

    # Requests that must not deliver (refused when asked: see the next test).
    assert deliver(replica_one, pki, "0123456789abcdef", fingerprint) is grpc.StatusCode.NOT_FOUND
    expired = _enroll_row(engine, transport, expires_in=timedelta(seconds=-1))
    assert deliver(replica_one, pki, expired, fingerprint) is grpc.StatusCode.FAILED_PRECONDITION
    assert deliver(replica_one, pki, waiting, "ab" * 32) is grpc.StatusCode.FAILED_PRECONDITION
    weak = _transport_key(2048)
    assert deliver(replica_one, pki, _enroll_row(engine, weak), masterkey.fingerprint_of(weak)) \
        is grpc.StatusCode.FAILED_PRECONDITION
    assert SharedKeyStore(engine).enrollment(waiting).state is EnrollmentState.REQUESTED

    delivered = deliver(replica_one, pki, waiting, fingerprint.upper())
    assert delivered.state == masterkey_pb2.ENROLLMENT_STATE_DELIVERED
    assert delivered.master_check_value == hsm_token.master_key_check_value()
    assert deliver(replica_one, pki, waiting, fingerprint) is grpc.StatusCode.FAILED_PRECONDITION  # once only

    # Completing: unknown, expired, not delivered, and a token that already holds another master key.
    real = hsm_token.master_key_long_check_value()
    with pytest.raises(InvalidArgument, match="long check value"):
        masterkey.complete_enrollment(hsm_token, engine, waiting, real[:6])
    with pytest.raises(NotFound):
        masterkey.complete_enrollment(hsm_token, engine, "fedcba9876543210", real)
    with pytest.raises(FailedPrecondition, match="expired"):
        masterkey.complete_enrollment(hsm_token, engine, expired, real)
    with pytest.raises(FailedPrecondition, match="not delivered"):
        masterkey.complete_enrollment(hsm_token, engine, _enroll_row(engine, transport), real)
    with pytest.raises(FailedPrecondition, match="already holds"):
        masterkey.complete_enrollment(hsm_token, engine, waiting, "00" * 16)
    with pytest.raises(FailedPrecondition, match="already holds"):
        masterkey.request_enrollment(hsm_token, engine, "again")
    with engine.connect() as connection:
        states = dict(connection.execute(sa.select(enrollments.c.enrollment_id, enrollments.c.state)).all())
    assert states[waiting] == "DELIVERED"


def test_a_delivery_that_cannot_run_is_refused_when_asked_not_kept_for_approval(replica_one, pki):
    from keysvc.store.schema import audit_records, pending_operations

    engine = replica_one.engine
    transport = _transport_key()
    fingerprint = masterkey.fingerprint_of(transport)
    waiting = _enroll_row(engine, transport)
    expired = _enroll_row(engine, transport, expires_in=timedelta(seconds=-1))
    cases = [
        ("not-hex-at-all!!", fingerprint, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (waiting, "ab" * 31, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("0123456789abcdef", fingerprint, grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        (expired, fingerprint, grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
        (waiting, "ab" * 32, grpc.StatusCode.FAILED_PRECONDITION, "FINGERPRINT_MISMATCH"),
    ]
    with channel_as(replica_one.address, pki, "client-key-admin") as channel:
        stub = masterkey_pb2_grpc.MasterKeyServiceStub(channel)
        for enrollment_id, asked_fingerprint, code, reason in cases:
            with pytest.raises(grpc.RpcError) as refused:
                stub.DeliverMasterKey(masterkey_pb2.DeliverMasterKeyRequest(
                    enrollment_id=enrollment_id, transport_key_fingerprint=asked_fingerprint), timeout=TIMEOUT)
            assert (refused.value.code(), error_info(refused.value).reason) == (code, reason), enrollment_id

    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(pending_operations)).scalar() == 0
        outcomes = connection.execute(sa.select(audit_records.c.outcome).where(
            audit_records.c.operation == "/keysvc.v1.MasterKeyService/DeliverMasterKey")
            .order_by(audit_records.c.seq)).scalars().all()
    assert outcomes == [reason for *_, reason in cases]
    assert SharedKeyStore(engine).enrollment(waiting).state is EnrollmentState.REQUESTED

    # The CLI: refused at once (exit 2), or the pending operation (JSON with --json).
    from click.testing import CliRunner

    from keysvc.cli import main as cli_main

    arguments = ["--server", replica_one.address, "--pki", str(pki), "--json", "replica", "deliver", waiting]
    mismatched = CliRunner().invoke(cli_main, [*arguments, "--fingerprint", "ab" * 32])
    asked_by_cli = CliRunner().invoke(cli_main, [*arguments, "--fingerprint", fingerprint])
    assert mismatched.exit_code == 2 and "FAILED_PRECONDITION" in mismatched.stderr
    assert asked_by_cli.exit_code == 0, asked_by_cli.output
    by_cli = json.loads(asked_by_cli.stdout)["pending_operation"]["operation_id"]
    with engine.connect() as connection:
        assert connection.execute(sa.select(pending_operations.c.operation_id)).scalars().all() == [by_cli]

    # Checked when asked, and again when approved: an enrollment that expired meanwhile is not delivered.
    with channel_as(replica_one.address, pki, "client-key-admin") as first, \
            channel_as(replica_one.address, pki, "client-key-admin-2") as second:
        with pytest.raises(grpc.RpcError) as asked:
            masterkey_pb2_grpc.MasterKeyServiceStub(first).DeliverMasterKey(masterkey_pb2.DeliverMasterKeyRequest(
                enrollment_id=waiting, transport_key_fingerprint=fingerprint), timeout=TIMEOUT)
        with engine.begin() as connection:
            connection.execute(sa.update(enrollments).where(enrollments.c.enrollment_id == waiting)
                               .values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
        with pytest.raises(grpc.RpcError) as approved:
            approvals_pb2_grpc.ApprovalServiceStub(second).ApproveOperation(
                approvals_pb2.DecideOperationRequest(operation_id=pending_id(asked.value)), timeout=TIMEOUT)
    assert approved.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "expired" in approved.value.details()
    assert SharedKeyStore(engine).enrollment(waiting).state is EnrollmentState.REQUESTED


def _long_check_value(master: bytes) -> str:
    """A master key's long check value computed with `cryptography` alone (as documented)."""
    return hashlib.sha256(keywrap.aes_key_wrap(master, bytes(32))).digest()[:16].hex().upper()


def _deployment_on(hsm_token, url: str) -> sa.Engine:
    """A database whose shared keys and master key record are the session token's."""
    domain = make_domain(hsm_token, url)
    try:
        deployment.prepare_token(hsm_token, domain.store.engine)
        deployment.load_shared_keys_into(hsm_token, domain.store.engine)
    finally:
        domain.store.close()
    return sa.create_engine(url)


def _ask_for_enrollment(token: SoftHsmToken, url: str) -> tuple[str, str]:
    asked = keysvc(token, "replica", "enroll", "--database", url, "--name", "new")
    assert asked.returncode == 0, asked.stderr
    lines = dict(line.split(" ", 1) for line in asked.stdout.splitlines()[:2])
    return lines["enrollment"], lines["transport"].removeprefix("key fingerprint ")


_COMPLETE_UNTIL_THE_TRANSPORT_KEY_CANNOT_BE_DESTROYED = """
import sys, hsm
from keysvc import cli
def failing(self, label):
    raise hsm.HsmUnavailable("the HSM went away")
hsm.Hsm.destroy_transport_key = failing
cli.main(sys.argv[1:])
"""

_HAS_TRANSPORT_KEY = """
import os, sys, hsm
token = hsm.Hsm.connect(hsm.HsmConfig(os.environ["KEYSVC_TOKEN_LABEL"],
                                      open(os.environ["KEYSVC_HSM_PIN_FILE"]).read().strip()))
print(token.has_transport_key(hsm.TRANSPORT_KEY_LABEL_PREFIX + sys.argv[1]))
"""


def test_a_delivery_forged_in_the_database_is_refused_with_the_real_check_value(hsm_token, sqlite_url, tmp_path):
    """Whoever can write to the database can wrap a key of their own to the (public)
    transport key and record its check values everywhere, or the real one: the new HSM
    keeps the key only if it has the long check value the operator brought."""
    engine = _deployment_on(hsm_token, sqlite_url)
    real = hsm_token.master_key_long_check_value()
    new = new_token(tmp_path / "new")
    enrollment_id, _ = _ask_for_enrollment(new, sqlite_url)
    transport = serialization.load_der_public_key(SharedKeyStore(engine).enrollment(enrollment_id).transport_public_key)
    own_key = os.urandom(32)
    own_wrapped = transport.encrypt(own_key, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))

    def forge(recorded_check_value: str) -> None:
        with engine.begin() as connection:
            connection.execute(sa.update(enrollments).where(enrollments.c.enrollment_id == enrollment_id).values(
                state="DELIVERED", wrapped_master_key=own_wrapped, master_check_value=recorded_check_value,
                delivered_by="spiffe://keysvc.dev/key-admin-2"))
            connection.execute(sa.update(shared_keys).where(shared_keys.c.name == "master").values(
                check_value=recorded_check_value))

    complete = ("replica", "enroll", "--database", sqlite_url, "--complete", enrollment_id, "--check-value", real)
    try:
        forge(_long_check_value(own_key))  # the database's values all agree with the forged key
        refused = keysvc(new, *complete)
        assert refused.returncode == 2, refused.stdout
        assert f"master key check value {_long_check_value(own_key)}, not the {real} expected" in refused.stderr

        forge(real)  # the database claims the real value: the HSM finds otherwise
        refused = keysvc(new, *complete)
        assert refused.returncode == 2, refused.stdout
        assert f"has check value {_long_check_value(own_key)}, not {real}: it was not kept" in refused.stderr
        assert keysvc(new, "master-key", "check").returncode == 2  # no master key was kept
        assert SharedKeyStore(engine).enrollment(enrollment_id).state is EnrollmentState.DELIVERED
    finally:
        engine.dispose()


def test_completing_again_after_a_run_that_stopped_part_way_finishes_it(hsm_token, sqlite_url, tmp_path):
    engine = _deployment_on(hsm_token, sqlite_url)
    real = hsm_token.master_key_long_check_value()
    new = new_token(tmp_path / "new")
    enrollment_id, fingerprint = _ask_for_enrollment(new, sqlite_url)
    try:
        masterkey.MasterKeyAdmin(hsm_token, engine).deliver(enrollment_id, fingerprint, "test")
        complete = ("replica", "enroll", "--database", sqlite_url, "--complete", enrollment_id, "--check-value")

        stopped = subprocess.run(
            [str(REPO / ".venv" / "bin" / "python"), "-c", _COMPLETE_UNTIL_THE_TRANSPORT_KEY_CANNOT_BE_DESTROYED,
             *complete, real], env=new.env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 2 and "the HSM went away" in stopped.stderr, stopped.stderr
        assert SharedKeyStore(engine).enrollment(enrollment_id).state is EnrollmentState.DELIVERED
        assert "matches the database's record" in keysvc(new, "master-key", "check", "--database", sqlite_url).stdout

        other = keysvc(new, *complete, "00" * 16)
        assert other.returncode == 2 and "already holds a keysvc master key" in other.stderr

        finished = keysvc(new, *complete, real)
        assert finished.returncode == 0, finished.stderr
        assert finished.stdout.split()[-1] == real
        stored = SharedKeyStore(engine).enrollment(enrollment_id)
        assert stored.state is EnrollmentState.COMPLETED and stored.wrapped_master_key is None
        has_transport_key = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", _HAS_TRANSPORT_KEY,
                                            enrollment_id], env=new.env, capture_output=True, text=True, timeout=60)
        assert has_transport_key.stdout.strip() == "False", has_transport_key.stderr
        assert keysvc(new, *complete, real).returncode == 0  # and again: nothing left to do
    finally:
        engine.dispose()


def test_an_import_public_key_swapped_in_the_database_is_never_served(hsm_token, token, sqlite_url):
    """Merchants wrap bank secrets to the key GetImportParameters serves: it is read
    from the import private key in the HSM, and a database whose copy differs is
    refused at start."""
    engine = _deployment_on(hsm_token, sqlite_url)
    served = hsm_token.import_public_key_der
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    try:
        with engine.begin() as connection:
            connection.execute(sa.update(shared_keys).where(shared_keys.c.name == "import").values(
                public_key=attacker))
        with pytest.raises(ConfigurationError, match="is not the public half of the import private key"):
            deployment.load_shared_keys_into(hsm_token, engine)
        assert hsm_token.import_public_key_der == served

        refused = keysvc(token, "serve", "--listen", "127.0.0.1:0", "--database", sqlite_url, "--insecure-loopback")
        assert refused.returncode != 0
        assert "is not the public half of the import private key" in refused.stderr, refused.stderr
    finally:
        engine.dispose()


# -- backup and restore ------------------------------------------------------------------------------------------


def _custodians(directory: Path, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """Each custodian's (private key file, public key file)."""
    made = {}
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        private, public = masterkey.make_custodian_key()
        (directory / f"{name}.key").write_text(masterkey.encode_private_key(private))
        (directory / f"{name}.pub").write_text(masterkey.encode_public_key(public))
        made[name] = (directory / f"{name}.key", directory / f"{name}.pub")
    return made


def _pairs(files: dict[str, tuple[Path, Path]], components: dict[str, Path], names: list[str],
           keys_of: list[str] | None = None) -> list[str]:
    arguments = []
    for name, key_owner in zip(names, keys_of or names):
        arguments += ["--component", str(components[name]), "--custodian-key", str(files[key_owner][0])]
    return arguments


def test_backup_and_restore_under_split_knowledge(hsm_token, token, sqlite_url, tmp_path, merchant):
    # A merchant key and a seal made before the backup, on the session token.
    message = b"amount=2500|currencyCode=978"
    domain = make_domain(hsm_token, sqlite_url)
    try:
        deployment.prepare_token(hsm_token, domain.store.engine)
        key = domain.keys.create_key(merchant, "k", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
        sealed_before = domain.sealer.compute_seal(SealRequest(key.key_id, message)).seal
    finally:
        domain.store.close()

    names = ["alice", "bob", "carol"]
    made = keysvc(token, "master-key", "custodian-keys", "--name", "alice", "--out", str(tmp_path / "alice"))
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "alice" / "alice.key").stat().st_mode & 0o777 == 0o600
    files = {"alice": (tmp_path / "alice" / "alice.key", tmp_path / "alice" / "alice.pub"),
             **_custodians(tmp_path / "custodians", names[1:])}
    backed_up = keysvc(token, "master-key", "backup", "--out", str(tmp_path / "backup"),
                       *[f"--custodian={name}={files[name][1]}" for name in names])
    assert backed_up.returncode == 0, backed_up.stderr
    assert f"master key check value {hsm_token.master_key_check_value()}" in backed_up.stdout
    backup_file = next((tmp_path / "backup").glob("master-key-backup-*.json"))
    components = {name: next((tmp_path / "backup").glob(f"master-key-component-*-{name}.json")) for name in names}
    backup = json.loads(backup_file.read_text())
    assert [c["name"] for c in backup["custodians"]] == names
    for name in names:  # sealed, with the component's own check value beside it
        component = json.loads(components[name].read_text())
        assert component["custodian"] == name and len(component["component_check_value"]) == 6

    # A second backup's component is a wrong component for this one.
    other_backup, other_sealed = masterkey.backup_master_key(hsm_token, [
        masterkey.Custodian(name, masterkey.decode_public_key(files[name][1].read_text())) for name in names])
    foreign = tmp_path / "foreign-bob.json"
    foreign.write_text(other_sealed[1].to_json())
    # bob's file, claiming to be alice's in clear.
    relabelled = tmp_path / "relabelled.json"
    relabelled.write_text(components["bob"].read_text().replace('"custodian": "bob"', '"custodian": "alice"'))

    empty = new_token(tmp_path / "restored")
    restore = ("master-key", "restore", "--backup", str(backup_file))
    refusals = [
        (_pairs(files, components, ["alice", "bob"]), "carol's component is missing"),
        (_pairs(files, components, ["alice", "bob", "carol"], ["alice", "carol", "bob"]), "that private key is not bob's"),
        (_pairs(files, components, ["alice", "carol"]) + ["--component", str(foreign), "--custodian-key",
                                                          str(files["bob"][0])], "belongs to another backup"),
        (["--component", str(relabelled), "--custodian-key", str(files["alice"][0])] + _pairs(
            files, components, ["bob", "carol"]), "not sealed to alice's key"),
    ]
    for arguments, reason in refusals:
        refused = keysvc(empty, *restore, *arguments)
        assert refused.returncode == 2 and reason in refused.stderr, (reason, refused.stderr)
    assert keysvc(empty, "master-key", "check").returncode == 2  # still no master key

    # With --database: the database's master key must be the backup's, to its long check value.
    real = hsm_token.master_key_long_check_value()
    for recorded, reason in [("AB" * 16, "but the database's has check value ABABAB: nothing restored"),
                             (real[:6] + "0" * 26, f"not {real[:6]}{'0' * 26}: it was not kept")]:
        other_url = f"sqlite:///{tmp_path / f'other-{recorded}.db'}"
        KeyStore.open(other_url).close()
        other_engine = sa.create_engine(other_url)
        SharedKeyStore(other_engine).insert_or_get("master", check_value=recorded)
        other_engine.dispose()
        refused = keysvc(empty, *restore, "--database", other_url, *_pairs(files, components, names))
        assert refused.returncode == 2 and reason in refused.stderr, (reason, refused.stderr)
        assert keysvc(empty, "master-key", "check").returncode == 2  # still no master key

    # Each custodian enters their own component when asked.
    answers = "".join(f"{components[name]}\n{files[name][0]}\ny\n" for name in names)
    restored = keysvc(empty, *restore, "--database", sqlite_url, input=answers)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.count("component check value") == 3
    assert f"backup key check value {backup['backup_key_check_value']}" in restored.stdout
    assert f"restored: master key check value {hsm_token.master_key_check_value()}" in restored.stdout
    assert f"long check value {real}\nmatches the database's record" in restored.stdout
    assert keysvc(empty, *restore, *_pairs(files, components, names)).returncode == 2  # it has one now

    # The restored token serves the keys made before the backup.
    server = start_keysvc_server(empty, sqlite_url, tmp_path / "restored.log")
    try:
        with grpc.insecure_channel(server.address) as channel:
            seals = seals_pb2_grpc.SealServiceStub(channel)
            assert seals.Verify(seals_pb2.VerifyRequest(key_id=key.key_id, message=message, seal=sealed_before),
                                timeout=TIMEOUT).valid
            assert seals.Seal(seals_pb2.SealRequest(key_id=key.key_id, message=message),
                              timeout=TIMEOUT).seal == sealed_before
    finally:
        stop_keysvc_server(server)


def test_the_master_key_check_value_is_as_documented(tmp_path):
    """Restores a master key of known value from a backup built here with `cryptography`
    and PyNaCl alone: the HSM must find the check value computed independently, SHA-256
    over the RFC 3394 wrap of an all-zero AES-256 key under the master key."""
    master = bytes(range(32))
    expected = hashlib.sha256(keywrap.aes_key_wrap(master, bytes(32))).digest()[:3].hex().upper()
    private_keys = [nacl.public.PrivateKey.generate() for _ in range(2)]
    parts = [os.urandom(32) for _ in private_keys]
    backup_key = bytes(a ^ b for a, b in zip(*parts))
    backup = masterkey.MasterKeyBackup("0011223344556677", "2026-01-01T00:00:00+00:00",
                                       keywrap.aes_key_wrap_with_padding(backup_key, master), expected,
                                       masterkey.key_check_value(backup_key),
                                       tuple(masterkey.Custodian(f"c{i}", bytes(k.public_key))
                                             for i, k in enumerate(private_keys)))
    (tmp_path / "backup.json").write_text(backup.to_json())
    arguments = []
    for index, (private, part) in enumerate(zip(private_keys, parts)):
        payload = json.dumps({"format": "keysvc-master-key-component-payload-v1", "backup_id": backup.backup_id,
                              "custodian": f"c{index}", "index": index, "component": part.hex()}).encode()
        component = masterkey.SealedComponent(backup.backup_id, f"c{index}", index, 2,
                                              masterkey.key_check_value(part),
                                              nacl.public.SealedBox(private.public_key).encrypt(payload))
        (tmp_path / f"c{index}.json").write_text(component.to_json())
        (tmp_path / f"c{index}.key").write_text(masterkey.encode_private_key(bytes(private)))
        arguments += ["--component", str(tmp_path / f"c{index}.json"), "--custodian-key", str(tmp_path / f"c{index}.key")]
    empty = new_token(tmp_path / "hsm")
    restored = keysvc(empty, "master-key", "restore", "--backup", str(tmp_path / "backup.json"), *arguments)
    assert restored.returncode == 0, restored.stderr
    assert f"restored: master key check value {expected}" in restored.stdout
    assert f"long check value {_long_check_value(master)}" in restored.stdout
    assert base64.b64decode(json.loads((tmp_path / "backup.json").read_text())["wrapped_master_key"])


_LEGACY_TOKEN_KEYS = """
import os, pkcs11
from pkcs11 import Attribute as A, KeyType
lib = pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so")
session = lib.get_token(token_label=os.environ["KEYSVC_TOKEN_LABEL"]).open(
    user_pin=open(os.environ["KEYSVC_HSM_PIN_FILE"]).read().strip(), rw=True)
session.generate_key(KeyType.AES, 256, label="keysvc-master-1", store=True, template={
    A.SENSITIVE: True, A.EXTRACTABLE: False, A.WRAP: True, A.UNWRAP: True, A.ENCRYPT: False, A.DECRYPT: False,
    A.SIGN: False, A.VERIFY: False})
session.generate_key(KeyType.GENERIC_SECRET, 256, label="keysvc-binding-1", store=True, template={
    A.SENSITIVE: True, A.EXTRACTABLE: False, A.SIGN: True, A.VERIFY: False})
session.generate_keypair(KeyType.RSA, 3072, label="keysvc-import-1", store=True,
    public_template={A.ENCRYPT: True, A.WRAP: True, A.VERIFY: False},
    private_template={A.SENSITIVE: True, A.EXTRACTABLE: False, A.UNWRAP: True, A.DECRYPT: False, A.SIGN: False})
"""


def test_a_token_made_before_shared_keys_keeps_serving_and_refuses_backup_clearly(tmp_path, merchant):
    """A token as keysvc made them before: master key not extractable, binding key and
    import key pair as token objects (the old templates, made here with python-pkcs11)."""
    legacy = new_token(tmp_path / "legacy")
    subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", _LEGACY_TOKEN_KEYS], env=legacy.env, check=True,
                   capture_output=True)
    url = f"sqlite:///{tmp_path / 'k.db'}"
    server = start_keysvc_server(legacy, url, tmp_path / "legacy.log")
    try:
        with grpc.insecure_channel(server.address) as channel:
            keys_pb2_grpc.KeyServiceStub(channel).CreateKey(keys_pb2.CreateKeyRequest(
                merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=TIMEOUT)
            seals = seals_pb2_grpc.SealServiceStub(channel)
            sealed = seals.Seal(seals_pb2.SealRequest(key_id=f"{merchant}/k", message=b"m"), timeout=TIMEOUT)
            assert seals.Verify(seals_pb2.VerifyRequest(key_id=f"{merchant}/k", message=b"m", seal=sealed.seal),
                                timeout=TIMEOUT).valid
    finally:
        stop_keysvc_server(server)
    assert "no other HSM can serve this database" in server.log()
    engine = sa.create_engine(url)
    assert set(shared_rows(engine)) == {"master"}  # its own keys stay in the token
    engine.dispose()

    for name in ("a", "b"):
        (tmp_path / f"{name}.pub").write_text(masterkey.encode_public_key(masterkey.make_custodian_key()[1]))
    refused = keysvc(legacy, "master-key", "backup", "--out", str(tmp_path / "backup"),
                     f"--custodian=a={tmp_path / 'a.pub'}", f"--custodian=b={tmp_path / 'b.pub'}")
    assert refused.returncode == 2 and "master key is not extractable" in refused.stderr, refused.stderr
