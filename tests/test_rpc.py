"""KeyService, SealService, health and reflection through a real gRPC server and a
real client (the in-process `server` fixture on a loopback port 0, a real SoftHSM
token, a real SQLite store): happy paths, status codes and their rich details."""

from __future__ import annotations

import base64
import hashlib
import logging
import os

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from keysvc.model import KeyAlgorithm, KeyPurpose
from keysvc.rpc.server import ServerOptions, create_server
from keysvc.v1 import keys_pb2, seals_pb2, seals_pb2_grpc
from tests.crypto_helpers import OAEP_SHA1, check_value, foreign_public_key, hmac_sha256, pem_public_key

# Deadline of every call here: a hung server fails the test instead of the session.
TIMEOUT = 10.0
SHA256 = keys_pb2.KEY_ALGORITHM_HMAC_SHA256
ENABLED = keys_pb2.KEY_VERSION_STATE_ENABLED
VERIFY_ONLY = keys_pb2.KEY_VERSION_STATE_VERIFY_ONLY
DISABLED = keys_pb2.KEY_VERSION_STATE_DISABLED
DESTROYED = keys_pb2.KEY_VERSION_STATE_DESTROYED
HEX = seals_pb2.SEAL_ENCODING_HEX
BASE64 = seals_pb2.SEAL_ENCODING_BASE64
# The SIPS simulation secret, as the bank hands it out: 20 bytes, shorter than SHA-256.
SIPS_SECRET = b"002001000000002_KEY1"
# Not the padding ImportKey takes: a secret wrapped with it must be refused.
OAEP_SHA256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


# -- helpers ---------------------------------------------------------------------------


def create_key(server, merchant: str, name: str = "sips", algorithm: int = SHA256) -> keys_pb2.Key:
    response = server.keys.CreateKey(
        keys_pb2.CreateKeyRequest(
            merchant_id=merchant, name=name, purpose=keys_pb2.KEY_PURPOSE_SEAL, algorithm=algorithm
        ),
        timeout=TIMEOUT,
    )
    return response.key


def get_key(server, key_id: str) -> keys_pb2.Key:
    return server.keys.GetKey(keys_pb2.GetKeyRequest(key_id=key_id), timeout=TIMEOUT).key


def seal(server, key_id: str, message: bytes, **fields) -> seals_pb2.SealResponse:
    return server.seals.Seal(seals_pb2.SealRequest(key_id=key_id, message=message, **fields), timeout=TIMEOUT)


def verify(server, key_id: str, message: bytes, seal_text: str, **fields) -> seals_pb2.VerifyResponse:
    return server.seals.Verify(
        seals_pb2.VerifyRequest(key_id=key_id, message=message, seal=seal_text, **fields), timeout=TIMEOUT
    )


def import_parameters(server) -> keys_pb2.GetImportParametersResponse:
    return server.keys.GetImportParameters(keys_pb2.GetImportParametersRequest(), timeout=TIMEOUT)


def wrap_secret(server, secret: bytes, digest_size: int = 32) -> tuple[bytes, str]:
    """The secret zero-padded to the digest size and wrapped with RSA-OAEP-SHA1 under
    the server's import key, as a bank-side tool would; and the import key id."""
    parameters = import_parameters(server)
    return pem_public_key(parameters).encrypt(secret.ljust(digest_size, b"\0"), OAEP_SHA1), parameters.import_key_id


def import_request(server, merchant: str, secret: bytes, name: str = "sips", **fields) -> keys_pb2.ImportKeyRequest:
    wrapped, import_key_id = wrap_secret(server, secret)
    fields.setdefault("algorithm", SHA256)
    return keys_pb2.ImportKeyRequest(
        merchant_id=merchant, name=name, purpose=keys_pb2.KEY_PURPOSE_SEAL,
        wrapped_secret=wrapped, import_key_id=import_key_id, **fields,
    )


def failed_call(method, request, **kwargs) -> grpc.RpcError:
    kwargs.setdefault("timeout", TIMEOUT)
    with pytest.raises(grpc.RpcError) as caught:
        method(request, **kwargs)
    return caught.value


def rich_details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo | None, error_details_pb2.BadRequest | None]:
    """The ErrorInfo and BadRequest packed in the call's google.rpc.Status, if any."""
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} carries no google.rpc.Status details"
    assert status.code == error.code().value[0]
    assert status.message == error.details()
    info = bad_request = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
    return info, bad_request


def assert_invalid_argument_naming(error: grpc.RpcError, field: str) -> None:
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    info, bad_request = rich_details(error)
    assert info is not None and info.reason and info.domain == "keysvc"
    assert bad_request is not None, "INVALID_ARGUMENT without a BadRequest detail"
    assert [violation.field for violation in bad_request.field_violations] == [field]
    assert bad_request.field_violations[0].description


def assert_status_with_reason(error: grpc.RpcError, code: grpc.StatusCode) -> error_details_pb2.ErrorInfo:
    assert error.code() is code, f"{error.code()}: {error.details()}"
    info, _ = rich_details(error)
    assert info is not None, "no ErrorInfo detail"
    assert info.reason and info.domain == "keysvc"
    return info


def versions_by_number(key: keys_pb2.Key) -> dict[int, keys_pb2.KeyVersion]:
    return {version.version: version for version in key.versions}


# -- KeyService happy paths ---------------------------------------------------------------


