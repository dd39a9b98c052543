"""Message seals: HMACs computed in the HSM with a key's primary (or named) version.

Verification recomputes the tag in the HSM and compares in constant time here
(SoftHSM's own C_Verify compares with memcmp). A wrong seal is an answer
(`valid=False`), not an error. Batches answer item by item: one bad item fails
alone, and items sharing a key version take the HSM lock once together.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import re
import time
from dataclasses import dataclass, field

from keysvc.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, KeysvcError, NotFound
from keysvc.keyring import KeyRing
from keysvc.keys import parse_key_id
from keysvc.model import Key, KeyPurpose, KeyVersion

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_MAX_BATCH_ITEMS = 1000
# bytes.fromhex alone would also take spaces.
_HEX_DIGITS = re.compile(r"(?:[0-9a-fA-F]{2})*")


class SealScheme(enum.Enum):
    """How a message becomes the bytes that are sealed. More schemes come with the
    payment formats; each is a canonicalisation in front of the key's HMAC."""

    HMAC = "HMAC"


class SealEncoding(enum.Enum):
    HEX = "HEX"
    BASE64 = "BASE64"


# The longest tag is HMAC-SHA512's 64 bytes.
_MAX_SEAL_CHARACTERS = {SealEncoding.HEX: 128, SealEncoding.BASE64: 88}


@dataclass(frozen=True)
class SealRequest:
    key_id: str
    message: bytes = field(repr=False)
    scheme: SealScheme = SealScheme.HMAC
    encoding: SealEncoding = SealEncoding.HEX
    # 0: the primary version.
    version: int = 0


@dataclass(frozen=True)
class VerifyRequest:
    key_id: str
    message: bytes = field(repr=False)
    seal: str = field(repr=False)
    scheme: SealScheme = SealScheme.HMAC
    encoding: SealEncoding = SealEncoding.HEX
    # 0: every ENABLED and VERIFY_ONLY version, newest first.
    version: int = 0


@dataclass(frozen=True)
class Seal:
    seal: str
    key_id: str
    version: int


@dataclass(frozen=True)
class Verification:
    valid: bool
    key_id: str
    # The version that matched; 0 when none did.
    version: int


def encode_tag(tag: bytes, encoding: SealEncoding) -> str:
    if encoding is SealEncoding.BASE64:
        return base64.b64encode(tag).decode()
    return tag.hex()


def decode_tag(seal: str, encoding: SealEncoding) -> bytes:
    """Raises InvalidArgument naming `seal` when it is not text in `encoding` or is
    longer than the longest tag (SHA-512's) can be."""
    if len(seal) > _MAX_SEAL_CHARACTERS[encoding]:
        raise InvalidArgument("seal", f"is longer than any seal ({_MAX_SEAL_CHARACTERS[encoding]} characters)")
    try:
        if encoding is SealEncoding.BASE64:
            return base64.b64decode(seal.encode("ascii"), validate=True)
        if not _HEX_DIGITS.fullmatch(seal):
            raise ValueError("not hex")
        return bytes.fromhex(seal)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise InvalidArgument("seal", f"is not {encoding.value.lower()} text") from None


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the deadline passed before the work was done")


