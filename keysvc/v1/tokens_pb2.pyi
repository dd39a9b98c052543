import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_FORMAT_UNSPECIFIED: _ClassVar[TokenFormat]
    TOKEN_FORMAT_PRESERVING: _ClassVar[TokenFormat]
    TOKEN_FORMAT_OPAQUE: _ClassVar[TokenFormat]

class CardBrand(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CARD_BRAND_UNSPECIFIED: _ClassVar[CardBrand]
    CARD_BRAND_VISA: _ClassVar[CardBrand]
    CARD_BRAND_MASTERCARD: _ClassVar[CardBrand]
    CARD_BRAND_AMEX: _ClassVar[CardBrand]
    CARD_BRAND_DISCOVER: _ClassVar[CardBrand]
    CARD_BRAND_JCB: _ClassVar[CardBrand]
    CARD_BRAND_DINERS_CLUB: _ClassVar[CardBrand]
    CARD_BRAND_UNIONPAY: _ClassVar[CardBrand]
    CARD_BRAND_MAESTRO: _ClassVar[CardBrand]
    CARD_BRAND_OTHER: _ClassVar[CardBrand]
TOKEN_FORMAT_UNSPECIFIED: TokenFormat
TOKEN_FORMAT_PRESERVING: TokenFormat
TOKEN_FORMAT_OPAQUE: TokenFormat
CARD_BRAND_UNSPECIFIED: CardBrand
CARD_BRAND_VISA: CardBrand
CARD_BRAND_MASTERCARD: CardBrand
CARD_BRAND_AMEX: CardBrand
CARD_BRAND_DISCOVER: CardBrand
CARD_BRAND_JCB: CardBrand
CARD_BRAND_DINERS_CLUB: CardBrand
CARD_BRAND_UNIONPAY: CardBrand
CARD_BRAND_MAESTRO: CardBrand
CARD_BRAND_OTHER: CardBrand

class TokenItemError(_message.Message):
    __slots__ = ("code", "reason", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("domain", "pans", "format", "keep_bin", "fresh", "ttl")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PANS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    KEEP_BIN_FIELD_NUMBER: _ClassVar[int]
    FRESH_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    domain: str
    pans: _containers.RepeatedScalarFieldContainer[str]
    format: TokenFormat
    keep_bin: bool
    fresh: bool
    ttl: _duration_pb2.Duration
    def __init__(self, domain: _Optional[str] = ..., pans: _Optional[_Iterable[str]] = ..., format: _Optional[_Union[TokenFormat, str]] = ..., keep_bin: _Optional[bool] = ..., fresh: _Optional[bool] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class TokenizedPan(_message.Message):
    __slots__ = ("token", "masked_pan", "brand", "created", "expire_time", "key_version")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MASKED_PAN_FIELD_NUMBER: _ClassVar[int]
    BRAND_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    token: str
    masked_pan: str
    brand: CardBrand
    created: bool
    expire_time: _timestamp_pb2.Timestamp
    key_version: int
    def __init__(self, token: _Optional[str] = ..., masked_pan: _Optional[str] = ..., brand: _Optional[_Union[CardBrand, str]] = ..., created: _Optional[bool] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_version: _Optional[int] = ...) -> None: ...

class TokenizeResult(_message.Message):
    __slots__ = ("token", "error")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    token: TokenizedPan
    error: TokenItemError
    def __init__(self, token: _Optional[_Union[TokenizedPan, _Mapping]] = ..., error: _Optional[_Union[TokenItemError, _Mapping]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("domain", "results")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    domain: str
    results: _containers.RepeatedCompositeFieldContainer[TokenizeResult]
    def __init__(self, domain: _Optional[str] = ..., results: _Optional[_Iterable[_Union[TokenizeResult, _Mapping]]] = ...) -> None: ...

class DetokenizeRequest(_message.Message):
    __slots__ = ("domain", "tokens")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    domain: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, domain: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class DetokenizedToken(_message.Message):
    __slots__ = ("token", "pan")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAN_FIELD_NUMBER: _ClassVar[int]
    token: str
    pan: str
    def __init__(self, token: _Optional[str] = ..., pan: _Optional[str] = ...) -> None: ...

class DetokenizeResult(_message.Message):
    __slots__ = ("token", "error")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    token: DetokenizedToken
    error: TokenItemError
    def __init__(self, token: _Optional[_Union[DetokenizedToken, _Mapping]] = ..., error: _Optional[_Union[TokenItemError, _Mapping]] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("domain", "results")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    domain: str
    results: _containers.RepeatedCompositeFieldContainer[DetokenizeResult]
    def __init__(self, domain: _Optional[str] = ..., results: _Optional[_Iterable[_Union[DetokenizeResult, _Mapping]]] = ...) -> None: ...

class GetTokenInfoRequest(_message.Message):
    __slots__ = ("domain", "token")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    token: str
    def __init__(self, domain: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("domain", "token", "masked_pan", "brand", "format", "keep_bin", "deterministic", "key_version", "create_time", "expire_time")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MASKED_PAN_FIELD_NUMBER: _ClassVar[int]
    BRAND_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    KEEP_BIN_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    domain: str
    token: str
    masked_pan: str
    brand: CardBrand
    format: TokenFormat
    keep_bin: bool
    deterministic: bool
    key_version: int
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, domain: _Optional[str] = ..., token: _Optional[str] = ..., masked_pan: _Optional[str] = ..., brand: _Optional[_Union[CardBrand, str]] = ..., format: _Optional[_Union[TokenFormat, str]] = ..., keep_bin: _Optional[bool] = ..., deterministic: _Optional[bool] = ..., key_version: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetTokenInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: TokenInfo
    def __init__(self, info: _Optional[_Union[TokenInfo, _Mapping]] = ...) -> None: ...

class DeleteTokenRequest(_message.Message):
    __slots__ = ("domain", "token")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    token: str
    def __init__(self, domain: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class DeleteTokenResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateTokenKeyRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class RotateTokenKeyResponse(_message.Message):
    __slots__ = ("domain", "key_version")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    domain: str
    key_version: int
    def __init__(self, domain: _Optional[str] = ..., key_version: _Optional[int] = ...) -> None: ...

class RewrapTokensRequest(_message.Message):
    __slots__ = ("domain", "limit")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    domain: str
    limit: int
    def __init__(self, domain: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class RewrapTokensResponse(_message.Message):
    __slots__ = ("domain", "key_version", "rewrapped", "remaining")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REWRAPPED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    domain: str
    key_version: int
    rewrapped: int
    remaining: int
    def __init__(self, domain: _Optional[str] = ..., key_version: _Optional[int] = ..., rewrapped: _Optional[int] = ..., remaining: _Optional[int] = ...) -> None: ...

class ShredTokenDomainRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class ShredTokenDomainResponse(_message.Message):
    __slots__ = ("domain", "tokens_destroyed")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DESTROYED_FIELD_NUMBER: _ClassVar[int]
    domain: str
    tokens_destroyed: int
    def __init__(self, domain: _Optional[str] = ..., tokens_destroyed: _Optional[int] = ...) -> None: ...