def test_create_key_makes_version_1_generated_enabled_and_primary(server, merchant):
    key = create_key(server, merchant)

    assert key.key_id == f"{merchant}/sips"
    assert (key.merchant_id, key.name) == (merchant, "sips")
    assert key.purpose == keys_pb2.KEY_PURPOSE_SEAL
    assert key.algorithm == SHA256
    assert key.primary_version == 1
    assert [v.version for v in key.versions] == [1]
    version = key.versions[0]
    assert version.state == ENABLED
    assert version.origin == keys_pb2.KEY_ORIGIN_GENERATED
    assert len(version.check_value) == 6 and version.check_value == version.check_value.upper()
    int(version.check_value, 16)
    assert version.HasField("create_time") and not version.HasField("destroy_time")
    assert key.HasField("create_time") and key.HasField("update_time")


def test_create_key_purpose_unspecified_defaults_to_seal(server, merchant):
    response = server.keys.CreateKey(
        keys_pb2.CreateKeyRequest(merchant_id=merchant, name="default", algorithm=SHA256), timeout=TIMEOUT
    )
    assert response.key.purpose == keys_pb2.KEY_PURPOSE_SEAL


@pytest.mark.parametrize(
    "algorithm, hash_function",
    [
        (keys_pb2.KEY_ALGORITHM_HMAC_SHA1, hashlib.sha1),
        (keys_pb2.KEY_ALGORITHM_HMAC_SHA384, hashlib.sha384),
        (keys_pb2.KEY_ALGORITHM_HMAC_SHA512, hashlib.sha512),
    ],
)
def test_seal_length_follows_the_key_algorithm(server, merchant, algorithm, hash_function):
    key = create_key(server, merchant, algorithm=algorithm)
    sealed = seal(server, key.key_id, b"amount=100")
    assert len(bytes.fromhex(sealed.seal)) == hash_function().digest_size
    assert verify(server, key.key_id, b"amount=100", sealed.seal).valid


def test_get_key_returns_what_create_key_returned(server, merchant):
    created = create_key(server, merchant)
    assert get_key(server, created.key_id) == created


def test_list_keys_filters_by_merchant_and_pages_in_key_id_order(server, merchant):
    for name in ("c", "a", "b"):
        create_key(server, merchant, name)
    create_key(server, merchant + "x", "a")  # another merchant: never listed below

    first = server.keys.ListKeys(keys_pb2.ListKeysRequest(merchant_id=merchant, page_size=2), timeout=TIMEOUT)
    assert [k.key_id for k in first.keys] == [f"{merchant}/a", f"{merchant}/b"]
    assert first.next_page_token
    second = server.keys.ListKeys(
        keys_pb2.ListKeysRequest(merchant_id=merchant, page_size=2, page_token=first.next_page_token),
        timeout=TIMEOUT,
    )
    assert [k.key_id for k in second.keys] == [f"{merchant}/c"]
    assert second.next_page_token == ""

    everything = server.keys.ListKeys(keys_pb2.ListKeysRequest(), timeout=TIMEOUT)
    assert [k.key_id for k in everything.keys] == sorted(k.key_id for k in everything.keys)
    assert {f"{merchant}/a", f"{merchant}/b", f"{merchant}/c", f"{merchant}x/a"} <= {
        k.key_id for k in everything.keys
    }


def test_rotate_key_adds_a_primary_version_that_seals_while_the_old_one_still_verifies(server, merchant):
    key = create_key(server, merchant)
    old_seal = seal(server, key.key_id, b"order=1")
    assert old_seal.version == 1

    rotated = server.keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key.key_id), timeout=TIMEOUT)

    assert rotated.version == 2
    assert rotated.key.primary_version == 2
    assert [v.version for v in rotated.key.versions] == [2, 1]  # newest first
    assert all(v.state == ENABLED for v in rotated.key.versions)
    assert get_key(server, key.key_id) == rotated.key
    new_seal = seal(server, key.key_id, b"order=1")
    assert new_seal.version == 2 and new_seal.seal != old_seal.seal
    assert verify(server, key.key_id, b"order=1", old_seal.seal).version == 1
    assert verify(server, key.key_id, b"order=1", new_seal.seal).version == 2


def test_set_key_version_state_verify_only_verifies_but_no_longer_seals(server, merchant):
    key = create_key(server, merchant)
    old_seal = seal(server, key.key_id, b"m")
    server.keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key.key_id), timeout=TIMEOUT)

    response = server.keys.SetKeyVersionState(
        keys_pb2.SetKeyVersionStateRequest(key_id=key.key_id, version=1, state=VERIFY_ONLY), timeout=TIMEOUT
    )

    assert versions_by_number(response.key)[1].state == VERIFY_ONLY
    assert verify(server, key.key_id, b"m", old_seal.seal).valid
    error = failed_call(server.seals.Seal, seals_pb2.SealRequest(key_id=key.key_id, message=b"m", version=1))
    assert_status_with_reason(error, grpc.StatusCode.FAILED_PRECONDITION)

    enabled_again = server.keys.SetKeyVersionState(
        keys_pb2.SetKeyVersionStateRequest(key_id=key.key_id, version=1, state=ENABLED), timeout=TIMEOUT
    )
    assert versions_by_number(enabled_again.key)[1].state == ENABLED
    assert seal(server, key.key_id, b"m", version=1).seal == old_seal.seal


def test_set_primary_version_makes_unversioned_seals_use_that_version(server, merchant):
    key = create_key(server, merchant)
    server.keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key.key_id), timeout=TIMEOUT)

    response = server.keys.SetPrimaryVersion(
        keys_pb2.SetPrimaryVersionRequest(key_id=key.key_id, version=1), timeout=TIMEOUT
    )

    assert response.key.primary_version == 1
    sealed = seal(server, key.key_id, b"m")
    assert sealed.version == 1
    assert sealed.seal == seal(server, key.key_id, b"m", version=1).seal


