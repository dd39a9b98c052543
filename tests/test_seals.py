"""Sealer on the real SoftHSM2 token and a fresh SQLite database (the `domain` fixture).

Expected seals are computed with Python's `hmac` module on secrets imported through
KeyManager.import_key (RSA-OAEP-SHA1 under the token's import key). "Another worker" is a
second KeyRing and Sealer over its own KeyStore on the same database file, as a second
process would have; it shares this process's HSM connection (PKCS#11 login is per process).
"""

from __future__ import annotations

import base64
import os
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from keysvc.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, KeysvcError, NotFound
from keysvc.keyring import KeyRing
from keysvc.model import KeyAlgorithm, KeyPurpose, KeyVersionState
from keysvc.seals import Seal, SealEncoding, Sealer, SealRequest, Verification, VerifyRequest
from keysvc.store import KeyStore
from tests.conftest import make_domain, run_together
from tests.crypto_helpers import hmac_sha256, import_secret

SHA256 = KeyAlgorithm.HMAC_SHA256
HEX, BASE64 = SealEncoding.HEX, SealEncoding.BASE64


def wait_until(condition, timeout: float) -> float:
    """Seconds until condition() held; fails when it does not within `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture
def secret_key(domain, merchant):
    """(key_id, secret): an HMAC-SHA256 key whose only version is a known imported secret."""
    secret = os.urandom(32)
    key, _version = import_secret(domain, merchant, "known", secret)
    return key.key_id, secret


@pytest.fixture
def other_worker(domain, sqlite_url):
    """A second domain (own KeyStore and KeyRing, default metadata_ttl) on the same database."""
    built = make_domain(domain.hsm, sqlite_url)
    yield built
    built.store.close()


@pytest.fixture
def slow_worker(domain, sqlite_url):
    """A second KeyRing that would trust its cached metadata for an hour."""
    store = KeyStore.open(sqlite_url)
    yield Sealer(KeyRing(domain.hsm, store, metadata_ttl=3600))
    store.close()


# -- encodings ----------------------------------------------------------------------------------


def test_hex_seal_is_the_lowercase_hex_hmac_and_names_key_and_version(domain, secret_key):
    key_id, secret = secret_key

    sealed = domain.sealer.compute_seal(SealRequest(key_id, b"amount=100", encoding=HEX))

    assert sealed == Seal(hmac_sha256(secret, b"amount=100").hex(), key_id, 1, algorithm="HMAC-SHA-256")


def test_base64_seal_is_the_standard_base64_hmac(domain, secret_key):
    key_id, secret = secret_key

    sealed = domain.sealer.compute_seal(SealRequest(key_id, b"amount=100", encoding=BASE64))

    assert sealed.seal == base64.b64encode(hmac_sha256(secret, b"amount=100")).decode()


@pytest.mark.parametrize(
    "seal_text, encoding",
    [
        pytest.param(lambda t: t.hex(), HEX, id="hex"),
        pytest.param(lambda t: t.hex().upper(), HEX, id="uppercase-hex"),
        pytest.param(lambda t: base64.b64encode(t).decode(), BASE64, id="base64"),
    ],
)
def test_verify_accepts_the_seal_in_each_encoding(domain, secret_key, seal_text, encoding):
    key_id, secret = secret_key

    verification = domain.sealer.verify_seal(
        VerifyRequest(key_id, b"m", seal_text(hmac_sha256(secret, b"m")), encoding=encoding)
    )

    assert verification == Verification(True, key_id, 1)


@pytest.mark.parametrize(
    "seal_text, encoding",
    [
        pytest.param("zz" * 32, HEX, id="hex-non-hex-digits"),
        pytest.param("abc", HEX, id="hex-odd-length"),
        pytest.param("\u00e9" * 64, HEX, id="hex-non-ascii"),
        pytest.param("!!!!", BASE64, id="base64-bad-characters"),
        pytest.param("abc", BASE64, id="base64-bad-padding"),
        pytest.param("\u00e9\u00e9\u00e9\u00e9", BASE64, id="base64-non-ascii"),
    ],
)
def test_verify_of_text_not_in_the_encoding_raises_invalid_argument_seal(domain, secret_key, seal_text, encoding):
    key_id, _secret = secret_key

    with pytest.raises(InvalidArgument) as raised:
        domain.sealer.verify_seal(VerifyRequest(key_id, b"m", seal_text, encoding=encoding))

    assert raised.value.field == "seal"


@pytest.mark.parametrize(
    "wrong_seal",
    [
        pytest.param(lambda t: (t[:-1] + bytes([t[-1] ^ 1])).hex(), id="last-bit-flipped"),
        pytest.param(lambda t: t[:16].hex(), id="truncated"),
        pytest.param(lambda t: (t + b"\x00").hex(), id="extended"),
        pytest.param(lambda t: "", id="empty"),
        pytest.param(lambda t: hmac_sha256(b"another secret of thirty-two by", b"m").hex(), id="other-key"),
    ],
)
def test_wrong_seal_is_an_answer_valid_false_with_version_0(domain, secret_key, wrong_seal):
    key_id, secret = secret_key

    verification = domain.sealer.verify_seal(VerifyRequest(key_id, b"m", wrong_seal(hmac_sha256(secret, b"m"))))

    assert verification == Verification(False, key_id, 0)


def test_seal_of_another_message_is_valid_false(domain, secret_key):
    key_id, secret = secret_key

    verification = domain.sealer.verify_seal(
        VerifyRequest(key_id, b"amount=101", hmac_sha256(secret, b"amount=100").hex())
    )

    assert verification == Verification(False, key_id, 0)


# -- limits -------------------------------------------------------------------------------------


def test_message_longer_than_max_message_bytes_raises_invalid_argument_message(domain, secret_key):
    key_id, secret = secret_key
    sealer = Sealer(domain.ring, max_message_bytes=16)

    assert sealer.compute_seal(SealRequest(key_id, b"x" * 16)).seal == hmac_sha256(secret, b"x" * 16).hex()
    with pytest.raises(InvalidArgument) as sealing:
        sealer.compute_seal(SealRequest(key_id, b"x" * 17))
    with pytest.raises(InvalidArgument) as verifying:
        sealer.verify_seal(VerifyRequest(key_id, b"x" * 17, hmac_sha256(secret, b"x" * 17).hex()))

    assert sealing.value.field == verifying.value.field == "message"


def test_default_max_message_bytes_is_64_kib(domain, secret_key):
    key_id, secret = secret_key

    assert domain.sealer.compute_seal(SealRequest(key_id, bytes(65536))).seal == hmac_sha256(secret, bytes(65536)).hex()
    with pytest.raises(InvalidArgument) as raised:
        domain.sealer.compute_seal(SealRequest(key_id, bytes(65537)))
    assert raised.value.field == "message"


def test_batch_over_max_batch_items_raises_invalid_argument_requests(domain, secret_key):
    key_id, secret = secret_key
    sealer = Sealer(domain.ring, max_batch_items=3)
    seal_requests = [SealRequest(key_id, b"m")] * 4
    verify_requests = [VerifyRequest(key_id, b"m", hmac_sha256(secret, b"m").hex())] * 4

    assert len(sealer.compute_seals(seal_requests[:3])) == 3
    assert len(sealer.verify_seals(verify_requests[:3])) == 3
    with pytest.raises(InvalidArgument) as sealing:
        sealer.compute_seals(seal_requests)
    with pytest.raises(InvalidArgument) as verifying:
        sealer.verify_seals(verify_requests)

    assert sealing.value.field == verifying.value.field == "requests"


def test_default_max_batch_items_is_1000(domain, secret_key):
    key_id, _secret = secret_key

    with pytest.raises(InvalidArgument):
        domain.sealer.compute_seals([SealRequest(key_id, b"m")] * 1001)


def test_work_past_its_deadline_fails_the_whole_call_with_deadline_exceeded(domain, secret_key):
    key_id, secret = secret_key
    past, future = time.monotonic() - 1, time.monotonic() + 60
    seal_requests = [SealRequest(key_id, b"a"), SealRequest(key_id, b"b")]
    verify_requests = [VerifyRequest(key_id, b"a", hmac_sha256(secret, b"a").hex())]

    with pytest.raises(DeadlineExceeded):
        domain.sealer.compute_seals(seal_requests, deadline=past)
    with pytest.raises(DeadlineExceeded):
        domain.sealer.verify_seals(verify_requests, deadline=past)
    with pytest.raises(DeadlineExceeded):
        domain.sealer.compute_seal(seal_requests[0], deadline=past)

    assert [s.seal for s in domain.sealer.compute_seals(seal_requests, deadline=future)] == [
        hmac_sha256(secret, b"a").hex(), hmac_sha256(secret, b"b").hex()
    ]
    assert domain.sealer.verify_seals(verify_requests, deadline=future) == [Verification(True, key_id, 1)]


# -- batches ------------------------------------------------------------------------------------


def test_batch_seal_answers_each_item_in_place_with_errors_where_they_occurred(domain, merchant, secret_key):
    key_id, secret = secret_key
    other_secret = os.urandom(32)
    other_id = import_secret(domain, merchant, "other", other_secret)[0].key_id
    domain.keys.rotate_key(other_id)
    domain.keys.set_primary_version(other_id, 1)
    domain.keys.set_version_state(other_id, 2, KeyVersionState.DISABLED)

    outcomes = domain.sealer.compute_seals([
        SealRequest(key_id, b"first"),
        SealRequest(f"{merchant}/unknown", b"m"),
        SealRequest("malformed", b"m"),
        SealRequest(key_id, bytes(65537)),
        SealRequest(other_id, b"second", encoding=BASE64),
        SealRequest(key_id, b"m", version=9),
        SealRequest(other_id, b"m", version=2),
        SealRequest(key_id, b"third"),
    ])

    assert outcomes[0] == Seal(hmac_sha256(secret, b"first").hex(), key_id, 1, algorithm="HMAC-SHA-256")
    assert isinstance(outcomes[1], NotFound)
    assert isinstance(outcomes[2], InvalidArgument) and outcomes[2].field == "key_id"
    assert isinstance(outcomes[3], InvalidArgument) and outcomes[3].field == "message"
    assert outcomes[4] == Seal(base64.b64encode(hmac_sha256(other_secret, b"second")).decode(), other_id, 1,
                                 algorithm="HMAC-SHA-256")
    assert isinstance(outcomes[5], NotFound)
    assert isinstance(outcomes[6], FailedPrecondition)
    assert outcomes[7] == Seal(hmac_sha256(secret, b"third").hex(), key_id, 1, algorithm="HMAC-SHA-256")


def test_batch_verify_answers_each_item_in_place_with_errors_where_they_occurred(domain, merchant, rotated_pair):
    key_id, secret = rotated_pair
    domain.keys.set_version_state(key_id, 1, KeyVersionState.DISABLED)

    outcomes = domain.sealer.verify_seals([
        VerifyRequest(key_id, b"a", hmac_sha256(secret, b"a").hex(), version=2),
        VerifyRequest(key_id, b"a", hmac_sha256(secret, b"b").hex()),
        VerifyRequest(key_id, b"a", "not hex"),
        VerifyRequest(f"{merchant}/unknown", b"a", hmac_sha256(secret, b"a").hex()),
        VerifyRequest(key_id, b"a", hmac_sha256(secret, b"a").hex(), version=1),
        VerifyRequest(key_id, b"a", hmac_sha256(secret, b"a").hex(), version=7),
        VerifyRequest(key_id, b"c", base64.b64encode(hmac_sha256(secret, b"c")).decode(), encoding=BASE64),
    ])

    assert outcomes[0] == Verification(True, key_id, 2)
    assert outcomes[1] == Verification(False, key_id, 0)
    assert isinstance(outcomes[2], InvalidArgument) and outcomes[2].field == "seal"
    assert isinstance(outcomes[3], NotFound)
    assert isinstance(outcomes[4], FailedPrecondition)
    assert isinstance(outcomes[5], NotFound)
    assert outcomes[6] == Verification(True, key_id, 2)


def test_batch_of_many_messages_equals_their_single_seals(domain, secret_key):
    key_id, secret = secret_key
    messages = [os.urandom(n) for n in range(50)]
    encodings = [HEX, BASE64] * 25

    outcomes = domain.sealer.compute_seals([SealRequest(key_id, m, encoding=e) for m, e in zip(messages, encodings)])

    for message, encoding, outcome in zip(messages, encodings, outcomes):
        expected = hmac_sha256(secret, message)
        assert outcome.seal == (expected.hex() if encoding is HEX else base64.b64encode(expected).decode())


def test_seal_for_an_unknown_or_malformed_key_raises(domain, merchant):
    with pytest.raises(NotFound):
        domain.sealer.compute_seal(SealRequest(f"{merchant}/unknown", b"m"))
    with pytest.raises(InvalidArgument) as raised:
        domain.sealer.compute_seal(SealRequest("malformed", b"m"))
    assert raised.value.field == "key_id"


def test_compute_seal_answers_as_compute_seals_does_for_one_item(domain, secret_key, merchant):
    """The unary path skips the batch's bookkeeping, not its checks: same seal, same errors."""
    key_id, _secret = secret_key
    requests = [
        SealRequest(key_id, b"amount=100"),
        SealRequest(key_id, b"amount=100", encoding=SealEncoding.BASE64),
        SealRequest(key_id, b"m", version=9),
        SealRequest(f"{merchant}/unknown", b"m"),
        SealRequest("malformed", b"m"),
        SealRequest(key_id, b"x" * (domain.sealer.max_message_bytes + 1)),
    ]
    for request in requests:
        batch_answer = domain.sealer.compute_seals([request])[0]
        if isinstance(batch_answer, KeysvcError):
            with pytest.raises(type(batch_answer)) as raised:
                domain.sealer.compute_seal(request)
            assert (raised.value.reason, raised.value.message) == (batch_answer.reason, batch_answer.message)
        else:
            assert domain.sealer.compute_seal(request) == batch_answer
    with pytest.raises(DeadlineExceeded):
        domain.sealer.compute_seal(SealRequest(key_id, b"m"), deadline=time.monotonic() - 1)


