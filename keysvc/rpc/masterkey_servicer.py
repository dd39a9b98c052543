"""MasterKeyService over gRPC: delivering the master key to an enrolling replica (dual
control only), its check value, and the enrollments."""

from __future__ import annotations

from keysvc.errors import FailedPrecondition
from keysvc.logs import current_identity
from keysvc.masterkey import MasterKeyAdmin, fingerprint_of, short_check_value
from keysvc.rpc.convert import timestamp
from keysvc.rpc.errors import translated
from keysvc.store.shared_keys import Enrollment
from keysvc.v1 import masterkey_pb2, masterkey_pb2_grpc

DELIVER_METHOD = "/keysvc.v1.MasterKeyService/DeliverMasterKey"


def _message(enrollment: Enrollment) -> masterkey_pb2.Enrollment:
    return masterkey_pb2.Enrollment(
        enrollment_id=enrollment.enrollment_id, replica_name=enrollment.replica_name,
        transport_key_fingerprint=fingerprint_of(enrollment.transport_public_key),
        state=masterkey_pb2.EnrollmentState.Value(f"ENROLLMENT_STATE_{enrollment.state.value}"),
        request_time=timestamp(enrollment.requested_at), expire_time=timestamp(enrollment.expires_at),
        master_check_value=short_check_value(enrollment.master_check_value), delivered_by=enrollment.delivered_by,
    )


class MasterKeyServicer(masterkey_pb2_grpc.MasterKeyServiceServicer):
    def __init__(self, admin: MasterKeyAdmin) -> None:
        self._admin = admin

    @translated
    def DeliverMasterKey(self, request, context):
        # With dual control the auth interceptor turns every call into a pending
        # operation, and an approval runs deliver_approved: a call reaching this method
        # comes from a server without dual control, where one person would decide alone.
        raise FailedPrecondition(
            "DeliverMasterKey needs two key-admins: serve with mutual TLS and dual control",
            reason="DUAL_CONTROL_REQUIRED")

    def check_delivery(self, request) -> None:
        """The dual-control precheck: a DeliverMasterKey that could not run (a malformed,
        unknown, expired or already delivered enrollment, a fingerprint that is not its
        transport key's) is refused when asked rather than kept for approval."""
        self._admin.check_delivery(request.enrollment_id, request.transport_key_fingerprint)

    def deliver_approved(self, request, context):
        """Runs a DeliverMasterKey request a second key-admin approved (ApprovalService)."""
        enrollment = self._admin.deliver(request.enrollment_id, request.transport_key_fingerprint,
                                         current_identity.get() or "")
        return masterkey_pb2.DeliverMasterKeyResponse(enrollment=_message(enrollment))

    @translated
    def GetMasterKeyCheckValue(self, request, context):
        values = self._admin.check_values()
        return masterkey_pb2.GetMasterKeyCheckValueResponse(check_value=values.token,
                                                             recorded_check_value=values.recorded,
                                                             long_check_value=values.token_long)

    @translated
    def ListEnrollments(self, request, context):
        return masterkey_pb2.ListEnrollmentsResponse(
            enrollments=[_message(enrollment) for enrollment in self._admin.enrollments()])
