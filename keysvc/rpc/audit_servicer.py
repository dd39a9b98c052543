"""AuditService over gRPC: reading and checking the audit trail."""

from __future__ import annotations

from keysvc.audit import AuditTrail
from keysvc.errors import InvalidArgument
from keysvc.rpc.errors import translated
from keysvc.v1 import audit_pb2, audit_pb2_grpc

MAX_RECORDS = 1000


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    @translated
    def ListAuditRecords(self, request, context):
        if request.limit > MAX_RECORDS:
            raise InvalidArgument("limit", f"must be at most {MAX_RECORDS}")
        rows = self._trail.read(after_seq=request.after_seq, limit=request.limit or 100,
                                identity=request.identity, operation=request.operation)
        return audit_pb2.ListAuditRecordsResponse(records=[
            audit_pb2.AuditRecord(seq=row.seq, recorded_at=row.recorded_at, identity=row.identity,
                                  operation=row.operation, target=row.target, outcome=row.outcome,
                                  request_id=row.request_id, record_hash=row.record_hash.hex())
            for row in rows
        ])

    @translated
    def VerifyAuditTrail(self, request, context):
        report = self._trail.verify(expect_at_least=request.expect_at_least)
        return audit_pb2.VerifyAuditTrailResponse(
            intact=report.intact, records=report.records, checkpoints=report.checkpoints,
            first_bad_seq=report.first_bad_seq, problem=report.problem, public_key=self._trail.public_key.hex(),
        )