def test_set_primary_version_refuses_a_version_that_is_not_enabled(server, merchant):
    key = create_key(server, merchant)
    server.keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key.key_id), timeout=TIMEOUT)
    server.keys.SetKeyVersionState(
        keys_pb2.SetKeyVersionStateRequest(key_id=key.key_id, version=1, state=DISABLED), timeout=TIMEOUT
    )
    error = failed_call(server.keys.SetPrimaryVersion, keys_pb2.SetPrimaryVersionRequest(key_id=key.key_id, version=1))
    assert_status_with_reason(error, grpc.StatusCode.FAILED_PRECONDITION)
    assert get_key(server, key.key_id).primary_version == 2


def test_primary_version_cannot_be_disabled_or_destroyed(server, merchant):
    key = create_key(server, merchant)
    error = failed_call(
        server.keys.SetKeyVersionState,
        keys_pb2.SetKeyVersionStateRequest(key_id=key.key_id, version=1, state=DISABLED),
    )
    assert_status_with_reason(error, grpc.StatusCode.FAILED_PRECONDITION)
    error = failed_call(server.keys.DestroyKeyVersion, keys_pb2.DestroyKeyVersionRequest(key_id=key.key_id, version=1))
    assert_status_with_reason(error, grpc.StatusCode.FAILED_PRECONDITION)
    assert get_key(server, key.key_id) == key


def test_destroy_key_version_is_final_and_the_version_neither_seals_nor_verifies(server, merchant):
    key = create_key(server, merchant)
    old_seal = seal(server, key.key_id, b"m")
    server.keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key.key_id), timeout=TIMEOUT)

    response = server.keys.DestroyKeyVersion(
        keys_pb2.DestroyKeyVersionRequest(key_id=key.key_id, version=1), timeout=TIMEOUT
    )

    destroyed = versions_by_number(response.key)[1]
    assert destroyed.state == DESTROYED
    assert destroyed.HasField("destroy_time")
    assert versions_by_number(get_key(server, key.key_id))[1].state == DESTROYED
    answer = verify(server, key.key_id, b"m", old_seal.seal)
    assert (answer.valid, answer.version) == (False, 0)
    error = failed_call(server.seals.Seal, seals_pb2.SealRequest(key_id=key.key_id, message=b"m", version=1))
    assert_status_with_reason(error, grpc.StatusCode.FAILED_PRECONDITION)
    # Final: neither destroyed again nor brought back.
    error = failed_call(server.keys.DestroyKeyVersion, keys_pb2.DestroyKeyVersionRequest(key_id=key.key_id, version=1))
    assert_status_with_reason(error, grpc.StatusCode.FAILED_PRECONDITION)
    error = failed_call(
        server.keys.SetKeyVersionState,
        keys_pb2.SetKeyVersionStateRequest(key_id=key.key_id, version=1, state=ENABLED),
    )
    assert_status_with_reason(error, grpc.StatusCode.FAILED_PRECONDITION)


def test_destroyed_version_keeps_its_check_value_for_the_record(server, merchant):
    # keys.proto, KeyVersion.check_value: "Kept once the version is destroyed".
    key = create_key(server, merchant)
    original = versions_by_number(key)[1].check_value
    server.keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key.key_id), timeout=TIMEOUT)

    response = server.keys.DestroyKeyVersion(
        keys_pb2.DestroyKeyVersionRequest(key_id=key.key_id, version=1), timeout=TIMEOUT
    )

    assert versions_by_number(response.key)[1].state == keys_pb2.KEY_VERSION_STATE_DESTROYED
    assert versions_by_number(response.key)[1].check_value == original
    assert versions_by_number(get_key(server, key.key_id))[1].check_value == original


def test_get_import_parameters_gives_an_rsa_3072_pem_and_rsa_oaep_sha1(server):
    parameters = import_parameters(server)
    public_key = pem_public_key(parameters)
    assert isinstance(public_key, rsa.RSAPublicKey)
    assert public_key.key_size == 3072
    assert parameters.wrapping_algorithm == "RSA_OAEP_SHA1"
    assert parameters.import_key_id


def test_import_key_of_the_sips_secret_gives_its_check_value_and_python_hmac_seals(server, merchant):
    request = import_request(server, merchant, SIPS_SECRET)

    response = server.keys.ImportKey(request, timeout=TIMEOUT)

    assert response.version == 1
    assert response.check_value == check_value(SIPS_SECRET)
    assert response.key.key_id == f"{merchant}/sips"
    assert response.key.primary_version == 1
    version = response.key.versions[0]
    assert (version.origin, version.state, version.check_value) == (
        keys_pb2.KEY_ORIGIN_IMPORTED, ENABLED, response.check_value,
    )
    message = b"amount=55|currencyCode=978|merchantId=002001000000002|transactionReference=abc123"
    sealed = seal(server, response.key.key_id, message)
    assert sealed.seal == hmac_sha256(SIPS_SECRET, message).hex()
    assert verify(server, response.key.key_id, message, sealed.seal).valid


