"""Merchant keys: creation in the HSM, import of bank secrets, versions, rotation, states.

A key is `<merchant_id>/<name>` with a fixed purpose and algorithm and integer
versions, one of them primary. Key material is generated or unwrapped inside the
HSM, stored only wrapped under the HSM master key, and bound to its metadata.

Version states and what they allow:
    ENABLED      seals and verifies (the primary is always ENABLED)
    VERIFY_ONLY  retired: verifies, never seals
    DISABLED     neither; reversible
    DESTROYED    material gone for good, metadata kept; final
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, replace
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

import hsm
from keysvc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from keysvc.keyring import (
    CHECK_VALUE_MESSAGE,
    KeyRing,
    binding_message,
    check_value,
    compute_tags,
    hsm_errors,
    load_handle,
    public_key_check_value,
    subject_public_key_info,
)
from keysvc.model import (
    PLATFORM_ALGORITHMS,
    Charset,
    Key,
    KeyAlgorithm,
    KeyOrigin,
    KeyPlatform,
    KeyPurpose,
    KeyVersion,
    KeyVersionState,
    make_key_id,
)
from keysvc.store import KeyStore, utcnow

MERCHANT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_NAME_PATTERN = re.compile(r"[a-z0-9._-]{1,64}")
MAX_VERSION = 2**31 - 1
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
IMPORT_WRAPPING_ALGORITHM = "RSA_OAEP_SHA1"
# RSA private keys travel as RSA_OAEP_SHA1(an AES-256 key) ‖ RFC 5649 wrap of the PKCS#8 under it.
PRIVATE_KEY_WRAPPING_ALGORITHM = "RSA_AES_KEY_WRAP_SHA1"
# Names the import key pair on the token; a new pair would get a new id.
IMPORT_KEY_ID = hsm.token.IMPORT_KEY_LABEL
SETTABLE_STATES = (KeyVersionState.ENABLED, KeyVersionState.VERIFY_ONLY, KeyVersionState.DISABLED)


@dataclass(frozen=True)
class ImportParameters:
    public_key_pem: str
    wrapping_algorithm: str
    import_key_id: str
    private_key_wrapping_algorithm: str


@dataclass(frozen=True)
class NewMaterial:
    """Fresh key material, wrapped under the master key, with its check value."""

    wrapped_key: bytes
    check_value: str
    origin: KeyOrigin
    # RSA: the public key, DER SubjectPublicKeyInfo.
    public_key: bytes | None = None


def validate_merchant_id(merchant_id: str) -> None:
    if not MERCHANT_ID_PATTERN.fullmatch(merchant_id):
        raise InvalidArgument("merchant_id", "must be 1-64 characters of A-Z a-z 0-9 . _ -")


def validate_key_name(name: str) -> None:
    if not KEY_NAME_PATTERN.fullmatch(name):
        raise InvalidArgument("name", "must be 1-64 characters of a-z 0-9 . _ -")


def parse_key_id(key_id: str) -> tuple[str, str]:
    """Splits `<merchant_id>/<name>`; raises InvalidArgument naming `key_id`."""
    merchant_id, slash, name = key_id.partition("/")
    if not slash or not MERCHANT_ID_PATTERN.fullmatch(merchant_id) or not KEY_NAME_PATTERN.fullmatch(name):
        raise InvalidArgument("key_id", "must be '<merchant_id>/<name>', e.g. '002001000000002/sips'")
    return merchant_id, name


def validate_profile(platform: KeyPlatform, algorithm: KeyAlgorithm, purpose: KeyPurpose = KeyPurpose.SEAL) -> None:
    """A key's purpose and platform decide which algorithms it may have."""
    if purpose is KeyPurpose.SIGN or algorithm.is_rsa:
        if not algorithm.is_rsa or purpose is not KeyPurpose.SIGN:
            raise InvalidArgument("algorithm", "a SIGN key is RSA_2048, RSA_3072 or RSA_4096, and only a SIGN "
                                               "key is RSA")
        if platform is not KeyPlatform.GENERIC:
            raise InvalidArgument("platform", "a SIGN key serves no payment platform: leave it GENERIC")
        return
    allowed = PLATFORM_ALGORITHMS[platform]
    if algorithm not in allowed:
        names = ", ".join(a.value for a in allowed)
        raise InvalidArgument("algorithm", f"a {platform.value} key must be one of {names}, not {algorithm.value}")


