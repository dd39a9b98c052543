"""The HSM layer's AES-256-GCM data keys, on the real SoftHSM token.

Known answers: NIST CAVP's gcmDecrypt256.rsp (from the `cryptography_vectors`
package), the records with 96-bit IVs and 128-bit tags, PASS and FAIL alike.
"""

from __future__ import annotations

import os

import cryptography_vectors
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, ObjectClass

import hsm
from hsm.token import GCM_NONCE_BYTES

NIST_FILE = "ciphers/AES/GCM/gcmDecrypt256.rsp"


def nist_gcm_records(limit_per_section: int = 3) -> list[dict]:
    """(key, iv, ct, aad, tag, pt or None for FAIL) of the 96-bit-IV, 128-bit-tag sections."""
    records, section, current, taken = [], {}, {}, 0
    with cryptography_vectors.open_vector_file(NIST_FILE, "r") as lines:
        for raw in lines:
            line = raw.strip()
            if line.startswith("["):
                name, _, value = line.strip("[]").partition(" = ")
                if name == "Keylen":
                    section, taken = {}, 0
                section[name] = int(value)
                continue
            name, _, value = line.partition("=")
            name, value = name.strip(), value.strip()
            if name in ("Key", "IV", "CT", "AAD", "Tag", "PT"):
                current[name] = bytes.fromhex(value)
            if line == "FAIL" or name == "PT":
                wanted = section.get("IVlen") == 96 and section.get("Taglen") == 128
                if wanted and taken < limit_per_section:
                    records.append({**current, "PT": None if line == "FAIL" else current.get("PT", b"")})
                    taken += 1
                current = {}
    return records


@pytest.fixture
def known_key_factory(hsm_token):
    """Session AES keys with known values (test only: keysvc itself never imports raw keys)."""
    made = []

    def make(value: bytes) -> hsm.SecretKeyHandle:
        with hsm_token._locked() as session:
            key = session.create_object({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: value, Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
            })
            handle = hsm.SecretKeyHandle(key, hsm_token.generation)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        hsm_token.release_secret(handle)


def test_nist_gcm_decrypt_vectors(hsm_token, known_key_factory):
    records = nist_gcm_records()
    assert len(records) >= 20 and any(r["PT"] is None for r in records) and any(r["PT"] for r in records)
    for record in records:
        handle = known_key_factory(record["Key"])
        [opened] = hsm_token.decrypt_gcm_many(handle, [(record["IV"], record["CT"] + record["Tag"], record["AAD"])])
        assert opened == record["PT"], record
    assert not hsm_token._recovering  # failed tags are answers, not HSM failures


def test_encryption_agrees_with_cryptography(hsm_token, known_key_factory):
    value = os.urandom(32)
    handle = known_key_factory(value)
    items = [(os.urandom(n), os.urandom(20)) for n in (0, 12, 16, 19, 100)]
    sealed = hsm_token.encrypt_gcm_many(handle, items)
    assert len({nonce for nonce, _ in sealed}) == len(items)
    for (plaintext, aad), (nonce, ciphertext) in zip(items, sealed):
        assert len(nonce) == GCM_NONCE_BYTES and len(ciphertext) == len(plaintext) + 16
        assert AESGCM(value).decrypt(nonce, ciphertext, aad) == plaintext


def test_generated_data_keys_round_trip_and_refuse_tampering(hsm_token):
    wrapped = hsm_token.generate_wrapped_aes_key()
    assert len(wrapped) == 40  # 32 bytes under CKM_AES_KEY_WRAP_PAD
    handle = hsm_token.load_aes_key(wrapped)
    other = hsm_token.load_aes_key(hsm_token.generate_wrapped_aes_key())
    try:
        [(nonce, ciphertext)] = hsm_token.encrypt_gcm_many(handle, [(b"4111111111111111", b"aad")])
        flipped = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
        opened = hsm_token.decrypt_gcm_many(handle, [
            (nonce, ciphertext, b"aad"), (nonce, ciphertext, b"other aad"), (nonce, flipped, b"aad"),
            (nonce[:8], ciphertext, b"aad"), (nonce, ciphertext[:10], b"aad"),
        ])
        assert opened == [b"4111111111111111", None, None, None, None]
        assert hsm_token.decrypt_gcm_many(other, [(nonce, ciphertext, b"aad")]) == [None]
        assert not hsm_token._recovering
        # Re-encryption under another key and associated data, in one call.
        [moved] = hsm_token.reencrypt_gcm_many(handle, other, [(nonce, ciphertext, b"aad", b"new aad")])
        assert hsm_token.decrypt_gcm_many(other, [(*moved, b"new aad")]) == [b"4111111111111111"]
        assert hsm_token.reencrypt_gcm_many(handle, other, [(nonce, ciphertext, b"wrong", b"x")]) == [None]
    finally:
        hsm_token.release_secret(handle)
        hsm_token.release_secret(other)
    with pytest.raises(hsm.HsmUnwrapFailed):
        hsm_token.load_aes_key(bytes(40))


def test_the_new_hsm_calls_take_the_process_lock(hsm_token):
    """Two threads in SoftHSM at once crash it (shared/HSM-NOTES.md): run each new call
    in its own thread, beside HMACs, for a while."""
    import time

    from tests.conftest import run_together

    first = hsm_token.load_aes_key(hsm_token.generate_wrapped_aes_key())
    second = hsm_token.load_aes_key(hsm_token.generate_wrapped_aes_key())
    mac_key = hsm_token.load_secret(hsm_token.generate_wrapped_secret(32))
    items = [(os.urandom(16), os.urandom(30)) for _ in range(50)]
    sealed = hsm_token.encrypt_gcm_many(first, items)
    opened = [(nonce, ciphertext, aad) for (nonce, ciphertext), (_, aad) in zip(sealed, items)]
    stop_at = time.monotonic() + 2.0

    def work(index: int) -> int:
        rounds = 0
        while time.monotonic() < stop_at:
            rounds += 1
            if index == 0:
                assert hsm_token.decrypt_gcm_many(first, opened) == [plaintext for plaintext, _ in items]
            elif index == 1:
                assert len(hsm_token.encrypt_gcm_many(first, items)) == len(items)
            elif index == 2:
                moved = hsm_token.reencrypt_gcm_many(first, second, [(*o, b"new") for o in opened])
                assert None not in moved
            elif index == 3:
                hsm_token.release_secret(hsm_token.load_aes_key(hsm_token.generate_wrapped_aes_key()))
            else:
                hsm_token.hmac_many(mac_key, hsm.Digest.SHA256, [b"x" * 64] * 50)
        return rounds

    try:
        assert all(run_together(5, work))
    finally:
        for handle in (first, second, mac_key):
            hsm_token.release_secret(handle)