# -- versions -----------------------------------------------------------------------------------


@pytest.fixture
def rotated_pair(domain, merchant):
    """(key_id, secret): versions 1 and 2 hold the same imported secret; 2 is primary."""
    secret = os.urandom(32)
    key, _ = import_secret(domain, merchant, "pair", secret, version=1)
    import_secret(domain, merchant, "pair", secret, version=2, make_primary=True)
    return key.key_id, secret


def test_verify_tries_versions_newest_first_and_reports_the_first_match(domain, rotated_pair):
    key_id, secret = rotated_pair
    sealed_by_1 = domain.sealer.compute_seal(SealRequest(key_id, b"m", version=1))

    verification = domain.sealer.verify_seal(VerifyRequest(key_id, b"m", sealed_by_1.seal))

    # Versions 1 and 2 hold the same secret: the newer one answers.
    assert sealed_by_1.seal == hmac_sha256(secret, b"m").hex()
    assert verification == Verification(True, key_id, 2)


def test_verify_reports_the_older_version_that_made_the_seal(domain, merchant):
    key_id = domain.keys.create_key(merchant, "three", KeyPurpose.SEAL, SHA256).key_id
    domain.keys.rotate_key(key_id)
    domain.keys.rotate_key(key_id)

    for version in (1, 2, 3):
        sealed = domain.sealer.compute_seal(SealRequest(key_id, b"m", version=version))
        assert sealed.version == version
        assert domain.sealer.verify_seal(VerifyRequest(key_id, b"m", sealed.seal)) == Verification(True, key_id, version)