class Sealer:
    """The SealService operations. Thread-safe."""

    def __init__(
        self,
        ring: KeyRing,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
    ) -> None:
        self._ring = ring
        self.max_message_bytes = max_message_bytes
        self.max_batch_items = max_batch_items

    # -- shared checks ------------------------------------------------------------------

    def _sealing_key(self, key_id: str) -> Key:
        parse_key_id(key_id)
        key = self._ring.key(key_id)
        if key.purpose is not KeyPurpose.SEAL:
            raise FailedPrecondition(f"key {key_id!r} is a {key.purpose.value} key, not a sealing key")
        return key

    def _oversized_message(self) -> InvalidArgument:
        return InvalidArgument("message", f"is longer than {self.max_message_bytes} bytes")

    def _check_message(self, message: bytes) -> bytes:
        if len(message) > self.max_message_bytes:
            raise self._oversized_message()
        return message

    def _check_batch(self, items: list) -> None:
        if len(items) > self.max_batch_items:
            raise InvalidArgument("requests", f"holds more than {self.max_batch_items} items; split the batch")

    def _sealing_version(self, key: Key, version: int) -> KeyVersion:
        number = version or key.primary_version
        found = key.find_version(number)
        if found is None:
            raise NotFound(f"key {key.key_id!r} has no version {number}")
        if not found.state.can_seal:
            raise FailedPrecondition(
                f"version {number} of key {key.key_id!r} is {found.state.value} and cannot seal"
            )
        return found

    def _with_fresh_key(self, key: Key, choose):
        """Applies `choose` to the key; when it names a version this cache has not seen
        or holds in a state that refuses, re-reads the key once (another worker may just
        have added or re-enabled it)."""
        try:
            return key, choose(key)
        except (NotFound, FailedPrecondition):
            fresh = self._ring.refresh(key.key_id)
            if fresh is None:
                raise
            return fresh, choose(fresh)

    def _resolve_sealing_version(self, key_id: str, version: int) -> tuple[Key, KeyVersion] | KeysvcError:
        try:
            key = self._sealing_key(key_id)
            return self._with_fresh_key(key, lambda k: self._sealing_version(k, version))
        except KeysvcError as error:
            return error

    # -- sealing ----------------------------------------------------------------------

    def compute_seal(self, request: SealRequest, deadline: float | None = None) -> Seal:
        outcome = self.compute_seals([request], deadline)[0]
        if isinstance(outcome, KeysvcError):
            raise outcome
        return outcome

    def compute_seals(self, requests: list[SealRequest], deadline: float | None = None) -> list[Seal | KeysvcError]:
        """One Seal or one KeysvcError per request, in order."""
        self._check_batch(requests)
        outcomes: list[Seal | KeysvcError | None] = [None] * len(requests)
        # Items sealed by the same key version go to the HSM together.
        groups: dict[tuple[str, int], tuple[Key, KeyVersion, list[int]]] = {}
        # Items of a batch mostly share a key: resolve each (key id, version) asked for once.
        resolved: dict[tuple[str, int], tuple[Key, KeyVersion] | KeysvcError] = {}
        for index, request in enumerate(requests):
            if len(request.message) > self.max_message_bytes:
                outcomes[index] = self._oversized_message()
                continue
            asked = (request.key_id, request.version)
            choice = resolved.get(asked)
            if choice is None:
                choice = resolved[asked] = self._resolve_sealing_version(request.key_id, request.version)
            if isinstance(choice, KeysvcError):
                outcomes[index] = choice
                continue
            key, version = choice
            groups.setdefault((key.key_id, version.version), (key, version, []))[2].append(index)
        for key, version, indexes in groups.values():
            _check_deadline(deadline)  # fails the whole call: the caller has given up on it
            try:
                tags = self._ring.tags(key, version, (requests[i].message for i in indexes))
            except KeysvcError as error:
                for index in indexes:
                    outcomes[index] = error
                continue
            for index, tag in zip(indexes, tags):
                outcomes[index] = Seal(encode_tag(tag, requests[index].encoding), key.key_id, version.version)
        return outcomes

    # -- verification -------------------------------------------------------------------

    def verify_seal(self, request: VerifyRequest, deadline: float | None = None) -> Verification:
        outcome = self.verify_seals([request], deadline)[0]
        if isinstance(outcome, KeysvcError):
            raise outcome
        return outcome

    def verify_seals(
        self, requests: list[VerifyRequest], deadline: float | None = None
    ) -> list[Verification | KeysvcError]:
        """One Verification or one KeysvcError per request, in order."""
        self._check_batch(requests)
        outcomes: list[Verification | KeysvcError] = []
        for request in requests:
            _check_deadline(deadline)  # fails the whole call: the caller has given up on it
            try:
                outcomes.append(self._verify_one(request))
            except KeysvcError as error:
                outcomes.append(error)
        return outcomes

    def _candidates(self, key: Key, version: int) -> list[KeyVersion]:
        if version:
            found = key.find_version(version)
            if found is None:
                raise NotFound(f"key {key.key_id!r} has no version {version}")
            if not found.state.can_verify:
                raise FailedPrecondition(
                    f"version {version} of key {key.key_id!r} is {found.state.value} and cannot verify"
                )
            return [found]
        return [v for v in key.versions if v.state.can_verify]  # versions are newest first

    def _matching_version(self, key: Key, candidates: list[KeyVersion], tag: bytes, message: bytes) -> int:
        for candidate in candidates:
            expected = self._ring.tags(key, candidate, [message])[0]
            if hmac.compare_digest(expected, tag):
                return candidate.version
        return 0

    def _verify_one(self, request: VerifyRequest) -> Verification:
        self._check_message(request.message)
        tag = decode_tag(request.seal, request.encoding)
        key = self._sealing_key(request.key_id)
        key, candidates = self._with_fresh_key(key, lambda k: self._candidates(k, request.version))
        matched = self._matching_version(key, candidates, tag, request.message)
        if not matched:
            # Perhaps another worker rotated or re-enabled a version this cache has
            # not seen yet: check the revision now rather than answer from old data.
            fresh = self._ring.refresh(key.key_id)
            if fresh is not None:
                key = fresh
                matched = self._matching_version(key, self._candidates(key, request.version), tag, request.message)
        return Verification(valid=bool(matched), key_id=key.key_id, version=matched)
