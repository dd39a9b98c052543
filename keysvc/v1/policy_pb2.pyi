import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicySource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_SOURCE_UNSPECIFIED: _ClassVar[PolicySource]
    POLICY_SOURCE_FILE: _ClassVar[PolicySource]
    POLICY_SOURCE_DATABASE: _ClassVar[PolicySource]
POLICY_SOURCE_UNSPECIFIED: PolicySource
POLICY_SOURCE_FILE: PolicySource
POLICY_SOURCE_DATABASE: PolicySource

class Policy(_message.Message):
    __slots__ = ("source", "revision", "sha256", "policy_toml", "proposed_by", "approved_by", "approve_time")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    POLICY_TOML_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_BY_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    APPROVE_TIME_FIELD_NUMBER: _ClassVar[int]
    source: PolicySource
    revision: int
    sha256: str
    policy_toml: str
    proposed_by: str
    approved_by: str
    approve_time: _timestamp_pb2.Timestamp
    def __init__(self, source: _Optional[_Union[PolicySource, str]] = ..., revision: _Optional[int] = ..., sha256: _Optional[str] = ..., policy_toml: _Optional[str] = ..., proposed_by: _Optional[str] = ..., approved_by: _Optional[str] = ..., approve_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ProposePolicyRequest(_message.Message):
    __slots__ = ("policy_toml",)
    POLICY_TOML_FIELD_NUMBER: _ClassVar[int]
    policy_toml: str
    def __init__(self, policy_toml: _Optional[str] = ...) -> None: ...

class ProposePolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...
