import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollmentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENROLLMENT_STATE_UNSPECIFIED: _ClassVar[EnrollmentState]
    ENROLLMENT_STATE_REQUESTED: _ClassVar[EnrollmentState]
    ENROLLMENT_STATE_DELIVERED: _ClassVar[EnrollmentState]
    ENROLLMENT_STATE_COMPLETED: _ClassVar[EnrollmentState]
ENROLLMENT_STATE_UNSPECIFIED: EnrollmentState
ENROLLMENT_STATE_REQUESTED: EnrollmentState
ENROLLMENT_STATE_DELIVERED: EnrollmentState
ENROLLMENT_STATE_COMPLETED: EnrollmentState

class Enrollment(_message.Message):
    __slots__ = ("enrollment_id", "replica_name", "transport_key_fingerprint", "state", "request_time", "expire_time", "master_check_value", "delivered_by")
    ENROLLMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_NAME_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    MASTER_CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_BY_FIELD_NUMBER: _ClassVar[int]
    enrollment_id: str
    replica_name: str
    transport_key_fingerprint: str
    state: EnrollmentState
    request_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    master_check_value: str
    delivered_by: str
    def __init__(self, enrollment_id: _Optional[str] = ..., replica_name: _Optional[str] = ..., transport_key_fingerprint: _Optional[str] = ..., state: _Optional[_Union[EnrollmentState, str]] = ..., request_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., master_check_value: _Optional[str] = ..., delivered_by: _Optional[str] = ...) -> None: ...

class DeliverMasterKeyRequest(_message.Message):
    __slots__ = ("enrollment_id", "transport_key_fingerprint")
    ENROLLMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    enrollment_id: str
    transport_key_fingerprint: str
    def __init__(self, enrollment_id: _Optional[str] = ..., transport_key_fingerprint: _Optional[str] = ...) -> None: ...

class DeliverMasterKeyResponse(_message.Message):
    __slots__ = ("enrollment",)
    ENROLLMENT_FIELD_NUMBER: _ClassVar[int]
    enrollment: Enrollment
    def __init__(self, enrollment: _Optional[_Union[Enrollment, _Mapping]] = ...) -> None: ...

class GetMasterKeyCheckValueRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMasterKeyCheckValueResponse(_message.Message):
    __slots__ = ("check_value", "recorded_check_value", "long_check_value")
    CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    RECORDED_CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    LONG_CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    check_value: str
    recorded_check_value: str
    long_check_value: str
    def __init__(self, check_value: _Optional[str] = ..., recorded_check_value: _Optional[str] = ..., long_check_value: _Optional[str] = ...) -> None: ...

class ListEnrollmentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEnrollmentsResponse(_message.Message):
    __slots__ = ("enrollments",)
    ENROLLMENTS_FIELD_NUMBER: _ClassVar[int]
    enrollments: _containers.RepeatedCompositeFieldContainer[Enrollment]
    def __init__(self, enrollments: _Optional[_Iterable[_Union[Enrollment, _Mapping]]] = ...) -> None: ...
