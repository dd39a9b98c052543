"""Reference crypto the tests compare keysvc against, and how they wrap secrets for import.

Reference: expected tags and check values come from Python's `hmac` and `hashlib` on the same
secret, never from keysvc or the HSM. A check value is the first 3 bytes of the HMAC over 16 zero
bytes, in upper-case hex.

Wrapping: a secret goes in the way a bank sends it, RSA-OAEP with SHA-1 (MGF1-SHA-1, no label)
under the import public key that KeyManager.import_parameters() (or GetImportParameters over gRPC)
hands out as PEM; KeyManager.import_key then takes the wrapped bytes. `foreign_public_key` is an RSA
key of the same size that is not the import key: what it wraps must be refused.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import hsm
from keysvc.model import KeyAlgorithm, KeyPurpose

# The generic HMAC algorithms (the legacy SHA256_DATA_SECRET is tested with the SIPS seals).
HMAC_ALGORITHMS = [algorithm for algorithm in KeyAlgorithm if algorithm.is_hmac]
OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
HASHLIB_NAMES = {
    hsm.Digest.SHA1: "sha1",
    hsm.Digest.SHA256: "sha256",
    hsm.Digest.SHA384: "sha384",
    hsm.Digest.SHA512: "sha512",
}


# -- reference HMAC -------------------------------------------------------------------------------


def hashlib_name(algorithm: KeyAlgorithm | hsm.Digest) -> str:
    """The `hashlib` name of a key algorithm's (or an HSM digest's) hash function."""
    digest = algorithm.digest if isinstance(algorithm, KeyAlgorithm) else algorithm
    return HASHLIB_NAMES[digest]


def python_hmac(secret: bytes, algorithm: KeyAlgorithm | hsm.Digest, message: bytes) -> bytes:
    """The HMAC tag Python's `hmac` computes: what keysvc's seal of `message` must equal."""
    return hmac.new(secret, message, hashlib_name(algorithm)).digest()


def hmac_sha256(secret: bytes, message: bytes) -> bytes:
    return python_hmac(secret, hsm.Digest.SHA256, message)


def check_value(secret: bytes, algorithm: KeyAlgorithm | hsm.Digest = hsm.Digest.SHA256) -> str:
    """The key check value: the first 3 bytes of the HMAC over 16 zero bytes, upper-case hex."""
    return python_hmac(secret, algorithm, bytes(16))[:3].hex().upper()


# -- wrapping for import ----------------------------------------------------------------------------


def pem_public_key(parameters) -> rsa.RSAPublicKey:
    """The import public key of import parameters (the domain's or GetImportParameters' response)."""
    return serialization.load_pem_public_key(parameters.public_key_pem.encode())


def foreign_public_key() -> rsa.RSAPublicKey:
    """A fresh RSA-3072 public key that is not the import key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key()


def wrap_for_import(domain, secret: bytes) -> bytes:
    """`secret` wrapped with RSA-OAEP-SHA1 under the domain's import public key."""
    return pem_public_key(domain.keys.import_parameters()).encrypt(secret, OAEP_SHA1)


def import_secret(domain, merchant, name, secret, algorithm=KeyAlgorithm.HMAC_SHA256, **options):
    """KeyManager.import_key of a known secret, wrapped as a bank would: (key, version)."""
    parameters = domain.keys.import_parameters()
    wrapped = pem_public_key(parameters).encrypt(secret, OAEP_SHA1)
    return domain.keys.import_key(merchant, name, KeyPurpose.SEAL, algorithm, wrapped, parameters.import_key_id,
                                  **options)


def wrap_private_key_for_import(parameters, private_key_pkcs8: bytes) -> bytes:
    """An RSA private key (PKCS#8 DER) as ImportKey takes it (RSA_AES_KEY_WRAP_SHA1): a fresh
    AES-256 key under the import key with RSA-OAEP-SHA1, then the key wrapped under it (RFC 5649)."""
    import os

    from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

    transport_key = os.urandom(32)
    return pem_public_key(parameters).encrypt(transport_key, OAEP_SHA1) + aes_key_wrap_with_padding(
        transport_key, private_key_pkcs8
    )


def import_private_key(domain, merchant, name, private_key_pkcs8: bytes, algorithm, **options):
    """KeyManager.import_key of a known RSA private key: (key, version)."""
    parameters = domain.keys.import_parameters()
    return domain.keys.import_key(merchant, name, KeyPurpose.SIGN, algorithm,
                                  wrap_private_key_for_import(parameters, private_key_pkcs8),
                                  parameters.import_key_id, **options)
