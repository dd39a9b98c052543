"""Message seals: tags computed in the HSM with a key's primary (or named) version.

A scheme (keysvc.seal_formats) first turns the request into the exact bytes that are
sealed: the message as given for HMAC, or the string a payment platform seals. The
key's profile must serve that scheme's platform, and a SIPS message that names its
keyVersion is sealed or verified with that version.

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
from keysvc.model import Key, KeyAlgorithm, KeyPurpose, KeyVersion
from keysvc.seal_formats import RECEIPT_GENUINE, RECEIPT_NOT_GENUINE, SealedText, SealScheme, build

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
KNOWN_ALGORITHM_NAMES = frozenset(algorithm.platform_name for algorithm in KeyAlgorithm)
DEFAULT_MAX_BATCH_ITEMS = 1000
# bytes.fromhex alone would also take spaces.
_HEX_DIGITS = re.compile(r"(?:[0-9a-fA-F]{2})*")


class SealEncoding(enum.Enum):
    HEX = "HEX"
    BASE64 = "BASE64"


# The longest tag is HMAC-SHA512's 64 bytes.
_MAX_SEAL_CHARACTERS = {SealEncoding.HEX: 128, SealEncoding.BASE64: 88}


@dataclass(frozen=True)
class SealRequest:
    key_id: str
    message: bytes = field(default=b"", repr=False)
    scheme: SealScheme = SealScheme.HMAC
    encoding: SealEncoding = SealEncoding.HEX
    # 0: the primary version (or the one a SIPS message names).
    version: int = 0
    # Form fields, in order, for the schemes that build the sealed string from them.
    fields: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # SIPS POST: a JSON object to build Data from (nested objects, lists of scalars).
    fields_json: str = field(default="", repr=False)
    # SIPS POST: Data is posted base64-encoded (Encode=base64).
    encode_base64: bool = False


@dataclass(frozen=True)
class VerifyRequest:
    key_id: str
    message: bytes = field(default=b"", repr=False)
    seal: str = field(default="", repr=False)
    scheme: SealScheme = SealScheme.HMAC
    encoding: SealEncoding = SealEncoding.HEX
    # 0: the version a SIPS message names, else every ENABLED and VERIFY_ONLY
    # version, newest first.
    version: int = 0
    fields: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    fields_json: str = field(default="", repr=False)
    encode_base64: bool = False


@dataclass(frozen=True)
class Seal:
    seal: str
    key_id: str
    version: int
    # SIPS POST built from fields: the Data to post with the seal.
    data: str = field(default="", repr=False)
    # The algorithm's name as the platform spells it, to post with the seal (SIPS
    # SealAlgorithm): "HMAC-SHA-256", "SHA-256", "HMAC-SHA1"...
    algorithm: str = ""


@dataclass(frozen=True)
class Verification:
    valid: bool
    key_id: str
    # The version that matched; 0 when none did.
    version: int
    # Monetico / CM-CIC notifications: the body to answer the bank with.
    receipt: str = ""


@dataclass(frozen=True)
class Explanation:
    """What a seal would cover and with which key version: never the key or the seal."""

    key_id: str
    version: int
    scheme: SealScheme
    algorithm: str
    charset: str
    sealed_data: bytes = field(repr=False)


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


_UNSEEN = object()


def _memoised(cache: dict, name, compute):
    """compute() once per name: its result, or the KeysvcError it raised, again."""
    found = cache.get(name, _UNSEEN)  # one lookup per item of a batch: this runs for each
    if found is _UNSEEN:
        try:
            found = compute()
        except KeysvcError as error:
            found = error
        cache[name] = found
    if isinstance(found, KeysvcError):
        raise found
    return found


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

    def _sealing_key(self, key_id: str, scheme: SealScheme) -> Key:
        parse_key_id(key_id)
        key = self._ring.key(key_id)
        if key.purpose is not KeyPurpose.SEAL:
            raise FailedPrecondition(f"key {key_id!r} is a {key.purpose.value} key, not a sealing key")
        if key.platform is not scheme.platform:
            raise InvalidArgument(
                "scheme", f"key {key_id!r} is a {key.platform.value} key and cannot make {scheme.value} seals"
            )
        return key

    def _oversized_message(self) -> InvalidArgument:
        return InvalidArgument("message", f"is longer than {self.max_message_bytes} bytes")

    def _check_size(self, request) -> None:
        given = len(request.message) + len(request.fields_json)
        if request.fields:
            given += sum(len(name) + len(value) for name, value in request.fields)
        if given > self.max_message_bytes:
            raise self._oversized_message()

    def _check_batch(self, items: list) -> None:
        if len(items) > self.max_batch_items:
            raise InvalidArgument("requests", f"holds more than {self.max_batch_items} items; split the batch")

    def _sealed_text(self, request, key: Key) -> SealedText:
        """The bytes `request` seals under `key`'s profile; checks what the message says
        about its seal against the key."""
        if request.scheme is not SealScheme.HMAC and request.encoding is not SealEncoding.HEX:
            raise InvalidArgument("encoding", f"{request.scheme.value} seals are hex")
        sealed = build(request.scheme, request, key.charset)
        if sealed.seal_algorithm is not None and sealed.seal_algorithm != (algorithm := key.algorithm.platform_name):
            # Quoted only when it is an algorithm name: it is message data.
            asked = repr(sealed.seal_algorithm) if sealed.seal_algorithm in KNOWN_ALGORITHM_NAMES else "another"
            raise InvalidArgument(
                "sealAlgorithm", f"the message asks for {asked} algorithm but key {key.key_id!r} is {algorithm!r}"
            )
        return sealed

    @staticmethod
    def _version_asked(request, sealed: SealedText) -> int:
        """The version the caller or the message names (0: none)."""
        if sealed.key_version is not None and request.version and sealed.key_version != request.version:
            raise InvalidArgument(
                "version", f"is {request.version} but the message names keyVersion {sealed.key_version}"
            )
        return request.version or sealed.key_version or 0

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

    def _prepare_seal(self, request: SealRequest, resolved: dict | None = None) -> tuple[Key, KeyVersion, SealedText]:
        """The key, version and sealed bytes of one request. `resolved` memoises key and
        version lookups across the items of a batch, which mostly share a key."""
        self._check_size(request)
        if resolved is None:
            key = self._sealing_key(request.key_id, request.scheme)
        else:
            key = _memoised(resolved, (request.key_id, request.scheme),
                            lambda: self._sealing_key(request.key_id, request.scheme))
        sealed = self._sealed_text(request, key)
        if len(sealed.data) > self.max_message_bytes:
            raise self._oversized_message()
        version = self._version_asked(request, sealed)
        if resolved is None:
            key, found = self._ring.with_fresh_key(key, lambda k: self._sealing_version(k, version))
            return key, found, sealed
        return (*_memoised(resolved, (request.key_id, version),
                           lambda: self._ring.with_fresh_key(key, lambda k: self._sealing_version(k, version))), sealed)

    # -- sealing ----------------------------------------------------------------------

    def compute_seal(self, request: SealRequest, deadline: float | None = None) -> Seal:
        """The seal of one request: compute_seals' answer for it, raised when an error
        (without the batch's bookkeeping: this is the unary Seal's path)."""
        key, version, sealed = self._prepare_seal(request)
        _check_deadline(deadline)
        tag = self._ring.tags(key, version, [sealed.data])[0]
        return Seal(encode_tag(tag, request.encoding), key.key_id, version.version, sealed.built_data,
                    key.algorithm.platform_name)

    def compute_seals(self, requests: list[SealRequest], deadline: float | None = None) -> list[Seal | KeysvcError]:
        """One Seal or one KeysvcError per request, in order."""
        self._check_batch(requests)
        outcomes: list[Seal | KeysvcError | None] = [None] * len(requests)
        # Items sealed by the same key version go to the HSM together.
        groups: dict[tuple[str, int], tuple[Key, KeyVersion, list[tuple[int, SealedText]]]] = {}
        resolved: dict = {}
        for index, request in enumerate(requests):
            try:
                key, version, sealed = self._prepare_seal(request, resolved)
            except KeysvcError as error:
                outcomes[index] = error
                continue
            groups.setdefault((key.key_id, version.version), (key, version, []))[2].append((index, sealed))
        for key, version, items in groups.values():
            _check_deadline(deadline)  # fails the whole call: the caller has given up on it
            try:
                tags = self._ring.tags(key, version, (sealed.data for _, sealed in items))
            except KeysvcError as error:
                for index, _sealed in items:
                    outcomes[index] = error
                continue
            algorithm = key.algorithm.platform_name
            for (index, sealed), tag in zip(items, tags):
                outcomes[index] = Seal(
                    encode_tag(tag, requests[index].encoding), key.key_id, version.version, sealed.built_data,
                    algorithm,
                )
        return outcomes

    def explain(self, request: SealRequest) -> Explanation:
        """What compute_seal would seal, with which version, algorithm and charset."""
        key, version, sealed = self._prepare_seal(request)
        return Explanation(
            key_id=key.key_id, version=version.version, scheme=request.scheme,
            algorithm=key.algorithm.platform_name, charset=key.charset.value, sealed_data=sealed.data,
        )

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

    def _matching_version(self, key: Key, candidates: list[KeyVersion], tag: bytes, data: bytes) -> int:
        for candidate in candidates:
            expected = self._ring.tags(key, candidate, [data])[0]
            if hmac.compare_digest(expected, tag):
                return candidate.version
        return 0

    def _verify_one(self, request: VerifyRequest) -> Verification:
        self._check_size(request)
        tag = decode_tag(request.seal, request.encoding)
        key = self._sealing_key(request.key_id, request.scheme)
        sealed = self._sealed_text(request, key)
        if len(sealed.data) > self.max_message_bytes:
            raise self._oversized_message()
        version = self._version_asked(request, sealed)
        key, candidates = self._ring.with_fresh_key(key, lambda k: self._candidates(k, version))
        matched = self._matching_version(key, candidates, tag, sealed.data)
        if not matched:
            # Perhaps another worker rotated or re-enabled a version this cache has
            # not seen yet: check the revision now rather than answer from old data.
            fresh = self._ring.refresh(key.key_id)
            if fresh is not None:
                key = fresh
                matched = self._matching_version(key, self._candidates(key, version), tag, sealed.data)
        receipt = ""
        if request.scheme.answers_with_receipt:
            receipt = RECEIPT_GENUINE if matched else RECEIPT_NOT_GENUINE
        return Verification(valid=bool(matched), key_id=key.key_id, version=matched, receipt=receipt)
