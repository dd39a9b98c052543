"""RSA signatures with merchant signing keys whose private half never leaves the HSM.

The message is hashed here (it is not secret), and the HSM signs the hash: PKCS#1 v1.5
over its DigestInfo, or PSS with MGF1 and a salt as long as the hash. A caller may send
the hash itself instead of the message. Verification uses `cryptography` on the public
key stored with each version (the HSM only checks, once per version, that the stored
record is the one it bound). Certificate signing requests and test certificates are
built here and signed in the HSM, so a key can be certified without leaving it.
"""

from __future__ import annotations

import base64
import datetime
import enum
import hashlib
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.hazmat.primitives.asymmetric import utils as asymmetric_utils

import hsm
from keysvc.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, KeysvcError, NotFound
from keysvc.keyring import KeyRing
from keysvc.keys import parse_key_id
from keysvc.model import Key, KeyPurpose, KeyVersion

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_MAX_BATCH_ITEMS = 1000
MAX_CERTIFICATE_DAYS = 825


class SignatureAlgorithm(enum.Enum):
    """A closed set: the padding, the hash, and the JOSE name (RFC 7518)."""

    RSA_PSS_SHA256 = (hsm.RsaPadding.PSS, hsm.Digest.SHA256, "PS256")
    RSA_PSS_SHA384 = (hsm.RsaPadding.PSS, hsm.Digest.SHA384, "PS384")
    RSA_PSS_SHA512 = (hsm.RsaPadding.PSS, hsm.Digest.SHA512, "PS512")
    RSA_PKCS1_V15_SHA256 = (hsm.RsaPadding.PKCS1_V15, hsm.Digest.SHA256, "RS256")
    RSA_PKCS1_V15_SHA384 = (hsm.RsaPadding.PKCS1_V15, hsm.Digest.SHA384, "RS384")
    RSA_PKCS1_V15_SHA512 = (hsm.RsaPadding.PKCS1_V15, hsm.Digest.SHA512, "RS512")

    @property
    def padding(self) -> hsm.RsaPadding:
        return self.value[0]

    @property
    def digest(self) -> hsm.Digest:
        return self.value[1]

    @property
    def jose_name(self) -> str:
        return self.value[2]

    def hash(self, message: bytes) -> bytes:
        return hashlib.new(self.digest.name.lower(), message).digest()

    def _hash_algorithm(self) -> hashes.HashAlgorithm:
        return {hsm.Digest.SHA256: hashes.SHA256, hsm.Digest.SHA384: hashes.SHA384,
                hsm.Digest.SHA512: hashes.SHA512}[self.digest]()

    def verify(self, public_key, signature: bytes, digest: bytes) -> bool:
        """Whether `signature` is this algorithm's signature of the hash `digest`."""
        hash_algorithm = self._hash_algorithm()
        if self.padding is hsm.RsaPadding.PSS:
            padding = rsa_padding.PSS(mgf=rsa_padding.MGF1(hash_algorithm), salt_length=self.digest.digest_size)
        else:
            padding = rsa_padding.PKCS1v15()
        try:
            public_key.verify(signature, digest, padding, asymmetric_utils.Prehashed(hash_algorithm))
            return True
        except InvalidSignature:
            return False

    def asn1_identifier(self) -> dict:
        """The AlgorithmIdentifier a certificate or CSR signed this way names."""
        hash_name = self.digest.name.lower()
        if self.padding is hsm.RsaPadding.PKCS1_V15:
            return {"algorithm": f"{hash_name}_rsa"}
        return {
            "algorithm": "rsassa_pss",
            "parameters": {
                "hash_algorithm": {"algorithm": hash_name},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": hash_name}},
                "salt_length": self.digest.digest_size,
                "trailer_field": "trailer_field_bc",
            },
        }


@dataclass(frozen=True)
class SignRequest:
    key_id: str
    algorithm: SignatureAlgorithm
    message: bytes = field(default=b"", repr=False)
    # A precomputed hash of the message instead of it (the algorithm's hash, its length).
    digest: bytes = field(default=b"", repr=False)
    # 0: the primary version.
    version: int = 0