def test_import_key_adds_a_numbered_version_to_an_existing_key_and_can_make_it_primary(server, merchant):
    key = create_key(server, merchant)
    secret = os.urandom(32)
    request = import_request(server, merchant, secret, algorithm=keys_pb2.KEY_ALGORITHM_UNSPECIFIED,
                             version=7, make_primary=True)

    response = server.keys.ImportKey(request, timeout=TIMEOUT)

    assert response.version == 7
    assert response.key.primary_version == 7
    assert [v.version for v in response.key.versions] == [7, 1]
    assert versions_by_number(response.key)[7].origin == keys_pb2.KEY_ORIGIN_IMPORTED
    assert seal(server, key.key_id, b"m").seal == hmac_sha256(secret, b"m").hex()

    next_free = server.keys.ImportKey(import_request(server, merchant, os.urandom(32)), timeout=TIMEOUT)
    assert next_free.version == 8
    assert next_free.key.primary_version == 7  # make_primary not asked


# -- SealService happy paths ------------------------------------------------------------------


def test_seal_and_verify_in_hex_by_default_accepting_upper_case(server, merchant):
    key = create_key(server, merchant)
    sealed = seal(server, key.key_id, b"hello")
    assert (sealed.key_id, sealed.version) == (key.key_id, 1)
    assert sealed.seal == sealed.seal.lower() and len(sealed.seal) == 64
    assert seal(server, key.key_id, b"hello", encoding=HEX).seal == sealed.seal

    answer = verify(server, key.key_id, b"hello", sealed.seal)
    assert (answer.valid, answer.key_id, answer.version) == (True, key.key_id, 1)
    assert verify(server, key.key_id, b"hello", sealed.seal.upper(), encoding=HEX).valid


def test_seal_and_verify_in_base64(server, merchant):
    key = create_key(server, merchant)
    hex_seal = seal(server, key.key_id, b"hello").seal
    sealed = seal(server, key.key_id, b"hello", encoding=BASE64)

    assert base64.b64decode(sealed.seal, validate=True) == bytes.fromhex(hex_seal)
    assert verify(server, key.key_id, b"hello", sealed.seal, encoding=BASE64).valid
    # The same tag read in the wrong encoding is refused, not silently accepted.
    error = failed_call(server.seals.Verify, seals_pb2.VerifyRequest(
        key_id=key.key_id, message=b"hello", seal=sealed.seal, encoding=HEX))
    assert_invalid_argument_naming(error, "seal")


def test_wrong_seal_is_an_answer_valid_false_not_an_error(server, merchant):
    key = create_key(server, merchant)
    sealed = seal(server, key.key_id, b"amount=100").seal
    tampered = ("0" if sealed[0] != "0" else "1") + sealed[1:]

    for message, seal_text in [(b"amount=100", tampered), (b"amount=101", sealed), (b"amount=100", sealed[:-2])]:
        answer = verify(server, key.key_id, message, seal_text)
        assert (answer.valid, answer.version, answer.key_id) == (False, 0, key.key_id)


def test_seal_with_a_disabled_version_is_failed_precondition(server, merchant):
    key = create_key(server, merchant)
    server.keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key.key_id), timeout=TIMEOUT)
    server.keys.SetKeyVersionState(
        keys_pb2.SetKeyVersionStateRequest(key_id=key.key_id, version=1, state=DISABLED), timeout=TIMEOUT
    )

    error = failed_call(server.seals.Seal, seals_pb2.SealRequest(key_id=key.key_id, message=b"m", version=1))

    info = assert_status_with_reason(error, grpc.StatusCode.FAILED_PRECONDITION)
    assert info.reason == "FAILED_PRECONDITION"
    error = failed_call(server.seals.Verify, seals_pb2.VerifyRequest(
        key_id=key.key_id, message=b"m", seal="00" * 32, version=1))
    assert_status_with_reason(error, grpc.StatusCode.FAILED_PRECONDITION)


# -- status codes and rich details ---------------------------------------------------------------


def test_unknown_key_is_not_found_with_an_error_info_reason(server, merchant):
    key_id = f"{merchant}/nothing"
    calls = [
        (server.keys.GetKey, keys_pb2.GetKeyRequest(key_id=key_id)),
        (server.keys.RotateKey, keys_pb2.RotateKeyRequest(key_id=key_id)),
        (server.keys.SetPrimaryVersion, keys_pb2.SetPrimaryVersionRequest(key_id=key_id, version=1)),
        (server.keys.DestroyKeyVersion, keys_pb2.DestroyKeyVersionRequest(key_id=key_id, version=1)),
        (server.keys.SetKeyVersionState,
         keys_pb2.SetKeyVersionStateRequest(key_id=key_id, version=1, state=DISABLED)),
        (server.seals.Seal, seals_pb2.SealRequest(key_id=key_id, message=b"m")),
        (server.seals.Verify, seals_pb2.VerifyRequest(key_id=key_id, message=b"m", seal="00")),
    ]
    for method, request in calls:
        info = assert_status_with_reason(failed_call(method, request), grpc.StatusCode.NOT_FOUND)
        assert info.reason == "NOT_FOUND"


