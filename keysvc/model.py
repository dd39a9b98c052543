"""The values keysvc's keys are made of, shared by the domain and the store."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime

from hsm import Digest


class KeyAlgorithm(enum.Enum):
    """A closed set of algorithms; a key's algorithm never changes."""

    HMAC_SHA1 = "HMAC_SHA1"
    HMAC_SHA256 = "HMAC_SHA256"
    HMAC_SHA384 = "HMAC_SHA384"
    HMAC_SHA512 = "HMAC_SHA512"
    # SHA-256(message ‖ secret): the legacy SIPS seal, from before SIPS used HMAC.
    SHA256_DATA_SECRET = "SHA256_DATA_SECRET"
    # RSA signing key pairs.
    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"

    @property
    def digest(self) -> Digest:
        """The hash of a sealing algorithm (signing algorithms choose theirs per call)."""
        return _DIGESTS[self]

    @property
    def is_hmac(self) -> bool:
        return self.value.startswith("HMAC")

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("RSA")

    @property
    def rsa_bits(self) -> int:
        return int(self.value.removeprefix("RSA_"))

    @property
    def platform_name(self) -> str:
        """The name the payment platforms give the algorithm (SIPS `sealAlgorithm`)."""
        return _PLATFORM_NAMES[self]


_DIGESTS = {
    KeyAlgorithm.HMAC_SHA1: Digest.SHA1,
    KeyAlgorithm.HMAC_SHA256: Digest.SHA256,
    KeyAlgorithm.HMAC_SHA384: Digest.SHA384,
    KeyAlgorithm.HMAC_SHA512: Digest.SHA512,
    KeyAlgorithm.SHA256_DATA_SECRET: Digest.SHA256,
}
_PLATFORM_NAMES = {
    KeyAlgorithm.HMAC_SHA1: "HMAC-SHA1",
    KeyAlgorithm.HMAC_SHA256: "HMAC-SHA-256",
    KeyAlgorithm.HMAC_SHA384: "HMAC-SHA-384",
    KeyAlgorithm.HMAC_SHA512: "HMAC-SHA-512",
    KeyAlgorithm.SHA256_DATA_SECRET: "SHA-256",
    KeyAlgorithm.RSA_2048: "RSA-2048",
    KeyAlgorithm.RSA_3072: "RSA-3072",
    KeyAlgorithm.RSA_4096: "RSA-4096",
}
RSA_ALGORITHMS = (KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072, KeyAlgorithm.RSA_4096)


class KeyPlatform(enum.Enum):
    """The payment platform a key's seals are for: it decides which seal schemes and
    algorithms the key serves (see PLATFORM_ALGORITHMS)."""

    GENERIC = "GENERIC"  # raw HMAC over the caller's bytes
    SIPS = "SIPS"  # Worldline SIPS 2.0
    MONETICO = "MONETICO"  # Monetico / CM-CIC (formerly CyberMUT P@iement)


PLATFORM_ALGORITHMS = {
    KeyPlatform.GENERIC: (
        KeyAlgorithm.HMAC_SHA1, KeyAlgorithm.HMAC_SHA256, KeyAlgorithm.HMAC_SHA384, KeyAlgorithm.HMAC_SHA512,
    ),
    KeyPlatform.SIPS: (KeyAlgorithm.HMAC_SHA256, KeyAlgorithm.SHA256_DATA_SECRET),
    KeyPlatform.MONETICO: (KeyAlgorithm.HMAC_SHA1,),
}


class Charset(enum.Enum):
    """How the text a platform seal covers is turned into bytes."""

    UTF_8 = "UTF-8"
    ISO_8859_1 = "ISO-8859-1"

    @property
    def codec(self) -> str:
        return "utf-8" if self is Charset.UTF_8 else "iso-8859-1"


class KeyPurpose(enum.Enum):
    SEAL = "SEAL"  # message seals (MACs): HMAC and the platforms' formats
    SIGN = "SIGN"  # RSA signatures


class KeyVersionState(enum.Enum):
    ENABLED = "ENABLED"
    VERIFY_ONLY = "VERIFY_ONLY"
    DISABLED = "DISABLED"
    DESTROYED = "DESTROYED"

    @property
    def can_seal(self) -> bool:
        return self is KeyVersionState.ENABLED

    @property
    def can_verify(self) -> bool:
        return self in (KeyVersionState.ENABLED, KeyVersionState.VERIFY_ONLY)


class KeyOrigin(enum.Enum):
    GENERATED = "GENERATED"
    IMPORTED = "IMPORTED"


@dataclass(frozen=True)
class KeyVersion:
    """One version of a key. The wrapped key and its binding tag stay out of reprs."""

    version: int
    state: KeyVersionState
    origin: KeyOrigin
    check_value: str
    created_at: datetime
    # The key material wrapped under the HSM master key; None once destroyed.
    wrapped_key: bytes | None = field(default=None, repr=False)
    # Label of the HSM key that wrapped it.
    wrapping_key_label: str = ""
    # HMAC under the HSM binding key over the key id, version, algorithm and wrapped key.
    binding_tag: bytes = field(default=b"", repr=False)
    destroyed_at: datetime | None = None
    # RSA versions: the public key, DER SubjectPublicKeyInfo; kept once destroyed.
    public_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Key:
    """A merchant key and its versions (newest first)."""

    key_id: str
    merchant_id: str
    name: str
    purpose: KeyPurpose
    algorithm: KeyAlgorithm
    primary_version: int
    created_at: datetime
    updated_at: datetime
    versions: tuple[KeyVersion, ...] = ()
    # Bumped by every change; lets caches and writers detect concurrent changes.
    revision: int = 0
    # The profile: which platform's seals the key makes, over text in which charset.
    platform: KeyPlatform = KeyPlatform.GENERIC
    charset: Charset = Charset.UTF_8
    # A rotation's new version while it waits to become primary: it is ENABLED (it
    # verifies) but seals only once every live replica has loaded it. None when none waits.
    pending_primary: int | None = None

    def find_version(self, version: int) -> KeyVersion | None:
        for key_version in self.versions:
            if key_version.version == version:
                return key_version
        return None

    def with_version(self, new: KeyVersion) -> "Key":
        """A copy with `new` replacing the version of the same number, or added."""
        others = [v for v in self.versions if v.version != new.version]
        versions = sorted([*others, new], key=lambda v: v.version, reverse=True)
        return replace(self, versions=tuple(versions))


def make_key_id(merchant_id: str, name: str) -> str:
    return f"{merchant_id}/{name}"
