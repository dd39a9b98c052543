"""Known-answer tests: published HMAC vectors, sealed and verified through the HSM.

Sources
- RFC 4231 (HMAC-SHA-256/384/512) test cases 1-4, 6 and 7 and RFC 2202 (HMAC-SHA-1) test
  cases 1-7: the `cryptography_vectors` package (HMAC/rfc-4231-sha*.txt, HMAC/rfc-2202-sha1.txt),
  files of `Key = / Msg = / MD =` records in RFC order. The package leaves out RFC 4231 test
  case 5 (a tag truncated to 128 bits); its key, data and truncated tags are copied below from
  RFC 4231 section 4.6, and the seal's first 16 bytes are compared with them.
- Wycheproof (C2SP/wycheproof, testvectors_v1): tests/vectors/wycheproof/hmac_sha{1,256,384,512}_test.json,
  see tests/vectors/README.md for the commit.

Every key goes in the way a bank's secret does: wrapped with RSA-OAEP-SHA1 under the public key
from KeyManager.import_parameters(), imported with KeyManager.import_key, then used through
Sealer.compute_seal / verify_seal.

Keys shorter than the digest are zero-padded to the digest length before wrapping: SoftHSM refuses
shorter HMAC keys, and HMAC zero-pads any key up to the hash block size anyway (RFC 2104, section 2),
so the tags are unchanged. Every such key is at most the block size. Keys longer than the block size
(RFC 4231 cases 6 and 7: 131 bytes; RFC 2202 cases 6 and 7: 80 bytes) and Wycheproof's 65-byte
keys are imported unchanged.

SoftHSM 2.6.1 zero-pads a key to a multiple of 8 bytes when it wraps it under the master key, so it
cannot store a key longer than 64 bytes exactly unless its length is a multiple of 8. keysvc may
accept such a key only if its seals stay right, and may refuse it with InvalidArgument on
`wrapped_secret`. When it refuses one, an HMAC-equivalent key is imported instead and the published
tags must still come out: H(key) for a key longer than the block size (HMAC itself uses H(key),
RFC 2104 section 2), or the key zero-padded to the block size otherwise. Accepting a key and
sealing with something else is the outcome these tests exist to catch.

Which Wycheproof tests run: all of them, in every group of the four files; none is skipped.
Each distinct key of a file is imported once (a module-scoped cache). keysvc accepts only
full-length tags, so:
- groups with tagSize equal to the digest size: `valid` tests seal to the vector's tag and verify
  as valid; `invalid` tests verify as invalid (version 0) and their tag differs from the seal;
- groups with a truncated tagSize: every test verifies as invalid, `valid` or not; for `valid`
  tests the seal's prefix equals the vector's tag (so the refusal is the truncation, not a wrong
  key), for `invalid` tests it does not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass

import cryptography_vectors
import pytest

from tests.conftest import VECTORS, make_domain
from tests.crypto_helpers import HMAC_ALGORITHMS, OAEP_SHA1, hashlib_name, pem_public_key
from keysvc.errors import InvalidArgument
from keysvc.model import KeyAlgorithm, KeyPurpose
from keysvc.seals import SealRequest, VerifyRequest


@dataclass(frozen=True)
class HmacVector:
    source: str
    algorithm: KeyAlgorithm
    key: bytes
    message: bytes
    tag: bytes
    # Tags shorter than the digest are truncated: compare the seal's prefix.
    truncated: bool = False


def _read_rfc_file(path: str) -> list[tuple[bytes, bytes, bytes]]:
    """The (key, message, tag) records of a cryptography_vectors HMAC file, in file order."""
    records, current = [], {}
    with cryptography_vectors.open_vector_file(path, "r") as lines:
        for line in lines:
            name, equals, value = line.strip().partition(" = ")
            if not equals or name not in ("Key", "Msg", "MD"):
                continue
            current[name] = bytes.fromhex(value)
            if name == "MD":
                records.append((current["Key"], current["Msg"], current["MD"]))
                current = {}
    return records


def _rfc_vectors() -> list[HmacVector]:
    vectors = []
    sha1 = _read_rfc_file("HMAC/rfc-2202-sha1.txt")
    assert len(sha1) == 7, "RFC 2202 has seven HMAC-SHA-1 test cases"
    for case, (key, message, tag) in enumerate(sha1, start=1):
        vectors.append(HmacVector(f"rfc2202-case{case}", KeyAlgorithm.HMAC_SHA1, key, message, tag))
    for bits, algorithm in ((256, KeyAlgorithm.HMAC_SHA256), (384, KeyAlgorithm.HMAC_SHA384),
                            (512, KeyAlgorithm.HMAC_SHA512)):
        records = _read_rfc_file(f"HMAC/rfc-4231-sha{bits}.txt")
        assert len(records) == 6, "the package holds RFC 4231 cases 1-4, 6 and 7 (not 5)"
        for case, (key, message, tag) in zip((1, 2, 3, 4, 6, 7), records):
            vectors.append(HmacVector(f"rfc4231-case{case}-sha{bits}", algorithm, key, message, tag))
    # RFC 4231 section 4.6, test case 5: "Test With Truncation", tags truncated to 128 bits.
    case5_key, case5_message = bytes([0x0C] * 20), b"Test With Truncation"
    for bits, algorithm, tag in (
        (256, KeyAlgorithm.HMAC_SHA256, "a3b6167473100ee06e0c796c2955552b"),
        (384, KeyAlgorithm.HMAC_SHA384, "3abf34c3503b2a23a46efc619baef897"),
        (512, KeyAlgorithm.HMAC_SHA512, "415fad6271580a531d4179bc891d87a6"),
    ):
        vectors.append(HmacVector(f"rfc4231-case5-sha{bits}", algorithm, case5_key, case5_message,
                                  bytes.fromhex(tag), truncated=True))
    return vectors


RFC_VECTORS = _rfc_vectors()

WYCHEPROOF_FILES = {
    KeyAlgorithm.HMAC_SHA1: "hmac_sha1_test.json",
    KeyAlgorithm.HMAC_SHA256: "hmac_sha256_test.json",
    KeyAlgorithm.HMAC_SHA384: "hmac_sha384_test.json",
    KeyAlgorithm.HMAC_SHA512: "hmac_sha512_test.json",
}


@dataclass(frozen=True)
class WycheproofCase:
    algorithm: KeyAlgorithm
    tc_id: int
    key: bytes
    message: bytes
    tag: bytes
    valid: bool
    truncated: bool


def _wycheproof_cases() -> list[WycheproofCase]:
    cases = []
    for algorithm, file_name in WYCHEPROOF_FILES.items():
        document = json.loads((VECTORS / "wycheproof" / file_name).read_text())
        for group in document["testGroups"]:
            truncated = group["tagSize"] != 8 * algorithm.digest.digest_size
            for test in group["tests"]:
                assert test["result"] in ("valid", "invalid"), f"unexpected result in {file_name} #{test['tcId']}"
                cases.append(WycheproofCase(
                    algorithm, test["tcId"], bytes.fromhex(test["key"]), bytes.fromhex(test["msg"]),
                    bytes.fromhex(test["tag"]), test["result"] == "valid", truncated,
                ))
    return cases


WYCHEPROOF_CASES = _wycheproof_cases()


def importable_secret(key: bytes, algorithm: KeyAlgorithm) -> bytes:
    """The key zero-padded to the digest length when shorter (same HMAC tags, see module doc)."""
    digest = algorithm.digest
    if len(key) >= digest.digest_size:
        return key
    assert digest.digest_size <= digest.block_size
    return key + bytes(digest.digest_size - len(key))


def hmac_equivalent_key(key: bytes, algorithm: KeyAlgorithm) -> bytes:
    """A key of a length SoftHSM stores exactly that gives the same HMAC tags as `key`."""
    block_size = algorithm.digest.block_size
    if len(key) > block_size:
        return importable_secret(hashlib.new(hashlib_name(algorithm), key).digest(), algorithm)
    return key + bytes(block_size - len(key))


class VectorKeys:
    """Imports each distinct (algorithm, key) once and hands out its key id."""

    def __init__(self, domain) -> None:
        self.domain = domain
        self.merchant = "kat" + uuid.uuid4().hex[:10]
        parameters = domain.keys.import_parameters()
        assert parameters.wrapping_algorithm == "RSA_OAEP_SHA1"
        self._import_key_id = parameters.import_key_id
        self._public_key = pem_public_key(parameters)
        self._key_ids: dict[tuple[KeyAlgorithm, bytes], str] = {}

    def key_id(self, algorithm: KeyAlgorithm, key: bytes) -> str:
        found = self._key_ids.get((algorithm, key))
        if found is None:
            name = f"{algorithm.value.lower().replace('_', '-')}-{len(self._key_ids)}"
            try:
                stored = self._import(name, algorithm, importable_secret(key, algorithm))
            except InvalidArgument as refused:
                if refused.field != "wrapped_secret" or len(key) <= 64 or len(key) % 8 == 0:
                    raise
                stored = self._import(name, algorithm, hmac_equivalent_key(key, algorithm))
            found = self._key_ids[(algorithm, key)] = stored.key_id
        return found

    def _import(self, name: str, algorithm: KeyAlgorithm, secret: bytes):
        wrapped = self._public_key.encrypt(secret, OAEP_SHA1)
        stored, version = self.domain.keys.import_key(
            self.merchant, name, KeyPurpose.SEAL, algorithm, wrapped, self._import_key_id
        )
        assert version.version == 1
        return stored


@pytest.fixture(scope="module")
def vector_keys(hsm_token, tmp_path_factory):
    domain = make_domain(hsm_token, f"sqlite:///{tmp_path_factory.mktemp('kat') / 'keysvc.db'}")
    yield VectorKeys(domain)
    domain.store.close()


def test_zero_padding_to_the_digest_length_keeps_hmac_tags():
    # The premise of importable_secret, checked in software on RFC 4231 case 2 ("Jefe").
    key, message = b"Jefe", b"what do ya want for nothing?"
    for name, size in (("sha1", 20), ("sha256", 32), ("sha384", 48), ("sha512", 64)):
        padded = key + bytes(size - len(key))
        assert hashlib.new(name).digest_size == size
        assert hmac.new(padded, message, name).digest() == hmac.new(key, message, name).digest()


@pytest.mark.parametrize("length", [65, 67, 131])
@pytest.mark.parametrize("algorithm", HMAC_ALGORITHMS, ids=lambda a: a.value)
def test_hmac_equivalent_key_keeps_hmac_tags(algorithm, length):
    # The premise of the fallback for refused keys, checked in software.
    key, message, name = bytes(range(length)), b"Test Using Larger Than Block-Size Key", hashlib_name(algorithm)

    equivalent = hmac_equivalent_key(key, algorithm)

    assert len(equivalent) % 8 == 0 or len(equivalent) <= 64
    assert hmac.new(equivalent, message, name).digest() == hmac.new(key, message, name).digest()


@pytest.mark.parametrize("vector", RFC_VECTORS, ids=lambda v: v.source)
def test_rfc_hmac_vector_seals_to_the_published_tag_and_verifies(vector_keys, vector):
    key_id = vector_keys.key_id(vector.algorithm, vector.key)
    sealer = vector_keys.domain.sealer

    seal = sealer.compute_seal(SealRequest(key_id, vector.message))

    assert (seal.key_id, seal.version) == (key_id, 1)
    if vector.truncated:
        assert seal.seal[: 2 * len(vector.tag)] == vector.tag.hex()
        truncated = sealer.verify_seal(VerifyRequest(key_id, vector.message, vector.tag.hex()))
        assert (truncated.valid, truncated.version) == (False, 0)
    else:
        assert seal.seal == vector.tag.hex()
    verification = sealer.verify_seal(VerifyRequest(key_id, vector.message, seal.seal))
    assert (verification.valid, verification.version) == (True, 1)


@pytest.mark.parametrize(
    "case", WYCHEPROOF_CASES,
    ids=lambda c: f"{c.algorithm.value.lower()}-tc{c.tc_id}-{'valid' if c.valid else 'invalid'}"
                  f"{'-truncated' if c.truncated else ''}",
)
def test_wycheproof_hmac_vector_verifies_only_when_valid_and_full_length(vector_keys, case):
    key_id = vector_keys.key_id(case.algorithm, case.key)
    sealer = vector_keys.domain.sealer

    seal = sealer.compute_seal(SealRequest(key_id, case.message)).seal
    verification = sealer.verify_seal(VerifyRequest(key_id, case.message, case.tag.hex()))

    prefix_matches = seal[: 2 * len(case.tag)] == case.tag.hex()
    assert prefix_matches is case.valid
    if case.valid and not case.truncated:
        assert seal == case.tag.hex()
        assert (verification.valid, verification.version) == (True, 1)
    else:
        assert (verification.valid, verification.version) == (False, 0)