def test_unknown_version_of_a_known_key_is_not_found(server, merchant):
    key = create_key(server, merchant)
    error = failed_call(server.seals.Seal, seals_pb2.SealRequest(key_id=key.key_id, message=b"m", version=9))
    assert_status_with_reason(error, grpc.StatusCode.NOT_FOUND)
    error = failed_call(server.keys.SetPrimaryVersion, keys_pb2.SetPrimaryVersionRequest(key_id=key.key_id, version=9))
    assert_status_with_reason(error, grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("key_id", ["", "no-slash", "/name", "merchant/", "merchant/UPPER", "mer chant/x", "a/b/c"])
def test_malformed_key_id_is_invalid_argument_naming_key_id(server, key_id):
    for method, request in [
        (server.keys.GetKey, keys_pb2.GetKeyRequest(key_id=key_id)),
        (server.keys.RotateKey, keys_pb2.RotateKeyRequest(key_id=key_id)),
        (server.seals.Seal, seals_pb2.SealRequest(key_id=key_id, message=b"m")),
        (server.seals.Verify, seals_pb2.VerifyRequest(key_id=key_id, message=b"m", seal="00")),
    ]:
        assert_invalid_argument_naming(failed_call(method, request), "key_id")


def test_create_key_with_bad_merchant_id_or_name_names_that_field(server, merchant):
    error = failed_call(server.keys.CreateKey, keys_pb2.CreateKeyRequest(
        merchant_id="bad merchant", name="sips", algorithm=SHA256))
    assert_invalid_argument_naming(error, "merchant_id")
    error = failed_call(server.keys.CreateKey, keys_pb2.CreateKeyRequest(
        merchant_id=merchant, name="Upper", algorithm=SHA256))
    assert_invalid_argument_naming(error, "name")


def test_unknown_algorithm_number_is_invalid_argument_naming_algorithm(server, merchant):
    error = failed_call(server.keys.CreateKey, keys_pb2.CreateKeyRequest(
        merchant_id=merchant, name="sips", algorithm=99))
    assert_invalid_argument_naming(error, "algorithm")
    error = failed_call(server.keys.ImportKey, import_request(server, merchant, os.urandom(32), algorithm=99))
    assert_invalid_argument_naming(error, "algorithm")
    assert_status_with_reason(
        failed_call(server.keys.GetKey, keys_pb2.GetKeyRequest(key_id=f"{merchant}/sips")), grpc.StatusCode.NOT_FOUND
    )


def test_missing_algorithm_is_invalid_argument_naming_algorithm(server, merchant):
    error = failed_call(server.keys.CreateKey, keys_pb2.CreateKeyRequest(merchant_id=merchant, name="sips"))
    assert_invalid_argument_naming(error, "algorithm")
    # Import of a key that does not exist yet needs it too.
    error = failed_call(server.keys.ImportKey, import_request(
        server, merchant, os.urandom(32), algorithm=keys_pb2.KEY_ALGORITHM_UNSPECIFIED))
    assert_invalid_argument_naming(error, "algorithm")


def test_unknown_enum_numbers_are_invalid_argument_naming_their_field(server, merchant):
    key = create_key(server, merchant)
    cases = [
        (server.keys.SetKeyVersionState,
         keys_pb2.SetKeyVersionStateRequest(key_id=key.key_id, version=1, state=99), "state"),
        (server.keys.SetKeyVersionState,
         keys_pb2.SetKeyVersionStateRequest(key_id=key.key_id, version=1), "state"),
        (server.keys.CreateKey,
         keys_pb2.CreateKeyRequest(merchant_id=merchant, name="p", purpose=99, algorithm=SHA256), "purpose"),
        (server.seals.Seal, seals_pb2.SealRequest(key_id=key.key_id, message=b"m", encoding=99), "encoding"),
        (server.seals.Seal, seals_pb2.SealRequest(key_id=key.key_id, message=b"m", scheme=99), "scheme"),
        (server.seals.Verify,
         seals_pb2.VerifyRequest(key_id=key.key_id, message=b"m", seal="00", encoding=99), "encoding"),
    ]
    for method, request, field in cases:
        assert_invalid_argument_naming(failed_call(method, request), field)


def test_set_state_destroyed_is_refused_naming_state(server, merchant):
    key = create_key(server, merchant)
    server.keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key.key_id), timeout=TIMEOUT)
    error = failed_call(server.keys.SetKeyVersionState, keys_pb2.SetKeyVersionStateRequest(
        key_id=key.key_id, version=1, state=DESTROYED))
    assert_invalid_argument_naming(error, "state")
    assert versions_by_number(get_key(server, key.key_id))[1].state == ENABLED


def test_create_key_twice_is_already_exists(server, merchant):
    key = create_key(server, merchant)
    info = assert_status_with_reason(
        failed_call(server.keys.CreateKey, keys_pb2.CreateKeyRequest(
            merchant_id=merchant, name="sips", algorithm=SHA256)),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert info.reason == "ALREADY_EXISTS"
    assert get_key(server, key.key_id) == key


def test_list_keys_page_size_over_1000_or_foreign_token_is_invalid_argument(server):
    assert_invalid_argument_naming(
        failed_call(server.keys.ListKeys, keys_pb2.ListKeysRequest(page_size=1001)), "page_size")
    assert_invalid_argument_naming(
        failed_call(server.keys.ListKeys, keys_pb2.ListKeysRequest(page_token="%%%not-a-token")), "page_token")


# -- batches ---------------------------------------------------------------------------------


def test_batch_seal_answers_item_by_item_with_item_errors_in_place(server, merchant):
    key = create_key(server, merchant)
    oversized = bytes(64 * 1024 + 1)
    requests = [
        seals_pb2.SealRequest(key_id=key.key_id, message=b"first"),
        seals_pb2.SealRequest(key_id=f"{merchant}/unknown", message=b"m"),
        seals_pb2.SealRequest(key_id=key.key_id, message=b"second", encoding=BASE64),
        seals_pb2.SealRequest(key_id=key.key_id, message=b"m", encoding=99),
        seals_pb2.SealRequest(key_id=key.key_id, message=oversized),
        seals_pb2.SealRequest(key_id="malformed", message=b"m"),
        seals_pb2.SealRequest(key_id=key.key_id, message=b"third"),
    ]

    response = server.seals.BatchSeal(seals_pb2.BatchSealRequest(requests=requests), timeout=TIMEOUT)

    outcomes = [result.WhichOneof("outcome") for result in response.results]
    assert outcomes == ["response", "error", "response", "error", "error", "error", "response"]
    results = response.results
    assert results[0].response.seal == seal(server, key.key_id, b"first").seal
    assert results[2].response.seal == seal(server, key.key_id, b"second", encoding=BASE64).seal
    assert results[6].response.seal == seal(server, key.key_id, b"third").seal
    assert all(results[i].response.version == 1 and results[i].response.key_id == key.key_id for i in (0, 2, 6))
    expected_errors = {
        1: (grpc.StatusCode.NOT_FOUND, "NOT_FOUND", ""),
        3: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "encoding"),
        4: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "message"),
        5: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "key_id"),
    }
    for index, (code, reason, field) in expected_errors.items():
        error = results[index].error
        assert (error.code, error.reason) == (code.value[0], reason), (index, error)
        assert error.message.startswith(field)