def test_verify_with_an_explicit_version_tries_only_that_version(domain, merchant):
    key_id = domain.keys.create_key(merchant, "two", KeyPurpose.SEAL, SHA256).key_id
    domain.keys.rotate_key(key_id)
    sealed_by_1 = domain.sealer.compute_seal(SealRequest(key_id, b"m", version=1)).seal

    assert domain.sealer.verify_seal(VerifyRequest(key_id, b"m", sealed_by_1, version=2)) == Verification(False, key_id, 0)
    assert domain.sealer.verify_seal(VerifyRequest(key_id, b"m", sealed_by_1, version=1)) == Verification(True, key_id, 1)
    with pytest.raises(NotFound):
        domain.sealer.verify_seal(VerifyRequest(key_id, b"m", sealed_by_1, version=3))


# -- another worker on the same database ------------------------------------------------------------


def test_other_worker_seals_with_a_rotated_version_within_one_second(domain, secret_key, other_worker):
    key_id, _secret = secret_key
    assert other_worker.sealer.compute_seal(SealRequest(key_id, b"m")).version == 1  # warms its cache

    domain.keys.rotate_key(key_id)

    elapsed = wait_until(lambda: other_worker.sealer.compute_seal(SealRequest(key_id, b"m")).version == 2, 1.0)
    assert elapsed < 1.0