@dataclass(frozen=True)
class VerifySignatureRequest:
    key_id: str
    algorithm: SignatureAlgorithm
    signature: bytes = field(repr=False)
    message: bytes = field(default=b"", repr=False)
    digest: bytes = field(default=b"", repr=False)
    # 0: every ENABLED and VERIFY_ONLY version, newest first.
    version: int = 0


@dataclass(frozen=True)
class Signature:
    signature: bytes
    key_id: str
    version: int
    algorithm: SignatureAlgorithm


@dataclass(frozen=True)
class SignatureVerification:
    valid: bool
    key_id: str
    # The version that matched; 0 when none did.
    version: int


@dataclass(frozen=True)
class PublicKey:
    key_id: str
    version: int
    pem: str
    # RFC 7517 JSON Web Key: kty, n, e, kid ("<key_id>#<version>"), use, alg.
    jwk: dict


@dataclass(frozen=True)
class CertificateSubject:
    """Who a CSR or test certificate is for: an RFC 4514 name and subject alternative names."""

    name: str
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()


class CertificateDocument(NamedTuple):
    """A PEM document (CSR or certificate) and the key version it is for."""

    pem: str
    key_id: str
    version: int


def _b64url_integer(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the deadline passed before the work was done")


class Signer:
    """The SigningService operations. Thread-safe."""

    def __init__(self, ring: KeyRing, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS) -> None:
        self._ring = ring
        self.max_message_bytes = max_message_bytes
        self.max_batch_items = max_batch_items

    # -- shared checks ------------------------------------------------------------------

    def _signing_key(self, key_id: str) -> Key:
        parse_key_id(key_id)
        key = self._ring.key(key_id)
        if key.purpose is not KeyPurpose.SIGN:
            raise FailedPrecondition(f"key {key_id!r} is a {key.purpose.value} key, not a signing key")
        return key

    def _hash_of(self, request) -> bytes:
        algorithm = request.algorithm
        if request.digest:
            if request.message:
                raise InvalidArgument("digest", "give the message or its hash, not both")
            if len(request.digest) != algorithm.digest.digest_size:
                raise InvalidArgument(
                    "digest", f"must be the {algorithm.digest.digest_size}-byte {algorithm.digest.name} hash"
                )
            return request.digest
        if len(request.message) > self.max_message_bytes:
            raise InvalidArgument("message", f"is longer than {self.max_message_bytes} bytes: send its hash "
                                             "in digest instead")
        return algorithm.hash(request.message)

    def _version(self, key: Key, number: int, *, signing: bool) -> KeyVersion:
        number = number or key.primary_version
        found = key.find_version(number)
        if found is None:
            raise NotFound(f"key {key.key_id!r} has no version {number}")
        allowed = found.state.can_seal if signing else found.state.can_verify
        if not allowed:
            raise FailedPrecondition(
                f"version {number} of key {key.key_id!r} is {found.state.value} and cannot "
                f"{'sign' if signing else 'verify'}"
            )
        return found

    def _check_batch(self, items: list) -> None:
        if len(items) > self.max_batch_items:
            raise InvalidArgument("requests", f"holds more than {self.max_batch_items} items; split the batch")

    # -- signing ----------------------------------------------------------------------

    def sign(self, request: SignRequest, deadline: float | None = None) -> Signature:
        outcome = self.sign_many([request], deadline)[0]
        if isinstance(outcome, KeysvcError):
            raise outcome
        return outcome

    def sign_many(self, requests: list[SignRequest], deadline: float | None = None) -> list[Signature | KeysvcError]:
        """One Signature or one KeysvcError per request, in order; items signed by the same
        key version and algorithm go to the HSM together."""
        self._check_batch(requests)
        outcomes: list[Signature | KeysvcError | None] = [None] * len(requests)
        groups: dict[tuple, tuple[Key, KeyVersion, SignatureAlgorithm, list[tuple[int, bytes]]]] = {}
        for index, request in enumerate(requests):
            try:
                digest = self._hash_of(request)
                key = self._signing_key(request.key_id)
                key, version = self._ring.with_fresh_key(
                    key, lambda k: self._version(k, request.version, signing=True))
            except KeysvcError as error:
                outcomes[index] = error
                continue
            group = (key.key_id, version.version, request.algorithm)
            groups.setdefault(group, (key, version, request.algorithm, []))[3].append((index, digest))
        for key, version, algorithm, items in groups.values():
            _check_deadline(deadline)
            try:
                signatures = self._ring.signatures(key, version, algorithm.padding, algorithm.digest,
                                                   [digest for _, digest in items])
            except KeysvcError as error:
                for index, _digest in items:
                    outcomes[index] = error
                continue
            for (index, _digest), signature in zip(items, signatures):
                outcomes[index] = Signature(signature, key.key_id, version.version, algorithm)
        return outcomes

    # -- verification -------------------------------------------------------------------

    def _public_key(self, key: Key, version: KeyVersion):
        return serialization.load_der_public_key(self._ring.public_key(key, version))

    def verify(self, request: VerifySignatureRequest) -> SignatureVerification:
        """Whether the signature is the key's (the named version's, or any ENABLED or
        VERIFY_ONLY one's, newest first) over the message or hash."""
        digest = self._hash_of(request)
        key = self._signing_key(request.key_id)

        def candidates(current: Key) -> list[KeyVersion]:
            if request.version:
                return [self._version(current, request.version, signing=False)]
            return [v for v in current.versions if v.state.can_verify]

        key, versions = self._ring.with_fresh_key(key, candidates)
        for version in versions:
            if request.algorithm.verify(self._public_key(key, version), request.signature, digest):
                return SignatureVerification(True, key.key_id, version.version)
        return SignatureVerification(False, key.key_id, 0)

    # -- public keys and certificates ------------------------------------------------------

    def public_key(self, key_id: str, version: int = 0,
                   algorithm: SignatureAlgorithm = SignatureAlgorithm.RSA_PSS_SHA256) -> PublicKey:
        """The version's public key as PEM and JWK (`alg` from `algorithm`); versions that
        can still verify only."""
        key = self._signing_key(key_id)
        key, found = self._ring.with_fresh_key(key, lambda k: self._version(k, version, signing=False))
        public = self._public_key(key, found)
        numbers = public.public_numbers()
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        jwk = {"kty": "RSA", "n": _b64url_integer(numbers.n), "e": _b64url_integer(numbers.e),
               "kid": f"{key.key_id}#{found.version}", "use": "sig", "alg": algorithm.jose_name}
        return PublicKey(key.key_id, found.version, pem.decode(), jwk)

    def _signing_material(self, key_id: str, version: int) -> tuple[Key, KeyVersion, asn1_keys.PublicKeyInfo]:
        key = self._signing_key(key_id)
        key, found = self._ring.with_fresh_key(key, lambda k: self._version(k, version, signing=True))
        spki = self._public_key(key, found).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return key, found, asn1_keys.PublicKeyInfo.load(spki)

    def _sign_der(self, key: Key, version: KeyVersion, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        return self._ring.signatures(key, version, algorithm.padding, algorithm.digest, [algorithm.hash(data)])[0]

    def certificate_signing_request(self, key_id: str, subject: CertificateSubject, version: int = 0,
                                    algorithm: SignatureAlgorithm = SignatureAlgorithm.RSA_PKCS1_V15_SHA256,
                                    ) -> CertificateDocument:
        """A PKCS#10 CSR (PEM) for the version's key, signed in the HSM."""
        name, extensions = _subject_parts(subject)
        key, found, public_key_info = self._signing_material(key_id, version)
        attributes = []
        if extensions:
            attributes.append({"type": "extension_request", "values": [extensions]})
        info = asn1_csr.CertificationRequestInfo({
            "version": "v1", "subject": name, "subject_pk_info": public_key_info, "attributes": attributes,
        })
        request = asn1_csr.CertificationRequest({
            "certification_request_info": info,
            "signature_algorithm": algorithm.asn1_identifier(),
            "signature": self._sign_der(key, found, algorithm, info.dump()),
        })
        return CertificateDocument(_pem("CERTIFICATE REQUEST", request.dump()), key.key_id, found.version)

    def self_signed_certificate(self, key_id: str, subject: CertificateSubject, version: int = 0, days: int = 30,
                                algorithm: SignatureAlgorithm = SignatureAlgorithm.RSA_PKCS1_V15_SHA256,
                                ) -> CertificateDocument:
        """A self-signed X.509 certificate (PEM) for tests, signed in the HSM."""
        if not 1 <= days <= MAX_CERTIFICATE_DAYS:
            raise InvalidArgument("days", f"must be between 1 and {MAX_CERTIFICATE_DAYS}")
        name, extensions = _subject_parts(subject)
        key, found, public_key_info = self._signing_material(key_id, version)
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        extensions = [
            *extensions,
            {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": False}},
            {"extn_id": "key_usage", "critical": True, "extn_value": {"digital_signature"}},
        ]
        tbs = asn1_x509.TbsCertificate({
            "version": "v3",
            "serial_number": secrets.randbits(127) + 1,
            "signature": algorithm.asn1_identifier(),
            "issuer": name,
            "validity": {
                "not_before": asn1_x509.Time(name="utc_time", value=now - datetime.timedelta(minutes=5)),
                "not_after": asn1_x509.Time(name="utc_time", value=now + datetime.timedelta(days=days)),
            },
            "subject": name,
            "subject_public_key_info": public_key_info,
            "extensions": extensions,
        })
        certificate = asn1_x509.Certificate({
            "tbs_certificate": tbs,
            "signature_algorithm": algorithm.asn1_identifier(),
            "signature_value": self._sign_der(key, found, algorithm, tbs.dump()),
        })
        return CertificateDocument(_pem("CERTIFICATE", certificate.dump()), key.key_id, found.version)


def _pem(label: str, der: bytes) -> str:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


# A host name, optionally with a leading wildcard label: labels of letters, digits and
# inner hyphens, 1-63 characters.
_DNS_NAME = re.compile(r"(\*\.)?(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


def _subject_parts(subject: CertificateSubject) -> tuple[asn1_x509.Name, list]:
    """The subject Name and the subjectAltName extension (if any SAN) in asn1crypto form,
    parsed and checked with `cryptography` (RFC 4514 names, IP addresses)."""
    if any(ord(character) < 32 or ord(character) == 127 for character in subject.name):
        raise InvalidArgument("subject", "holds a control character")
    if re.search(r"=\s*#", subject.name):
        raise InvalidArgument("subject", "a value in #hex (BER) form is not accepted: write it as text")
    try:
        parsed = x509.Name.from_rfc4514_string(subject.name)
    except ValueError:
        raise InvalidArgument("subject", "must be an RFC 4514 name such as 'CN=shop.example,O=Shop SA,C=FR'") from None
    if not list(parsed):
        raise InvalidArgument("subject", "must name at least one attribute, e.g. CN=shop.example")
    try:
        name = asn1_x509.Name.load(parsed.public_bytes())
    except ValueError:
        raise InvalidArgument("subject", "holds a value its attribute does not allow (e.g. C is 2 letters)") from None
    for dns_name in subject.dns_names:
        if not _DNS_NAME.fullmatch(dns_name) or len(dns_name) > 253:
            raise InvalidArgument("subject_alternative_names", "holds a DNS name that is not a host name")
    if any(not uri or not uri.isprintable() or " " in uri for uri in subject.uris) or \
            any("@" not in email or not email.isprintable() for email in subject.emails):
        raise InvalidArgument("subject_alternative_names", "holds an empty or malformed URI or e-mail address")
    general_names: list[x509.GeneralName] = []
    try:
        general_names += [x509.DNSName(value) for value in subject.dns_names]
        general_names += [x509.IPAddress(ipaddress.ip_address(value)) for value in subject.ip_addresses]
        general_names += [x509.UniformResourceIdentifier(value) for value in subject.uris]
        general_names += [x509.RFC822Name(value) for value in subject.emails]
    except ValueError:
        raise InvalidArgument("subject_alternative_names", "holds a malformed name or IP address") from None
    if not general_names:
        return name, []
    san_der = x509.SubjectAlternativeName(general_names).public_bytes()
    return name, [{"extn_id": "subject_alt_name", "critical": False,
                   "extn_value": asn1_x509.GeneralNames.load(san_der)}]
