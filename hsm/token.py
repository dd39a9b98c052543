"""One PKCS#11 token, used through one logged-in session per process.

Facts this module is built on (measured on SoftHSM2 2.6.1, see shared/HSM-NOTES.md):
- python-pkcs11 initialises the module without locking flags and releases the GIL
  on every call, so two threads in one process crash SoftHSM. Every call below
  runs under one process-wide lock.
- Closing a logged-in session logs every session out, so the one session lives as
  long as the process.
- After a fork the child must re-initialise the module and log in again; handles
  made before the fork are then stale.
- Looking keys up by label is slow: token keys are found once, at connect time;
  merchant keys are unwrapped into session objects and used by handle.

What the token holds: only the master key (AES-256, wrap/unwrap), the one key that
several HSMs may share. The other keys every HSM sharing it needs (the binding key and
the import key pair) are made in an HSM, wrapped under the master key and handed to
the caller to keep; `install_shared_keys` unwraps them into session objects. This
module knows nothing of where they are kept, and trusts nothing the caller keeps
beyond what the HSM can check: the import public key is read from the unwrapped
private key, not taken from the caller.
"""

from __future__ import annotations

import enum
import hashlib
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MGF, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.constants import DEFAULT
from pkcs11.mechanisms import GCMParams
from pkcs11.util.rsa import decode_rsa_public_key, encode_rsa_public_key

from hsm.deadline import acquired
from hsm.direct import CKR_KEY_SIZE_RANGE, DirectCipher, DirectRsaSigner, DirectSigner, DirectSignError
from hsm.errors import (
    HsmConfigurationError,
    HsmError,
    HsmKeyCheckFailed,
    HsmKeyNotPreserved,
    HsmKeyRejected,
    HsmStaleHandle,
    HsmUnavailable,
    HsmUnwrapFailed,
)
from hsm.serial import SerialRunner

DEFAULT_MODULE_PATH = "/usr/lib/softhsm/libsofthsm2.so"

# Labels of the token objects keysvc owns. The "-1" leaves room for a new generation.
MASTER_KEY_LABEL = "keysvc-master-1"
# Older tokens held the shared keys as token objects under these labels; a caller may
# still use them (use_token_held_shared_keys).
BINDING_KEY_LABEL = "keysvc-binding-1"
IMPORT_KEY_LABEL = "keysvc-import-1"
IMPORT_KEY_BITS = 3072
# An HSM being given the master key receives it under an RSA transport key pair of
# its own (the private half a token object that only unwraps), labelled with this
# prefix and the enrollment's name.
TRANSPORT_KEY_LABEL_PREFIX = "keysvc-transport-"
TRANSPORT_KEY_BITS = 3072

# The master key. SENSITIVE: its value is never readable in plaintext. EXTRACTABLE:
# it may leave the HSM wrapped, to give it to another HSM (RSA-OAEP to its
# transport key) or for a backup (under a backup key split among custodians).
# On a production HSM one would also set CKA_WRAP_WITH_TRUSTED, so that it can be
# wrapped only under keys the security officer marked CKA_TRUSTED (the transport
# and backup keys): then no user session can wrap it under a key of its own choice.
# SoftHSM's user sessions cannot mark keys trusted, so it is not set here.
_MASTER_KEY_TEMPLATE = {
    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
    Attribute.WRAP: True, Attribute.UNWRAP: True,
    Attribute.ENCRYPT: False, Attribute.DECRYPT: False,
    Attribute.SIGN: False, Attribute.VERIFY: False,
}
# The master key check value (see master_key_check_value): SHA-256 over the RFC 3394
# AES key wrap (no padding, deterministic) of this all-zero AES-256 key under the
# master key. Its first 3 bytes (6 hex digits) name the key to a person; they do not
# prove it: 2^24 tries find another key with the same 6 digits. A key that must be
# proved against someone able to try keys is compared on the first 16 bytes (32 hex
# digits, the long check value), which no search reaches.
_CHECK_VALUE_KEY = bytes(32)
MASTER_CHECK_VALUE_DIGITS = 6
MASTER_LONG_CHECK_VALUE_DIGITS = 32

# An exact secret (see envelope_imported_secret) travels in an envelope: this marker,
# the length of the wrapped one-off private key (2 bytes), that key, then the secret
# under RSA-OAEP. The one-off key pair is RSA-2048: one pair per secret, used once.
ENVELOPE_MARKER = b"KSE1"
ENVELOPE_KEY_BITS = 2048
# What RSA-OAEP with SHA-1 carries under a 2048-bit key: 256 - 2 * 20 - 2 bytes.
MAX_ENVELOPED_SECRET_BYTES = ENVELOPE_KEY_BITS // 8 - 2 * 20 - 2
_OAEP_SHA1 = (Mechanism.SHA_1, MGF.SHA1, None)
# AES-GCM as keysvc uses it: 96-bit random nonces, 128-bit tags.
GCM_NONCE_BYTES = 12
GCM_TAG_BITS = 128
# What SoftHSM answers C_Decrypt when a GCM tag does not verify: CKR_GENERAL_ERROR,
# CKR_ENCRYPTED_DATA_INVALID, CKR_ENCRYPTED_DATA_LEN_RANGE.
_GCM_TAG_FAILURES = (0x05, 0x40, 0x41)

T = TypeVar("T")

# One lock for every PKCS#11 call in the process, whatever object makes it.
_PROCESS_LOCK = threading.RLock()
# RSA signatures run back to back on one thread (hsm/serial.py says why).
_LONG_CALLS = SerialRunner(_PROCESS_LOCK, "keysvc-hsm-sign")

# Attributes python-pkcs11 adds to unwrap templates that a key of our kind must not
# carry (and that SoftHSM refuses on some key classes): DEFAULT drops them.
_NO_EXTRA_CAPABILITIES = {
    Attribute.ENCRYPT: DEFAULT,
    Attribute.DECRYPT: DEFAULT,
    Attribute.WRAP: DEFAULT,
    Attribute.UNWRAP: DEFAULT,
}

# The session, the module or the token's objects are gone. Finding the token keys
# again in the same session does not work on SoftHSM once its token folder has been
# away: recovery re-initialises the module and logs in again.
_UNAVAILABLE_ERRORS = (
    p11.DeviceError,
    p11.DeviceMemory,
    p11.DeviceRemoved,
    p11.GeneralError,
    p11.HostMemory,
    p11.FunctionFailed,
    p11.SessionClosed,
    p11.SessionHandleInvalid,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.UserNotLoggedIn,
    p11.ObjectHandleInvalid,
    p11.KeyHandleInvalid,
    p11.WrappingKeyHandleInvalid,
    p11.UnwrappingKeyHandleInvalid,
)
# Seconds between recovery attempts while the HSM stays unusable: calls in between
# fail fast instead of each hammering the module.
RECOVERY_INTERVAL = 0.5
_UNWRAP_ERRORS = (
    p11.WrappedKeyInvalid,
    p11.WrappedKeyLenRange,
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.DataLenRange,
    p11.DataInvalid,
)


