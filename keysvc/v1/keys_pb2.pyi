import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_ALGORITHM_UNSPECIFIED: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_HMAC_SHA1: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_HMAC_SHA256: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_HMAC_SHA384: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_HMAC_SHA512: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_SHA256_DATA_SECRET: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_RSA_2048: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_RSA_3072: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_RSA_4096: _ClassVar[KeyAlgorithm]

class KeyPlatform(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_PLATFORM_UNSPECIFIED: _ClassVar[KeyPlatform]
    KEY_PLATFORM_GENERIC: _ClassVar[KeyPlatform]
    KEY_PLATFORM_SIPS: _ClassVar[KeyPlatform]
    KEY_PLATFORM_MONETICO: _ClassVar[KeyPlatform]

class Charset(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHARSET_UNSPECIFIED: _ClassVar[Charset]
    CHARSET_UTF_8: _ClassVar[Charset]
    CHARSET_ISO_8859_1: _ClassVar[Charset]

class KeyPurpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_PURPOSE_UNSPECIFIED: _ClassVar[KeyPurpose]
    KEY_PURPOSE_SEAL: _ClassVar[KeyPurpose]
    KEY_PURPOSE_SIGN: _ClassVar[KeyPurpose]

class KeyVersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_VERSION_STATE_UNSPECIFIED: _ClassVar[KeyVersionState]
    KEY_VERSION_STATE_ENABLED: _ClassVar[KeyVersionState]
    KEY_VERSION_STATE_VERIFY_ONLY: _ClassVar[KeyVersionState]
    KEY_VERSION_STATE_DISABLED: _ClassVar[KeyVersionState]
    KEY_VERSION_STATE_DESTROYED: _ClassVar[KeyVersionState]

class KeyOrigin(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_ORIGIN_UNSPECIFIED: _ClassVar[KeyOrigin]
    KEY_ORIGIN_GENERATED: _ClassVar[KeyOrigin]
    KEY_ORIGIN_IMPORTED: _ClassVar[KeyOrigin]
KEY_ALGORITHM_UNSPECIFIED: KeyAlgorithm
KEY_ALGORITHM_HMAC_SHA1: KeyAlgorithm
KEY_ALGORITHM_HMAC_SHA256: KeyAlgorithm
KEY_ALGORITHM_HMAC_SHA384: KeyAlgorithm
KEY_ALGORITHM_HMAC_SHA512: KeyAlgorithm
KEY_ALGORITHM_SHA256_DATA_SECRET: KeyAlgorithm
KEY_ALGORITHM_RSA_2048: KeyAlgorithm
KEY_ALGORITHM_RSA_3072: KeyAlgorithm
KEY_ALGORITHM_RSA_4096: KeyAlgorithm
KEY_PLATFORM_UNSPECIFIED: KeyPlatform
KEY_PLATFORM_GENERIC: KeyPlatform
KEY_PLATFORM_SIPS: KeyPlatform
KEY_PLATFORM_MONETICO: KeyPlatform
CHARSET_UNSPECIFIED: Charset
CHARSET_UTF_8: Charset
CHARSET_ISO_8859_1: Charset
KEY_PURPOSE_UNSPECIFIED: KeyPurpose
KEY_PURPOSE_SEAL: KeyPurpose
KEY_PURPOSE_SIGN: KeyPurpose
KEY_VERSION_STATE_UNSPECIFIED: KeyVersionState
KEY_VERSION_STATE_ENABLED: KeyVersionState
KEY_VERSION_STATE_VERIFY_ONLY: KeyVersionState
KEY_VERSION_STATE_DISABLED: KeyVersionState
KEY_VERSION_STATE_DESTROYED: KeyVersionState
KEY_ORIGIN_UNSPECIFIED: KeyOrigin
KEY_ORIGIN_GENERATED: KeyOrigin
KEY_ORIGIN_IMPORTED: KeyOrigin

class KeyVersion(_message.Message):
    __slots__ = ("version", "state", "origin", "check_value", "create_time", "destroy_time")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DESTROY_TIME_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: KeyVersionState
    origin: KeyOrigin
    check_value: str
    create_time: _timestamp_pb2.Timestamp
    destroy_time: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[KeyVersionState, str]] = ..., origin: _Optional[_Union[KeyOrigin, str]] = ..., check_value: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., destroy_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("key_id", "merchant_id", "name", "purpose", "algorithm", "primary_version", "versions", "create_time", "update_time", "platform", "charset", "pending_primary")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MERCHANT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    CHARSET_FIELD_NUMBER: _ClassVar[int]
    PENDING_PRIMARY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    merchant_id: str
    name: str
    purpose: KeyPurpose
    algorithm: KeyAlgorithm
    primary_version: int
    versions: _containers.RepeatedCompositeFieldContainer[KeyVersion]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    platform: KeyPlatform
    charset: Charset
    pending_primary: int
    def __init__(self, key_id: _Optional[str] = ..., merchant_id: _Optional[str] = ..., name: _Optional[str] = ..., purpose: _Optional[_Union[KeyPurpose, str]] = ..., algorithm: _Optional[_Union[KeyAlgorithm, str]] = ..., primary_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[KeyVersion, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., platform: _Optional[_Union[KeyPlatform, str]] = ..., charset: _Optional[_Union[Charset, str]] = ..., pending_primary: _Optional[int] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("merchant_id", "name", "purpose", "algorithm", "platform", "charset")
    MERCHANT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    CHARSET_FIELD_NUMBER: _ClassVar[int]
    merchant_id: str
    name: str
    purpose: KeyPurpose
    algorithm: KeyAlgorithm
    platform: KeyPlatform
    charset: Charset
    def __init__(self, merchant_id: _Optional[str] = ..., name: _Optional[str] = ..., purpose: _Optional[_Union[KeyPurpose, str]] = ..., algorithm: _Optional[_Union[KeyAlgorithm, str]] = ..., platform: _Optional[_Union[KeyPlatform, str]] = ..., charset: _Optional[_Union[Charset, str]] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: Key
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ...) -> None: ...

class GetImportParametersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetImportParametersResponse(_message.Message):
    __slots__ = ("public_key_pem", "wrapping_algorithm", "import_key_id", "private_key_wrapping_algorithm")
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    WRAPPING_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    IMPORT_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_WRAPPING_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    public_key_pem: str
    wrapping_algorithm: str
    import_key_id: str
    private_key_wrapping_algorithm: str
    def __init__(self, public_key_pem: _Optional[str] = ..., wrapping_algorithm: _Optional[str] = ..., import_key_id: _Optional[str] = ..., private_key_wrapping_algorithm: _Optional[str] = ...) -> None: ...

class ImportKeyRequest(_message.Message):
    __slots__ = ("merchant_id", "name", "purpose", "algorithm", "wrapped_secret", "import_key_id", "version", "make_primary", "platform", "charset")
    MERCHANT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_SECRET_FIELD_NUMBER: _ClassVar[int]
    IMPORT_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAKE_PRIMARY_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    CHARSET_FIELD_NUMBER: _ClassVar[int]
    merchant_id: str
    name: str
    purpose: KeyPurpose
    algorithm: KeyAlgorithm
    wrapped_secret: bytes
    import_key_id: str
    version: int
    make_primary: bool
    platform: KeyPlatform
    charset: Charset
    def __init__(self, merchant_id: _Optional[str] = ..., name: _Optional[str] = ..., purpose: _Optional[_Union[KeyPurpose, str]] = ..., algorithm: _Optional[_Union[KeyAlgorithm, str]] = ..., wrapped_secret: _Optional[bytes] = ..., import_key_id: _Optional[str] = ..., version: _Optional[int] = ..., make_primary: _Optional[bool] = ..., platform: _Optional[_Union[KeyPlatform, str]] = ..., charset: _Optional[_Union[Charset, str]] = ...) -> None: ...

class ImportKeyResponse(_message.Message):
    __slots__ = ("key", "version", "check_value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    key: Key
    version: int
    check_value: str
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ..., version: _Optional[int] = ..., check_value: _Optional[str] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("key", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: Key
    version: int
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class GetKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class GetKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: Key
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("merchant_id", "page_size", "page_token")
    MERCHANT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    merchant_id: str
    page_size: int
    page_token: str
    def __init__(self, merchant_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SetKeyVersionStateRequest(_message.Message):
    __slots__ = ("key_id", "version", "state")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    version: int
    state: KeyVersionState
    def __init__(self, key_id: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[KeyVersionState, str]] = ...) -> None: ...

class SetKeyVersionStateResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: Key
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ...) -> None: ...

class SetPrimaryVersionRequest(_message.Message):
    __slots__ = ("key_id", "version")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    version: int
    def __init__(self, key_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SetPrimaryVersionResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: Key
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ...) -> None: ...

class DestroyKeyVersionRequest(_message.Message):
    __slots__ = ("key_id", "version")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    version: int
    def __init__(self, key_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DestroyKeyVersionResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: Key
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ...) -> None: ...