def test_other_worker_verifies_a_seal_of_a_version_it_has_not_seen_yet_at_once(domain, secret_key, other_worker):
    key_id, _secret = secret_key
    other_worker.sealer.compute_seal(SealRequest(key_id, b"m"))  # caches the key with version 1 only

    domain.keys.rotate_key(key_id)
    sealed_by_2 = domain.sealer.compute_seal(SealRequest(key_id, b"m"))
    verification = other_worker.sealer.verify_seal(VerifyRequest(key_id, b"m", sealed_by_2.seal))

    assert sealed_by_2.version == 2
    assert verification == Verification(True, key_id, 2)


def test_other_worker_with_a_long_ttl_still_verifies_a_new_versions_seal_by_refreshing(domain, secret_key, slow_worker):
    key_id, _secret = secret_key
    slow_worker.compute_seal(SealRequest(key_id, b"m"))

    domain.keys.rotate_key(key_id)
    sealed_by_2 = domain.sealer.compute_seal(SealRequest(key_id, b"m"))

    assert slow_worker.verify_seal(VerifyRequest(key_id, b"m", sealed_by_2.seal)) == Verification(True, key_id, 2)
    assert slow_worker.compute_seal(SealRequest(key_id, b"m", version=2)) == sealed_by_2


def test_other_worker_stops_sealing_with_a_disabled_version_within_one_second(domain, merchant, other_worker):
    key_id = domain.keys.create_key(merchant, "retire", KeyPurpose.SEAL, SHA256).key_id
    domain.keys.rotate_key(key_id)
    other_worker.sealer.compute_seal(SealRequest(key_id, b"m", version=1))

    domain.keys.set_version_state(key_id, 1, KeyVersionState.DISABLED)

    def refused() -> bool:
        try:
            other_worker.sealer.compute_seal(SealRequest(key_id, b"m", version=1))
        except FailedPrecondition:
            return True
        return False

    assert wait_until(refused, 1.0) < 1.0


