"""Dual control of policy changes (issue 6): the role policy changes only when two
distinct key-admins agree, through real mutual-TLS servers with the development PKI
and a second key-admin; every server on the database applies an approved policy
within seconds; an invalid policy is refused when proposed; a policy row written
straight into the database is never applied."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import threading
import time

import grpc
import pytest
import sqlalchemy as sa

from keysvc.approvals import Approvals
from keysvc.audit import AuditTrail
from keysvc.authz import Policy
from keysvc.pki import dev_identity, issue_client_certificate, make_dev_pki
from keysvc.policies import PolicyBook
from keysvc.rpc.server import Security, ServerOptions, create_server, server_credentials
from keysvc.store.audit import AuditStore
from keysvc.store.policies import PolicyStore
from keysvc.store.schema import policies
from keysvc.v1 import approvals_pb2, approvals_pb2_grpc, policy_pb2, policy_pb2_grpc, seals_pb2, seals_pb2_grpc
from tests.grpc_helpers import channel_as, code_of, error_info
from tests.servers import KEYSVC, start_keysvc_server, stop_keysvc_server

TIMEOUT = 10.0
SECOND_ADMIN = "spiffe://keysvc.dev/key-admin-2"
# An approved policy reaches every server within this (each reads the newest revision every second).
APPLIED_WITHIN = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The development PKI, a second key-admin, and a policy file granting both."""
    directory = tmp_path_factory.mktemp("pki")
    make_dev_pki(directory)
    issue_client_certificate(directory, "client-key-admin-2", SECOND_ADMIN)
    with open(directory / "policy.toml", "a") as policy:
        policy.write(f'\n[[grant]]\nidentity = "{SECOND_ADMIN}"\nroles = ["key-admin"]\n')
    return directory


def demoted_gateway_policy(pki) -> str:
    """The file's policy with the gateway identity made an auditor."""
    text = (pki / "policy.toml").read_text()
    gateway_grant = f'identity = "{dev_identity("gateway")}"\nroles = ["gateway"]'
    assert gateway_grant in text
    return text.replace(gateway_grant, f'identity = "{dev_identity("gateway")}"\nroles = ["auditor"]')


class Servers:
    """Two servers on one database, as two replicas: each its own policy object, loaded
    from the file, and its own book following the database."""

    def __init__(self, domain, pki) -> None:
        self.domain = domain
        self.trail = AuditTrail(domain.hsm, AuditStore(domain.store.engine))
        self.approvals = Approvals(domain.store.engine, domain.hsm, audit=self.trail)
        self.stop = threading.Event()
        self.addresses, self.books, self._servers = [], [], []
        for _ in range(2):
            security = Security(server_credentials(pki / "server.crt", pki / "server.key", pki / "ca.crt"),
                                Policy.load(pki / "policy.toml"))
            book = PolicyBook(security.policy, PolicyStore(domain.store.engine), domain.hsm,
                              file_path=pki / "policy.toml", min_key_admins=2)
            book.refresh()
            server, port, _ = create_server(
                "127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False), signer=domain.signer,
                audit_trail=self.trail, security=security, approvals=self.approvals, policies=book)
            server.start()
            book.follow(self.stop, interval=0.2)
            self.addresses.append(f"localhost:{port}")
            self.books.append(book)
            self._servers.append(server)

    def close(self) -> None:
        self.stop.set()
        for server in self._servers:
            server.stop(None)


@pytest.fixture
def servers(domain, pki):
    running = Servers(domain, pki)
    yield running
    running.close()








def propose(address: str, pki, document: str, name: str = "client-key-admin") -> grpc.RpcError:
    with channel_as(address, pki, name) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            policy_pb2_grpc.PolicyServiceStub(channel).ProposePolicy(
                policy_pb2.ProposePolicyRequest(policy_toml=document), timeout=TIMEOUT)
    return raised.value


