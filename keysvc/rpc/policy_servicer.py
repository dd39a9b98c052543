"""PolicyService over gRPC: propose a new role policy (dual control), read the one in force."""

from __future__ import annotations

from keysvc.approvals import current_approval
from keysvc.logs import current_identity
from keysvc.policies import DATABASE, PolicyBook, PolicyRecord
from keysvc.rpc.convert import timestamp
from keysvc.rpc.errors import translated
from keysvc.v1 import policy_pb2, policy_pb2_grpc

PROPOSE_POLICY_METHOD = "/keysvc.v1.PolicyService/ProposePolicy"


def _message(record: PolicyRecord) -> policy_pb2.Policy:
    message = policy_pb2.Policy(
        source=policy_pb2.POLICY_SOURCE_DATABASE if record.source == DATABASE else policy_pb2.POLICY_SOURCE_FILE,
        revision=record.revision, sha256=record.sha256, policy_toml=record.document,
        proposed_by=record.proposed_by, approved_by=record.approved_by,
    )
    if record.approved_at is not None:
        message.approve_time.CopyFrom(timestamp(record.approved_at))
    return message


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, book: PolicyBook) -> None:
        self._book = book

    @translated
    def ProposePolicy(self, request, context):
        # Reached as an approved operation (dual control: the approver calls), or
        # directly where dual control is off (the caller alone decides).
        approver = current_identity.get() or ""
        approval = current_approval.get()
        record = self._book.adopt(request.policy_toml, approved_by=approver,
                                  proposed_by=approval.requested_by if approval else approver)
        return policy_pb2.ProposePolicyResponse(policy=_message(record))

    @translated
    def GetPolicy(self, request, context):
        return policy_pb2.GetPolicyResponse(policy=_message(self._book.current()))

    def check_proposal(self, request) -> None:
        """Refuses an invalid policy before it becomes a pending operation (InvalidArgument)."""
        self._book.check(request.policy_toml)
