from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SealScheme(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEAL_SCHEME_UNSPECIFIED: _ClassVar[SealScheme]
    SEAL_SCHEME_HMAC: _ClassVar[SealScheme]
    SEAL_SCHEME_SIPS_POST: _ClassVar[SealScheme]
    SEAL_SCHEME_SIPS_JSON_REQUEST: _ClassVar[SealScheme]
    SEAL_SCHEME_SIPS_JSON_RESPONSE: _ClassVar[SealScheme]
    SEAL_SCHEME_MONETICO: _ClassVar[SealScheme]
    SEAL_SCHEME_CMCIC_LEGACY_REQUEST: _ClassVar[SealScheme]
    SEAL_SCHEME_CMCIC_LEGACY_NOTIFICATION: _ClassVar[SealScheme]

class SealEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEAL_ENCODING_UNSPECIFIED: _ClassVar[SealEncoding]
    SEAL_ENCODING_HEX: _ClassVar[SealEncoding]
    SEAL_ENCODING_BASE64: _ClassVar[SealEncoding]
SEAL_SCHEME_UNSPECIFIED: SealScheme
SEAL_SCHEME_HMAC: SealScheme
SEAL_SCHEME_SIPS_POST: SealScheme
SEAL_SCHEME_SIPS_JSON_REQUEST: SealScheme
SEAL_SCHEME_SIPS_JSON_RESPONSE: SealScheme
SEAL_SCHEME_MONETICO: SealScheme
SEAL_SCHEME_CMCIC_LEGACY_REQUEST: SealScheme
SEAL_SCHEME_CMCIC_LEGACY_NOTIFICATION: SealScheme
SEAL_ENCODING_UNSPECIFIED: SealEncoding
SEAL_ENCODING_HEX: SealEncoding
SEAL_ENCODING_BASE64: SealEncoding

class Field(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class SealRequest(_message.Message):
    __slots__ = ("key_id", "message", "scheme", "encoding", "version", "fields", "fields_json", "encode_base64")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_JSON_FIELD_NUMBER: _ClassVar[int]
    ENCODE_BASE64_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    message: bytes
    scheme: SealScheme
    encoding: SealEncoding
    version: int
    fields: _containers.RepeatedCompositeFieldContainer[Field]
    fields_json: str
    encode_base64: bool
    def __init__(self, key_id: _Optional[str] = ..., message: _Optional[bytes] = ..., scheme: _Optional[_Union[SealScheme, str]] = ..., encoding: _Optional[_Union[SealEncoding, str]] = ..., version: _Optional[int] = ..., fields: _Optional[_Iterable[_Union[Field, _Mapping]]] = ..., fields_json: _Optional[str] = ..., encode_base64: _Optional[bool] = ...) -> None: ...

class SealResponse(_message.Message):
    __slots__ = ("seal", "key_id", "version", "data", "algorithm")
    SEAL_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    seal: str
    key_id: str
    version: int
    data: str
    algorithm: str
    def __init__(self, seal: _Optional[str] = ..., key_id: _Optional[str] = ..., version: _Optional[int] = ..., data: _Optional[str] = ..., algorithm: _Optional[str] = ...) -> None: ...

class ExplainSealResponse(_message.Message):
    __slots__ = ("key_id", "version", "scheme", "algorithm", "charset", "sealed_data")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CHARSET_FIELD_NUMBER: _ClassVar[int]
    SEALED_DATA_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    version: int
    scheme: SealScheme
    algorithm: str
    charset: str
    sealed_data: bytes
    def __init__(self, key_id: _Optional[str] = ..., version: _Optional[int] = ..., scheme: _Optional[_Union[SealScheme, str]] = ..., algorithm: _Optional[str] = ..., charset: _Optional[str] = ..., sealed_data: _Optional[bytes] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("key_id", "message", "seal", "scheme", "encoding", "version", "fields", "fields_json", "encode_base64")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_JSON_FIELD_NUMBER: _ClassVar[int]
    ENCODE_BASE64_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    message: bytes
    seal: str
    scheme: SealScheme
    encoding: SealEncoding
    version: int
    fields: _containers.RepeatedCompositeFieldContainer[Field]
    fields_json: str
    encode_base64: bool
    def __init__(self, key_id: _Optional[str] = ..., message: _Optional[bytes] = ..., seal: _Optional[str] = ..., scheme: _Optional[_Union[SealScheme, str]] = ..., encoding: _Optional[_Union[SealEncoding, str]] = ..., version: _Optional[int] = ..., fields: _Optional[_Iterable[_Union[Field, _Mapping]]] = ..., fields_json: _Optional[str] = ..., encode_base64: _Optional[bool] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("valid", "key_id", "version", "receipt")
    VALID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    key_id: str
    version: int
    receipt: str
    def __init__(self, valid: _Optional[bool] = ..., key_id: _Optional[str] = ..., version: _Optional[int] = ..., receipt: _Optional[str] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "reason", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class BatchSealRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SealRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SealRequest, _Mapping]]] = ...) -> None: ...

class BatchSealResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: SealResponse
    error: ItemError
    def __init__(self, response: _Optional[_Union[SealResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class BatchSealResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchSealResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchSealResult, _Mapping]]] = ...) -> None: ...

class BatchVerifyRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[VerifyRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[VerifyRequest, _Mapping]]] = ...) -> None: ...

class BatchVerifyResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: VerifyResponse
    error: ItemError
    def __init__(self, response: _Optional[_Union[VerifyResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class BatchVerifyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchVerifyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchVerifyResult, _Mapping]]] = ...) -> None: ...