@contextmanager
def _general_error_means_bad_wrapping() -> Iterator[None]:
    # SoftHSM answers CKR_GENERAL_ERROR when unwrapping fails to decode (bad OAEP or
    # key-wrap padding): that is bad input, not an unavailable HSM.
    try:
        yield
    except p11.GeneralError:
        raise HsmUnwrapFailed("the wrapped key could not be unwrapped") from None


class Digest(enum.Enum):
    """The hash functions the HMAC mechanisms use, with their sizes in bytes."""

    SHA1 = (Mechanism.SHA_1_HMAC, 20, 64, Mechanism.SHA_1)
    SHA256 = (Mechanism.SHA256_HMAC, 32, 64, Mechanism.SHA256)
    SHA384 = (Mechanism.SHA384_HMAC, 48, 128, Mechanism.SHA384)
    SHA512 = (Mechanism.SHA512_HMAC, 64, 128, Mechanism.SHA512)

    @property
    def hmac_mechanism(self) -> Mechanism:
        return self.value[0]

    @property
    def hash_mechanism(self) -> Mechanism:
        return self.value[3]

    @property
    def digest_size(self) -> int:
        return self.value[1]

    @property
    def block_size(self) -> int:
        return self.value[2]


@dataclass(frozen=True)
class HsmConfig:
    """Where the token is and how to log in. The PIN never shows in a repr."""

    token_label: str
    pin: str = field(repr=False)
    module_path: str = DEFAULT_MODULE_PATH


@dataclass(frozen=True)
class WrappedSharedKeys:
    """The keys every HSM of a deployment uses besides the master key, as
    make_shared_keys returns them: wrapped under the master key
    (CKM_AES_KEY_WRAP_PAD), so that only an HSM holding the master opens them.

    binding_key: HMAC-SHA256 key binding stored records to their metadata.
    import_private_key: RSA-3072 private key that unwraps secrets sent for import.
    import_public_key: its public half, DER RSAPublicKey (PKCS#1). It is public, and
    install_shared_keys never trusts it: it reads the public half from the private key.
    """

    binding_key: bytes = field(repr=False)
    import_private_key: bytes = field(repr=False)
    import_public_key: bytes = field(repr=False)


class RsaPadding(enum.Enum):
    """The RSA signature schemes: PKCS#1 v1.5, and PSS with MGF1 and salt = digest length."""

    PKCS1_V15 = "PKCS1_V15"
    PSS = "PSS"


