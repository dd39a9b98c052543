"""The hsm layer on the real SoftHSM2 test token (the session `hsm_token` fixture).

Generated secrets never leave the HSM, so their tags are checked for shape and
determinism only; secrets imported under the token's RSA-OAEP (SHA-1) import key
are known here, so their tags are checked against Python's `hmac` module.
The concurrency and fork tests exercise the facts in shared/HSM-NOTES.md: one
process-wide lock around every PKCS#11 call, and re-initialisation after fork.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import subprocess
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import hsm
from tests.conftest import REPO, run_together
from tests.crypto_helpers import OAEP_SHA1, foreign_public_key, python_hmac


def import_public_key(token: hsm.Hsm) -> rsa.RSAPublicKey:
    return serialization.load_der_public_key(token.import_public_key_der)


def oaep_wrap(token: hsm.Hsm, secret: bytes) -> bytes:
    """`secret` wrapped as a bank would send it: RSA-OAEP (SHA-1, MGF1-SHA-1) under the import key."""
    return import_public_key(token).encrypt(secret, OAEP_SHA1)


@pytest.fixture
def known_secret_handle(hsm_token):
    """A handle on a known 32-byte secret imported through the import key, released afterwards."""
    secret = bytes(range(1, 33))
    handle = hsm_token.load_secret(hsm_token.rewrap_imported_secret(oaep_wrap(hsm_token, secret), hsm.Digest.SHA256))
    yield secret, handle
    hsm_token.release_secret(handle)


# -- token keys -------------------------------------------------------------------------------


def test_import_public_key_is_rsa_3072_in_pkcs1_der(hsm_token):
    public_key = import_public_key(hsm_token)

    assert isinstance(public_key, rsa.RSAPublicKey)
    assert public_key.key_size == 3072


def test_the_import_public_key_is_read_from_the_private_key_never_taken_from_the_caller(hsm_token):
    """The public key senders wrap secrets to comes from the unwrapped private key's
    modulus and exponent: a public key that is not the private key's (a swapped copy
    where the caller keeps the shared keys) is refused and changes nothing."""
    installed = hsm_token.installed_shared_keys
    served = hsm_token.import_public_key_der
    assert served == installed.import_public_key
    attacker = foreign_public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)

    with pytest.raises(hsm.HsmKeyCheckFailed):
        hsm_token.install_shared_keys(dataclasses.replace(installed, import_public_key=attacker))
    assert hsm_token.import_public_key_der == served
    assert hsm_token.installed_shared_keys == installed
    assert len(hsm_token.bind(b"still bound")) == 32
    try:
        hsm_token.install_shared_keys(dataclasses.replace(installed, import_public_key=b""))
        assert hsm_token.import_public_key_der == served
    finally:
        hsm_token.install_shared_keys(installed)
    assert hsm_token.import_public_key_der == served


def test_the_long_master_key_check_value_begins_with_the_short_one(hsm_token):
    long_check_value = hsm_token.master_key_long_check_value()

    assert len(long_check_value) == hsm.MASTER_LONG_CHECK_VALUE_DIGITS == 32
    assert long_check_value == long_check_value.upper() and int(long_check_value, 16) >= 0
    assert hsm_token.master_key_check_value() == long_check_value[:hsm.MASTER_CHECK_VALUE_DIGITS]


_RECEIVE_WHILE_THE_CHECK_FAILS = """
import os, hsm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
token = hsm.Hsm.connect(hsm.HsmConfig(os.environ["KEYSVC_TOKEN_LABEL"],
                                      open(os.environ["KEYSVC_HSM_PIN_FILE"]).read().strip()))
