"""KeyManager on the real SoftHSM2 token and a fresh SQLite database (the `domain` fixture):
creation, rotation, import, version states, listing, and the record-binding check.

Imported secrets are wrapped here the way a bank does it: RSA-OAEP with SHA-1 under the
public key from KeyManager.import_parameters(). Expected tags and check values come from
Python's `hmac` module on the same secrets.
"""

from __future__ import annotations

import base64
import os
import re

import pytest
import sqlalchemy as sa

from keysvc.errors import (
    AlreadyExists,
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    KeysvcError,
    NotFound,
)
from keysvc.model import KeyAlgorithm, KeyOrigin, KeyPurpose, KeyVersionState
from keysvc.seals import SealRequest, VerifyRequest
from tests.conftest import make_domain
from tests.crypto_helpers import (
    HMAC_ALGORITHMS,
    OAEP_SHA1,
    check_value,
    foreign_public_key,
    import_secret,
    pem_public_key,
    python_hmac,
    wrap_for_import,
)

SETTABLE = [KeyVersionState.ENABLED, KeyVersionState.VERIFY_ONLY, KeyVersionState.DISABLED]
CHECK_VALUE = re.compile(r"[0-9A-F]{6}")
SHA256 = KeyAlgorithm.HMAC_SHA256
SEAL = KeyPurpose.SEAL


def seal(domain, key_id: str, message: bytes = b"message", version: int = 0) -> str:
    return domain.sealer.compute_seal(SealRequest(key_id, message, version=version)).seal


def verify(domain, key_id: str, seal_text: str, message: bytes = b"message", version: int = 0):
    return domain.sealer.verify_seal(VerifyRequest(key_id, message, seal_text, version=version))


@pytest.fixture
def rotated_key(domain, merchant):
    """A key with versions 1 and 2, version 2 primary, both ENABLED."""
    key = domain.keys.create_key(merchant, "rotated", SEAL, SHA256)
    domain.keys.rotate_key(key.key_id)
    return key.key_id


# -- create -------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", HMAC_ALGORITHMS, ids=lambda a: a.value)
def test_create_key_makes_version_1_the_enabled_generated_primary(domain, merchant, algorithm):
    key = domain.keys.create_key(merchant, "sips", SEAL, algorithm)

    assert key.key_id == f"{merchant}/sips"
    assert (key.merchant_id, key.name, key.purpose, key.algorithm) == (merchant, "sips", SEAL, algorithm)
    assert key.primary_version == 1
    assert key.revision == 1
    [version] = key.versions
    assert (version.version, version.state, version.origin) == (1, KeyVersionState.ENABLED, KeyOrigin.GENERATED)
    assert CHECK_VALUE.fullmatch(version.check_value)
    assert domain.keys.get_key(key.key_id) == key


@pytest.mark.parametrize("algorithm", HMAC_ALGORITHMS, ids=lambda a: a.value)
def test_generated_key_check_value_is_the_start_of_its_seal_over_16_zero_bytes(domain, merchant, algorithm):
    key = domain.keys.create_key(merchant, "kcv", SEAL, algorithm)

    assert seal(domain, key.key_id, bytes(16))[:6].upper() == key.versions[0].check_value


@pytest.mark.parametrize("merchant_id", ["", "x" * 65, "has/slash", "has space", "caf\u00e9", "semi;colon"])
def test_create_key_with_malformed_merchant_id_raises_invalid_argument_merchant_id(domain, merchant_id):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.create_key(merchant_id, "name", SEAL, SHA256)

    assert raised.value.field == "merchant_id"


@pytest.mark.parametrize("name", ["", "x" * 65, "Upper", "has/slash", "has space", "caf\u00e9"])
def test_create_key_with_malformed_name_raises_invalid_argument_name(domain, merchant, name):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.create_key(merchant, name, SEAL, SHA256)

    assert raised.value.field == "name"


def test_create_key_accepts_the_longest_and_widest_ids(domain):
    key = domain.keys.create_key("A-z.0_9" + "m" * 57, "a-z.0_9" + "n" * 57, SEAL, SHA256)

    assert key.key_id == "A-z.0_9" + "m" * 57 + "/a-z.0_9" + "n" * 57


