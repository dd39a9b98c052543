"""Interleavings and inputs that once went wrong (found in review), kept from coming back.

The race tests step into a real store call (wrapping one method of a real KeyStore)
to run another operation at the worst moment, or hold the real HSM layer in its
"unavailable, recovering" state, and check that the outcome stays right.
"""

from __future__ import annotations

import base64
import time

import pytest

from keysvc.errors import InvalidArgument, Unavailable
from keysvc.keyring import KeyRing
from keysvc.keys import KeyManager
from keysvc.model import KeyAlgorithm, KeyPurpose, KeyVersionState
from keysvc.seals import Sealer, SealRequest, VerifyRequest
from keysvc.store import KeyStore
from tests.crypto_helpers import OAEP_SHA1, pem_public_key

SHA256 = KeyAlgorithm.HMAC_SHA256


def test_a_cache_revalidation_never_puts_back_an_older_copy_than_one_just_written(hsm_token, sqlite_url, merchant):
    now = [0.0]
    store = KeyStore.open(sqlite_url)
    ring = KeyRing(hsm_token, store, clock=lambda: now[0])
    keys, sealer = KeyManager(hsm_token, store, ring), Sealer(ring)
    key_id = keys.create_key(merchant, "k", KeyPurpose.SEAL, SHA256).key_id
    keys.rotate_key(key_id)
    ring.key(key_id)
    now[0] = 1.0  # the cached copy is due for a revision check
    read_revision = store.load_revision

    def revision_read_while_this_process_disables_version_1(wanted_key_id):
        revision = read_revision(wanted_key_id)
        keys.set_version_state(key_id, 1, KeyVersionState.DISABLED)
        return revision

    store.load_revision = revision_read_while_this_process_disables_version_1
    ring.key(key_id)
    store.load_revision = read_revision

    with pytest.raises(Exception) as raised:
        sealer.compute_seal(SealRequest(key_id, b"m", version=1))
    assert "DISABLED" in str(raised.value)
    store.close()


def test_import_racing_a_create_of_another_algorithm_is_refused_not_added(hsm_token, sqlite_url, merchant):
    store = KeyStore.open(sqlite_url)
    ring = KeyRing(hsm_token, store)
    keys = KeyManager(hsm_token, store, ring)
    parameters = keys.import_parameters()
    wrapped = pem_public_key(parameters).encrypt(b"s" * 32, OAEP_SHA1)
    load_key = store.load_key

    def key_created_with_sha512_right_after_the_existence_check(key_id):
        store.load_key = load_key
        keys.create_key(merchant, "k", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA512)
        return None

    store.load_key = key_created_with_sha512_right_after_the_existence_check
    with pytest.raises(InvalidArgument) as raised:
        keys.import_key(merchant, "k", KeyPurpose.SEAL, SHA256, wrapped, parameters.import_key_id, make_primary=True)
    assert raised.value.field == "algorithm"
    key = keys.get_key(f"{merchant}/k")
    assert [v.version for v in key.versions] == [1] and key.algorithm is KeyAlgorithm.HMAC_SHA512
    store.close()


def test_a_version_re_enabled_by_another_worker_seals_and_verifies_here_at_once(hsm_token, sqlite_url, merchant):
    frozen = [0.0]  # this worker's cache never expires on its own
    worker_a = _domain(hsm_token, sqlite_url)
    store_b = KeyStore.open(sqlite_url)
    ring_b = KeyRing(hsm_token, store_b, clock=lambda: frozen[0])
    sealer_b = Sealer(ring_b)
    keys_a, sealer_a = worker_a
    key_id = keys_a.create_key(merchant, "k", KeyPurpose.SEAL, SHA256).key_id
    keys_a.rotate_key(key_id)
    keys_a.set_version_state(key_id, 1, KeyVersionState.DISABLED)
    ring_b.key(key_id)  # worker B caches version 1 as DISABLED
    keys_a.set_version_state(key_id, 1, KeyVersionState.ENABLED)

    sealed = sealer_a.compute_seal(SealRequest(key_id, b"m", version=1))
    assert sealer_b.verify_seal(VerifyRequest(key_id, b"m", sealed.seal, version=1)).valid
    assert sealer_b.compute_seal(SealRequest(key_id, b"m", version=1)).seal == sealed.seal
    store_b.close()


def test_a_stored_destroy_is_not_reported_failed_when_freeing_the_hsm_handle_fails(hsm_token, sqlite_url, merchant):
    keys, sealer = _domain(hsm_token, sqlite_url)
    key_id = keys.create_key(merchant, "k", KeyPurpose.SEAL, SHA256).key_id
    keys.rotate_key(key_id)
    sealer.compute_seal(SealRequest(key_id, b"m", version=1))  # version 1's handle is cached
    hsm_token._recovering, hsm_token._next_recovery = True, time.monotonic() + 3600  # the HSM is down
    try:
        destroyed = keys.destroy_version(key_id, 1)
        with pytest.raises(Unavailable):
            sealer.compute_seal(SealRequest(key_id, b"m"))
    finally:
        hsm_token._next_recovery = 0.0
    assert destroyed.find_version(1).state is KeyVersionState.DESTROYED
    assert sealer.compute_seal(SealRequest(key_id, b"m")).version == 2  # recovered


@pytest.mark.parametrize("last_key_id", [b"a\x00b", b"no-slash", b"\xff"])
def test_a_page_token_that_names_no_key_id_is_invalid_argument(domain, last_key_id):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.list_keys(page_token=base64.urlsafe_b64encode(last_key_id).decode())
    assert raised.value.field == "page_token"


@pytest.mark.parametrize("seal", ["0" * 130, "A" * 92], ids=["hex", "base64"])
def test_a_seal_longer_than_any_tag_is_invalid_argument(domain, merchant, seal):
    from keysvc.seals import SealEncoding

    key_id = domain.keys.create_key(merchant, "k", KeyPurpose.SEAL, SHA256).key_id
    encoding = SealEncoding.HEX if set(seal) == {"0"} else SealEncoding.BASE64
    with pytest.raises(InvalidArgument) as raised:
        domain.sealer.verify_seal(VerifyRequest(key_id, b"m", seal, encoding=encoding))
    assert raised.value.field == "seal"


def _domain(token, url):
    store = KeyStore.open(url)
    ring = KeyRing(token, store)
    return KeyManager(token, store, ring), Sealer(ring)