label = hsm.TRANSPORT_KEY_LABEL_PREFIX + "0011223344556677"
public = serialization.load_der_public_key(token.generate_transport_key(label))
wrapped = public.encrypt(os.urandom(32), padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
def failing_check(self, master):
    raise RuntimeError("the check value could not be computed")
hsm.Hsm._long_check_value_of = failing_check
try:
    token.receive_master_key(label, wrapped, "00" * 16)
except RuntimeError as error:
    print("raised:", error)
"""

_HAS_MASTER_KEY = """
import os, hsm
print(hsm.Hsm.connect(hsm.HsmConfig(os.environ["KEYSVC_TOKEN_LABEL"],
                                    open(os.environ["KEYSVC_HSM_PIN_FILE"]).read().strip())).has_master_key)
"""


def test_a_received_master_key_whose_check_fails_to_run_is_not_left_in_the_token(tmp_path):
    """The key is unwrapped as a token object before it is checked: if computing its
    check value raises, it is destroyed all the same, or a later start would find an
    unverified master key by its label."""
    from tests.test_masterkey import new_token

    token = new_token(tmp_path / "hsm")
    python = str(REPO / ".venv" / "bin" / "python")
    received = subprocess.run([python, "-c", _RECEIVE_WHILE_THE_CHECK_FAILS], env=token.env, capture_output=True,
                              text=True, timeout=60)
    assert received.returncode == 0, received.stderr
    assert "raised: the check value could not be computed" in received.stdout
    later = subprocess.run([python, "-c", _HAS_MASTER_KEY], env=token.env, capture_output=True, text=True,
                           timeout=60)
    assert later.returncode == 0, later.stderr
    assert later.stdout.strip() == "False"


def test_bind_is_a_deterministic_32_byte_tag_that_depends_on_the_data(hsm_token):
    first = hsm_token.bind(b"record one")

    assert len(first) == 32
    assert hsm_token.bind(b"record one") == first
    assert hsm_token.bind(b"record two") != first


# -- generated secrets ----------------------------------------------------------------------


@pytest.mark.parametrize("digest", list(hsm.Digest), ids=lambda d: d.name)
def test_generated_secret_gives_deterministic_digest_length_tags(hsm_token, digest):
    wrapped = hsm_token.generate_wrapped_secret(digest.digest_size)
    handle = hsm_token.load_secret(wrapped)
    try:
        tag = hsm_token.hmac(handle, digest, b"message")

        assert len(tag) == digest.digest_size
        assert hsm_token.hmac(handle, digest, b"message") == tag
        assert hsm_token.hmac(handle, digest, b"other message") != tag
    finally:
        hsm_token.release_secret(handle)


def test_generated_secret_loaded_twice_gives_the_same_tags(hsm_token):
    wrapped = hsm_token.generate_wrapped_secret(32)
    first, second = hsm_token.load_secret(wrapped), hsm_token.load_secret(wrapped)
    try:
        assert hsm_token.hmac(first, hsm.Digest.SHA256, b"m") == hsm_token.hmac(second, hsm.Digest.SHA256, b"m")
    finally:
        hsm_token.release_secret(first)
        hsm_token.release_secret(second)


def test_two_generated_secrets_differ(hsm_token):
    handles = [hsm_token.load_secret(hsm_token.generate_wrapped_secret(32)) for _ in range(2)]
    try:
        tags = {hsm_token.hmac(handle, hsm.Digest.SHA256, b"m") for handle in handles}
        assert len(tags) == 2
    finally:
        for handle in handles:
            hsm_token.release_secret(handle)


def test_wrapped_secret_is_aes_key_wrap_padded_size(hsm_token):
    # CKM_AES_KEY_WRAP_PAD (RFC 5649): 8-byte integrity block plus the key padded to 8 bytes.
    assert len(hsm_token.generate_wrapped_secret(20)) == 32
    assert len(hsm_token.generate_wrapped_secret(32)) == 40
    assert len(hsm_token.generate_wrapped_secret(64)) == 72


# -- imported secrets -------------------------------------------------------------------------


# SoftHSM 2.6.1's CKM_AES_KEY_WRAP_PAD wrap zero-pads a key to a multiple of 8 bytes before
# wrapping (measured: a 65-byte secret unwraps as 72 bytes). HMAC zero-pads keys up to the block
# size anyway, so that is harmless for a key no longer than 64 bytes (the smallest block size) or
# whose length is a multiple of 8. Longer keys of other lengths are hashed whole by HMAC.
def _exact_cases():
    for digest in hsm.Digest:
        lengths = {"digest-length": digest.digest_size, "block-length": digest.block_size,
                   "twice-block-length": 2 * digest.block_size}
        if digest.digest_size + 3 <= 64:
            lengths["odd-length-up-to-64"] = digest.digest_size + 3
        for name, length in lengths.items():
            yield pytest.param(digest, length, id=f"{name}-{digest.name}")


def _exact_or_refused_cases():
    for digest in hsm.Digest:
        lengths = {"block-plus-one": digest.block_size + 1, "twice-block-plus-three": 2 * digest.block_size + 3}
        if digest.block_size > 64:
            lengths["odd-length-over-64-within-block"] = 67
        for name, length in lengths.items():
            yield pytest.param(digest, length, id=f"{name}-{digest.name}")


def _assert_hmacs_like_python(token: hsm.Hsm, wrapped: bytes, secret: bytes, digest: hsm.Digest) -> None:
    handle = token.load_secret(wrapped)
    try:
        for message in (b"", b"Hi There", os.urandom(1024)):
            assert token.hmac(handle, digest, message) == python_hmac(secret, digest, message)
    finally:
        token.release_secret(handle)


@pytest.mark.parametrize("digest, length", list(_exact_cases()))
def test_imported_secret_hmac_equals_python_hmac(hsm_token, digest, length):
    secret = os.urandom(length)

    wrapped = hsm_token.rewrap_imported_secret(oaep_wrap(hsm_token, secret), digest)

    _assert_hmacs_like_python(hsm_token, wrapped, secret, digest)


@pytest.mark.parametrize("digest, length", list(_exact_or_refused_cases()))
def test_imported_secret_over_64_bytes_and_not_a_multiple_of_8_hmacs_like_python_or_is_refused(
    hsm_token, digest, length
):
    # Never a silently different key: the HSM keeps the secret's HMACs exactly, or refuses it.
    secret = os.urandom(length)

    try:
        wrapped = hsm_token.rewrap_imported_secret(oaep_wrap(hsm_token, secret), digest)
    except hsm.HsmKeyNotPreserved:
        return

    _assert_hmacs_like_python(hsm_token, wrapped, secret, digest)


def test_rewrapped_secret_does_not_contain_the_plaintext(hsm_token):
    secret = b"\x5a" * 32

    wrapped = hsm_token.rewrap_imported_secret(oaep_wrap(hsm_token, secret), hsm.Digest.SHA256)

    assert secret not in wrapped
    assert secret[:8] not in wrapped


def test_hmac_many_equals_hmac_of_each_message(hsm_token, known_secret_handle):
    secret, handle = known_secret_handle
    messages = [b"", b"a", b"bb", os.urandom(300)]

    tags = hsm_token.hmac_many(handle, hsm.Digest.SHA256, messages)

    assert tags == [python_hmac(secret, hsm.Digest.SHA256, m) for m in messages]


@pytest.mark.parametrize("digest", list(hsm.Digest), ids=lambda d: d.name)
def test_hmac_with_key_of_half_the_digest_length_raises_key_rejected(hsm_token, digest):
    handle = hsm_token.load_secret(hsm_token.generate_wrapped_secret(digest.digest_size // 2))
    try:
        with pytest.raises(hsm.HsmKeyRejected):
            hsm_token.hmac(handle, digest, b"message")
    finally:
        hsm_token.release_secret(handle)


def test_hmac_with_short_imported_key_raises_key_rejected(hsm_token):
    handle = hsm_token.load_secret(hsm_token.rewrap_imported_secret(oaep_wrap(hsm_token, b"k" * 20), hsm.Digest.SHA1))
    try:
        assert hsm_token.hmac(handle, hsm.Digest.SHA1, b"m") == python_hmac(b"k" * 20, hsm.Digest.SHA1, b"m")
        with pytest.raises(hsm.HsmKeyRejected):
            hsm_token.hmac(handle, hsm.Digest.SHA256, b"m")
    finally:
        hsm_token.release_secret(handle)


@pytest.mark.parametrize("secret", [b"", b"k" * 20], ids=["empty", "20-bytes"])
def test_rewrap_of_a_secret_too_short_for_hmac_sha256_raises_key_rejected(hsm_token, secret):
    with pytest.raises(hsm.HsmKeyRejected):
        hsm_token.rewrap_imported_secret(oaep_wrap(hsm_token, secret), hsm.Digest.SHA256)


# -- damaged or foreign wrapped data ----------------------------------------------------------


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


@pytest.mark.parametrize(
    "make_garbage",
    [
        pytest.param(lambda token: os.urandom(40), id="random-40-bytes"),
        pytest.param(lambda token: os.urandom(41), id="random-41-bytes"),
        pytest.param(lambda token: os.urandom(8), id="random-8-bytes"),
        pytest.param(lambda token: b"", id="empty"),
        pytest.param(lambda token: _flip_last_byte(token.generate_wrapped_secret(32)), id="tampered"),
    ],
)
def test_load_secret_of_garbage_raises_unwrap_failed(hsm_token, make_garbage):
    with pytest.raises(hsm.HsmUnwrapFailed):
        hsm_token.load_secret(make_garbage(hsm_token))


def _wrapped_under_another_rsa_key(token: hsm.Hsm) -> bytes:
    return foreign_public_key().encrypt(b"s" * 32, OAEP_SHA1)


@pytest.mark.parametrize(
    "make_garbage",
    [
        pytest.param(lambda token: os.urandom(384), id="random-384-bytes"),
        pytest.param(lambda token: os.urandom(10), id="random-10-bytes"),
        pytest.param(lambda token: _flip_last_byte(oaep_wrap(token, b"s" * 32)), id="tampered"),
        pytest.param(_wrapped_under_another_rsa_key, id="other-rsa-key"),
    ],
)
def test_rewrap_of_data_not_wrapped_under_the_import_key_raises_unwrap_failed(hsm_token, make_garbage):
    with pytest.raises(hsm.HsmUnwrapFailed):
        hsm_token.rewrap_imported_secret(make_garbage(hsm_token), hsm.Digest.SHA256)


# -- handles ----------------------------------------------------------------------------------


def test_secret_key_handle_repr_shows_only_the_generation(hsm_token, known_secret_handle):
    secret, handle = known_secret_handle

    text = repr(handle)

    assert text == f"SecretKeyHandle(generation={hsm_token.generation})"
    assert str(handle) == text
    assert secret.hex() not in text.lower()
    assert not hasattr(handle, "__dict__")


def test_secret_key_handle_refuses_pickling_and_copying(known_secret_handle):
    _secret, handle = known_secret_handle

    with pytest.raises(TypeError):
        pickle.dumps(handle)
    with pytest.raises(TypeError):
        copy.copy(handle)
    with pytest.raises(TypeError):
        copy.deepcopy(handle)


def test_released_handle_cannot_be_used_even_after_another_key_is_loaded(hsm_token):
    wrapped = hsm_token.rewrap_imported_secret(oaep_wrap(hsm_token, b"r" * 32), hsm.Digest.SHA256)
    released = hsm_token.load_secret(wrapped)
    hsm_token.release_secret(released)

    with pytest.raises(hsm.HsmError):
        hsm_token.hmac(released, hsm.Digest.SHA256, b"m")

    replacement = hsm_token.load_secret(wrapped)
    try:
        with pytest.raises(hsm.HsmError):
            hsm_token.hmac(released, hsm.Digest.SHA256, b"m")
        with pytest.raises(hsm.HsmError):
            hsm_token.hmac_many(released, hsm.Digest.SHA256, [b"m"])
    finally:
        hsm_token.release_secret(replacement)


# -- one lock, many threads -------------------------------------------------------------------


def test_eight_threads_using_the_hsm_for_two_seconds_get_no_error_and_correct_tags(hsm_token, known_secret_handle):
    secret, shared_handle = known_secret_handle
    wrapped = hsm_token.rewrap_imported_secret(oaep_wrap(hsm_token, secret), hsm.Digest.SHA256)
    messages = [os.urandom(n) for n in (0, 1, 64, 1024)]
    expected = {m: python_hmac(secret, hsm.Digest.SHA256, m) for m in messages}
    wrong_tags: list[bytes] = []
    calls = [0] * 8
    deadline = time.monotonic() + 2.0

    def worker(index: int) -> None:
        while time.monotonic() < deadline:
            message = messages[calls[index] % len(messages)]
            # Mix every kind of call: the lock must cover all of them, not sign alone.
            if calls[index] % 50 == 0:
                own = hsm_token.load_secret(wrapped)
                try:
                    tag = hsm_token.hmac_many(own, hsm.Digest.SHA256, [message])[0]
                finally:
                    hsm_token.release_secret(own)
            else:
                tag = hsm_token.hmac(shared_handle, hsm.Digest.SHA256, message)
            if tag != expected[message]:
                wrong_tags.append(message)
            calls[index] += 1

    run_together(8, worker, timeout=30)  # raises the first error any thread met

    assert wrong_tags == []
    assert all(count > 0 for count in calls)


# -- fork -------------------------------------------------------------------------------------


def _wait_for_child(pid: int, timeout: float) -> int:
    """The child's exit code; kills it (by its pid) when it outlives `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} did not finish within {timeout} s")


def test_forked_child_reinitialises_the_module_and_parent_keeps_working(hsm_token, known_secret_handle):
    secret, parent_handle = known_secret_handle
    wrapped = hsm_token.rewrap_imported_secret(oaep_wrap(hsm_token, secret), hsm.Digest.SHA256)
    expected = python_hmac(secret, hsm.Digest.SHA256, b"after fork")
    parent_generation = hsm_token.generation

    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            handle = hsm_token.load_secret(wrapped)
            fresh_ok = hsm_token.hmac(handle, hsm.Digest.SHA256, b"after fork") == expected
            try:
                hsm_token.hmac(parent_handle, hsm.Digest.SHA256, b"after fork")
                stale_refused = False
            except hsm.HsmStaleHandle:
                stale_refused = True
            reinitialised = hsm_token.generation == parent_generation + 1
            code = 0 if (fresh_ok and stale_refused and reinitialised) else 3
        except BaseException:  # noqa: BLE001 - the exit code reports it
            code = 2
        finally:
            os._exit(code)

    assert _wait_for_child(pid, timeout=60) == 0
    assert hsm_token.generation == parent_generation
    assert hsm_token.hmac(parent_handle, hsm.Digest.SHA256, b"after fork") == expected
    fresh = hsm_token.load_secret(wrapped)
    try:
        assert hsm_token.hmac(fresh, hsm.Digest.SHA256, b"after fork") == expected
    finally:
        hsm_token.release_secret(fresh)


# -- the direct HMAC path ---------------------------------------------------------------------


def test_softhsm_passes_the_direct_signing_self_test_so_hmacs_keep_the_gil(hsm_token):
    assert hsm_token.signs_directly


@pytest.mark.parametrize("digest", list(hsm.Digest), ids=lambda d: d.name)
def test_direct_hmac_equals_python_pkcs11_sign_on_the_same_key(hsm_token, digest):
    secret = os.urandom(digest.digest_size)
    handle = hsm_token.load_secret(hsm_token.rewrap_imported_secret(oaep_wrap(hsm_token, secret), digest))
    try:
        messages = [b"", b"x", os.urandom(1000)]
        direct = hsm_token.hmac_many(handle, digest, messages)
        through_python_pkcs11 = [handle._key.sign(m, mechanism=digest.hmac_mechanism) for m in messages]
        assert direct == through_python_pkcs11 == [python_hmac(secret, digest, m) for m in messages]
    finally:
        hsm_token.release_secret(handle)


# -- exact secrets in envelopes -------------------------------------------------------------------


def _sha256(data: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(data).digest()


@pytest.mark.parametrize("length", [1, 7, 20, 33, 100])
def test_enveloped_import_keeps_the_secret_exactly_for_hashing_with_data(hsm_token, length):
    # What CKM_AES_KEY_WRAP_PAD cannot do on SoftHSM 2.6.1: it pads a 20-byte key to 24.
    secret = os.urandom(length)
    public_key = serialization.load_der_public_key(hsm_token.import_public_key_der)

    envelope = hsm_token.envelope_imported_secret(public_key.encrypt(secret, OAEP_SHA1))
    handle = hsm_token.load_enveloped_secret(envelope)
    try:
        tags = hsm_token.hash_with_secret_many(handle, hsm.Digest.SHA256, [b"", b"amount=1|keyVersion=1"])
    finally:
        hsm_token.release_secret(handle)

    assert tags == [_sha256(secret), _sha256(b"amount=1|keyVersion=1" + secret)]
    assert length < 8 or secret not in envelope  # a byte or a few turn up in any random blob


def test_generated_enveloped_secret_gives_the_same_hash_each_time_it_is_loaded(hsm_token):
    envelope = hsm_token.generate_enveloped_secret(32)

    first, second = (hsm_token.load_enveloped_secret(envelope) for _ in range(2))
    try:
        assert hsm_token.hash_with_secret_many(first, hsm.Digest.SHA256, [b"m"]) == \
            hsm_token.hash_with_secret_many(second, hsm.Digest.SHA256, [b"m"])
        assert hsm_token.hash_with_secret_many(first, hsm.Digest.SHA256, [b"m"]) != [_sha256(b"m")]
    finally:
        hsm_token.release_secret(first)
        hsm_token.release_secret(second)


@pytest.mark.parametrize("damage", [
    lambda e: e[:-1] + bytes([e[-1] ^ 1]),  # the secret's part
    lambda e: e[:10] + bytes([e[10] ^ 1]) + e[11:],  # the private key's part
    lambda e: b"XXXX" + e[4:],  # not an envelope
    lambda e: e[:5],
])
def test_damaged_envelope_raises_unwrap_failed(hsm_token, damage):
    envelope = hsm_token.generate_enveloped_secret(20)

    with pytest.raises(hsm.HsmUnwrapFailed):
        hsm_token.load_enveloped_secret(damage(envelope))