def test_create_key_twice_raises_already_exists_and_keeps_the_first(domain, merchant):
    first = domain.keys.create_key(merchant, "twice", SEAL, SHA256)

    with pytest.raises(AlreadyExists):
        domain.keys.create_key(merchant, "twice", SEAL, KeyAlgorithm.HMAC_SHA512)

    assert domain.keys.get_key(first.key_id) == first


@pytest.mark.parametrize("key_id", ["", "no-slash", "/name", "merchant/", "merchant/Upper", "a/b/c"])
def test_get_key_with_malformed_id_raises_invalid_argument_key_id(domain, key_id):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.get_key(key_id)

    assert raised.value.field == "key_id"


def test_get_unknown_key_raises_not_found(domain, merchant):
    with pytest.raises(NotFound):
        domain.keys.get_key(f"{merchant}/unknown")


# -- rotate ---------------------------------------------------------------------------------------


def test_rotate_key_adds_a_generated_primary_and_leaves_the_old_version_enabled(domain, merchant):
    key = domain.keys.create_key(merchant, "rotate", SEAL, SHA256)
    old_seal = seal(domain, key.key_id)

    rotated, new_version = domain.keys.rotate_key(key.key_id)

    assert new_version.version == 2
    assert (new_version.state, new_version.origin) == (KeyVersionState.ENABLED, KeyOrigin.GENERATED)
    assert rotated.primary_version == 2
    assert rotated.revision == 2
    assert [v.version for v in rotated.versions] == [2, 1]
    assert rotated.find_version(1).state is KeyVersionState.ENABLED
    assert rotated.find_version(1) == key.versions[0]
    assert new_version.check_value != key.versions[0].check_value
    assert domain.sealer.compute_seal(SealRequest(key.key_id, b"message")).version == 2
    assert seal(domain, key.key_id, version=1) == old_seal
    assert domain.keys.get_key(key.key_id) == rotated


def test_rotate_key_twice_numbers_versions_consecutively(domain, rotated_key):
    key, version = domain.keys.rotate_key(rotated_key)

    assert version.version == 3
    assert [v.version for v in key.versions] == [3, 2, 1]


def test_rotate_unknown_key_raises_not_found(domain, merchant):
    with pytest.raises(NotFound):
        domain.keys.rotate_key(f"{merchant}/unknown")


# -- check values of imported keys ------------------------------------------------------------


@pytest.mark.parametrize("algorithm", HMAC_ALGORITHMS, ids=lambda a: a.value)
def test_imported_key_check_value_is_first_3_bytes_of_hmac_over_16_zero_bytes(domain, merchant, algorithm):
    secret = os.urandom(algorithm.digest.digest_size)

    _key, version = import_secret(domain, merchant, "kcv", secret, algorithm)

    expected = check_value(secret, algorithm)
    assert CHECK_VALUE.fullmatch(version.check_value)
    assert version.check_value == expected


# -- version states: what is allowed ----------------------------------------------------------


@pytest.mark.parametrize("start", SETTABLE, ids=lambda s: s.value)
@pytest.mark.parametrize("target", SETTABLE, ids=lambda s: s.value)
def test_non_primary_version_moves_between_enabled_verify_only_and_disabled(domain, rotated_key, start, target):
    domain.keys.set_version_state(rotated_key, 1, start)

    key = domain.keys.set_version_state(rotated_key, 1, target)

    assert key.find_version(1).state is target
    assert key.find_version(2).state is KeyVersionState.ENABLED
    assert domain.keys.get_key(rotated_key).find_version(1).state is target


@pytest.mark.parametrize("start", SETTABLE, ids=lambda s: s.value)
def test_non_primary_version_can_be_destroyed_from_every_settable_state(domain, rotated_key, start):
    domain.keys.set_version_state(rotated_key, 1, start)
    before = domain.keys.get_key(rotated_key).find_version(1)

    key = domain.keys.destroy_version(rotated_key, 1)

    destroyed = key.find_version(1)
    assert destroyed.state is KeyVersionState.DESTROYED
    assert destroyed.wrapped_key is None
    assert destroyed.destroyed_at is not None
    assert (destroyed.check_value, destroyed.origin, destroyed.created_at) == (
        before.check_value, before.origin, before.created_at
    )
    assert domain.keys.get_key(rotated_key).find_version(1) == destroyed


