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

    @property
    def digest(self) -> Digest:
        return _DIGESTS[self]


_DIGESTS = {
    KeyAlgorithm.HMAC_SHA1: Digest.SHA1,
    KeyAlgorithm.HMAC_SHA256: Digest.SHA256,
    KeyAlgorithm.HMAC_SHA384: Digest.SHA384,
    KeyAlgorithm.HMAC_SHA512: Digest.SHA512,
}


class KeyPurpose(enum.Enum):
    SEAL = "SEAL"


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