def test_batch_verify_answers_item_by_item_with_item_errors_in_place(server, merchant):
    key = create_key(server, merchant)
    good = seal(server, key.key_id, b"one").seal
    good_base64 = seal(server, key.key_id, b"two", encoding=BASE64).seal
    requests = [
        seals_pb2.VerifyRequest(key_id=key.key_id, message=b"one", seal=good),
        seals_pb2.VerifyRequest(key_id=key.key_id, message=b"one-changed", seal=good),
        seals_pb2.VerifyRequest(key_id=f"{merchant}/unknown", message=b"one", seal=good),
        seals_pb2.VerifyRequest(key_id=key.key_id, message=b"two", seal=good_base64, encoding=BASE64),
        seals_pb2.VerifyRequest(key_id=key.key_id, message=b"two", seal=good_base64, encoding=99),
        seals_pb2.VerifyRequest(key_id=key.key_id, message=bytes(64 * 1024 + 1), seal=good),
        seals_pb2.VerifyRequest(key_id=key.key_id, message=b"one", seal="not hex"),
    ]

    response = server.seals.BatchVerify(seals_pb2.BatchVerifyRequest(requests=requests), timeout=TIMEOUT)

    results = response.results
    assert [r.WhichOneof("outcome") for r in results] == [
        "response", "response", "error", "response", "error", "error", "error",
    ]
    assert (results[0].response.valid, results[0].response.version) == (True, 1)
    assert (results[1].response.valid, results[1].response.version) == (False, 0)
    assert (results[3].response.valid, results[3].response.version) == (True, 1)
    assert results[2].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert results[2].error.reason == "NOT_FOUND"
    for index, field in [(4, "encoding"), (5, "message"), (6, "seal")]:
        assert results[index].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert results[index].error.reason == "INVALID_ARGUMENT"
        assert results[index].error.message.startswith(field)


def test_batches_over_1000_items_are_invalid_argument_naming_requests(server, merchant):
    key = create_key(server, merchant)
    seal_requests = [seals_pb2.SealRequest(key_id=key.key_id, message=b"m")] * 1001
    error = failed_call(server.seals.BatchSeal, seals_pb2.BatchSealRequest(requests=seal_requests))
    assert_invalid_argument_naming(error, "requests")
    verify_requests = [seals_pb2.VerifyRequest(key_id=key.key_id, message=b"m", seal="00")] * 1001
    error = failed_call(server.seals.BatchVerify, seals_pb2.BatchVerifyRequest(requests=verify_requests))
    assert_invalid_argument_naming(error, "requests")
    # Exactly 1000 is allowed.
    response = server.seals.BatchSeal(seals_pb2.BatchSealRequest(requests=seal_requests[:1000]), timeout=TIMEOUT)
    assert len(response.results) == 1000
    assert {r.response.seal for r in response.results} == {seal(server, key.key_id, b"m").seal}


def test_request_above_the_4_mib_message_limit_is_resource_exhausted(server, merchant):
    key = create_key(server, merchant)
    error = failed_call(server.seals.Seal, seals_pb2.SealRequest(key_id=key.key_id, message=bytes(4 * 1024 * 1024 + 1)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    # The server is fine afterwards.
    assert verify(server, key.key_id, b"m", seal(server, key.key_id, b"m").seal).valid


def test_batch_seal_with_an_already_expired_deadline_is_deadline_exceeded(server, merchant):
    key = create_key(server, merchant)
    requests = [seals_pb2.SealRequest(key_id=key.key_id, message=b"m")] * 10
    # A deadline in the past (timeout=0 is not one: gRPC rounds the timeout it sends up).
    for timeout in (-1.0, -0.001):
        error = failed_call(server.seals.BatchSeal, seals_pb2.BatchSealRequest(requests=requests), timeout=timeout)
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The same batch with time to spare is answered in full.
    response = server.seals.BatchSeal(seals_pb2.BatchSealRequest(requests=requests), timeout=TIMEOUT)
    assert [r.WhichOneof("outcome") for r in response.results] == ["response"] * 10


# -- health and reflection -----------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", "keysvc.v1.SealService", "keysvc.v1.KeyService"])
def test_health_check_is_serving(server, service):
    response = server.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_of_an_unknown_service_is_not_found(server):
    error = failed_call(server.health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert error.code() is grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_keysvc_services_health_and_reflection(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT))
    assert len(responses) == 1
    names = {service.name for service in responses[0].list_services_response.service}
    assert {"keysvc.v1.KeyService", "keysvc.v1.SealService", "grpc.health.v1.Health"} <= names


def test_reflection_describes_the_key_service_file(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="keysvc.v1.KeyService")]),
        timeout=TIMEOUT))
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in responses[0].file_descriptor_response.file_descriptor_proto]
    key_file = next(f for f in files if f.package == "keysvc.v1" and f.service)
    assert "ImportKey" in {method.name for method in key_file.service[0].method}


