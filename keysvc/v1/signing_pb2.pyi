from keysvc.v1 import seals_pb2 as _seals_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SignatureAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNATURE_ALGORITHM_UNSPECIFIED: _ClassVar[SignatureAlgorithm]
    SIGNATURE_ALGORITHM_RSA_PSS_SHA256: _ClassVar[SignatureAlgorithm]
    SIGNATURE_ALGORITHM_RSA_PSS_SHA384: _ClassVar[SignatureAlgorithm]
    SIGNATURE_ALGORITHM_RSA_PSS_SHA512: _ClassVar[SignatureAlgorithm]
    SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256: _ClassVar[SignatureAlgorithm]
    SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA384: _ClassVar[SignatureAlgorithm]
    SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA512: _ClassVar[SignatureAlgorithm]
SIGNATURE_ALGORITHM_UNSPECIFIED: SignatureAlgorithm
SIGNATURE_ALGORITHM_RSA_PSS_SHA256: SignatureAlgorithm
SIGNATURE_ALGORITHM_RSA_PSS_SHA384: SignatureAlgorithm
SIGNATURE_ALGORITHM_RSA_PSS_SHA512: SignatureAlgorithm
SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256: SignatureAlgorithm
SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA384: SignatureAlgorithm
SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA512: SignatureAlgorithm

class SignRequest(_message.Message):
    __slots__ = ("key_id", "algorithm", "message", "digest", "version")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: SignatureAlgorithm
    message: bytes
    digest: bytes
    version: int
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[_Union[SignatureAlgorithm, str]] = ..., message: _Optional[bytes] = ..., digest: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("signature", "key_id", "version", "algorithm")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    key_id: str
    version: int
    algorithm: SignatureAlgorithm
    def __init__(self, signature: _Optional[bytes] = ..., key_id: _Optional[str] = ..., version: _Optional[int] = ..., algorithm: _Optional[_Union[SignatureAlgorithm, str]] = ...) -> None: ...

class VerifySignatureRequest(_message.Message):
    __slots__ = ("key_id", "algorithm", "message", "digest", "signature", "version")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: SignatureAlgorithm
    message: bytes
    digest: bytes
    signature: bytes
    version: int
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[_Union[SignatureAlgorithm, str]] = ..., message: _Optional[bytes] = ..., digest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class VerifySignatureResponse(_message.Message):
    __slots__ = ("valid", "key_id", "version")
    VALID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    key_id: str
    version: int
    def __init__(self, valid: _Optional[bool] = ..., key_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class BatchSignRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SignRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SignRequest, _Mapping]]] = ...) -> None: ...

class BatchSignResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: SignResponse
    error: _seals_pb2.ItemError
    def __init__(self, response: _Optional[_Union[SignResponse, _Mapping]] = ..., error: _Optional[_Union[_seals_pb2.ItemError, _Mapping]] = ...) -> None: ...

class BatchSignResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchSignResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchSignResult, _Mapping]]] = ...) -> None: ...

class GetPublicKeyRequest(_message.Message):
    __slots__ = ("key_id", "version", "algorithm")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    version: int
    algorithm: SignatureAlgorithm
    def __init__(self, key_id: _Optional[str] = ..., version: _Optional[int] = ..., algorithm: _Optional[_Union[SignatureAlgorithm, str]] = ...) -> None: ...

class GetPublicKeyResponse(_message.Message):
    __slots__ = ("key_id", "version", "public_key_pem", "jwk")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    JWK_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    version: int
    public_key_pem: str
    jwk: str
    def __init__(self, key_id: _Optional[str] = ..., version: _Optional[int] = ..., public_key_pem: _Optional[str] = ..., jwk: _Optional[str] = ...) -> None: ...

class CreateCertificateRequest(_message.Message):
    __slots__ = ("key_id", "version", "subject", "dns_names", "ip_addresses", "uris", "emails", "algorithm", "days")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    IP_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    URIS_FIELD_NUMBER: _ClassVar[int]
    EMAILS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    version: int
    subject: str
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    ip_addresses: _containers.RepeatedScalarFieldContainer[str]
    uris: _containers.RepeatedScalarFieldContainer[str]
    emails: _containers.RepeatedScalarFieldContainer[str]
    algorithm: SignatureAlgorithm
    days: int
    def __init__(self, key_id: _Optional[str] = ..., version: _Optional[int] = ..., subject: _Optional[str] = ..., dns_names: _Optional[_Iterable[str]] = ..., ip_addresses: _Optional[_Iterable[str]] = ..., uris: _Optional[_Iterable[str]] = ..., emails: _Optional[_Iterable[str]] = ..., algorithm: _Optional[_Union[SignatureAlgorithm, str]] = ..., days: _Optional[int] = ...) -> None: ...

class CreateCertificateResponse(_message.Message):
    __slots__ = ("pem", "key_id", "version")
    PEM_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    pem: str
    key_id: str
    version: int
    def __init__(self, pem: _Optional[str] = ..., key_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