def test_set_primary_version_moves_the_primary_to_an_enabled_version(domain, rotated_key):
    key = domain.keys.set_primary_version(rotated_key, 1)

    assert key.primary_version == 1
    assert domain.sealer.compute_seal(SealRequest(rotated_key, b"m")).version == 1
    # The former primary may now be retired.
    assert domain.keys.set_version_state(rotated_key, 2, KeyVersionState.VERIFY_ONLY).find_version(2).state \
        is KeyVersionState.VERIFY_ONLY


def test_setting_a_version_to_its_current_state_changes_nothing(domain, rotated_key):
    revision = domain.keys.get_key(rotated_key).revision

    domain.keys.set_version_state(rotated_key, 2, KeyVersionState.ENABLED)
    domain.keys.set_primary_version(rotated_key, 2)

    assert domain.keys.get_key(rotated_key).revision == revision


# -- version states: what is refused ------------------------------------------------------------


@pytest.mark.parametrize("target", [KeyVersionState.VERIFY_ONLY, KeyVersionState.DISABLED], ids=lambda s: s.value)
def test_primary_version_cannot_leave_enabled(domain, rotated_key, target):
    before = domain.keys.get_key(rotated_key)

    with pytest.raises(FailedPrecondition):
        domain.keys.set_version_state(rotated_key, 2, target)

    assert domain.keys.get_key(rotated_key) == before


def test_destroying_the_primary_is_refused(domain, rotated_key):
    before = domain.keys.get_key(rotated_key)

    with pytest.raises(FailedPrecondition):
        domain.keys.destroy_version(rotated_key, 2)

    assert domain.keys.get_key(rotated_key) == before


def test_set_version_state_to_destroyed_is_refused_as_invalid_argument_state(domain, rotated_key):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.set_version_state(rotated_key, 1, KeyVersionState.DESTROYED)

    assert raised.value.field == "state"
    assert domain.keys.get_key(rotated_key).find_version(1).state is KeyVersionState.ENABLED


@pytest.mark.parametrize("target", SETTABLE, ids=lambda s: s.value)
def test_destroyed_version_cannot_change_state(domain, rotated_key, target):
    destroyed = domain.keys.destroy_version(rotated_key, 1)

    with pytest.raises(FailedPrecondition):
        domain.keys.set_version_state(rotated_key, 1, target)

    assert domain.keys.get_key(rotated_key) == destroyed


def test_destroyed_version_cannot_be_destroyed_again(domain, rotated_key):
    destroyed = domain.keys.destroy_version(rotated_key, 1)

    with pytest.raises(FailedPrecondition):
        domain.keys.destroy_version(rotated_key, 1)

    assert domain.keys.get_key(rotated_key) == destroyed


def test_destroyed_version_cannot_become_primary(domain, rotated_key):
    domain.keys.destroy_version(rotated_key, 1)

    with pytest.raises(FailedPrecondition):
        domain.keys.set_primary_version(rotated_key, 1)

    assert domain.keys.get_key(rotated_key).primary_version == 2


@pytest.mark.parametrize("state", [KeyVersionState.VERIFY_ONLY, KeyVersionState.DISABLED], ids=lambda s: s.value)
def test_set_primary_version_refuses_a_version_that_is_not_enabled(domain, rotated_key, state):
    domain.keys.set_version_state(rotated_key, 1, state)

    with pytest.raises(FailedPrecondition):
        domain.keys.set_primary_version(rotated_key, 1)

    assert domain.keys.get_key(rotated_key).primary_version == 2


VERSION_OPERATIONS = {
    "set_version_state": lambda keys, key_id, version: keys.set_version_state(key_id, version, KeyVersionState.DISABLED),
    "set_primary_version": lambda keys, key_id, version: keys.set_primary_version(key_id, version),
    "destroy_version": lambda keys, key_id, version: keys.destroy_version(key_id, version),
}


@pytest.mark.parametrize("operation", list(VERSION_OPERATIONS.values()), ids=list(VERSION_OPERATIONS))
def test_version_operations_on_an_unknown_version_raise_not_found(domain, rotated_key, operation):
    with pytest.raises(NotFound):
        operation(domain.keys, rotated_key, 9)


@pytest.mark.parametrize("operation", list(VERSION_OPERATIONS.values()), ids=list(VERSION_OPERATIONS))
def test_version_operations_on_an_unknown_key_raise_not_found(domain, merchant, operation):
    with pytest.raises(NotFound):
        operation(domain.keys, f"{merchant}/unknown", 1)