def test_reflection_turned_off_is_unimplemented_while_seals_still_work(domain, merchant):
    grpc_server, port, _ = create_server(
        "127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reflection=False, reuse_port=False),
        signer=domain.signer,
    )
    grpc_server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT))
            assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
            key = domain.keys.create_key(merchant, "k", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
            sealed = seals_pb2_grpc.SealServiceStub(channel).Seal(
                seals_pb2.SealRequest(key_id=key.key_id, message=b"m"), timeout=TIMEOUT)
            assert sealed.version == 1
    finally:
        grpc_server.stop(None)


# -- secrets and atomicity -------------------------------------------------------------------------


def _secret_spellings(secret: bytes) -> list[bytes]:
    spellings = [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret)]
    padded = secret.ljust(32, b"\0")
    spellings += [padded.hex().encode(), base64.b64encode(padded)]
    return spellings


def test_no_status_message_or_log_line_contains_the_imported_secret(server, merchant, caplog):
    secret = b"s3cr3t-bank-issued-key-0123456789"[:32]
    key_id = server.keys.ImportKey(import_request(server, merchant, secret), timeout=TIMEOUT).key.key_id
    parameters = import_parameters(server)
    public_key = pem_public_key(parameters)
    other_key = foreign_public_key()

    def request(wrapped: bytes, **fields) -> keys_pb2.ImportKeyRequest:
        fields.setdefault("algorithm", SHA256)
        fields.setdefault("import_key_id", parameters.import_key_id)
        fields.setdefault("name", "sips")
        return keys_pb2.ImportKeyRequest(merchant_id=merchant, purpose=keys_pb2.KEY_PURPOSE_SEAL,
                                         wrapped_secret=wrapped, **fields)

    good = public_key.encrypt(secret, OAEP_SHA1)
    failing = [
        (server.keys.ImportKey, request(good, version=1)),  # version taken
        (server.keys.ImportKey, request(good, algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA512)),
        (server.keys.ImportKey, request(good, import_key_id="someone-elses")),
        (server.keys.ImportKey, request(public_key.encrypt(secret, OAEP_SHA256))),
        (server.keys.ImportKey, request(other_key.encrypt(secret, OAEP_SHA1))),
        (server.keys.ImportKey, request(good[:-1] + bytes([good[-1] ^ 1]))),
        (server.keys.ImportKey, request(secret)),  # the plain secret instead of a wrapped one
        (server.keys.ImportKey, request(public_key.encrypt(secret[:20], OAEP_SHA1), name="short")),
        (server.seals.Seal, seals_pb2.SealRequest(key_id=key_id, message=secret, version=5)),
        (server.seals.Verify, seals_pb2.VerifyRequest(key_id=key_id, message=secret, seal=secret.decode())),
        (server.seals.Verify, seals_pb2.VerifyRequest(key_id=key_id, message=secret, seal=secret.hex(),
                                                      encoding=BASE64, version=3)),
    ]
    with caplog.at_level(logging.DEBUG):
        errors = [failed_call(method, req) for method, req in failing]

    for error in errors:
        status = rpc_status.from_call(error)
        texts = [error.details().encode(), status.SerializeToString() if status else b""]
        texts += [value if isinstance(value, bytes) else value.encode()
                  for _, value in (error.trailing_metadata() or ())]
        for text in texts:
            for spelling in _secret_spellings(secret):
                assert spelling not in text, f"{error.code()}: {error.details()!r} shows the secret"
    logged = "\n".join(record.getMessage() for record in caplog.records).encode()
    for spelling in _secret_spellings(secret):
        assert spelling not in logged
    assert all(e.code() is not grpc.StatusCode.INTERNAL for e in errors)


def test_import_key_with_bad_wrapping_leaves_the_existing_key_unchanged(server, merchant):
    first = server.keys.ImportKey(import_request(server, merchant, SIPS_SECRET), timeout=TIMEOUT)
    before = get_key(server, first.key.key_id)
    sealed_before = seal(server, first.key.key_id, b"m").seal
    parameters = import_parameters(server)
    other_key = foreign_public_key()

    failed_call(server.keys.ImportKey, keys_pb2.ImportKeyRequest(
        merchant_id=merchant, name="sips", purpose=keys_pb2.KEY_PURPOSE_SEAL, algorithm=SHA256,
        wrapped_secret=other_key.encrypt(os.urandom(32), OAEP_SHA1), import_key_id=parameters.import_key_id,
        version=2, make_primary=True,
    ))

    assert get_key(server, first.key.key_id) == before
    assert seal(server, first.key.key_id, b"m").seal == sealed_before
    # The version number the failed import asked for is still free.
    retried = server.keys.ImportKey(import_request(server, merchant, os.urandom(32), version=2), timeout=TIMEOUT)
    assert retried.version == 2