@dataclass(frozen=True)
class KeyProfile:
    """What a key serves: its platform and the charset of the text it seals."""

    platform: KeyPlatform = KeyPlatform.GENERIC
    charset: Charset = Charset.UTF_8


class RotationGate(Protocol):
    """Safe rotation across replicas (keysvc.replicas): a rotated key's new version waits
    as pending_primary until every live replica has loaded it."""

    def await_promotion(self, stored: Key, version: int) -> Key:
        """Waits (bounded) for `version` of `stored` (the key as stored with that version
        pending) to stop pending and returns the key as it then is. Never raises: the
        version is stored already, and a failure would invite the caller to rotate again."""


def promoted(key: Key, version: int) -> Key:
    """The key with its pending version `version` made primary; the same object when
    that version no longer waits (promoted already, or superseded). A pending version
    that left ENABLED meanwhile stops waiting without becoming primary."""
    if key.pending_primary != version:
        return key
    found = key.find_version(version)
    if found is None or found.state is not KeyVersionState.ENABLED:
        return replace(key, pending_primary=None)
    return replace(key, primary_version=version, pending_primary=None)


def _find_version(key: Key, version: int) -> KeyVersion:
    found = key.find_version(version)
    if found is None:
        raise NotFound(f"key {key.key_id!r} has no version {version}")
    return found


