"""The master key across HSMs (PCI DSS 3.6.1.2, 3.7.6): enrolling a new replica's HSM,
backing the master key up under split knowledge, and restoring it.

**Check value.** The master key only wraps and unwraps, so the usual KCV (encrypting a
zero block) is not available: its check value is the first 3 bytes (6 upper-case hex
digits) of SHA-256 over the RFC 3394 AES key wrap (CKM_AES_KEY_WRAP, deterministic) of
an all-zero AES-256 key under it (hsm.Hsm.master_key_check_value). Six digits name the
key for people; they prove nothing to someone who can try 2^24 keys. Where a key must
be proved (the database's record, completing an enrollment, restoring into a
deployment) the *long check value* is compared: the first 16 bytes (32 hex digits) of
the same SHA-256 (hsm.Hsm.master_key_long_check_value).

**Enrollment.** The new replica's HSM makes an RSA-3072 transport key pair (the private
half never leaves it and only unwraps) and asks, through the database, for the master
key; once two distinct key-admins agree (DeliverMasterKey is dual control), a replica
holding the master wraps it to the transport key inside its HSM (RSA-OAEP, SHA-1 and
MGF1-SHA-1: the only OAEP SoftHSM unwraps, still sound for key transport) and stores
it in the enrollment; the new HSM unwraps it into a token object and keeps it only if
it has the long check value the operator brings from a serving replica, out of band.
Nothing in the database is trusted for that: the transport key is public, so whoever
can write to the database could wrap a key of their own to it. The master key never
exists in plaintext outside an HSM.

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
_LONG_CHECK_VALUE = re.compile(r"[0-9A-F]{%d}" % hsm.MASTER_LONG_CHECK_VALUE_DIGITS)


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


def short_check_value(check_value: str) -> str:
    """The 6-digit check value that a long master key check value begins with."""
    return check_value[:hsm.MASTER_CHECK_VALUE_DIGITS]


def checked_long_check_value(text: str) -> str:
    """`text` as a long master key check value (32 hex digits; case, spaces and colons
    ignored), upper-case. Raises InvalidArgument otherwise, naming where to read it."""
    value = text.replace(":", "").replace(" ", "").strip().upper()
    if not _LONG_CHECK_VALUE.fullmatch(value):
        raise InvalidArgument(
            "check_value", f"must be the master key's long check value ({hsm.MASTER_LONG_CHECK_VALUE_DIGITS} hex "
            "digits), as `keysvc master-key check` prints it on a serving replica's host or GetMasterKeyCheckValue "
            "returns it (long_check_value)")
    return value


def _xor(values: list[bytes]) -> bytes:
    return reduce(lambda left, right: bytes(a ^ b for a, b in zip(left, right)), values)


# -- enrollment ----------------------------------------------------------------------------


def transport_key_label(enrollment_id: str) -> str:
    return hsm.TRANSPORT_KEY_LABEL_PREFIX + enrollment_id


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


def complete_enrollment(token: hsm.Hsm, engine: sa.Engine, enrollment_id: str, expected_check_value: str) -> str:
    """On the new replica's host: unwraps the delivered master key into its HSM with the
    transport key, keeps it only if its long check value is `expected_check_value`
    (else the HSM destroys it), destroys the transport key and marks the enrollment
    COMPLETED. Returns the master key's long check value.

    `expected_check_value` is the deployment's long check value (32 hex digits) read
    out of band from a serving replica (`keysvc master-key check` on its host, or
    GetMasterKeyCheckValue over mutual TLS). The database's values are compared too,
    for an early clear error, but never decide: whoever can write to the database can
    wrap a key of their own to the public transport key and record its check values.

    Safe to run again after a partial failure: when the token already holds a master
    key with that long check value and the enrollment was delivered, it only finishes
    (destroys the transport key, marks the enrollment COMPLETED).

    Raises InvalidArgument (a malformed id or check value), NotFound (unknown id),
    FailedPrecondition (expired, not delivered yet, completed by another token, the
    token holds another master key or is not the one that asked), IntegrityError (the
    delivered key is not the expected one)."""
    _checked_enrollment_id(enrollment_id)
    expected = checked_long_check_value(expected_check_value)
    store = SharedKeyStore(engine)
    enrollment = store.enrollment(enrollment_id)
    if enrollment is None:
        raise NotFound(f"no enrollment {enrollment_id}")
    label = transport_key_label(enrollment_id)
    with _hsm_errors():
        held = token.master_key_long_check_value() if token.has_master_key else None
        if held == expected and enrollment.state is not EnrollmentState.REQUESTED:
            # An earlier run received the key and stopped before cleaning up: finish.
            token.destroy_transport_key(label)
            store.mark_completed(enrollment_id)
            return held
    if enrollment.state is EnrollmentState.COMPLETED:
        raise FailedPrecondition(f"enrollment {enrollment_id} is already completed"
                                 + (", by another token" if held is None else ""))
    if enrollment.expired(datetime.now(timezone.utc)):
        raise FailedPrecondition(f"enrollment {enrollment_id} expired at "
                                 f"{enrollment.expires_at.isoformat(timespec='seconds')}: enroll again")
    if enrollment.state is not EnrollmentState.DELIVERED or not enrollment.wrapped_master_key:
        raise FailedPrecondition(f"enrollment {enrollment_id} is not delivered yet: a key-admin asks "
                                 f"(keysvc replica deliver {enrollment_id}) and a second one approves")
    if held is not None:
        raise FailedPrecondition(f"this token already holds a keysvc master key (check value "
                                 f"{short_check_value(held)}), not the one expected: it takes no other")
    recorded = store.get(MASTER)
    for what, value in (("the enrollment records", enrollment.master_check_value),
                        ("the database records", recorded.check_value if recorded else "none")):
        if value != expected:
            raise IntegrityError(f"{what} master key check value {value}, not the {expected} expected: the "
                                 "delivered key is not taken (check the value with a serving replica's operator)")
    with _hsm_errors():
        if not token.has_transport_key(label):
            raise FailedPrecondition(f"this token has no transport key for enrollment {enrollment_id}: "
                                     "complete it on the host that asked for it")
        check_value = token.receive_master_key(label, enrollment.wrapped_master_key, expected)
        token.destroy_transport_key(label)
    store.mark_completed(enrollment_id)
    return check_value


@dataclass(frozen=True)
class MasterKeyCheckValues:
    """This replica's master key check value (6 hex digits), the database's record of
    it (6 hex digits, "" before any), and this replica's long check value (32)."""

    token: str
    recorded: str
    token_long: str


