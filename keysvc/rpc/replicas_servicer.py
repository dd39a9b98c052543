"""ReplicaService over gRPC: the serving processes sharing this database."""

from __future__ import annotations

from keysvc.replicas import Replica
from keysvc.rpc.convert import timestamp
from keysvc.rpc.errors import translated
from keysvc.v1 import replicas_pb2, replicas_pb2_grpc


class ReplicaServicer(replicas_pb2_grpc.ReplicaServiceServicer):
    def __init__(self, replica: Replica) -> None:
        self._replica = replica

    @translated
    def ListReplicas(self, request, context):
        listing = self._replica.list_replicas()
        return replicas_pb2.ListReplicasResponse(
            replicas=[replicas_pb2.Replica(
                replica_id=record.replica_id, address=record.address, start_time=timestamp(record.started_at),
                heartbeat_time=timestamp(record.heartbeat_at), seen_change=record.seen_change, live=record.live)
                for record in listing.replicas],
            latest_change=listing.latest_change,
        )
