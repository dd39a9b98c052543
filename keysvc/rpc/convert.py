"""Translation between protobuf messages and domain values (and nothing else)."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from keysvc.errors import InvalidArgument
from keysvc.model import Charset, Key, KeyAlgorithm, KeyOrigin, KeyPlatform, KeyPurpose, KeyVersion, KeyVersionState
from keysvc.seals import SealEncoding, SealScheme
from keysvc.signing import SignatureAlgorithm
from keysvc.v1 import keys_pb2, seals_pb2, signing_pb2

ALGORITHMS = {
    keys_pb2.KEY_ALGORITHM_HMAC_SHA1: KeyAlgorithm.HMAC_SHA1,
    keys_pb2.KEY_ALGORITHM_HMAC_SHA256: KeyAlgorithm.HMAC_SHA256,
    keys_pb2.KEY_ALGORITHM_HMAC_SHA384: KeyAlgorithm.HMAC_SHA384,
    keys_pb2.KEY_ALGORITHM_HMAC_SHA512: KeyAlgorithm.HMAC_SHA512,
    keys_pb2.KEY_ALGORITHM_SHA256_DATA_SECRET: KeyAlgorithm.SHA256_DATA_SECRET,
    keys_pb2.KEY_ALGORITHM_RSA_2048: KeyAlgorithm.RSA_2048,
    keys_pb2.KEY_ALGORITHM_RSA_3072: KeyAlgorithm.RSA_3072,
    keys_pb2.KEY_ALGORITHM_RSA_4096: KeyAlgorithm.RSA_4096,
}
PLATFORMS = {
    keys_pb2.KEY_PLATFORM_GENERIC: KeyPlatform.GENERIC,
    keys_pb2.KEY_PLATFORM_SIPS: KeyPlatform.SIPS,
    keys_pb2.KEY_PLATFORM_MONETICO: KeyPlatform.MONETICO,
}
CHARSETS = {keys_pb2.CHARSET_UTF_8: Charset.UTF_8, keys_pb2.CHARSET_ISO_8859_1: Charset.ISO_8859_1}
PURPOSES = {keys_pb2.KEY_PURPOSE_SEAL: KeyPurpose.SEAL, keys_pb2.KEY_PURPOSE_SIGN: KeyPurpose.SIGN}
STATES = {
    keys_pb2.KEY_VERSION_STATE_ENABLED: KeyVersionState.ENABLED,
    keys_pb2.KEY_VERSION_STATE_VERIFY_ONLY: KeyVersionState.VERIFY_ONLY,
    keys_pb2.KEY_VERSION_STATE_DISABLED: KeyVersionState.DISABLED,
    keys_pb2.KEY_VERSION_STATE_DESTROYED: KeyVersionState.DESTROYED,
}
ORIGINS = {
    keys_pb2.KEY_ORIGIN_GENERATED: KeyOrigin.GENERATED,
    keys_pb2.KEY_ORIGIN_IMPORTED: KeyOrigin.IMPORTED,
}
SCHEMES = {
    seals_pb2.SEAL_SCHEME_HMAC: SealScheme.HMAC,
    seals_pb2.SEAL_SCHEME_SIPS_POST: SealScheme.SIPS_POST,
    seals_pb2.SEAL_SCHEME_SIPS_JSON_REQUEST: SealScheme.SIPS_JSON_REQUEST,
    seals_pb2.SEAL_SCHEME_SIPS_JSON_RESPONSE: SealScheme.SIPS_JSON_RESPONSE,
    seals_pb2.SEAL_SCHEME_MONETICO: SealScheme.MONETICO,
    seals_pb2.SEAL_SCHEME_CMCIC_LEGACY_REQUEST: SealScheme.CMCIC_LEGACY_REQUEST,
    seals_pb2.SEAL_SCHEME_CMCIC_LEGACY_NOTIFICATION: SealScheme.CMCIC_LEGACY_NOTIFICATION,
}
SIGNATURE_ALGORITHMS = {
    signing_pb2.SIGNATURE_ALGORITHM_RSA_PSS_SHA256: SignatureAlgorithm.RSA_PSS_SHA256,
    signing_pb2.SIGNATURE_ALGORITHM_RSA_PSS_SHA384: SignatureAlgorithm.RSA_PSS_SHA384,
    signing_pb2.SIGNATURE_ALGORITHM_RSA_PSS_SHA512: SignatureAlgorithm.RSA_PSS_SHA512,
    signing_pb2.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256: SignatureAlgorithm.RSA_PKCS1_V15_SHA256,
    signing_pb2.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA384: SignatureAlgorithm.RSA_PKCS1_V15_SHA384,
    signing_pb2.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA512: SignatureAlgorithm.RSA_PKCS1_V15_SHA512,
}
ENCODINGS = {
    seals_pb2.SEAL_ENCODING_HEX: SealEncoding.HEX,
    seals_pb2.SEAL_ENCODING_BASE64: SealEncoding.BASE64,
}


def _reverse(table: dict) -> dict:
    return {value: number for number, value in table.items()}


STATE_NUMBERS = _reverse(STATES)
ALGORITHM_NUMBERS = _reverse(ALGORITHMS)
PURPOSE_NUMBERS = _reverse(PURPOSES)
ORIGIN_NUMBERS = _reverse(ORIGINS)
PLATFORM_NUMBERS = _reverse(PLATFORMS)
CHARSET_NUMBERS = _reverse(CHARSETS)
SCHEME_NUMBERS = _reverse(SCHEMES)
SIGNATURE_ALGORITHM_NUMBERS = _reverse(SIGNATURE_ALGORITHMS)


def from_enum(table: dict, number: int, field: str, *, default=None, required: bool = False):
    """The domain value of a proto enum number; 0 (UNSPECIFIED) gives `default`."""
    if number == 0 and not required:
        return default
    try:
        return table[number]
    except KeyError:
        names = ", ".join(value.name for value in table.values())
        raise InvalidArgument(field, f"must be one of {names}") from None


def timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def key_version_message(version: KeyVersion) -> keys_pb2.KeyVersion:
    return keys_pb2.KeyVersion(
        version=version.version,
        state=STATE_NUMBERS[version.state],
        origin=ORIGIN_NUMBERS[version.origin],
        check_value=version.check_value,
        create_time=timestamp(version.created_at),
        destroy_time=timestamp(version.destroyed_at),
    )


def key_message(key: Key) -> keys_pb2.Key:
    return keys_pb2.Key(
        key_id=key.key_id,
        merchant_id=key.merchant_id,
        name=key.name,
        purpose=PURPOSE_NUMBERS[key.purpose],
        algorithm=ALGORITHM_NUMBERS[key.algorithm],
        primary_version=key.primary_version,
        versions=[key_version_message(v) for v in key.versions],
        create_time=timestamp(key.created_at),
        update_time=timestamp(key.updated_at),
        platform=PLATFORM_NUMBERS[key.platform],
        charset=CHARSET_NUMBERS[key.charset],
        pending_primary=key.pending_primary or 0,
    )