# -- properties ---------------------------------------------------------------------------------


def test_verify_accepts_the_seal_of_the_same_message_and_rejects_any_other(domain, merchant):
    key_id = domain.keys.create_key(merchant, "property", KeyPurpose.SEAL, SHA256).key_id

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(message=st.binary(max_size=2048), other=st.binary(max_size=2048),
           encoding=st.sampled_from(list(SealEncoding)))
    def check(message, other, encoding):
        assume(other != message)
        sealed = domain.sealer.compute_seal(SealRequest(key_id, message, encoding=encoding))
        same = domain.sealer.verify_seal(VerifyRequest(key_id, message, sealed.seal, encoding=encoding))
        different = domain.sealer.verify_seal(VerifyRequest(key_id, other, sealed.seal, encoding=encoding))
        assert same == Verification(True, key_id, 1)
        assert different == Verification(False, key_id, 0)

    check()


# -- concurrency --------------------------------------------------------------------------------


def test_concurrent_seals_with_a_handle_cache_smaller_than_the_working_set_never_fail(domain, merchant):
    # Four keys, one cached handle, four threads: handles are evicted (and released in the
    # HSM) all the time while other threads are about to use them.
    key_ids = [domain.keys.create_key(merchant, f"k{i}", KeyPurpose.SEAL, SHA256).key_id for i in range(4)]
    expected = {key_id: domain.sealer.compute_seal(SealRequest(key_id, b"m")).seal for key_id in key_ids}
    sealer = Sealer(KeyRing(domain.hsm, domain.store, max_handles=1))
    failures: list[KeysvcError | str] = []
    deadline = time.monotonic() + 1.5

    def worker(offset: int) -> None:
        count = offset
        while time.monotonic() < deadline and len(failures) < 10:
            key_id = key_ids[count % 4]
            count += 1
            try:
                if sealer.compute_seal(SealRequest(key_id, b"m")).seal != expected[key_id]:
                    failures.append(f"wrong seal for {key_id}")
            except KeysvcError as error:
                failures.append(error)

    run_together(4, worker, timeout=30)

    assert failures == []