def gateway_seal_code(address: str, pki) -> grpc.StatusCode:
    # The key does not exist: a gateway gets NOT_FOUND, anyone else PERMISSION_DENIED.
    with channel_as(address, pki, "client-gateway") as channel:
        return code_of(seals_pb2_grpc.SealServiceStub(channel).Seal,
                       seals_pb2.SealRequest(key_id="m-policy/k", message=b"m"))


def wait_for(condition, within: float) -> float:
    """Seconds until condition() holds; fails the test after `within`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            pytest.fail(f"not so within {within} s")
        time.sleep(0.05)
    return time.monotonic() - start


def test_one_admin_alone_changes_nothing_and_cannot_approve_their_own_policy(servers, pki):
    address = servers.addresses[0]
    asked = propose(address, pki, demoted_gateway_policy(pki))
    info = error_info(asked)
    operation_id = info.metadata["operation_id"]
    with channel_as(address, pki, "client-key-admin") as channel:
        own = code_of(approvals_pb2_grpc.ApprovalServiceStub(channel).ApproveOperation,
                      approvals_pb2.DecideOperationRequest(operation_id=operation_id))
        shown = policy_pb2_grpc.PolicyServiceStub(channel).GetPolicy(policy_pb2.GetPolicyRequest(), timeout=TIMEOUT)

    assert asked.code() is grpc.StatusCode.FAILED_PRECONDITION and info.reason == "APPROVAL_REQUIRED"
    assert own is grpc.StatusCode.PERMISSION_DENIED
    assert [op.operation_id for op in servers.approvals.pending()] == [operation_id]
    assert shown.policy.source == policy_pb2.POLICY_SOURCE_FILE and shown.policy.revision == 0
    assert shown.policy.sha256 == hashlib.sha256((pki / "policy.toml").read_bytes()).hexdigest()
    assert PolicyStore(servers.domain.store.engine).latest_revision() == 0
    assert all(book.current().revision == 0 for book in servers.books)
    assert gateway_seal_code(address, pki) is grpc.StatusCode.NOT_FOUND  # still a gateway


def test_a_second_admin_approves_then_every_server_applies_the_policy_within_seconds(servers, pki):
    first, second = servers.addresses
    document = demoted_gateway_policy(pki)
    before = [gateway_seal_code(address, pki) for address in servers.addresses]
    operation_id = error_info(propose(first, pki, document)).metadata["operation_id"]
    with channel_as(second, pki, "client-key-admin-2") as channel:  # approved through the other server
        approved = approvals_pb2_grpc.ApprovalServiceStub(channel).ApproveOperation(
            approvals_pb2.DecideOperationRequest(operation_id=operation_id), timeout=TIMEOUT)
    result = policy_pb2.ProposePolicyResponse()
    assert approved.response.Unpack(result)
    took = wait_for(lambda: all(gateway_seal_code(address, pki) is grpc.StatusCode.PERMISSION_DENIED
                                for address in servers.addresses), APPLIED_WITHIN)
    with channel_as(first, pki, "client-auditor") as channel:  # the demoted gateway reads it too
        shown = policy_pb2_grpc.PolicyServiceStub(channel).GetPolicy(policy_pb2.GetPolicyRequest(), timeout=TIMEOUT)
    with channel_as(first, pki, "client-gateway") as channel:
        now_auditor = code_of(policy_pb2_grpc.PolicyServiceStub(channel).GetPolicy, policy_pb2.GetPolicyRequest())

    assert before == [grpc.StatusCode.NOT_FOUND] * 2
    assert took < APPLIED_WITHIN and now_auditor is grpc.StatusCode.OK
    digest = hashlib.sha256(document.encode()).hexdigest()
    for policy in (result.policy, shown.policy):
        assert policy.source == policy_pb2.POLICY_SOURCE_DATABASE and policy.revision == 1
        assert policy.sha256 == digest and policy.policy_toml == document
        assert policy.proposed_by == dev_identity("key-admin") and policy.approved_by == SECOND_ADMIN
    records = [(r.identity, r.operation.rpartition("/")[2], r.target, r.outcome) for r in servers.trail.read(limit=100)]
    assert (dev_identity("key-admin"), "ProposePolicy", f"policy sha256={digest}", "APPROVAL_REQUIRED") in [
        (i, o, t.partition(" op=")[0], out) for i, o, t, out in records]
    assert (SECOND_ADMIN, "ApproveOperation", f"op={operation_id}", "OK") in records
    assert servers.trail.verify().intact


@pytest.mark.parametrize("document, complaint", [
    ("[[grant]\nidentity = 'x'", "cannot read policy_toml"),
    ('[[grant]]\nidentity = "spiffe://keysvc.dev/x"\nroles = ["root"]\n', "grant 1: roles must be"),
    ('[[grant]]\nidentity = "spiffe://keysvc.dev/x"\nroles = ["gateway"]\nmerchant = ["m1"]\n',
     "grant 1: unknown setting 'merchant'"),
    # One key-admin left: no later policy could ever be approved.
    (f'[[grant]]\nidentity = "{SECOND_ADMIN}"\nroles = ["key-admin"]\n', "grants key-admin to 1 identity"),
])
def test_an_invalid_policy_is_refused_when_proposed_and_nothing_waits(servers, pki, document, complaint):
    refused = propose(servers.addresses[0], pki, document)

    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    assert complaint in refused.details() and error_info(refused).reason == "INVALID_POLICY"
    assert servers.approvals.pending() == []
    outcomes = [(r.operation.rpartition("/")[2], r.outcome) for r in servers.trail.read(limit=100)]
    assert ("ProposePolicy", "INVALID_POLICY") in outcomes


def test_a_policy_row_written_into_the_database_is_never_applied(servers, pki, domain):
    from datetime import datetime, timezone

    document = demoted_gateway_policy(pki)
    with domain.store.engine.begin() as connection:
        connection.execute(sa.insert(policies).values(
            revision=1, document=document, sha256=hashlib.sha256(document.encode()).hexdigest(),
            proposed_by=dev_identity("key-admin"), approved_by=SECOND_ADMIN,
            approved_at=datetime.now(timezone.utc), tag=b"\0" * 32))

    assert not servers.books[0].refresh()
    assert servers.books[0].current().revision == 0
    assert gateway_seal_code(servers.addresses[0], pki) is grpc.StatusCode.NOT_FOUND


def _pending_policy_rewritten(domain, operation_id: str, how: str, document: str) -> None:
    """Rewrites a pending ProposePolicy as someone with database write access would."""
    from keysvc.store.schema import pending_operations

    rewritten = policy_pb2.ProposePolicyRequest(policy_toml=document)
    digest = hashlib.sha256(document.encode()).hexdigest()
    values = {"request": dict(request=rewritten.SerializeToString()),
              "request and target": dict(request=rewritten.SerializeToString(), target=f"policy sha256={digest}"),
              "target": dict(target=f"policy sha256={digest}"),
              "requester": dict(requested_by=dev_identity("auditor"))}[how]
    with domain.store.engine.begin() as connection:
        assert connection.execute(sa.update(pending_operations).where(
            pending_operations.c.operation_id == operation_id).values(**values)).rowcount == 1


@pytest.mark.parametrize("how", ["request", "request and target", "target", "requester"])
def test_a_pending_policy_rewritten_in_the_database_is_refused_and_never_applied(servers, pki, domain, how):
    # The proposal only demotes the gateway; the attacker's policy makes them a key-admin.
    attacker = (pki / "policy.toml").read_text() + (
        '\n[[grant]]\nidentity = "spiffe://keysvc.dev/attacker"\nroles = ["key-admin"]\n')
    address = servers.addresses[0]
    operation_id = error_info(propose(address, pki, demoted_gateway_policy(pki))).metadata["operation_id"]
    _pending_policy_rewritten(domain, operation_id, how, attacker)
    with channel_as(address, pki, "client-key-admin-2") as channel:
        approvals = approvals_pb2_grpc.ApprovalServiceStub(channel)
        listed = approvals.ListPendingOperations(approvals_pb2.ListPendingOperationsRequest(), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as refused:
            approvals.ApproveOperation(approvals_pb2.DecideOperationRequest(operation_id=operation_id),
                                       timeout=TIMEOUT)

    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    assert error_info(refused.value).reason == "PENDING_OPERATION_TAMPERED"
    assert list(listed.operations) == [] and servers.approvals.pending() == []
    assert PolicyStore(domain.store.engine).latest_revision() == 0
    assert all(book.current().revision == 0 for book in servers.books)
    records = [(r.identity, r.operation.rpartition("/")[2], r.target.rpartition(" op=")[2], r.outcome)
               for r in servers.trail.read(limit=100)]
    assert (SECOND_ADMIN, "ProposePolicy", operation_id, "PENDING_OPERATION_TAMPERED") in records
    assert servers.trail.verify().intact


def test_a_pending_operation_whose_target_is_not_its_requests_is_neither_listed_nor_run(servers, pki, domain):
    """Even with a valid tag (made here with the HSM, as no attacker can), the target an
    approver reads must be the one the request describes."""
    document = demoted_gateway_policy(pki)
    operation = servers.approvals.propose(
        "/keysvc.v1.PolicyService/ProposePolicy", policy_pb2.ProposePolicyRequest(policy_toml=document)
        .SerializeToString(), "policy sha256=" + "0" * 64, dev_identity("key-admin"))
    with channel_as(servers.addresses[0], pki, "client-key-admin-2") as channel:
        approvals = approvals_pb2_grpc.ApprovalServiceStub(channel)
        listed = approvals.ListPendingOperations(approvals_pb2.ListPendingOperationsRequest(), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as refused:
            approvals.ApproveOperation(approvals_pb2.DecideOperationRequest(operation_id=operation.operation_id),
                                       timeout=TIMEOUT)

    assert list(listed.operations) == []
    assert error_info(refused.value).reason == "PENDING_OPERATION_TAMPERED"
    assert "target is not the one its request describes" in refused.value.details()
    assert PolicyStore(domain.store.engine).latest_revision() == 0


def test_the_cli_says_which_operation_waits_for_approval_in_text_and_json(servers, pki, tmp_path):
    import json

    from click.testing import CliRunner

    from keysvc.cli import main as cli_main

    proposal = tmp_path / "proposed.toml"
    proposal.write_text(demoted_gateway_policy(pki))
    digest = hashlib.sha256(proposal.read_bytes()).hexdigest()
    arguments = ["--server", servers.addresses[0], "--pki", str(pki)]
    text = CliRunner().invoke(cli_main, [*arguments, "policy", "propose", str(proposal)])
    as_json = CliRunner().invoke(cli_main, [*arguments, "--json", "policy", "propose", str(proposal)])

    assert text.exit_code == 0 and as_json.exit_code == 0, (text.output, as_json.output)
    text_id = text.stdout.split()[2]
    assert text.stdout == (f"pending operation {text_id} (policy sha256 {digest}): a second key-admin approves it "
                           f"with keysvc approvals approve {text_id}\n")
    pending = json.loads(as_json.stdout)["pending_operation"]
    assert pending["policy_sha256"] == digest
    assert {op.operation_id for op in servers.approvals.pending()} == {text_id, pending["operation_id"]}


def test_keysvc_serve_workers_apply_an_approved_policy_and_sighup_keeps_it(token, tmp_path, pki):
    """The CLI against `keysvc serve` with two workers: propose, approve as the other
    admin, every connection sees the new policy; SIGHUP does not bring the file back."""
    second_pki = tmp_path / "pki-admin-2"  # the CLI presents client-key-admin.crt: make it the second admin's
    shutil.copytree(pki, second_pki)
    for suffix in ("crt", "key"):
        shutil.copy(pki / f"client-key-admin-2.{suffix}", second_pki / f"client-key-admin.{suffix}")
    server = start_keysvc_server(token, f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "server.log", workers=2,
                                 extra_args=("--tls-cert", str(pki / "server.crt"), "--tls-key",
                                             str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.crt"),
                                             "--policy", str(pki / "policy.toml")))
    address = "localhost:" + server.address.rpartition(":")[2]
    proposal = tmp_path / "proposed.toml"
    proposal.write_text(demoted_gateway_policy(pki))

    def cli(directory, *args):
        return subprocess.run([KEYSVC, "--server", address, "--pki", str(directory), *args],
                              capture_output=True, text=True, timeout=60)

    def denied_everywhere() -> bool:
        # Each channel its own connection, spread over the workers by the kernel.
        return all(gateway_seal_code(address, pki) is grpc.StatusCode.PERMISSION_DENIED for _ in range(8))

    try:
        proposed = cli(pki, "policy", "propose", str(proposal))
        operation_id = proposed.stdout.split()[2] if proposed.stdout.startswith("pending operation") else ""
        before = gateway_seal_code(address, pki)
        approved = cli(second_pki, "approvals", "approve", operation_id)
        took = wait_for(denied_everywhere, APPLIED_WITHIN)
        shown = cli(pki, "policy", "show")
        server.process.send_signal(signal.SIGHUP)  # the workers get it too
        wait_for(lambda: server.log().count("policy file not applied") >= 2, APPLIED_WITHIN)
        still = denied_everywhere()
    finally:
        stop_keysvc_server(server)

    digest = hashlib.sha256(proposal.read_bytes()).hexdigest()
    assert proposed.returncode == 0 and f"policy sha256 {digest}" in proposed.stdout, proposed.stderr
    assert before is grpc.StatusCode.NOT_FOUND
    assert approved.returncode == 0, approved.stderr
    assert took < APPLIED_WITHIN and still
    assert shown.returncode == 0 and f"# revision 1 (sha256 {digest})" in shown.stdout
    assert f"approved by {SECOND_ADMIN}" in shown.stdout and 'roles = ["auditor"]' in shown.stdout


def test_policy_service_roles_key_admin_proposes_and_auditor_reads(servers, pki):
    from keysvc.authz import ROLES

    address = servers.addresses[0]
    found = {}
    for role in ROLES:
        with channel_as(address, pki, f"client-{role}") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            found[role] = (code_of(stub.GetPolicy, policy_pb2.GetPolicyRequest()),
                           code_of(stub.ProposePolicy, policy_pb2.ProposePolicyRequest(policy_toml="")))

    denied = grpc.StatusCode.PERMISSION_DENIED
    assert found.pop("key-admin") == (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)  # "" grants no admin
    assert found.pop("auditor") == (grpc.StatusCode.OK, denied)
    assert set(found.values()) == {(denied, denied)}


def test_without_dual_control_a_proposed_policy_is_in_force_at_once(domain, pki):
    security = Security(server_credentials(pki / "server.crt", pki / "server.key", pki / "ca.crt"),
                        Policy.load(pki / "policy.toml"))
    book = PolicyBook(security.policy, PolicyStore(domain.store.engine), domain.hsm, file_path=pki / "policy.toml")
    server, port, _ = create_server("127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False),
                                    signer=domain.signer, security=security, policies=book)
    server.start()
    address = f"localhost:{port}"
    try:
        with channel_as(address, pki, "client-key-admin") as channel:
            response = policy_pb2_grpc.PolicyServiceStub(channel).ProposePolicy(
                policy_pb2.ProposePolicyRequest(policy_toml=demoted_gateway_policy(pki)), timeout=TIMEOUT)
        after = gateway_seal_code(address, pki)
    finally:
        server.stop(None)

    assert response.policy.revision == 1 and after is grpc.StatusCode.PERMISSION_DENIED
    assert response.policy.proposed_by == response.policy.approved_by == dev_identity("key-admin")
