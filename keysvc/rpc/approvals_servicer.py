"""ApprovalService over gRPC: list, approve (then run) or reject pending operations."""

from __future__ import annotations

from typing import Callable

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from keysvc.approvals import Approvals, PendingOperation, current_approval
from keysvc.errors import FailedPrecondition
from keysvc.logs import current_identity
from keysvc.rpc.auth import target_of
from keysvc.rpc.convert import timestamp
from keysvc.rpc.errors import translated
from keysvc.v1 import approvals_pb2, approvals_pb2_grpc

# Method name → (its request class, the servicer method that runs it).
Runners = dict[str, tuple[type, Callable]]


def _message(operation: PendingOperation) -> approvals_pb2.PendingOperation:
    return approvals_pb2.PendingOperation(
        operation_id=operation.operation_id, method=operation.method, target=operation.target,
        requested_by=operation.requested_by, create_time=timestamp(operation.created_at),
        expire_time=timestamp(operation.expires_at),
    )


class ApprovalServicer(approvals_pb2_grpc.ApprovalServiceServicer):
    def __init__(self, approvals: Approvals, runners: Runners) -> None:
        self._approvals = approvals
        self._runners = runners

    def _target_of(self, operation: PendingOperation) -> str | None:
        """The target the operation's request describes, so that what an approver reads
        cannot disagree with what would run; None for a kind this server cannot run."""
        runner = self._runners.get(operation.method)
        if runner is None:
            return None
        try:
            return target_of(runner[0].FromString(operation.request))
        except DecodeError:
            return "(a request that does not decode)"

    @translated
    def ListPendingOperations(self, request, context):
        return approvals_pb2.ListPendingOperationsResponse(
            operations=[_message(operation) for operation in self._approvals.pending(self._target_of)]
        )

    @translated
    def ApproveOperation(self, request, context):
        pending = self._approvals.get(request.operation_id)
        if pending.method not in self._runners:
            raise FailedPrecondition(f"this server cannot run {pending.method}")
        operation = self._approvals.decide(request.operation_id, current_identity.get(), approve=True,
                                           target_of=self._target_of)
        request_class, run = self._runners[operation.method]
        # Runs as asked: its errors end this call with their own status.
        running = current_approval.set(operation)
        try:
            response = run(request_class.FromString(operation.request), context)
        finally:
            current_approval.reset(running)
        packed = any_pb2.Any()
        packed.Pack(response)
        return approvals_pb2.ApproveOperationResponse(operation=_message(operation), response=packed)

    @translated
    def RejectOperation(self, request, context):
        operation = self._approvals.decide(request.operation_id, current_identity.get(), approve=False)
        return approvals_pb2.RejectOperationResponse(operation=_message(operation))