class MasterKeyAdmin:
    """A serving replica's side: delivering its master key to enrollments, and its
    check value. Thread-safe."""

    def __init__(self, token: hsm.Hsm, engine: sa.Engine) -> None:
        self._hsm = token
        self._store = SharedKeyStore(engine)

    def check_values(self) -> MasterKeyCheckValues:
        with _hsm_errors():
            long_check_value = self._hsm.master_key_long_check_value()
        recorded = self._store.get(MASTER)
        return MasterKeyCheckValues(short_check_value(long_check_value),
                                    short_check_value(recorded.check_value) if recorded else "", long_check_value)

    def enrollments(self) -> list[Enrollment]:
        return self._store.enrollments()

    def check_delivery(self, enrollment_id: str, expected_fingerprint: str) -> None:
        """Raises what deliver would raise before it reaches the HSM (a request that cannot
        run is refused when asked, not when approved); nothing is changed."""
        self._deliverable(enrollment_id, expected_fingerprint, datetime.now(timezone.utc))

    def deliver(self, enrollment_id: str, expected_fingerprint: str, delivered_by: str) -> Enrollment:
        """Wraps the master key to the enrollment's transport key in the HSM and stores it
        (REQUESTED → DELIVERED, at most once). The caller runs it only with two key-admins'
        agreement. Raises InvalidArgument (malformed id or fingerprint), NotFound,
        FailedPrecondition (expired, not REQUESTED, a fingerprint that is not the transport
        key's, a transport key too weak, a master key that cannot leave its HSM)."""
        now = datetime.now(timezone.utc)
        pkcs1 = self._deliverable(enrollment_id, expected_fingerprint, now)
        with _hsm_errors():
            wrapped = self._hsm.wrap_master_key_for_transport(pkcs1)
            check_value = self._hsm.master_key_long_check_value()
        if not self._store.mark_delivered(enrollment_id, wrapped, check_value, delivered_by[:512], now):
            raise FailedPrecondition(f"enrollment {enrollment_id} was delivered or expired meanwhile")
        return self._store.enrollment(enrollment_id)

    def _deliverable(self, enrollment_id: str, expected_fingerprint: str, now: datetime) -> bytes:
        """The transport key (PKCS#1 DER) to deliver to; raises as deliver does."""
        _checked_enrollment_id(enrollment_id)
        expected = _normalised_fingerprint(expected_fingerprint)
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise InvalidArgument("transport_key_fingerprint",
                                  "must be the 64 hex digits `keysvc replica enroll` printed")
        enrollment = self._store.enrollment(enrollment_id)
        if enrollment is None:
            raise NotFound(f"no enrollment {enrollment_id}")
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
        if not isinstance(public, rsa.RSAPublicKey) or public.key_size < hsm.TRANSPORT_KEY_BITS:
            raise FailedPrecondition(f"a transport key must be RSA of at least {hsm.TRANSPORT_KEY_BITS} bits")
        return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)


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
    """What a restore checked: the combined backup key's KCV, the restored master key's
    check value and long check value, and the database's long check value it was
    compared with ("" when no database was given or it records none)."""

    backup_key_check_value: str
    master_check_value: str
    master_long_check_value: str
    database_check_value: str = ""


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


def restore_master_key(token: hsm.Hsm, backup: MasterKeyBackup, components: list[OpenedComponent],
                       engine: sa.Engine | None = None) -> RestoredMasterKey:
    """Combines every custodian's component (each exactly once) into the backup key,
    checks its check value, and unwraps the master key into a token without one; the
    restored key must have the backup's master check value (else it is destroyed).
    With `engine`, the deployment's database: when it records a master key, the
    restored key must have its long check value instead (and the backup is refused
    before anything is unwrapped when it names another key).
    Raises FailedPrecondition (a component missing or given twice, a combined key
    that is not the backup key, a token that already holds a master key, a backup of
    another master key than the database's), IntegrityError (the restored key is not
    the backed-up one, or not the database's)."""
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
    recorded = SharedKeyStore(engine).get(MASTER) if engine is not None else None
    database_check_value = recorded.check_value if recorded is not None else ""
    if database_check_value and short_check_value(database_check_value) != backup.master_check_value.upper():
        raise FailedPrecondition(f"the backup is of a master key with check value {backup.master_check_value}, "
                                 f"but the database's has check value {short_check_value(database_check_value)}: "
                                 "nothing restored", reason="WRONG_BACKUP")
    with _hsm_errors():
        master_long_check_value = token.restore_master_key(backup_key, backup.wrapped_master_key,
                                                           database_check_value or backup.master_check_value)
    return RestoredMasterKey(check_value, short_check_value(master_long_check_value), master_long_check_value,
                             database_check_value)