class KeyManager:
    """The KeyService operations. Thread-safe."""

    def __init__(self, token: hsm.Hsm, store: KeyStore, ring: KeyRing, rotation_gate: RotationGate | None = None
                 ) -> None:
        self._hsm = token
        self._store = store
        self._ring = ring
        self.rotation_gate = rotation_gate

    # -- material -------------------------------------------------------------------------

    def _check_value(self, algorithm: KeyAlgorithm, wrapped_key: bytes) -> str:
        handle = load_handle(self._hsm, algorithm, wrapped_key)
        try:
            return check_value(compute_tags(self._hsm, handle, algorithm, [CHECK_VALUE_MESSAGE])[0])
        finally:
            self._hsm.release_secret(handle)

    def _generate_material(self, algorithm: KeyAlgorithm) -> NewMaterial:
        # As long as the digest: the most HMAC uses, and the least SoftHSM accepts.
        with hsm_errors():
            if algorithm.is_rsa:
                wrapped, public_der = self._hsm.generate_wrapped_rsa_key(algorithm.rsa_bits)
                return self._rsa_material(wrapped, public_der, KeyOrigin.GENERATED)
            length = algorithm.digest.digest_size
            if algorithm.is_hmac:
                wrapped = self._hsm.generate_wrapped_secret(length)
            else:
                wrapped = self._hsm.generate_enveloped_secret(length)
            return NewMaterial(wrapped, self._check_value(algorithm, wrapped), KeyOrigin.GENERATED)

    def _imported_material(self, algorithm: KeyAlgorithm, wrapped_secret: bytes) -> NewMaterial:
        if not wrapped_secret:
            raise InvalidArgument("wrapped_secret", "is required")
        if algorithm.is_rsa:
            return self._imported_private_key(algorithm, wrapped_secret)
        digest = algorithm.digest
        try:
            if algorithm.is_hmac:
                wrapped = self._hsm.rewrap_imported_secret(wrapped_secret, digest)
            else:  # the secret's bytes are hashed as data: kept exactly as sent
                wrapped = self._hsm.envelope_imported_secret(wrapped_secret)
        except hsm.HsmUnwrapFailed:
            raise InvalidArgument(
                "wrapped_secret",
                f"could not be unwrapped: wrap the secret with {IMPORT_WRAPPING_ALGORITHM} "
                "under the public key from GetImportParameters",
            ) from None
        except hsm.HsmKeyNotPreserved:
            raise InvalidArgument(
                "wrapped_secret",
                f"a secret longer than {digest.block_size} bytes cannot be kept intact by this HSM: "
                f"import its {digest.name} hash instead, which HMAC uses in its place (RFC 2104)",
            ) from None
        except hsm.HsmKeyRejected:
            if not algorithm.is_hmac:  # hashed as data: padding would change it
                raise InvalidArgument(
                    "wrapped_secret",
                    f"a {algorithm.value} secret must be 1 to {hsm.token.MAX_ENVELOPED_SECRET_BYTES} bytes, "
                    "wrapped exactly as it is",
                ) from None
            raise InvalidArgument(
                "wrapped_secret",
                f"the HSM refuses this secret for {algorithm.value}: it must be {digest.digest_size} "
                f"bytes or more (zero-pad a shorter one to {digest.digest_size} bytes before wrapping; "
                "the tags are unchanged)",
            ) from None
        except hsm.HsmError as error:
            raise Unavailable(f"the HSM is unavailable: {error}") from None
        with hsm_errors():
            return NewMaterial(wrapped, self._check_value(algorithm, wrapped), KeyOrigin.IMPORTED)

    def _imported_private_key(self, algorithm: KeyAlgorithm, transport_blob: bytes) -> NewMaterial:
        try:
            wrapped, public_der = self._hsm.rewrap_imported_private_key(transport_blob)
        except hsm.HsmUnwrapFailed:
            raise InvalidArgument(
                "wrapped_secret",
                f"could not be unwrapped: send an AES-256 key wrapped with {IMPORT_WRAPPING_ALGORITHM} under "
                "the import key, followed by the PKCS#8 private key wrapped under it with AES key wrap with "
                f"padding ({PRIVATE_KEY_WRAPPING_ALGORITHM})",
            ) from None
        except hsm.HsmError as error:
            raise Unavailable(f"the HSM is unavailable: {error}") from None
        public_key = serialization.load_der_public_key(public_der)
        if public_key.key_size != algorithm.rsa_bits:
            raise InvalidArgument("wrapped_secret", f"holds an RSA-{public_key.key_size} key, not {algorithm.value}")
        self._check_private_key_matches(wrapped, public_key)
        return self._rsa_material(wrapped, public_der, KeyOrigin.IMPORTED)

    @staticmethod
    def _rsa_material(wrapped: bytes, public_der: bytes, origin: KeyOrigin) -> NewMaterial:
        return NewMaterial(wrapped, public_key_check_value(public_der), origin, subject_public_key_info(public_der))

    def _check_private_key_matches(self, wrapped: bytes, public_key) -> None:
        """Signs a probe in the HSM and checks it with the public key: a damaged private
        key (its public half intact) would otherwise sign what nobody can verify."""
        probe = hashlib.sha256(b"keysvc import check").digest()
        with hsm_errors():
            handle = self._hsm.load_private_key(wrapped)
            try:
                [signature] = self._hsm.rsa_sign_digests(handle, hsm.RsaPadding.PKCS1_V15, hsm.Digest.SHA256, [probe])
            finally:
                self._hsm.release_secret(handle)
        try:
            public_key.verify(signature, probe, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        except InvalidSignature:
            raise InvalidArgument("wrapped_secret", "holds an RSA private key that does not match its own "
                                                    "public key") from None

    def _new_version(self, key: Key, number: int, material: NewMaterial) -> KeyVersion:
        version = KeyVersion(
            version=number,
            state=KeyVersionState.ENABLED,
            origin=material.origin,
            check_value=material.check_value,
            created_at=utcnow(),
            wrapped_key=material.wrapped_key,
            wrapping_key_label=hsm.token.MASTER_KEY_LABEL,
            public_key=material.public_key,
        )
        with hsm_errors():
            tag = self._hsm.bind(binding_message(key, version))
        return replace(version, binding_tag=tag)

    def _new_key(self, merchant_id: str, name: str, purpose: KeyPurpose, algorithm: KeyAlgorithm,
                 profile: KeyProfile, number: int, material: NewMaterial) -> Key:
        now = utcnow()
        key = Key(
            key_id=make_key_id(merchant_id, name),
            merchant_id=merchant_id,
            name=name,
            purpose=purpose,
            algorithm=algorithm,
            primary_version=number,
            created_at=now,
            updated_at=now,
            platform=profile.platform,
            charset=profile.charset,
        )
        return replace(key, versions=(self._new_version(key, number, material),))

    def _stored(self, key: Key) -> Key:
        self._ring.remember(key)
        return key

    # -- operations -------------------------------------------------------------------------

    def create_key(self, merchant_id: str, name: str, purpose: KeyPurpose, algorithm: KeyAlgorithm,
                   profile: KeyProfile = KeyProfile()) -> Key:
        """Creates a key whose version 1 is generated in the HSM. Raises AlreadyExists,
        InvalidArgument when the algorithm does not suit the platform."""
        validate_merchant_id(merchant_id)
        validate_key_name(name)
        validate_profile(profile.platform, algorithm, purpose)
        if self._store.load_revision(make_key_id(merchant_id, name)) is not None:
            raise AlreadyExists(f"key {make_key_id(merchant_id, name)!r} already exists")
        material = self._generate_material(algorithm)
        key = self._new_key(merchant_id, name, purpose, algorithm, profile, 1, material)
        return self._stored(self._store.insert_key(key))

    def import_parameters(self) -> ImportParameters:
        """The public key and algorithm a caller wraps a secret with for import_key."""
        with hsm_errors():
            der = self._hsm.import_public_key_der
        # load_der_public_key reads the PKCS#1 RSAPublicKey the HSM layer exports.
        public_key = serialization.load_der_public_key(der)
        pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        return ImportParameters(pem, IMPORT_WRAPPING_ALGORITHM, IMPORT_KEY_ID, PRIVATE_KEY_WRAPPING_ALGORITHM)

    def import_key(
        self,
        merchant_id: str,
        name: str,
        purpose: KeyPurpose,
        algorithm: KeyAlgorithm | None,
        wrapped_secret: bytes,
        import_key_id: str,
        version: int = 0,
        make_primary: bool = False,
        profile: KeyProfile | None = None,
    ) -> tuple[Key, KeyVersion]:
        """Imports a bank-issued secret as a new version, creating the key if needed
        (with `profile`, by default a GENERIC key over UTF-8).

        Raises InvalidArgument (bad wrapping, short secret, algorithm or profile
        mismatch), AlreadyExists (version number taken).
        """
        validate_merchant_id(merchant_id)
        validate_key_name(name)
        if import_key_id != IMPORT_KEY_ID:
            raise InvalidArgument("import_key_id", f"unknown import key; use {IMPORT_KEY_ID!r} from GetImportParameters")
        if not 0 <= version <= MAX_VERSION:
            raise InvalidArgument("version", f"must be between 1 and {MAX_VERSION}, or 0 for the next")
        key_id = make_key_id(merchant_id, name)
        existing = self._store.load_key(key_id)
        if existing is None and algorithm is None:
            raise InvalidArgument("algorithm", "is required when the key does not exist yet")
        if existing is not None:
            if algorithm is not None and algorithm is not existing.algorithm:
                raise InvalidArgument(
                    "algorithm", f"key {key_id!r} is {existing.algorithm.value}, not {algorithm.value}"
                )
            if purpose is not existing.purpose:
                raise InvalidArgument("purpose", f"key {key_id!r} is a {existing.purpose.value} key")
            if profile is not None and profile != KeyProfile(existing.platform, existing.charset):
                raise InvalidArgument(
                    "platform", f"key {key_id!r} is a {existing.platform.value} key over {existing.charset.value}"
                )
            algorithm = existing.algorithm
        profile = profile or KeyProfile()
        validate_profile(profile.platform, algorithm, purpose)
        material = self._imported_material(algorithm, wrapped_secret)
        if existing is None:
            number = version or 1
            key = self._new_key(merchant_id, name, purpose, algorithm, profile, number, material)
            try:
                stored = self._store.insert_key(key)
                return self._stored(stored), stored.versions[0]
            except AlreadyExists:
                pass  # created meanwhile: add a version to it below

        return self._add_version(key_id, material, version, make_primary, algorithm, purpose)

    def _add_version(self, key_id: str, material: NewMaterial, version: int, make_primary: bool,
                     algorithm: KeyAlgorithm, purpose: KeyPurpose, pending: bool = False) -> tuple[Key, KeyVersion]:
        """Stores `material`, made for `algorithm` and `purpose`, as version `version`
        (0: the next number) of an existing key; primary with `make_primary`, pending
        promotion with `pending`."""
        added: list[int] = []

        def add_version(current: Key) -> Key:
            # Checked here too: the key may have been created meanwhile with another algorithm.
            if current.algorithm is not algorithm:
                raise InvalidArgument(
                    "algorithm", f"key {key_id!r} is {current.algorithm.value}, not {algorithm.value}"
                )
            if current.purpose is not purpose:
                raise InvalidArgument("purpose", f"key {key_id!r} is a {current.purpose.value} key")
            number = version or max((v.version for v in current.versions), default=0) + 1
            if current.find_version(number) is not None:
                raise AlreadyExists(f"key {key_id!r} already has version {number}")
            if number > MAX_VERSION:
                raise FailedPrecondition(f"key {key_id!r} has no version number left")
            added[:] = [number]
            changed = current.with_version(self._new_version(current, number, material))
            if pending:
                return replace(changed, pending_primary=number)
            return replace(changed, primary_version=number, pending_primary=None) if make_primary else changed

        stored = self._stored(self._store.update_key(key_id, add_version))
        return stored, _find_version(stored, added[0])

    def rotate_key(self, key_id: str) -> tuple[Key, KeyVersion]:
        """Adds a version generated in the HSM and makes it primary; older versions keep
        their state (retire them with set_version_state).

        With a rotation gate (replicas), the version is first stored ENABLED as the
        key's pending_primary, and becomes primary once every live replica has loaded
        it; this waits for that (bounded by the gate's wait and the call's deadline)
        and returns the key as it then is: with the new version primary, or still
        pending (it is promoted later without a caller). Once the version is stored,
        nothing fails the call: a retry would rotate again.
        """
        current = self.get_key(key_id)
        material = self._generate_material(current.algorithm)
        if self.rotation_gate is None:
            return self._add_version(key_id, material, 0, True, current.algorithm, current.purpose)
        stored, version = self._add_version(key_id, material, 0, False, current.algorithm, current.purpose,
                                            pending=True)
        return self.rotation_gate.await_promotion(stored, version.version), version

    def get_key(self, key_id: str) -> Key:
        """Raises InvalidArgument for a malformed id, NotFound for an unknown one."""
        parse_key_id(key_id)
        key = self._store.load_key(key_id)
        if key is None:
            raise NotFound(f"key {key_id!r} not found")
        return key

    def list_keys(self, merchant_id: str = "", page_size: int = 0, page_token: str = "") -> tuple[list[Key], str]:
        """One page of keys in key id order, and the token of the next page ('' at the end)."""
        if merchant_id:
            validate_merchant_id(merchant_id)
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be between 1 and {MAX_PAGE_SIZE} (0 for {DEFAULT_PAGE_SIZE})")
        limit = page_size or DEFAULT_PAGE_SIZE
        after = _decode_page_token(page_token)
        page = self._store.list_keys(merchant_id=merchant_id or None, after_key_id=after, limit=limit + 1)
        if len(page) > limit:
            return page[:limit], _encode_page_token(page[limit - 1].key_id)
        return page, ""

    def set_version_state(self, key_id: str, version: int, state: KeyVersionState) -> Key:
        """Moves a version between ENABLED, VERIFY_ONLY and DISABLED.

        Raises FailedPrecondition for a destroyed version or for taking the primary
        out of ENABLED.
        """
        parse_key_id(key_id)
        if state not in SETTABLE_STATES:
            raise InvalidArgument("state", "must be ENABLED, VERIFY_ONLY or DISABLED (destroy with DestroyKeyVersion)")

        def change_state(key: Key) -> Key:
            current = _find_version(key, version)
            if current.state is KeyVersionState.DESTROYED:
                raise FailedPrecondition(f"version {version} of key {key_id!r} is destroyed")
            if current.state is state:
                return key
            if version == key.primary_version and state is not KeyVersionState.ENABLED:
                raise FailedPrecondition(
                    f"version {version} is the primary of key {key_id!r}: rotate or set another primary first"
                )
            changed = key.with_version(replace(current, state=state))
            if version == key.pending_primary and state is not KeyVersionState.ENABLED:
                changed = replace(changed, pending_primary=None)  # retired before its promotion
            return changed

        return self._stored(self._store.update_key(key_id, change_state))

    def set_primary_version(self, key_id: str, version: int) -> Key:
        """Makes an ENABLED version the primary. Raises FailedPrecondition otherwise."""
        parse_key_id(key_id)

        def change_primary(key: Key) -> Key:
            current = _find_version(key, version)
            if current.state is not KeyVersionState.ENABLED:
                raise FailedPrecondition(
                    f"version {version} of key {key_id!r} is {current.state.value}; only an ENABLED version can be primary"
                )
            if key.primary_version == version and key.pending_primary is None:
                return key
            # An explicit choice: a rotation still waiting for promotion gives way to it.
            return replace(key, primary_version=version, pending_primary=None)

        return self._stored(self._store.update_key(key_id, change_primary))

    def destroy_version(self, key_id: str, version: int) -> Key:
        """Erases a version's wrapped material for good. The primary cannot be destroyed."""
        parse_key_id(key_id)

        def destroy(key: Key) -> Key:
            current = _find_version(key, version)
            if current.state is KeyVersionState.DESTROYED:
                raise FailedPrecondition(f"version {version} of key {key_id!r} is already destroyed")
            if version == key.primary_version:
                raise FailedPrecondition(
                    f"version {version} is the primary of key {key_id!r}: rotate or set another primary first"
                )
            destroyed = key.with_version(
                replace(current, state=KeyVersionState.DESTROYED, wrapped_key=None, destroyed_at=utcnow())
            )
            return replace(destroyed, pending_primary=None) if version == key.pending_primary else destroyed

        return self._stored(self._store.update_key(key_id, destroy))


def _encode_page_token(last_key_id: str) -> str:
    return base64.urlsafe_b64encode(last_key_id.encode()).decode()


def _decode_page_token(page_token: str) -> str:
    if not page_token:
        return ""
    try:
        last_key_id = base64.b64decode(page_token.encode(), altchars=b"-_", validate=True).decode()
        parse_key_id(last_key_id)
        return last_key_id
    except (binascii.Error, UnicodeDecodeError, ValueError, InvalidArgument):
        raise InvalidArgument("page_token", "is not a token from a previous ListKeys response") from None