# DER prefixes of the DigestInfo that PKCS#1 v1.5 signs (RFC 8017, section 9.2, note 1).
_DIGEST_INFO_PREFIXES = {
    "SHA256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "SHA384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "SHA512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_MGF1 = {"SHA256": MGF.SHA256, "SHA384": MGF.SHA384, "SHA512": MGF.SHA512}


class SecretKeyHandle:
    """A non-extractable key (a secret key or an RSA private key) living in the HSM
    session, used by handle.

    It holds no key material, refuses pickling, and is tied to the module
    generation it was made in (a fork makes it stale).
    """

    __slots__ = ("_key", "generation")

    def __init__(self, key: pkcs11.SecretKey, generation: int) -> None:
        self._key = key
        self.generation = generation

    def __repr__(self) -> str:
        return f"{type(self).__name__}(generation={self.generation})"

    def __reduce__(self):
        raise TypeError("a key handle cannot be pickled")


class Hsm:
    """The token of one process: connect once, then call its methods from any thread.

    Every method raises HsmUnavailable when the module or session fails, and the
    more specific HsmError subclasses where documented.
    """

    _connected: dict[tuple[str, str], "Hsm"] = {}

    def __init__(self, config: HsmConfig) -> None:
        self._config = config
        self._pid = -1
        self.generation = 0
        self._session: pkcs11.Session | None = None
        self._master_key = None
        # The shared keys in use (session objects), from install_shared_keys, or the
        # token objects of a token made before shared keys (use_token_held_shared_keys).
        self._binding_key = None
        self._import_private_key = None
        self._import_public_der = b""
        # What was installed, so that the session objects are made again after the
        # module is re-initialised (recovery, fork).
        self._shared_keys: WrappedSharedKeys | None = None
        self._token_held_shared_keys = False
        self._direct: DirectSigner | None = None
        self._direct_cipher: DirectCipher | None = None
        self._direct_rsa: DirectRsaSigner | None = None
        # Set by a failure that needs the module and session re-opened before the next call.
        self._recovering = False
        self._next_recovery = 0.0

    @classmethod
    def connect(cls, config: HsmConfig) -> "Hsm":
        """Returns this process's connection to the token, opening it on first use.

        Raises HsmConfigurationError when the module, token or PIN is wrong.
        """
        with _PROCESS_LOCK:
            key = (config.module_path, config.token_label)
            hsm = cls._connected.get(key)
            if hsm is None:
                hsm = cls(config)
                hsm._open()
                cls._connected[key] = hsm
            return hsm

    # -- session management -------------------------------------------------------

    def _open(self) -> None:
        """Initialises the module (again after a fork), logs in, finds the token keys."""
        try:
            lib = pkcs11.lib(self._config.module_path)
            if self._pid != -1:
                lib.reinitialize()
            token = lib.get_token(token_label=self._config.token_label)
            self._session = token.open(user_pin=self._config.pin, rw=True)
        except (p11.NoSuchToken, p11.MultipleTokensReturned):
            raise HsmConfigurationError(
                f"no single token labelled {self._config.token_label!r} in the PKCS#11 module"
            ) from None
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinLocked):
            raise HsmConfigurationError("the HSM refused the PIN") from None
        except p11.PKCS11Error as exc:
            raise HsmUnavailable(f"cannot open the HSM token: {type(exc).__name__}") from None
        except OSError:
            raise HsmConfigurationError(
                f"cannot load the PKCS#11 module {self._config.module_path!r}"
            ) from None
        self._pid = os.getpid()
        self.generation += 1
        self._find_token_keys()

    def _find_token_keys(self) -> None:
        """Finds the master key by label (slow: at start and on recovery only) and makes
        the installed shared keys' session objects again."""
        self._master_key = self._find_key(ObjectClass.SECRET_KEY, MASTER_KEY_LABEL)
        self._binding_key = self._import_private_key = None
        self._import_public_der = b""
        if self._token_held_shared_keys:
            self._find_token_held_shared_keys()
        elif self._shared_keys is not None and self._master_key is not None:
            try:
                self._unwrap_shared_keys(self._shared_keys)
            except (p11.PKCS11Error, HsmError):
                self._binding_key = self._import_private_key = None  # recovery tries again
        self._direct = self._checked_direct_signer()
        self._direct_cipher = self._checked_direct_cipher()
        # The same C_SignInit and C_Sign the HMAC self-test just checked; the signatures
        # themselves are checked by the known-answer tests (tests/test_signing.py).
        self._direct_rsa = DirectRsaSigner(self._config.module_path) if self._direct is not None else None

    @property
    def signs_directly(self) -> bool:
        """Whether HMACs take the GIL-holding path of hsm.direct (else python-pkcs11's)."""
        return self._direct is not None

    def _checked_direct_signer(self) -> DirectSigner | None:
        """The GIL-holding HMAC path, if it gives python-pkcs11's tags on this module."""
        try:
            direct = DirectSigner(self._config.module_path)
            probe_key = self._session.generate_key(
                KeyType.GENERIC_SECRET, 256, store=False,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True},
            )
        except (OSError, AttributeError, p11.PKCS11Error):
            return None
        try:
            probe = b"keysvc direct signing self-test"
            expected = probe_key.sign(probe, mechanism=Mechanism.SHA256_HMAC)
            same = direct.sign_many(self._session.handle, probe_key.handle, int(Mechanism.SHA256_HMAC), [probe])
            return direct if same == [expected] else None
        except DirectSignError:
            return None
        finally:
            probe_key.destroy()

    def _checked_direct_cipher(self) -> DirectCipher | None:
        """The GIL-holding AES-GCM path, if it agrees with python-pkcs11 on this module
        both ways and refuses a wrong tag."""
        try:
            direct = DirectCipher(self._config.module_path)
            probe_key = self._session.generate_key(
                KeyType.AES, 256, store=False,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.ENCRYPT: True, Attribute.DECRYPT: True},
            )
        except (OSError, AttributeError, p11.PKCS11Error):
            return None
        try:
            nonce, aad, probe = bytes(range(GCM_NONCE_BYTES)), b"keysvc probe aad", b"keysvc direct gcm self-test"
            session, key = self._session.handle, probe_key.handle
            sealed = direct.gcm_encrypt(session, key, nonce, probe, aad, GCM_TAG_BITS)
            params = GCMParams(nonce, aad, GCM_TAG_BITS)
            if probe_key.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params) != probe:
                return None
            theirs = probe_key.encrypt(probe, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            if direct.gcm_decrypt(session, key, nonce, theirs, aad, GCM_TAG_BITS) != probe:
                return None
            try:
                direct.gcm_decrypt(session, key, nonce, theirs, b"another aad", GCM_TAG_BITS)
                return None  # a wrong tag must not decrypt
            except DirectSignError:
                return direct
        except (DirectSignError, p11.PKCS11Error):
            return None
        finally:
            probe_key.destroy()

    def _direct_error(self, error: DirectSignError) -> HsmError:
        """The HsmError (and recovery) python-pkcs11's exception for the same code would give."""
        if error.return_value == CKR_KEY_SIZE_RANGE:
            return HsmKeyRejected("the key's size is out of range for this mechanism")
        self._schedule_recovery()
        return HsmUnavailable(f"HSM call failed: CKR 0x{error.return_value:x}")

    def _schedule_recovery(self) -> None:
        if not self._recovering:
            self._recovering = True
            self._next_recovery = time.monotonic()  # the next call tries at once

    def _recover(self) -> None:
        """Called under the lock before a call while the HSM is known to be unusable:
        re-opens the module and the session (a new generation, so cached key handles
        become stale and are loaded again). Raises HsmUnavailable while it cannot."""
        if time.monotonic() < self._next_recovery:
            raise HsmUnavailable("recovering from an HSM failure")
        had_token_keys = self._master_key is not None
        had_shared_keys = self._binding_key is not None
        try:
            self._open()
            recovered = ((self._master_key is not None or not had_token_keys)
                         and (self._binding_key is not None or not had_shared_keys))
        except (HsmError, p11.PKCS11Error):
            recovered = False
        if not recovered:
            self._next_recovery = time.monotonic() + RECOVERY_INTERVAL
            raise HsmUnavailable("recovering from an HSM failure")
        self._recovering = False

    def _find_key(self, object_class: ObjectClass, label: str):
        try:
            return self._session.get_key(object_class=object_class, label=label)
        except p11.NoSuchKey:
            return None
        except p11.MultipleObjectsReturned:
            raise HsmConfigurationError(
                f"the token holds more than one {object_class.name} labelled {label!r}: "
                "keep one (softhsm2-util / pkcs11-tool) before starting keysvc"
            ) from None

    @contextmanager
    def _locked(self) -> Iterator[pkcs11.Session]:
        """Serialises a PKCS#11 call and translates module errors to HsmError."""
        with acquired(_PROCESS_LOCK):  # bounded by the call's deadline (hsm/deadline.py)
            if self._pid != os.getpid():
                self._open()
            elif self._recovering:
                self._recover()
            try:
                yield self._session
            except HsmError:
                raise
            except (p11.KeySizeRange, p11.KeyNotWrappable):
                raise HsmKeyRejected("the key's size is out of range for this mechanism") from None
            except _UNWRAP_ERRORS:
                raise HsmUnwrapFailed("the wrapped key could not be unwrapped") from None
            except _UNAVAILABLE_ERRORS as exc:
                self._schedule_recovery()
                raise HsmUnavailable(f"HSM call failed: {type(exc).__name__}") from None
            except p11.PKCS11Error as exc:
                raise HsmError(f"HSM call refused: {type(exc).__name__}") from None

    def _check_current(self, handle: SecretKeyHandle) -> pkcs11.SecretKey:
        if handle.generation != self.generation:
            raise HsmStaleHandle("key handle predates the module's re-initialisation")
        return handle._key

    # -- the master key --------------------------------------------------------------
    #
    # The one key a token holds for keysvc. Every other key is wrapped under it.

    @property
    def has_master_key(self) -> bool:
        """Whether the token holds a keysvc master key."""
        with self._locked():
            return self._master_key is not None

    def ensure_master_key(self) -> bool:
        """Creates the master key (AES-256, token object) unless the token holds one;
        returns whether it did. Two processes on one host must not call it at once on a
        token without one (they would make two): the caller serialises them."""
        with self._locked() as session:
            if self._master_key is not None:
                return False
            self._master_key = session.generate_key(
                KeyType.AES, 256, label=MASTER_KEY_LABEL, store=True, template=_MASTER_KEY_TEMPLATE)
            return True

    def master_key_check_value(self) -> str:
        """The master key's check value: 6 upper-case hex digits, the first 3 bytes of
        SHA-256 over the RFC 3394 AES key wrap (CKM_AES_KEY_WRAP, deterministic) of an
        all-zero AES-256 key under the master key. The master only wraps and unwraps,
        so the usual KCV (encrypting a zero block) is not available; this one is the
        same for the same key in any HSM and shows nothing of it. It names the key; to
        prove a key, compare master_key_long_check_value.

        Raises HsmConfigurationError when the token holds no master key."""
        return self.master_key_long_check_value()[:MASTER_CHECK_VALUE_DIGITS]

    def master_key_long_check_value(self) -> str:
        """The master key's long check value: 32 upper-case hex digits, the first 16
        bytes of the same SHA-256 (so it starts with master_key_check_value). Finding
        another key with the same long check value takes about 2^128 tries.

        Raises HsmConfigurationError when the token holds no master key."""
        with self._locked():
            self._require_token_keys()
            return self._long_check_value_of(self._master_key)

    def _long_check_value_of(self, master: pkcs11.SecretKey) -> str:
        # Called under the lock.
        zero_key = self._session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: _CHECK_VALUE_KEY, Attribute.TOKEN: False,
            Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
        })
        try:
            wrapped = master.wrap_key(zero_key, mechanism=Mechanism.AES_KEY_WRAP)
        finally:
            zero_key.destroy()
        return hashlib.sha256(wrapped).digest()[:MASTER_LONG_CHECK_VALUE_DIGITS // 2].hex().upper()

    def _require_extractable_master(self) -> None:
        # Called under the lock.
        self._require_token_keys()
        if not self._master_key[Attribute.EXTRACTABLE]:
            raise HsmConfigurationError(
                "this token's master key is not extractable (it was made before enrollment and backup existed), "
                "so it cannot be delivered to another HSM nor backed up: make a new deployment's master key, or "
                "keep this token as the only one")

    def _require_no_master_key(self) -> None:
        # Called under the lock.
        if self._master_key is not None:
            raise HsmConfigurationError("the token already holds a keysvc master key")

    @staticmethod
    def _checked_expected_value(expected_check_value: str) -> str:
        expected = expected_check_value.strip().upper()
        if (len(expected) not in (MASTER_CHECK_VALUE_DIGITS, MASTER_LONG_CHECK_VALUE_DIGITS)
                or any(digit not in "0123456789ABCDEF" for digit in expected)):
            raise ValueError(f"a master key check value is {MASTER_CHECK_VALUE_DIGITS} or "
                             f"{MASTER_LONG_CHECK_VALUE_DIGITS} hex digits")
        return expected

    def _take_master_key(self, master: pkcs11.SecretKey, expected: str) -> str:
        """Keeps a master key just unwrapped into the token if its check value, short or
        long as `expected` is, is `expected`; otherwise (or if checking it fails) destroys
        it, so that no unverified key stays in the token, and raises HsmKeyCheckFailed
        (or what the check raised). Returns the long check value. Called under the lock."""
        try:
            long_check_value = self._long_check_value_of(master)
            found = long_check_value[:len(expected)]
            if found != expected:
                raise HsmKeyCheckFailed(
                    f"the master key received has check value {found}, not {expected}: it was not kept")
        except BaseException:
            master.destroy()
            raise
        self._master_key = master
        return long_check_value

    # -- shared keys -----------------------------------------------------------------
    #
    # The binding key and the import key pair are the same on every HSM of a
    # deployment: made once, in an HSM, and kept wrapped under the master key.

    def make_shared_keys(self) -> WrappedSharedKeys:
        """Generates a binding key (HMAC-SHA256) and an import key pair (RSA-3072) in the
        HSM and returns them wrapped under the master key; nothing is kept or installed."""
        with self._locked() as session:
            self._require_token_keys()
            binding = session.generate_key(
                KeyType.GENERIC_SECRET, 256, store=False,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                          Attribute.SIGN: True, Attribute.VERIFY: False},
            )
            try:
                wrapped_binding = self._master_key.wrap_key(binding, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            finally:
                binding.destroy()
            public, private = session.generate_keypair(
                KeyType.RSA, IMPORT_KEY_BITS, store=False,
                public_template={Attribute.ENCRYPT: True, Attribute.WRAP: True, Attribute.VERIFY: False},
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True, Attribute.UNWRAP: True,
                                  Attribute.DECRYPT: False, Attribute.SIGN: False},
            )
            try:
                return WrappedSharedKeys(
                    wrapped_binding, self._master_key.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD),
                    encode_rsa_public_key(public))
            finally:
                public.destroy()
                private.destroy()

    def install_shared_keys(self, shared: WrappedSharedKeys) -> None:
        """Unwraps the shared keys into non-extractable session objects that bind() and
        the import methods use from now on (again after every re-initialisation).
        Installing the keys already installed does nothing.

        The import public key served from now on (import_public_key_der) is read from
        the unwrapped private key (its modulus and public exponent), never taken from
        `shared`: whoever can alter what the caller keeps cannot make senders wrap
        secrets to a key of their own. `shared.import_public_key` may be empty; if not,
        it must be that key.

        Raises HsmUnwrapFailed when they were not wrapped under this token's master key,
        HsmKeyCheckFailed when `shared.import_public_key` is not the private key's
        public half (nothing is installed)."""
        with self._locked():
            self._require_token_keys()
            if shared == self._shared_keys and self._binding_key is not None:
                return
            previous = (self._binding_key, self._import_private_key) if not self._token_held_shared_keys else ()
            self._unwrap_shared_keys(shared)
            self._shared_keys, self._token_held_shared_keys = shared, False
            for key in previous:
                if key is not None:
                    key.destroy()

    def _unwrap_shared_keys(self, shared: WrappedSharedKeys) -> None:
        # Called under the lock; leaves the keys in use unchanged when it fails.
        binding = self._unwrap_for_use(shared.binding_key)
        try:
            with _general_error_means_bad_wrapping():
                private = self._master_key.unwrap_key(
                    ObjectClass.PRIVATE_KEY, KeyType.RSA, shared.import_private_key,
                    mechanism=Mechanism.AES_KEY_WRAP_PAD, store=False,
                    template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.SIGN: DEFAULT, Attribute.VERIFY: DEFAULT, **_NO_EXTRA_CAPABILITIES,
                              Attribute.UNWRAP: True},
                )
        except BaseException:
            binding.destroy()
            raise
        try:
            public_der = self._public_der_of(private)
            if shared.import_public_key and shared.import_public_key != public_der:
                raise HsmKeyCheckFailed("the import public key given is not the import private key's public half")
        except BaseException:
            binding.destroy()
            private.destroy()
            raise
        self._binding_key, self._import_private_key = binding, private
        self._import_public_der = public_der

    @property
    def installed_shared_keys(self) -> WrappedSharedKeys | None:
        """The shared keys install_shared_keys installed in this process, if any."""
        return self._shared_keys

    @property
    def has_token_held_shared_keys(self) -> bool:
        """Whether the token holds a binding key and import key pair as token objects
        (tokens made before the shared keys moved out of the token)."""
        with self._locked():
            return (self._find_key(ObjectClass.SECRET_KEY, BINDING_KEY_LABEL) is not None
                    and self._find_key(ObjectClass.PRIVATE_KEY, IMPORT_KEY_LABEL) is not None)

    def use_token_held_shared_keys(self) -> None:
        """Uses the token's own binding key and import key pair (an older token, whose
        records are bound with them) instead of installed shared keys. Such a token's
        keys cannot be shared with another HSM. Raises HsmConfigurationError when
        the token holds none."""
        with self._locked():
            self._require_token_keys()
            self._find_token_held_shared_keys()
            if self._binding_key is None or self._import_private_key is None:
                raise HsmConfigurationError("the token holds no binding key and import key pair of its own")
            self._shared_keys, self._token_held_shared_keys = None, True

    def _find_token_held_shared_keys(self) -> None:
        self._binding_key = self._find_key(ObjectClass.SECRET_KEY, BINDING_KEY_LABEL)
        self._import_private_key = self._find_key(ObjectClass.PRIVATE_KEY, IMPORT_KEY_LABEL)
        self._import_public_der = (self._public_der_of(self._import_private_key)
                                   if self._import_private_key is not None else b"")

    def ensure_token_keys(self) -> None:
        """For a token used alone, by one process (tests, tools): creates the master key
        if missing and, unless shared keys are installed, makes and installs new ones
        (kept by this process only). HSMs that share a master key should instead
        install the same shared keys, made once (make_shared_keys)."""
        self.ensure_master_key()
        if self._shared_keys is None and not self._token_held_shared_keys:
            self.install_shared_keys(self.make_shared_keys())

    def _require_token_keys(self) -> None:
        if self._master_key is None:
            raise HsmConfigurationError(
                "the token has no keysvc master key (the first replica's keysvc serve makes one; another "
                "replica's token gets it by keysvc replica enroll or keysvc master-key restore)")

    def _require_shared_keys(self) -> None:
        self._require_token_keys()
        if self._binding_key is None or self._import_private_key is None:
            raise HsmConfigurationError("no shared keys are installed (install_shared_keys)")

    @property
    def import_public_key_der(self) -> bytes:
        """The import key's public half, DER RSAPublicKey (PKCS#1)."""
        if not self._import_public_der:
            raise HsmConfigurationError("no shared keys are installed (install_shared_keys)")
        return self._import_public_der

    # -- enrollment: the master key to another HSM ----------------------------------------
    #
    # The receiving HSM makes an RSA transport key pair whose private half only
    # unwraps and never leaves it; an HSM holding the master key wraps the master to the
    # public half (RSA-OAEP with SHA-1 and MGF1-SHA-1, the only OAEP SoftHSM unwraps);
    # the new HSM unwraps it into a token object. The master is never in plaintext
    # outside an HSM.

    def generate_transport_key(self, label: str) -> bytes:
        """Makes an RSA-3072 transport key pair as token objects labelled `label` (the
        private half: sensitive, not extractable, unwrap only) on a token without a
        master key; returns the public half, DER RSAPublicKey (PKCS#1)."""
        if not label.startswith(TRANSPORT_KEY_LABEL_PREFIX):
            raise HsmConfigurationError(f"a transport key's label starts with {TRANSPORT_KEY_LABEL_PREFIX!r}")
        with self._locked() as session:
            self._require_no_master_key()
            public, _private = session.generate_keypair(
                KeyType.RSA, TRANSPORT_KEY_BITS, label=label, store=True,
                public_template={Attribute.WRAP: True, Attribute.ENCRYPT: False, Attribute.VERIFY: False},
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.UNWRAP: True,
                                  Attribute.DECRYPT: False, Attribute.SIGN: False, Attribute.SIGN_RECOVER: False},
            )
            return encode_rsa_public_key(public)

    def has_transport_key(self, label: str) -> bool:
        with self._locked():
            return self._find_key(ObjectClass.PRIVATE_KEY, label) is not None

    def destroy_transport_key(self, label: str) -> None:
        """Destroys the transport key pair labelled `label` (absent halves are ignored)."""
        with self._locked():
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                key = self._find_key(object_class, label)
                if key is not None:
                    key.destroy()

    def wrap_master_key_for_transport(self, transport_public_key: bytes) -> bytes:
        """The master key wrapped with RSA-OAEP (SHA-1, MGF1-SHA-1) to a transport public
        key (DER RSAPublicKey), imported for this one wrap as a session object.

        Raises HsmConfigurationError when the master key is not extractable."""
        public_attributes = decode_rsa_public_key(transport_public_key)
        with self._locked() as session:
            self._require_extractable_master()
            public = session.create_object({
                **public_attributes, Attribute.TOKEN: False,
                Attribute.WRAP: True, Attribute.ENCRYPT: False, Attribute.VERIFY: False,
            })
            try:
                return public.wrap_key(self._master_key, mechanism=Mechanism.RSA_PKCS_OAEP,
                                       mechanism_param=_OAEP_SHA1)
            finally:
                public.destroy()

    def receive_master_key(self, transport_label: str, wrapped_master_key: bytes, expected_check_value: str) -> str:
        """Unwraps a master key sent to the transport key `transport_label` into the
        token (a token object with a created master's attributes) and returns its long
        check value. `expected_check_value` is the short (6 hex digits) or long (32)
        check value the key must have; pass the long one when whoever sent the wrapped
        key could have searched for a key matching the short one. A key that does not
        have it is destroyed (HsmKeyCheckFailed). Raises ValueError when
        `expected_check_value` is not 6 or 32 hex digits, HsmConfigurationError when the
        token already holds a master key or has no such transport key, HsmUnwrapFailed
        when the data was not wrapped to it."""
        expected = self._checked_expected_value(expected_check_value)
        with self._locked():
            self._require_no_master_key()
            private = self._find_key(ObjectClass.PRIVATE_KEY, transport_label)
            if private is None:
                raise HsmConfigurationError(f"the token has no transport key {transport_label!r}")
            with _general_error_means_bad_wrapping():
                master = private.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, wrapped_master_key, label=MASTER_KEY_LABEL,
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1, store=True,
                    template=_MASTER_KEY_TEMPLATE,
                )
            return self._take_master_key(master, expected)

    # -- backup: the master key under a backup key --------------------------------------
    #
    # The caller brings the backup key's value (e.g. combined from custodians'
    # components); it exists in the HSM only as a session object that wraps or unwraps.

    def _backup_key(self, backup_key: bytes, *, wrap: bool) -> pkcs11.SecretKey:
        # Called under the lock.
        if len(backup_key) != 32:
            raise HsmKeyRejected("a backup key is AES-256: 32 bytes")
        return self._session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: backup_key, Attribute.TOKEN: False,
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.WRAP: wrap, Attribute.UNWRAP: not wrap,
            Attribute.ENCRYPT: False, Attribute.DECRYPT: False, Attribute.SIGN: False, Attribute.VERIFY: False,
        })

    def wrap_master_key_under(self, backup_key: bytes) -> bytes:
        """The master key wrapped (CKM_AES_KEY_WRAP_PAD) under the AES-256 key of value
        `backup_key`, which the HSM holds only for this call. Raises
        HsmConfigurationError when the master key is not extractable."""
        with self._locked():
            self._require_extractable_master()
            key = self._backup_key(backup_key, wrap=True)
            try:
                return key.wrap_key(self._master_key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            finally:
                key.destroy()

    def restore_master_key(self, backup_key: bytes, wrapped_master_key: bytes, expected_check_value: str) -> str:
        """Unwraps a master key wrapped under the AES-256 key `backup_key` into a token
        without one, and returns its long check value; a key whose check value (short or
        long, as `expected_check_value` is) differs is destroyed (HsmKeyCheckFailed).
        Raises ValueError when `expected_check_value` is not 6 or 32 hex digits,
        HsmConfigurationError when the token already holds a master key,
        HsmUnwrapFailed when the backup key is not the one it was wrapped under."""
        expected = self._checked_expected_value(expected_check_value)
        with self._locked():
            self._require_no_master_key()
            key = self._backup_key(backup_key, wrap=False)
            try:
                with _general_error_means_bad_wrapping():
                    master = key.unwrap_key(
                        ObjectClass.SECRET_KEY, KeyType.AES, wrapped_master_key, label=MASTER_KEY_LABEL,
                        mechanism=Mechanism.AES_KEY_WRAP_PAD, store=True, template=_MASTER_KEY_TEMPLATE,
                    )
            finally:
                key.destroy()
            return self._take_master_key(master, expected)

    # -- merchant secret keys ------------------------------------------------------------

    def generate_wrapped_secret(self, length: int) -> bytes:
        """Generates a random secret of `length` bytes and returns it wrapped under
        the master key (CKM_AES_KEY_WRAP_PAD). The plaintext never leaves the HSM."""
        with self._locked() as session:
            self._require_token_keys()
            secret = session.generate_key(
                KeyType.GENERIC_SECRET, length * 8, store=False,
                template={
                    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                    Attribute.SIGN: True, Attribute.VERIFY: True,
                },
            )
            try:
                return self._master_key.wrap_key(secret, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            finally:
                secret.destroy()

    def rewrap_imported_secret(self, oaep_wrapped_secret: bytes, digest: Digest) -> bytes:
        """Unwraps a secret sent under the import key (RSA-OAEP, SHA-1, MGF1-SHA-1)
        inside the HSM and returns it wrapped under the master key instead.

        The secret is for HMAC with `digest`: it is checked to give the same tags
        once re-wrapped, because SoftHSM 2.6.1 zero-pads a key to a multiple of 8
        bytes when wrapping it (harmless up to the hash block size, where HMAC pads
        with zeros anyway; a longer key is hashed first, and its tags would change).

        Raises HsmUnwrapFailed when the data was not wrapped with the import key,
        HsmKeyRejected when the HSM refuses the key for HMAC-`digest` (too short,
        empty), HsmKeyNotPreserved when wrapping would change its tags.
        """
        with self._locked():
            self._require_shared_keys()
            with _general_error_means_bad_wrapping():
                secret = self._import_private_key.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, oaep_wrapped_secret,
                    mechanism=Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None),
                    store=False,
                    template={
                        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                        Attribute.SIGN: True, Attribute.VERIFY: True, **_NO_EXTRA_CAPABILITIES,
                    },
                )
            try:
                wrapped = self._master_key.wrap_key(secret, mechanism=Mechanism.AES_KEY_WRAP_PAD)
                reloaded = self._unwrap_for_use(wrapped)
                try:
                    probe = b"keysvc-wrap-check"
                    same = secret.sign(probe, mechanism=digest.hmac_mechanism) == reloaded.sign(
                        probe, mechanism=digest.hmac_mechanism
                    )
                finally:
                    reloaded.destroy()
            finally:
                secret.destroy()
            if not same:
                raise HsmKeyNotPreserved("wrapping would change this key's HMAC tags")
            return wrapped

    def _unwrap_for_use(self, wrapped_secret: bytes) -> pkcs11.SecretKey:
        with _general_error_means_bad_wrapping():
            return self._master_key.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, wrapped_secret,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                store=False,
                template={
                    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True, Attribute.VERIFY: False, **_NO_EXTRA_CAPABILITIES,
                },
            )

    def load_secret(self, wrapped_secret: bytes) -> SecretKeyHandle:
        """Unwraps a master-key-wrapped secret into a non-extractable session key.

        Release it with release_secret when it is no longer cached.
        Raises HsmUnwrapFailed when the data is damaged or from another master key.
        """
        with self._locked():
            self._require_token_keys()
            return SecretKeyHandle(self._unwrap_for_use(wrapped_secret), self.generation)

    # -- exact secrets ------------------------------------------------------------------
    #
    # CKM_AES_KEY_WRAP_PAD on SoftHSM 2.6.1 gives back a key zero-padded to a multiple of
    # 8 bytes. HMAC does not mind (it pads with zeros itself), but a mechanism that uses
    # the key's bytes as data (C_DigestKey) does. An exact secret is therefore kept in
    # an envelope that preserves its length: the secret under RSA-OAEP with a one-off
    # RSA key pair made in the HSM, whose private half is wrapped under the master key.
    # Only the master key is needed to open it, as for every other stored key.

    def _seal_in_envelope(self, session: pkcs11.Session, secret: pkcs11.SecretKey) -> bytes:
        public, private = session.generate_keypair(
            KeyType.RSA, ENVELOPE_KEY_BITS, store=False,
            public_template={Attribute.WRAP: True, Attribute.ENCRYPT: DEFAULT, Attribute.VERIFY: DEFAULT},
            private_template={
                Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True, Attribute.UNWRAP: True,
                Attribute.DECRYPT: DEFAULT, Attribute.SIGN: DEFAULT,
            },
        )
        try:
            wrapped_secret = public.wrap_key(secret, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1)
            wrapped_private = self._master_key.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        finally:
            public.destroy()
            private.destroy()
        return ENVELOPE_MARKER + len(wrapped_private).to_bytes(2, "big") + wrapped_private + wrapped_secret

    def generate_enveloped_secret(self, length: int) -> bytes:
        """Generates a random secret of exactly `length` bytes in the HSM and returns it
        in an envelope (see above) that load_enveloped_secret opens."""
        with self._locked() as session:
            self._require_token_keys()
            secret = session.generate_key(
                KeyType.GENERIC_SECRET, length * 8, store=False,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True},
            )
            try:
                return self._seal_in_envelope(session, secret)
            finally:
                secret.destroy()

    def envelope_imported_secret(self, oaep_wrapped_secret: bytes) -> bytes:
        """Unwraps a secret sent under the import key (RSA-OAEP, SHA-1) inside the HSM
        and returns it, exactly as sent, in an envelope. Raises HsmUnwrapFailed when the
        data was not wrapped with the import key."""
        with self._locked() as session:
            self._require_shared_keys()
            with _general_error_means_bad_wrapping():
                secret = self._import_private_key.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, oaep_wrapped_secret,
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1, store=False,
                    template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                              Attribute.SIGN: DEFAULT, Attribute.VERIFY: DEFAULT, **_NO_EXTRA_CAPABILITIES},
                )
            try:
                return self._seal_in_envelope(session, secret)
            finally:
                secret.destroy()

    def load_enveloped_secret(self, envelope: bytes) -> SecretKeyHandle:
        """Opens an envelope into a non-extractable session key of the secret's exact
        length. Raises HsmUnwrapFailed when the envelope is damaged or from another
        master key."""
        if len(envelope) < 6 or not envelope.startswith(ENVELOPE_MARKER):
            raise HsmUnwrapFailed("the wrapped key is not an envelope")
        private_length = int.from_bytes(envelope[4:6], "big")
        wrapped_private, wrapped_secret = envelope[6:6 + private_length], envelope[6 + private_length:]
        with self._locked():
            self._require_token_keys()
            with _general_error_means_bad_wrapping():
                private = self._master_key.unwrap_key(
                    ObjectClass.PRIVATE_KEY, KeyType.RSA, wrapped_private,
                    mechanism=Mechanism.AES_KEY_WRAP_PAD, store=False,
                    # UNWRAP after the defaults: this key exists to unwrap the secret.
                    template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.SIGN: DEFAULT, Attribute.VERIFY: DEFAULT, **_NO_EXTRA_CAPABILITIES,
                              Attribute.UNWRAP: True},
                )
            try:
                with _general_error_means_bad_wrapping():
                    secret = private.unwrap_key(
                        ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, wrapped_secret,
                        mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1, store=False,
                        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.SIGN: DEFAULT, Attribute.VERIFY: DEFAULT, **_NO_EXTRA_CAPABILITIES},
                    )
            finally:
                private.destroy()
            return SecretKeyHandle(secret, self.generation)

    def hash_with_secret_many(
        self, handle: SecretKeyHandle, digest: Digest, messages: Iterable[bytes]
    ) -> list[bytes]:
        """Hash(message ‖ secret) of each message, the secret fed to the hash inside the
        HSM (C_DigestKey): for legacy seals that predate HMAC."""
        mechanism = digest.hash_mechanism
        with self._locked() as session:
            key = self._check_current(handle)
            return [session.digest(iter([message, key]), mechanism=mechanism) for message in messages]

    # -- RSA signing keys ---------------------------------------------------------------
    #
    # The private key is generated (or unwrapped) in the HSM and stored wrapped under the
    # master key with CKM_AES_KEY_WRAP_PAD, like every merchant key. Its public half is
    # returned as DER RSAPublicKey (PKCS#1); it is public.

    # A signing key signs and does nothing else: SoftHSM's defaults would also let it
    # decrypt and unwrap with raw RSA.
    _PRIVATE_KEY_FOR_USE = {
        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
        Attribute.VERIFY: DEFAULT, **_NO_EXTRA_CAPABILITIES,
        Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.SIGN_RECOVER: False,
    }

    def generate_wrapped_rsa_key(self, bits: int) -> tuple[bytes, bytes]:
        """Generates an RSA key pair of `bits` in the HSM; returns (the private key
        wrapped under the master key, the public key as DER RSAPublicKey)."""
        with self._locked() as session:
            self._require_token_keys()
            public, private = session.generate_keypair(
                KeyType.RSA, bits, store=False,
                public_template={Attribute.VERIFY: True, Attribute.ENCRYPT: DEFAULT, Attribute.WRAP: DEFAULT},
                private_template={
                    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True, Attribute.SIGN: True,
                    Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.SIGN_RECOVER: False,
                },
            )
            try:
                return (self._master_key.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD),
                        encode_rsa_public_key(public))
            finally:
                public.destroy()
                private.destroy()

    def rewrap_imported_private_key(self, transport_blob: bytes) -> tuple[bytes, bytes]:
        """Unwraps an RSA private key sent for import and returns it wrapped under the
        master key, with its public key (DER RSAPublicKey).

        `transport_blob` is an AES-256 key under the import key with RSA-OAEP (SHA-1),
        one import-key block long, followed by the private key (PKCS#8 DER) wrapped
        under that AES key with AES key wrap with padding (RFC 5649): the plaintext
        key exists only inside the HSM. Raises HsmUnwrapFailed when the blob is not so
        made or holds no RSA private key."""
        block = IMPORT_KEY_BITS // 8
        with self._locked():
            self._require_shared_keys()
            if len(transport_blob) <= block:
                raise HsmUnwrapFailed("the wrapped key is too short")
            with _general_error_means_bad_wrapping():
                transport_key = self._import_private_key.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, transport_blob[:block],
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1, store=False,
                    template={**_NO_EXTRA_CAPABILITIES, Attribute.UNWRAP: True,
                              Attribute.SIGN: DEFAULT, Attribute.VERIFY: DEFAULT},
                )
            try:
                private = transport_key.unwrap_key(
                    ObjectClass.PRIVATE_KEY, KeyType.RSA, transport_blob[block:],
                    mechanism=Mechanism.AES_KEY_WRAP_PAD, store=False,
                    template={**self._PRIVATE_KEY_FOR_USE, Attribute.EXTRACTABLE: True},
                )
            except p11.PKCS11Error:
                # The transport key did unwrap, so the HSM is working: the payload is bad
                # (SoftHSM answers FunctionFailed for a key that is not RSA PKCS#8).
                raise HsmUnwrapFailed("the wrapped data is not an RSA private key in PKCS#8") from None
            finally:
                transport_key.destroy()
            try:
                return (self._master_key.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD),
                        self._public_der_of(private))
            finally:
                private.destroy()

    @staticmethod
    def _public_der_of(private: pkcs11.PrivateKey) -> bytes:
        # Reads the modulus and exponent, which a private key shows even when sensitive.
        return encode_rsa_public_key(private)

    def load_private_key(self, wrapped_private_key: bytes) -> SecretKeyHandle:
        """Unwraps a master-key-wrapped RSA private key into a non-extractable session
        key. Raises HsmUnwrapFailed when the data is damaged or from another master key."""
        with self._locked():
            self._require_token_keys()
            with _general_error_means_bad_wrapping():
                private = self._master_key.unwrap_key(
                    ObjectClass.PRIVATE_KEY, KeyType.RSA, wrapped_private_key,
                    mechanism=Mechanism.AES_KEY_WRAP_PAD, store=False, template=self._PRIVATE_KEY_FOR_USE,
                )
            return SecretKeyHandle(private, self.generation)

    def rsa_sign_digests(self, handle: SecretKeyHandle, padding: RsaPadding, digest: Digest,
                         digests: Iterable[bytes]) -> list[bytes]:
        """RSA signatures of precomputed `digest` hashes, made in the HSM: PKCS#1 v1.5
        over the DigestInfo, or PSS with MGF1-`digest` and a salt as long as the hash."""
        name = digest.name
        if name not in _DIGEST_INFO_PREFIXES:
            raise HsmKeyRejected(f"RSA signatures here use SHA-256, SHA-384 or SHA-512, not {name}")
        if padding is RsaPadding.PKCS1_V15:
            prefix = _DIGEST_INFO_PREFIXES[name]
            mechanism, parameters, values = Mechanism.RSA_PKCS, None, [prefix + value for value in digests]
        else:
            mechanism, values = Mechanism.RSA_PKCS_PSS, list(digests)
            parameters = (digest.hash_mechanism, _MGF1[name], digest.digest_size)
        with self._locked():
            key = self._check_current(handle)
            if self._direct_rsa is None:
                return [key.sign(value, mechanism=mechanism, mechanism_param=parameters) for value in values]
            try:
                return self._direct_rsa.sign_many(
                    self._session.handle, key.handle, int(mechanism),
                    None if parameters is None else tuple(int(part) for part in parameters), values)
            except DirectSignError as error:
                raise self._direct_error(error) from None

    @staticmethod
    def run_queued(work: Callable[[], T]) -> T:
        """work() on the process's thread for long PKCS#11 calls (RSA signatures), which
        runs queued calls back to back (hsm/serial.py); its result or exception here.
        Raises HsmBusy when the call's deadline passes before its turn."""
        return _LONG_CALLS.run(work)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Holds the process's PKCS#11 lock across several calls, e.g. so that a cached
        handle cannot be released by another thread between looking it up and using it."""
        with acquired(_PROCESS_LOCK):
            yield

    def release_secret(self, handle: SecretKeyHandle) -> None:
        """Destroys a session key; a stale handle (its session is gone) is ignored."""
        with self._locked():
            if handle.generation == self.generation:
                handle._key.destroy()

    def hmac(self, handle: SecretKeyHandle, digest: Digest, message: bytes) -> bytes:
        """The HMAC of one message, computed in the HSM.

        Raises HsmKeyRejected when the key is shorter than the digest.
        """
        return self.hmac_many(handle, digest, [message])[0]

    def hmac_many(
        self, handle: SecretKeyHandle, digest: Digest, messages: Iterable[bytes]
    ) -> list[bytes]:
        """The HMACs of many messages under one key, taking the lock once."""
        mechanism = digest.hmac_mechanism
        with self._locked():
            key = self._check_current(handle)
            if self._direct is not None:
                try:
                    return self._direct.sign_many(self._session.handle, key.handle, int(mechanism), messages)
                except DirectSignError as error:
                    raise self._direct_error(error) from None
            return [key.sign(message, mechanism=mechanism) for message in messages]

    def bind(self, data: bytes) -> bytes:
        """HMAC-SHA256 of `data` under the installed binding key (ties records to keys)."""
        with self._locked():
            self._require_shared_keys()
            return self._binding_key.sign(data, mechanism=Mechanism.SHA256_HMAC)

    # -- AES-256-GCM data keys ---------------------------------------------------------
    #
    # A data key is generated in the HSM, leaves it only wrapped under the master key,
    # and is used as a non-extractable session object. Nonces are 96 random bits from
    # the operating system's CSPRNG (NIST SP 800-38D 8.2.2: at most 2^32 encryptions
    # per key with random nonces; callers rotate data keys well before that).

    def generate_wrapped_aes_key(self) -> bytes:
        """Generates an AES-256 key and returns it wrapped under the master key
        (CKM_AES_KEY_WRAP_PAD). The plaintext key never leaves the HSM."""
        with self._locked() as session:
            self._require_token_keys()
            secret = session.generate_key(
                KeyType.AES, 256, store=False,
                template={
                    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                    Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
                    Attribute.WRAP: False, Attribute.UNWRAP: False,
                },
            )
            try:
                return self._master_key.wrap_key(secret, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            finally:
                secret.destroy()

    def load_aes_key(self, wrapped_key: bytes) -> SecretKeyHandle:
        """Unwraps a master-key-wrapped AES key into a non-extractable session key that
        encrypts and decrypts only. Release it with release_secret.

        Raises HsmUnwrapFailed when the data is damaged or from another master key.
        """
        with self._locked():
            self._require_token_keys()
            with _general_error_means_bad_wrapping():
                key = self._master_key.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, wrapped_key,
                    mechanism=Mechanism.AES_KEY_WRAP_PAD,
                    store=False,
                    template={
                        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                        Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
                        Attribute.WRAP: DEFAULT, Attribute.UNWRAP: DEFAULT,
                        Attribute.SIGN: DEFAULT, Attribute.VERIFY: DEFAULT,
                    },
                )
            return SecretKeyHandle(key, self.generation)

    def encrypt_gcm_many(
        self, handle: SecretKeyHandle, items: Iterable[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        """AES-GCM (128-bit tag) of each (plaintext, associated data) under one key,
        taking the lock once. Returns (nonce, ciphertext with its tag) per item."""
        items = list(items)
        nonces = [os.urandom(GCM_NONCE_BYTES) for _ in items]
        with self._locked():
            key = self._check_current(handle)
            return [(nonce, self._gcm_seal(key, nonce, plaintext, aad))
                    for nonce, (plaintext, aad) in zip(nonces, items)]

    def decrypt_gcm_many(
        self, handle: SecretKeyHandle, items: Iterable[tuple[bytes, bytes, bytes]]
    ) -> list[bytes | None]:
        """Decrypts each (nonce, ciphertext with tag, associated data) under one key,
        taking the lock once. An item that fails authentication (wrong key, data or
        associated data) gives None; the others are unaffected."""
        with self._locked():
            key = self._check_current(handle)
            return [self._gcm_open(key, nonce, ciphertext, aad) for nonce, ciphertext, aad in items]

    def reencrypt_gcm_many(
        self,
        old_handle: SecretKeyHandle,
        new_handle: SecretKeyHandle,
        items: Iterable[tuple[bytes, bytes, bytes, bytes]],
    ) -> list[tuple[bytes, bytes] | None]:
        """Moves each (nonce, ciphertext, old associated data, new associated data) from
        the old key to the new one in one locked call: each plaintext exists outside the
        HSM only between its decryption and its encryption. An item that fails
        authentication under the old key gives None."""
        items = list(items)
        nonces = [os.urandom(GCM_NONCE_BYTES) for _ in items]
        with self._locked():
            old_key = self._check_current(old_handle)
            new_key = self._check_current(new_handle)
            moved: list[tuple[bytes, bytes] | None] = []
            for new_nonce, (nonce, ciphertext, old_aad, new_aad) in zip(nonces, items):
                plaintext = self._gcm_open(old_key, nonce, ciphertext, old_aad)
                moved.append(None if plaintext is None
                             else (new_nonce, self._gcm_seal(new_key, new_nonce, plaintext, new_aad)))
                del plaintext
            return moved

    def _gcm_seal(self, key: pkcs11.SecretKey, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        # Called under the lock.
        if self._direct_cipher is None:
            return key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                               mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS))
        try:
            return self._direct_cipher.gcm_encrypt(self._session.handle, key.handle, nonce, plaintext, aad,
                                                   GCM_TAG_BITS)
        except DirectSignError as error:
            raise self._direct_error(error) from None

    def _gcm_open(self, key: pkcs11.SecretKey, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
        # Called under the lock. SoftHSM answers a failed tag check with
        # CKR_GENERAL_ERROR, as it would a broken session: a probe with the same key
        # tells them apart, so that a real HSM failure still reads as unavailable.
        if len(nonce) != GCM_NONCE_BYTES or len(ciphertext) < GCM_TAG_BITS // 8:
            return None
        try:
            if self._direct_cipher is None:
                return key.decrypt(ciphertext, mechanism=Mechanism.AES_GCM,
                                   mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS))
            return self._direct_cipher.gcm_decrypt(self._session.handle, key.handle, nonce, ciphertext, aad,
                                                   GCM_TAG_BITS)
        except DirectSignError as error:
            if error.return_value not in _GCM_TAG_FAILURES:
                raise self._direct_error(error) from None
        except (p11.GeneralError, p11.EncryptedDataInvalid, p11.EncryptedDataLenRange):
            pass
        self._gcm_seal(key, bytes(GCM_NONCE_BYTES), b"", b"keysvc probe")  # raises if the HSM is failing
        return None