# -- what each state allows when sealing and verifying ---------------------------------------------


def _move_version_1_to(domain, key_id, state):
    if state is KeyVersionState.DESTROYED:
        domain.keys.destroy_version(key_id, 1)
    else:
        domain.keys.set_version_state(key_id, 1, state)


@pytest.mark.parametrize(
    "state", [KeyVersionState.VERIFY_ONLY, KeyVersionState.DISABLED, KeyVersionState.DESTROYED], ids=lambda s: s.value
)
def test_sealing_with_a_version_that_is_not_enabled_raises_failed_precondition(domain, rotated_key, state):
    _move_version_1_to(domain, rotated_key, state)

    with pytest.raises(FailedPrecondition):
        seal(domain, rotated_key, version=1)


def test_verify_only_version_still_verifies_its_seals(domain, rotated_key):
    old_seal = seal(domain, rotated_key, version=1)
    domain.keys.set_version_state(rotated_key, 1, KeyVersionState.VERIFY_ONLY)

    by_search = verify(domain, rotated_key, old_seal)
    by_number = verify(domain, rotated_key, old_seal, version=1)

    assert (by_search.valid, by_search.version) == (True, 1)
    assert (by_number.valid, by_number.version) == (True, 1)


def test_disabled_version_is_not_tried_when_verifying_until_re_enabled(domain, rotated_key):
    old_seal = seal(domain, rotated_key, version=1)
    domain.keys.set_version_state(rotated_key, 1, KeyVersionState.DISABLED)

    disabled = verify(domain, rotated_key, old_seal)
    with pytest.raises(FailedPrecondition):
        verify(domain, rotated_key, old_seal, version=1)
    domain.keys.set_version_state(rotated_key, 1, KeyVersionState.VERIFY_ONLY)
    re_enabled = verify(domain, rotated_key, old_seal)

    assert (disabled.valid, disabled.version) == (False, 0)
    assert (re_enabled.valid, re_enabled.version) == (True, 1)


def test_destroyed_version_no_longer_verifies_its_seals(domain, rotated_key):
    old_seal = seal(domain, rotated_key, version=1)
    domain.keys.destroy_version(rotated_key, 1)

    verification = verify(domain, rotated_key, old_seal)

    assert (verification.valid, verification.version) == (False, 0)
    with pytest.raises(FailedPrecondition):
        verify(domain, rotated_key, old_seal, version=1)


# -- list ---------------------------------------------------------------------------------------


def test_list_keys_pages_through_a_merchants_keys_in_key_id_order(domain, merchant):
    names = ["k3", "k0", "k4", "k1", "k2"]
    for name in names:
        domain.keys.create_key(merchant, name, SEAL, SHA256)

    pages, token = [], ""
    while True:
        page, token = domain.keys.list_keys(merchant, page_size=2, page_token=token)
        pages.append([key.name for key in page])
        if not token:
            break

    assert pages == [["k0", "k1"], ["k2", "k3"], ["k4"]]


def test_list_keys_page_as_large_as_the_rest_has_no_next_token(domain, merchant):
    for name in ("a", "b"):
        domain.keys.create_key(merchant, name, SEAL, SHA256)

    page, token = domain.keys.list_keys(merchant, page_size=2)

    assert [key.name for key in page] == ["a", "b"]
    assert token == ""


def test_list_keys_returns_keys_with_their_versions(domain, rotated_key, merchant):
    [key], token = domain.keys.list_keys(merchant)

    assert token == ""
    assert key == domain.keys.get_key(rotated_key)


def test_list_keys_filters_by_merchant(domain, merchant):
    other = merchant + "-other"
    domain.keys.create_key(merchant, "mine", SEAL, SHA256)
    domain.keys.create_key(other, "theirs", SEAL, SHA256)

    mine, _ = domain.keys.list_keys(merchant)
    theirs, _ = domain.keys.list_keys(other)
    everyone, _ = domain.keys.list_keys()

    assert [key.key_id for key in mine] == [f"{merchant}/mine"]
    assert [key.key_id for key in theirs] == [f"{other}/theirs"]
    assert [key.key_id for key in everyone] == sorted([f"{merchant}/mine", f"{other}/theirs"])


