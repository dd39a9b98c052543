from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuditRecord(_message.Message):
    __slots__ = ("seq", "recorded_at", "identity", "operation", "target", "outcome", "request_id", "record_hash")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    recorded_at: str
    identity: str
    operation: str
    target: str
    outcome: str
    request_id: str
    record_hash: str
    def __init__(self, seq: _Optional[int] = ..., recorded_at: _Optional[str] = ..., identity: _Optional[str] = ..., operation: _Optional[str] = ..., target: _Optional[str] = ..., outcome: _Optional[str] = ..., request_id: _Optional[str] = ..., record_hash: _Optional[str] = ...) -> None: ...

class ListAuditRecordsRequest(_message.Message):
    __slots__ = ("after_seq", "limit", "identity", "operation")
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    limit: int
    identity: str
    operation: str
    def __init__(self, after_seq: _Optional[int] = ..., limit: _Optional[int] = ..., identity: _Optional[str] = ..., operation: _Optional[str] = ...) -> None: ...

class ListAuditRecordsResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ...) -> None: ...

class VerifyAuditTrailRequest(_message.Message):
    __slots__ = ("expect_at_least",)
    EXPECT_AT_LEAST_FIELD_NUMBER: _ClassVar[int]
    expect_at_least: int
    def __init__(self, expect_at_least: _Optional[int] = ...) -> None: ...

class VerifyAuditTrailResponse(_message.Message):
    __slots__ = ("intact", "records", "checkpoints", "first_bad_seq", "problem", "public_key")
    INTACT_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    intact: bool
    records: int
    checkpoints: int
    first_bad_seq: int
    problem: str
    public_key: str
    def __init__(self, intact: _Optional[bool] = ..., records: _Optional[int] = ..., checkpoints: _Optional[int] = ..., first_bad_seq: _Optional[int] = ..., problem: _Optional[str] = ..., public_key: _Optional[str] = ...) -> None: ...