def test_import_key_of_a_new_key_with_bad_wrapping_creates_nothing(server, merchant):
    parameters = import_parameters(server)
    for wrapped in (os.urandom(384), b"\x00" * 10):
        failed_call(server.keys.ImportKey, keys_pb2.ImportKeyRequest(
            merchant_id=merchant, name="sips", purpose=keys_pb2.KEY_PURPOSE_SEAL, algorithm=SHA256,
            wrapped_secret=wrapped, import_key_id=parameters.import_key_id,
        ))
    assert_status_with_reason(
        failed_call(server.keys.GetKey, keys_pb2.GetKeyRequest(key_id=f"{merchant}/sips")), grpc.StatusCode.NOT_FOUND
    )
    listed = server.keys.ListKeys(keys_pb2.ListKeysRequest(merchant_id=merchant), timeout=TIMEOUT)
    assert list(listed.keys) == []


def test_import_key_of_an_unpadded_short_secret_is_refused_and_creates_nothing(server, merchant):
    parameters = import_parameters(server)
    public_key = pem_public_key(parameters)
    error = failed_call(server.keys.ImportKey, keys_pb2.ImportKeyRequest(
        merchant_id=merchant, name="sips", purpose=keys_pb2.KEY_PURPOSE_SEAL, algorithm=SHA256,
        wrapped_secret=public_key.encrypt(SIPS_SECRET, OAEP_SHA1), import_key_id=parameters.import_key_id,
    ))
    assert_invalid_argument_naming(error, "wrapped_secret")
    assert "32" in error.details()  # says how long to pad
    assert_status_with_reason(
        failed_call(server.keys.GetKey, keys_pb2.GetKeyRequest(key_id=f"{merchant}/sips")), grpc.StatusCode.NOT_FOUND
    )


def test_import_key_with_bad_wrapping_is_invalid_argument_naming_wrapped_secret(server, merchant):
    # A caller's mistake, not an outage: UNAVAILABLE would invite retries of a request
    # that can never succeed.
    parameters = import_parameters(server)
    public_key = pem_public_key(parameters)
    other_key = foreign_public_key()
    good = public_key.encrypt(os.urandom(32), OAEP_SHA1)
    bad_wrappings = {
        "random bytes": os.urandom(384),
        "too short": b"\x00" * 10,
        "under another RSA key": other_key.encrypt(os.urandom(32), OAEP_SHA1),
        "OAEP with SHA-256": public_key.encrypt(os.urandom(32), OAEP_SHA256),
        "PKCS#1 v1.5": public_key.encrypt(os.urandom(32), padding.PKCS1v15()),
        "one bit flipped": good[:-1] + bytes([good[-1] ^ 1]),
    }
    codes = {}
    for what, wrapped in bad_wrappings.items():
        error = failed_call(server.keys.ImportKey, keys_pb2.ImportKeyRequest(
            merchant_id=merchant, name="sips", purpose=keys_pb2.KEY_PURPOSE_SEAL, algorithm=SHA256,
            wrapped_secret=wrapped, import_key_id=parameters.import_key_id,
        ))
        codes[what] = error.code()
    assert codes == {what: grpc.StatusCode.INVALID_ARGUMENT for what in bad_wrappings}
    error = failed_call(server.keys.ImportKey, keys_pb2.ImportKeyRequest(
        merchant_id=merchant, name="sips", purpose=keys_pb2.KEY_PURPOSE_SEAL, algorithm=SHA256,
        wrapped_secret=bad_wrappings["under another RSA key"], import_key_id=parameters.import_key_id,
    ))
    assert_invalid_argument_naming(error, "wrapped_secret")


def test_import_key_with_an_empty_wrapped_secret_or_unknown_import_key_id_names_the_field(server, merchant):
    wrapped, import_key_id = wrap_secret(server, os.urandom(32))
    error = failed_call(server.keys.ImportKey, keys_pb2.ImportKeyRequest(
        merchant_id=merchant, name="sips", algorithm=SHA256, import_key_id=import_key_id))
    assert_invalid_argument_naming(error, "wrapped_secret")
    error = failed_call(server.keys.ImportKey, keys_pb2.ImportKeyRequest(
        merchant_id=merchant, name="sips", algorithm=SHA256, wrapped_secret=wrapped, import_key_id="other"))
    assert_invalid_argument_naming(error, "import_key_id")


def test_each_call_gets_its_own_request_id_and_metrics_although_handlers_are_built_once(server, merchant):
    """The interceptors build their handlers once per method: nothing of one call (its
    request id, its caller, its status) is carried into the next."""
    from keysvc import metrics

    key = create_key(server, merchant)
    labels = {"rpc": "keysvc.v1.SealService/Seal", "code": "OK", "role": metrics.NO_ROLE}
    before = metrics.REGISTRY.get_sample_value("keysvc_requests_total", labels) or 0
    ids = []
    for _ in range(3):
        response, call = server.seals.Seal.with_call(seals_pb2.SealRequest(key_id=key.key_id, message=b"m"))
        assert response.key_id == key.key_id
        ids.append(dict(call.trailing_metadata())["x-request-id"])
    with pytest.raises(grpc.RpcError) as raised:
        server.seals.Seal(seals_pb2.SealRequest(key_id=f"{merchant}/missing", message=b"m"))
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    ids.append(dict(raised.value.trailing_metadata())["x-request-id"])
    assert len(set(ids)) == 4
    assert all(len(request_id) == 22 and request_id.isalpha() and request_id.islower() for request_id in ids)
    assert metrics.REGISTRY.get_sample_value("keysvc_requests_total", labels) == before + 3
