"""The master key across HSMs (PCI DSS 3.6.1.2, 3.7.6): enrolling a new replica's HSM,
backing the master key up under split knowledge, and restoring it.

**Check value.** The master key only wraps and unwraps, so the usual KCV (encrypting a
zero block) is not available: its check value is the first 3 bytes (6 upper-case hex
digits) of SHA-256 over the RFC 3394 AES key wrap (CKM_AES_KEY_WRAP, deterministic) of
an all-zero AES-256 key under it (hsm.Hsm.master_key_check_value).

**Enrollment.** The new replica's HSM makes an RSA-3072 transport key pair (the private
half never leaves it and only unwraps) and asks, through the database, for the master
key; once two distinct key-admins agree (DeliverMasterKey is dual control), a replica
holding the master wraps it to the transport key inside its HSM (RSA-OAEP, SHA-1 and
MGF1-SHA-1: the only OAEP SoftHSM unwraps, still sound for key transport) and stores
it in the enrollment; the new HSM unwraps it into a token object and proves it by the
check value. The master key never exists in plaintext outside an HSM.

**Backup under split knowledge.** SoftHSM has no CKM_XOR_BASE_AND_DATA, so the master
key itself cannot be split into XOR components inside the HSM without its plaintext
leaving it. The backup therefore splits a one-off AES-256 *backup key*: N random
components (one per custodian, each with its own KCV, AES-ECB of a zero block), whose
XOR the HSM receives as a session key that only wraps; the master key is wrapped under
it (CKM_AES_KEY_WRAP_PAD) and the backup key is destroyed. Each component is sealed to
its custodian's X25519 public key (PyNaCl SealedBox). Restoring needs every component:
their XOR goes into the HSM as a session key that only unwraps, and the master key is
unwrapped into the token. The backup key exists in this process's memory while it is
combined (never the master key). On an HSM with CKM_XOR_BASE_AND_DATA the components
would be entered and combined inside the HSM instead, and the master key itself could
be split.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import reduce
from typing import Iterator

import nacl.exceptions
import nacl.public
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import hsm
from hsm.token import TRANSPORT_KEY_BITS, TRANSPORT_KEY_LABEL_PREFIX
from keysvc.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound, Unavailable
from keysvc.store.shared_keys import MASTER, Enrollment, EnrollmentState, SharedKeyStore

ENROLLMENT_TTL = timedelta(hours=1)
BACKUP_FORMAT = "keysvc-master-key-backup-v1"
COMPONENT_FORMAT = "keysvc-master-key-component-v1"
_SEALED_PAYLOAD_FORMAT = "keysvc-master-key-component-payload-v1"
PUBLIC_KEY_PREFIX = "x25519-public:"
PRIVATE_KEY_PREFIX = "x25519-private:"
BACKUP_KEY_BYTES = 32
_CUSTODIAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENROLLMENT_ID = re.compile(r"[0-9a-f]{16}")


def _translate(error: hsm.HsmError) -> Exception:
    """An HSM error as the domain error a caller acts on (messages carry no secret)."""
    if isinstance(error, hsm.HsmKeyCheckFailed):
        return IntegrityError(str(error))
    if isinstance(error, hsm.HsmUnwrapFailed):
        return IntegrityError("the HSM could not unwrap the master key: it was not wrapped for this key")
    if isinstance(error, (hsm.HsmConfigurationError, hsm.HsmKeyRejected)):
        return FailedPrecondition(str(error))
    return Unavailable(f"the HSM is unavailable: {error}")


@contextmanager
def _hsm_errors() -> Iterator[None]:
    try:
        yield
    except hsm.HsmError as error:
        raise _translate(error) from None


def key_check_value(key: bytes) -> str:
    """The usual KCV of an AES key: the first 3 bytes of AES-ECB of a zero block, upper-case hex."""
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return (encryptor.update(bytes(16)) + encryptor.finalize())[:3].hex().upper()


def _xor(values: list[bytes]) -> bytes:
    return reduce(lambda left, right: bytes(a ^ b for a, b in zip(left, right)), values)


# -- enrollment ----------------------------------------------------------------------------


def transport_key_label(enrollment_id: str) -> str:
    return TRANSPORT_KEY_LABEL_PREFIX + enrollment_id


def fingerprint_of(transport_public_key: bytes) -> str:
    """Lowercase hex SHA-256 of a transport public key (DER SubjectPublicKeyInfo)."""
    return hashlib.sha256(transport_public_key).hexdigest()


def _normalised_fingerprint(text: str) -> str:
    return text.replace(":", "").replace(" ", "").strip().lower()


def _checked_enrollment_id(enrollment_id: str) -> str:
    if not _ENROLLMENT_ID.fullmatch(enrollment_id):
        raise InvalidArgument("enrollment_id", "must be the 16 hex digits `keysvc replica enroll` printed")
    return enrollment_id


def request_enrollment(token: hsm.Hsm, engine: sa.Engine, replica_name: str, *,
                       ttl: timedelta = ENROLLMENT_TTL) -> Enrollment:
    """On a new replica's host: makes a transport key pair in its HSM (which must hold
    no master key yet) and records an enrollment request (REQUESTED, expiring after
    `ttl`). Raises FailedPrecondition when the token already holds a master key or the
    database records none (start the first replica before enrolling others)."""
    store = SharedKeyStore(engine)
    with _hsm_errors():
        if token.has_master_key:
            raise FailedPrecondition("this token already holds a keysvc master key: it needs no enrollment")
        if store.get(MASTER) is None:
            raise FailedPrecondition("the database records no master key yet: start the first replica "
                                     "(keysvc serve) before enrolling others")
        enrollment_id = secrets.token_hex(8)
        public_pkcs1 = token.generate_transport_key(transport_key_label(enrollment_id))
    spki = serialization.load_der_public_key(public_pkcs1).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    now = datetime.now(timezone.utc)
    enrollment = Enrollment(enrollment_id, replica_name[:256], spki, EnrollmentState.REQUESTED, now, now + ttl)
    try:
        store.insert_enrollment(enrollment)
    except BaseException:
        with _hsm_errors():
            token.destroy_transport_key(transport_key_label(enrollment_id))
        raise
    return enrollment


def complete_enrollment(token: hsm.Hsm, engine: sa.Engine, enrollment_id: str) -> str:
    """On the new replica's host: unwraps the delivered master key into its HSM with the
    transport key, checks its check value against the one recorded (else the key is
    destroyed), destroys the transport key and marks the enrollment COMPLETED. Returns
    the master key's check value.

    Raises NotFound (unknown id), FailedPrecondition (expired, not delivered yet,
    already completed, the token holds a master key or is not the one that asked),
    IntegrityError (the delivered key is not the deployment's)."""
    _checked_enrollment_id(enrollment_id)
    store = SharedKeyStore(engine)
    enrollment = store.enrollment(enrollment_id)
    if enrollment is None:
        raise NotFound(f"no enrollment {enrollment_id}")
    if enrollment.state is EnrollmentState.COMPLETED:
        raise FailedPrecondition(f"enrollment {enrollment_id} is already completed")
    if enrollment.expired(datetime.now(timezone.utc)):
        raise FailedPrecondition(f"enrollment {enrollment_id} expired at "
                                 f"{enrollment.expires_at.isoformat(timespec='seconds')}: enroll again")
    if enrollment.state is not EnrollmentState.DELIVERED or not enrollment.wrapped_master_key:
        raise FailedPrecondition(f"enrollment {enrollment_id} is not delivered yet: a key-admin asks "
                                 f"(keysvc replica deliver {enrollment_id}) and a second one approves")
    recorded = store.get(MASTER)
    if recorded is None or recorded.check_value != enrollment.master_check_value:
        raise IntegrityError(
            f"the delivered master key has check value {enrollment.master_check_value}, but the database records "
            f"{recorded.check_value if recorded else 'none'}: not taken")
    label = transport_key_label(enrollment_id)
    with _hsm_errors():
        if token.has_master_key:
            raise FailedPrecondition("this token already holds a keysvc master key")
        if not token.has_transport_key(label):
            raise FailedPrecondition(f"this token has no transport key for enrollment {enrollment_id}: "
                                     "complete it on the host that asked for it")
        check_value = token.receive_master_key(label, enrollment.wrapped_master_key, enrollment.master_check_value)
        token.destroy_transport_key(label)
    store.mark_completed(enrollment_id)
    return check_value


@dataclass(frozen=True)
class MasterKeyCheckValues:
    token: str
    recorded: str


class MasterKeyAdmin:
    """A serving replica's side: delivering its master key to enrollments, and its
    check value. Thread-safe."""

    def __init__(self, token: hsm.Hsm, engine: sa.Engine) -> None:
        self._hsm = token
        self._store = SharedKeyStore(engine)

    def check_values(self) -> MasterKeyCheckValues:
        with _hsm_errors():
            check_value = self._hsm.master_key_check_value()
        recorded = self._store.get(MASTER)
        return MasterKeyCheckValues(check_value, recorded.check_value if recorded else "")

    def enrollments(self) -> list[Enrollment]:
        return self._store.enrollments()

    def deliver(self, enrollment_id: str, expected_fingerprint: str, delivered_by: str) -> Enrollment:
        """Wraps the master key to the enrollment's transport key in the HSM and stores it
        (REQUESTED → DELIVERED, at most once). The caller runs it only with two key-admins'
        agreement. Raises InvalidArgument (malformed id or fingerprint), NotFound,
        FailedPrecondition (expired, not REQUESTED, a fingerprint that is not the transport
        key's, a transport key too weak, a master key that cannot leave its HSM)."""
        _checked_enrollment_id(enrollment_id)
        expected = _normalised_fingerprint(expected_fingerprint)
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise InvalidArgument("transport_key_fingerprint",
                                  "must be the 64 hex digits `keysvc replica enroll` printed")
        enrollment = self._store.enrollment(enrollment_id)
        if enrollment is None:
            raise NotFound(f"no enrollment {enrollment_id}")
        now = datetime.now(timezone.utc)
        if enrollment.state is not EnrollmentState.REQUESTED:
            raise FailedPrecondition(f"enrollment {enrollment_id} is {enrollment.state.value}, not REQUESTED")
        if enrollment.expired(now):
            raise FailedPrecondition(f"enrollment {enrollment_id} expired at "
                                     f"{enrollment.expires_at.isoformat(timespec='seconds')}")
        if fingerprint_of(enrollment.transport_public_key) != expected:
            raise FailedPrecondition(f"enrollment {enrollment_id}'s transport key is not the one with that "
                                     "fingerprint: nothing delivered", reason="FINGERPRINT_MISMATCH")
        try:
            public = serialization.load_der_public_key(enrollment.transport_public_key)
        except ValueError:
            raise FailedPrecondition(f"enrollment {enrollment_id}'s transport key is not a public key") from None
        if not isinstance(public, rsa.RSAPublicKey) or public.key_size < TRANSPORT_KEY_BITS:
            raise FailedPrecondition(f"a transport key must be RSA of at least {TRANSPORT_KEY_BITS} bits")
        pkcs1 = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        with _hsm_errors():
            wrapped = self._hsm.wrap_master_key_for_transport(pkcs1)
            check_value = self._hsm.master_key_check_value()
        if not self._store.mark_delivered(enrollment_id, wrapped, check_value, delivered_by[:512], now):
            raise FailedPrecondition(f"enrollment {enrollment_id} was delivered or expired meanwhile")
        return self._store.enrollment(enrollment_id)


# -- custodians --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Custodian:
    """A key custodian: a name and an X25519 public key (32 bytes)."""

    name: str
    public_key: bytes

    def __post_init__(self) -> None:
        if not _CUSTODIAN_NAME.fullmatch(self.name):
            raise InvalidArgument("custodian", "a name is 1-64 of A-Z a-z 0-9 . _ - (starting with a letter or digit)")
        if len(self.public_key) != 32:
            raise InvalidArgument("custodian", f"{self.name}'s public key is not an X25519 key (32 bytes)")


def make_custodian_key() -> tuple[bytes, bytes]:
    """A new X25519 key pair for a custodian: (private key, public key), 32 bytes each."""
    private = nacl.public.PrivateKey.generate()
    return bytes(private), bytes(private.public_key)


def encode_public_key(public_key: bytes) -> str:
    return PUBLIC_KEY_PREFIX + public_key.hex() + "\n"


def encode_private_key(private_key: bytes) -> str:
    return PRIVATE_KEY_PREFIX + private_key.hex() + "\n"


def _decode_key(text: str, prefix: str, what: str) -> bytes:
    text = text.strip()
    if not text.startswith(prefix):
        raise InvalidArgument(what, f"is not an X25519 {what.replace('_', ' ')} file (it starts with {prefix!r})")
    try:
        value = bytes.fromhex(text[len(prefix):])
    except ValueError:
        value = b""
    if len(value) != 32:
        raise InvalidArgument(what, "must hold 32 bytes in hex")
    return value


def decode_public_key(text: str) -> bytes:
    return _decode_key(text, PUBLIC_KEY_PREFIX, "public_key")


def decode_private_key(text: str) -> bytes:
    return _decode_key(text, PRIVATE_KEY_PREFIX, "private_key")


# -- backup and restore -------------------------------------------------------------------------


@dataclass(frozen=True)
class MasterKeyBackup:
    """The backup file: the master key wrapped under the backup key, and who holds the
    backup key's components. Nothing in it opens the master key without every component."""

    backup_id: str
    created_at: str
    wrapped_master_key: bytes = field(repr=False)
    master_check_value: str
    backup_key_check_value: str
    custodians: tuple[Custodian, ...]

    def to_json(self) -> str:
        return json.dumps({
            "format": BACKUP_FORMAT,
            "backup_id": self.backup_id,
            "created_at": self.created_at,
            "mechanism": "CKM_AES_KEY_WRAP_PAD",
            "wrapped_master_key": base64.b64encode(self.wrapped_master_key).decode(),
            "master_check_value": self.master_check_value,
            "backup_key_check_value": self.backup_key_check_value,
            "custodians": [{"name": c.name, "public_key": c.public_key.hex()} for c in self.custodians],
        }, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "MasterKeyBackup":
        try:
            document = json.loads(text)
            if document.get("format") != BACKUP_FORMAT:
                raise ValueError
            return cls(
                str(document["backup_id"]), str(document["created_at"]),
                base64.b64decode(document["wrapped_master_key"], validate=True),
                str(document["master_check_value"]), str(document["backup_key_check_value"]),
                tuple(Custodian(str(c["name"]), bytes.fromhex(c["public_key"])) for c in document["custodians"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise InvalidArgument("backup", f"not a keysvc master key backup ({BACKUP_FORMAT})") from None


@dataclass(frozen=True)
class SealedComponent:
    """One custodian's file: its component of the backup key, sealed to its public key
    (SealedBox), with the component's check value in clear beside it."""

    backup_id: str
    custodian: str
    index: int
    count: int
    check_value: str
    sealed: bytes = field(repr=False)

    def to_json(self) -> str:
        return json.dumps({
            "format": COMPONENT_FORMAT, "backup_id": self.backup_id, "custodian": self.custodian,
            "component": f"{self.index + 1} of {self.count}", "index": self.index, "count": self.count,
            "component_check_value": self.check_value,
            "sealed_component": base64.b64encode(self.sealed).decode(),
        }, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "SealedComponent":
        try:
            document = json.loads(text)
            if document.get("format") != COMPONENT_FORMAT:
                raise ValueError
            return cls(str(document["backup_id"]), str(document["custodian"]), int(document["index"]),
                       int(document["count"]), str(document["component_check_value"]),
                       base64.b64decode(document["sealed_component"], validate=True))
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise InvalidArgument("component", f"not a keysvc master key component ({COMPONENT_FORMAT})") from None


@dataclass(frozen=True)
class OpenedComponent:
    """A component opened by its custodian, checked against its check value."""

    custodian: str
    check_value: str
    value: bytes = field(repr=False)


@dataclass(frozen=True)
class RestoredMasterKey:
    backup_key_check_value: str
    master_check_value: str


def _sealed_payload(backup_id: str, custodian: str, index: int, component: bytes) -> bytes:
    # What is sealed names the backup and the custodian, so a component cannot be
    # passed off as another backup's or another custodian's.
    return json.dumps({"format": _SEALED_PAYLOAD_FORMAT, "backup_id": backup_id, "custodian": custodian,
                       "index": index, "component": component.hex()}).encode()


def backup_master_key(token: hsm.Hsm, custodians: list[Custodian]) -> tuple[MasterKeyBackup, list[SealedComponent]]:
    """Wraps the master key under a new one-off backup key split into one XOR component
    per custodian (at least two, distinct names) and seals each component to its
    custodian. Returns the backup and the custodians' sealed components, in order.
    Raises InvalidArgument, FailedPrecondition (no master key, or one that cannot leave
    its HSM)."""
    if len(custodians) < 2:
        raise InvalidArgument("custodian", "split knowledge needs at least two custodians")
    if len({c.name for c in custodians}) != len(custodians):
        raise InvalidArgument("custodian", "two custodians have the same name")
    if len({c.public_key for c in custodians}) != len(custodians):
        raise InvalidArgument("custodian", "two custodians have the same public key")
    components = [secrets.token_bytes(BACKUP_KEY_BYTES) for _ in custodians]
    backup_key = _xor(components)
    with _hsm_errors():
        wrapped = token.wrap_master_key_under(backup_key)
        master_check_value = token.master_key_check_value()
    backup = MasterKeyBackup(secrets.token_hex(8), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             wrapped, master_check_value, key_check_value(backup_key), tuple(custodians))
    sealed = [
        SealedComponent(backup.backup_id, custodian.name, index, len(custodians), key_check_value(component),
                        nacl.public.SealedBox(nacl.public.PublicKey(custodian.public_key)).encrypt(
                            _sealed_payload(backup.backup_id, custodian.name, index, component)))
        for index, (custodian, component) in enumerate(zip(custodians, components))
    ]
    return backup, sealed


def open_component(backup: MasterKeyBackup, component: SealedComponent, private_key: bytes) -> OpenedComponent:
    """Opens one custodian's sealed component with its private key and checks that it
    is this backup's, that custodian's, and matches its check value. Raises
    FailedPrecondition naming what is wrong (never the component)."""
    custodian = next((c for c in backup.custodians if c.name == component.custodian), None)
    if component.backup_id != backup.backup_id:
        raise FailedPrecondition(f"the component of {component.custodian} belongs to another backup "
                                 f"({component.backup_id}, not {backup.backup_id})", reason="WRONG_COMPONENT")
    if custodian is None:
        raise FailedPrecondition(f"{component.custodian} is not a custodian of this backup", reason="WRONG_COMPONENT")
    try:
        private = nacl.public.PrivateKey(private_key)
    except (nacl.exceptions.CryptoError, TypeError, ValueError):
        raise FailedPrecondition("that is not an X25519 private key") from None
    if bytes(private.public_key) != custodian.public_key:
        raise FailedPrecondition(f"that private key is not {custodian.name}'s (the custodian the component is "
                                 "sealed to)", reason="WRONG_CUSTODIAN")
    try:
        payload = json.loads(nacl.public.SealedBox(private).decrypt(component.sealed))
        value = bytes.fromhex(payload["component"])
        if (payload.get("format") != _SEALED_PAYLOAD_FORMAT or payload["backup_id"] != backup.backup_id
                or payload["index"] != component.index or len(value) != BACKUP_KEY_BYTES):
            raise ValueError
    except nacl.exceptions.CryptoError:
        raise FailedPrecondition(f"the component in that file is not sealed to {custodian.name}'s key: it is "
                                 "another custodian's, or damaged", reason="WRONG_CUSTODIAN") from None
    except (ValueError, KeyError, TypeError):
        raise FailedPrecondition(f"the component sealed to {custodian.name} is not one of this backup's",
                                 reason="WRONG_COMPONENT") from None
    if payload["custodian"] != custodian.name:
        raise FailedPrecondition(f"the component sealed to {custodian.name}'s key says it is "
                                 f"{payload['custodian']}'s", reason="WRONG_CUSTODIAN")
    check_value = key_check_value(value)
    if check_value != component.check_value.upper():
        raise FailedPrecondition(f"{custodian.name}'s component has check value {check_value}, not "
                                 f"{component.check_value} as written beside it", reason="WRONG_COMPONENT")
    return OpenedComponent(custodian.name, check_value, value)


def restore_master_key(token: hsm.Hsm, backup: MasterKeyBackup, components: list[OpenedComponent]) -> RestoredMasterKey:
    """Combines every custodian's component (each exactly once) into the backup key,
    checks its check value, and unwraps the master key into a token without one; the
    restored key must have the backup's master check value (else it is destroyed).
    Raises FailedPrecondition (a component missing or given twice, a combined key
    that is not the backup key, a token that already holds a master key),
    IntegrityError (the restored key is not the backed-up one)."""
    given = [component.custodian for component in components]
    for custodian in backup.custodians:
        if given.count(custodian.name) == 0:
            raise FailedPrecondition(f"{custodian.name}'s component is missing: every custodian's is needed",
                                     reason="MISSING_COMPONENT")
        if given.count(custodian.name) > 1:
            raise FailedPrecondition(f"{custodian.name}'s component was given twice")
    if len(given) != len(backup.custodians):
        raise FailedPrecondition("a component of someone who is not a custodian of this backup was given")
    backup_key = _xor([component.value for component in components])
    check_value = key_check_value(backup_key)
    if check_value != backup.backup_key_check_value:
        raise FailedPrecondition(f"the components combine into a key with check value {check_value}, not the "
                                 f"backup key's {backup.backup_key_check_value}", reason="WRONG_COMPONENT")
    with _hsm_errors():
        master_check_value = token.restore_master_key(backup_key, backup.wrapped_master_key,
                                                      backup.master_check_value)
    return RestoredMasterKey(check_value, master_check_value)