@pytest.mark.parametrize(
    "page_token",
    [
        "not-a-token",
        "***",
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
    ids=["bad-padding", "no-base64-characters", "not-utf8"],
)
def test_list_keys_with_a_token_it_never_issued_raises_invalid_argument_page_token(domain, merchant, page_token):
    domain.keys.create_key(merchant, "k", SEAL, SHA256)

    with pytest.raises(InvalidArgument) as raised:
        domain.keys.list_keys(merchant, page_token=page_token)

    assert raised.value.field == "page_token"


@pytest.mark.parametrize("page_size", [-1, 1001])
def test_list_keys_with_page_size_out_of_range_raises_invalid_argument_page_size(domain, page_size):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.list_keys(page_size=page_size)

    assert raised.value.field == "page_size"


def test_list_keys_with_malformed_merchant_raises_invalid_argument_merchant_id(domain):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.list_keys("bad/merchant")

    assert raised.value.field == "merchant_id"


# -- import ---------------------------------------------------------------------------------------


def test_import_parameters_name_rsa_oaep_sha1_and_a_3072_bit_public_key(domain):
    parameters = domain.keys.import_parameters()

    public_key = pem_public_key(parameters)
    assert parameters.wrapping_algorithm == "RSA_OAEP_SHA1"
    assert parameters.import_key_id
    assert public_key.key_size == 3072


@pytest.mark.parametrize("algorithm", HMAC_ALGORITHMS, ids=lambda a: a.value)
def test_import_into_a_new_key_creates_an_imported_primary_version_1_that_seals_like_hmac(
    domain, merchant, algorithm
):
    secret = os.urandom(algorithm.digest.digest_size)

    key, version = import_secret(domain, merchant, "bank", secret, algorithm)

    assert (key.key_id, key.algorithm, key.primary_version) == (f"{merchant}/bank", algorithm, 1)
    assert (version.version, version.state, version.origin) == (1, KeyVersionState.ENABLED, KeyOrigin.IMPORTED)
    assert seal(domain, key.key_id, b"payment") == python_hmac(secret, algorithm, b"payment").hex()


def test_import_with_an_explicit_version_uses_that_number(domain, merchant):
    key, version = import_secret(domain, merchant, "bank", os.urandom(32), version=7)

    assert version.version == 7
    assert key.primary_version == 7
    assert [v.version for v in key.versions] == [7]


def test_import_into_an_existing_key_adds_the_next_version_without_making_it_primary(domain, rotated_key):
    merchant, name = rotated_key.split("/")
    secret = os.urandom(32)

    key, version = import_secret(domain, merchant, name, secret)

    assert version.version == 3
    assert version.origin is KeyOrigin.IMPORTED
    assert key.primary_version == 2
    assert key.revision == 3
    assert seal(domain, rotated_key, b"m", version=3) == python_hmac(secret, SHA256, b"m").hex()


def test_import_with_make_primary_makes_the_new_version_primary(domain, rotated_key):
    merchant, name = rotated_key.split("/")

    key, version = import_secret(domain, merchant, name, os.urandom(32), make_primary=True)

    assert key.primary_version == version.version == 3
    assert domain.sealer.compute_seal(SealRequest(rotated_key, b"m")).version == 3


def test_import_into_an_existing_key_without_algorithm_uses_the_keys_algorithm(domain, merchant):
    domain.keys.create_key(merchant, "bank", SEAL, KeyAlgorithm.HMAC_SHA384)
    secret = os.urandom(48)
    wrapped = wrap_for_import(domain, secret)

    key, version = domain.keys.import_key(merchant, "bank", SEAL, None, wrapped,
                                          domain.keys.import_parameters().import_key_id)

    assert key.algorithm is KeyAlgorithm.HMAC_SHA384
    assert seal(domain, key.key_id, b"m", version=version.version) == python_hmac(
        secret, KeyAlgorithm.HMAC_SHA384, b"m").hex()


def test_import_without_algorithm_into_a_new_key_raises_invalid_argument_algorithm(domain, merchant):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.import_key(merchant, "bank", SEAL, None, wrap_for_import(domain, os.urandom(32)),
                               domain.keys.import_parameters().import_key_id)

    assert raised.value.field == "algorithm"


def test_import_of_a_taken_version_raises_already_exists(domain, rotated_key):
    merchant, name = rotated_key.split("/")

    with pytest.raises(AlreadyExists):
        import_secret(domain, merchant, name, os.urandom(32), version=1)


def test_import_with_another_algorithm_than_the_keys_raises_invalid_argument_algorithm(domain, rotated_key):
    merchant, name = rotated_key.split("/")

    with pytest.raises(InvalidArgument) as raised:
        import_secret(domain, merchant, name, os.urandom(64), KeyAlgorithm.HMAC_SHA512)

    assert raised.value.field == "algorithm"


def test_import_with_an_unknown_import_key_id_raises_invalid_argument_import_key_id(domain, merchant):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.import_key(merchant, "bank", SEAL, SHA256, wrap_for_import(domain, os.urandom(32)),
                               "keysvc-import-2")

    assert raised.value.field == "import_key_id"


@pytest.mark.parametrize("version", [-1, 2**31])
def test_import_with_a_version_out_of_range_raises_invalid_argument_version(domain, merchant, version):
    with pytest.raises(InvalidArgument) as raised:
        import_secret(domain, merchant, "bank", os.urandom(32), version=version)

    assert raised.value.field == "version"


def _other_rsa_key_wrap(domain) -> bytes:
    return foreign_public_key().encrypt(os.urandom(32), OAEP_SHA1)


def _tampered_wrap(domain) -> bytes:
    wrapped = wrap_for_import(domain, os.urandom(32))
    return wrapped[:-1] + bytes([wrapped[-1] ^ 1])


UNDECRYPTABLE = {
    "empty": lambda domain: b"",
    "random-384-bytes": lambda domain: os.urandom(384),
    "tampered": _tampered_wrap,
    "other-rsa-key": _other_rsa_key_wrap,
}


@pytest.mark.parametrize("make_wrapped", list(UNDECRYPTABLE.values()), ids=list(UNDECRYPTABLE))
def test_import_of_an_undecryptable_wrapped_secret_raises_invalid_argument_wrapped_secret(
    domain, merchant, make_wrapped
):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.import_key(merchant, "bank", SEAL, SHA256, make_wrapped(domain),
                               domain.keys.import_parameters().import_key_id)

    assert raised.value.field == "wrapped_secret"
    with pytest.raises(NotFound):
        domain.keys.get_key(f"{merchant}/bank")


@pytest.mark.parametrize("length", [0, 1, 16], ids=lambda n: f"{n}-bytes")
def test_import_of_a_secret_shorter_than_the_digest_raises_invalid_argument_wrapped_secret(domain, merchant, length):
    with pytest.raises(InvalidArgument) as raised:
        import_secret(domain, merchant, "bank", os.urandom(length), SHA256)

    assert raised.value.field == "wrapped_secret"
    with pytest.raises(NotFound):
        domain.keys.get_key(f"{merchant}/bank")


@pytest.mark.parametrize("algorithm", HMAC_ALGORITHMS, ids=lambda a: a.value)
def test_import_of_a_secret_longer_than_the_block_size_seals_like_hmac_or_is_refused(domain, merchant, algorithm):
    # Not a multiple of 8 bytes: SoftHSM 2.6.1's wrap would zero-pad it, and HMAC hashes such a key
    # whole. Refusing it is fine; sealing with a different key than the one imported is not.
    secret = os.urandom(algorithm.digest.block_size + 1)

    try:
        key, version = import_secret(domain, merchant, "long", secret, algorithm)
    except InvalidArgument as refused:
        assert refused.field == "wrapped_secret"
        with pytest.raises(NotFound):
            domain.keys.get_key(f"{merchant}/long")
        return

    expected = check_value(secret, algorithm)
    assert version.check_value == expected
    assert seal(domain, key.key_id, b"m") == python_hmac(secret, algorithm, b"m").hex()


FAILING_IMPORTS = {
    "taken-version": lambda d, m, n, w, i: d.keys.import_key(m, n, SEAL, SHA256, w, i, version=2),
    "algorithm-mismatch": lambda d, m, n, w, i: d.keys.import_key(m, n, SEAL, KeyAlgorithm.HMAC_SHA1, w, i),
    "unknown-import-key": lambda d, m, n, w, i: d.keys.import_key(m, n, SEAL, SHA256, w, "other"),
    "undecryptable": lambda d, m, n, w, i: d.keys.import_key(m, n, SEAL, SHA256, os.urandom(384), i),
    "short-secret": lambda d, m, n, w, i: d.keys.import_key(m, n, SEAL, SHA256, wrap_for_import(d, b"short"), i),
    "version-out-of-range": lambda d, m, n, w, i: d.keys.import_key(m, n, SEAL, SHA256, w, i, version=-5),
}


@pytest.mark.parametrize("failing_import", list(FAILING_IMPORTS.values()), ids=list(FAILING_IMPORTS))
def test_failing_import_into_an_existing_key_leaves_revision_and_versions_unchanged(
    domain, rotated_key, failing_import
):
    merchant, name = rotated_key.split("/")
    before = domain.keys.get_key(rotated_key)
    wrapped = wrap_for_import(domain, os.urandom(32))

    with pytest.raises(KeysvcError):
        failing_import(domain, merchant, name, wrapped, domain.keys.import_parameters().import_key_id)

    after = domain.keys.get_key(rotated_key)
    assert after.revision == before.revision
    assert after.versions == before.versions
    assert after == before


# -- record binding ---------------------------------------------------------------------------------


def _copy_material(domain, source_key_id, source_version, target_key_id, target_version) -> None:
    """What an attacker with write access to the database would do: move a wrapped key."""
    with domain.store.engine.begin() as connection:
        row = connection.execute(
            sa.text("SELECT wrapped_key, binding_tag FROM key_versions WHERE key_id = :k AND version = :v"),
            {"k": source_key_id, "v": source_version},
        ).one()
        moved = connection.execute(
            sa.text("UPDATE key_versions SET wrapped_key = :w, binding_tag = :t WHERE key_id = :k AND version = :v"),
            {"w": row.wrapped_key, "t": row.binding_tag, "k": target_key_id, "v": target_version},
        )
        assert moved.rowcount == 1


@pytest.fixture
def other_worker(domain, sqlite_url):
    """A second domain on the same database with its own, empty key cache."""
    built = make_domain(domain.hsm, sqlite_url)
    yield built
    built.store.close()


def test_fresh_keyring_seals_with_untouched_records(domain, rotated_key, other_worker):
    assert seal(other_worker, rotated_key, version=1) == seal(domain, rotated_key, version=1)
    assert seal(other_worker, rotated_key, version=2) == seal(domain, rotated_key, version=2)


def test_wrapped_key_moved_to_another_key_fails_the_integrity_check(domain, merchant, rotated_key, sqlite_url):
    victim = domain.keys.create_key(merchant, "victim", SEAL, SHA256).key_id
    _copy_material(domain, rotated_key, 1, victim, 1)
    other_worker = make_domain(domain.hsm, sqlite_url)
    try:
        with pytest.raises(IntegrityError):
            seal(other_worker, victim)
        with pytest.raises(IntegrityError):
            verify(other_worker, victim, seal(domain, rotated_key, version=1))
        # The source key is untouched and still works.
        assert seal(other_worker, rotated_key, version=1) == seal(domain, rotated_key, version=1)
    finally:
        other_worker.store.close()


def test_wrapped_key_moved_to_another_version_of_the_same_key_fails_the_integrity_check(
    domain, rotated_key, other_worker
):
    _copy_material(domain, rotated_key, 1, rotated_key, 2)

    with pytest.raises(IntegrityError):
        seal(other_worker, rotated_key)
    assert seal(other_worker, rotated_key, version=1) == seal(domain, rotated_key, version=1)


def test_wrapped_key_moved_into_a_destroyed_version_fails_the_integrity_check(domain, merchant, other_worker):
    key_id = domain.keys.create_key(merchant, "revived", SEAL, SHA256).key_id
    domain.keys.rotate_key(key_id)
    domain.keys.set_version_state(key_id, 1, KeyVersionState.VERIFY_ONLY)
    domain.keys.destroy_version(key_id, 1)
    # Bring the destroyed version back to life with version 2's material and tag.
    _copy_material(domain, key_id, 2, key_id, 1)
    with domain.store.engine.begin() as connection:
        connection.execute(sa.text("UPDATE key_versions SET state = 'ENABLED' WHERE key_id = :k AND version = 1"),
                           {"k": key_id})

    with pytest.raises(IntegrityError):
        seal(other_worker, key_id, version=1)
