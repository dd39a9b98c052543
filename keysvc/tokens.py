"""Card tokenization: PANs in, tokens out; only the vault keeps the PAN, encrypted.

- A token is random, never an encryption of its PAN: no key turns a token back into
  a PAN without the vault row. FORMAT_PRESERVING tokens keep the PAN's length and
  last 4 digits (and its BIN6 on request, when at least 6 random digits remain) and
  are never Luhn-valid, so no token passes as a card and none equals its PAN.
  OPAQUE tokens are `tok_` + 22 base62 characters (131 random bits).
- Deterministic by default: a PAN tokenized twice in a domain (with the same format
  and BIN option) gives the same token, found through a keyed fingerprint, an
  HMAC-SHA256 computed in the HSM (PCI DSS 3.5.1.1). Each domain has its own
  fingerprint key, so fingerprints of one card in two domains cannot be linked and
  shredding a domain takes its fingerprints' meaning with it.
- The PAN is encrypted with AES-256-GCM under the domain's current data key, with
  associated data binding the domain, the token and the key version: a ciphertext
  moved to another row does not decrypt. Data keys are generated in the HSM, stored
  wrapped under the master key with a binding tag (like merchant keys), versioned,
  rotated, and re-wrapped row by row; shredding a domain erases its keys.

PANs never appear in a repr, a log line, an exception or an error message: errors
name the item (`pans[3]`), never its digits.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import os
import re
import string
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator

import hsm
from keysvc.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    KeysvcError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from keysvc.store.tokens import DataKeyRecord, TokenDomainRecord, TokenRecord, TokenStore

DEFAULT_MAX_BATCH_ITEMS = 1000
# Longest TTL accepted at tokenize time.
MAX_TTL = timedelta(days=3650)
# Attempts at a token that no other row of the domain holds, before giving up.
TOKEN_ATTEMPTS = 10
OPAQUE_PREFIX = "tok_"
OPAQUE_RANDOM_CHARACTERS = 22
_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
_DOMAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
_TOKEN = re.compile(r"[A-Za-z0-9_]{1,32}")
_FINGERPRINT_PREFIX = b"keysvc-pan-fingerprint-v1:"
FINGERPRINT_KEY_BYTES = 32


class TokenFormat(enum.Enum):
    FORMAT_PRESERVING = "FORMAT_PRESERVING"
    OPAQUE = "OPAQUE"


class CardBrand(enum.Enum):
    VISA = "VISA"
    MASTERCARD = "MASTERCARD"
    AMEX = "AMEX"
    DISCOVER = "DISCOVER"
    JCB = "JCB"
    DINERS_CLUB = "DINERS_CLUB"
    UNIONPAY = "UNIONPAY"
    MAESTRO = "MAESTRO"
    OTHER = "OTHER"


# (first digits, lowest, highest) over the leading digits, most specific first.
_BRAND_RANGES: tuple[tuple[int, int, int, CardBrand], ...] = (
    (4, 2221, 2720, CardBrand.MASTERCARD),
    (2, 51, 55, CardBrand.MASTERCARD),
    (2, 34, 34, CardBrand.AMEX),
    (2, 37, 37, CardBrand.AMEX),
    (4, 6011, 6011, CardBrand.DISCOVER),
    (3, 644, 649, CardBrand.DISCOVER),
    (2, 65, 65, CardBrand.DISCOVER),
    (4, 3528, 3589, CardBrand.JCB),
    (3, 300, 305, CardBrand.DINERS_CLUB),
    (2, 36, 36, CardBrand.DINERS_CLUB),
    (2, 38, 39, CardBrand.DINERS_CLUB),
    (2, 62, 62, CardBrand.UNIONPAY),
    (2, 50, 50, CardBrand.MAESTRO),
    (2, 56, 58, CardBrand.MAESTRO),
    (2, 67, 67, CardBrand.MAESTRO),
    (1, 4, 4, CardBrand.VISA),
)


# Each digit byte mapped to the byte of its Luhn-doubled value's digit sum.
_LUHN_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_valid(digits: str) -> bool:
    """Whether an ASCII digit string passes the Luhn check (ISO/IEC 7812-1 annex B)."""
    encoded = digits.encode("ascii")
    total = sum(encoded[-1::-2]) + sum(encoded[-2::-2].translate(_LUHN_DOUBLED)) - 48 * len(encoded)
    return total % 10 == 0


# The brand ranges over the first 4 digits: (lowest, highest) inclusive.
_BRAND_RANGES_4 = tuple(
    (lowest * 10 ** (4 - length), (highest + 1) * 10 ** (4 - length) - 1, brand)
    for length, lowest, highest, brand in _BRAND_RANGES
)


def card_brand(pan: str) -> CardBrand:
    """The card scheme the PAN's leading digits belong to (OTHER when none matches)."""
    leading = int(pan[:4])
    for lowest, highest, brand in _BRAND_RANGES_4:
        if lowest <= leading <= highest:
            return brand
    return CardBrand.OTHER


_BRAND_OF_VALUE = {brand.value: brand for brand in CardBrand}
# As _BRAND_RANGES_4, with each brand's stored value (reading an enum's .value costs).
_BRAND_VALUE_RANGES_4 = tuple((lowest, highest, brand.value) for lowest, highest, brand in _BRAND_RANGES_4)


def _brand_value(pan: str) -> str:
    """card_brand(pan).value."""
    leading = int(pan[:4])
    for lowest, highest, value in _BRAND_VALUE_RANGES_4:
        if lowest <= leading <= highest:
            return value
    return CardBrand.OTHER.value


def visible_bin_digits(length: int) -> int:
    """How many leading digits may show beside the last 4: six (BIN6), as long as at
    least six digits stay hidden (fewer for PANs shorter than 16 digits)."""
    return max(0, min(6, length - 4 - 6))


def mask_pan(pan: str) -> str:
    """BIN6 + stars + last 4 at most (PCI DSS 3.4.1); at least six digits hidden."""
    shown = visible_bin_digits(len(pan))
    return pan[:shown] + "*" * (len(pan) - shown - 4) + pan[-4:]


def check_pan(value: str, field_name: str) -> str:
    """The PAN, if it is 12 to 19 ASCII digits with a valid Luhn check digit.
    Raises InvalidArgument naming `field_name`, never quoting the value."""
    if not (12 <= len(value) <= 19 and value.isascii() and value.isdigit() and luhn_valid(value)):
        raise InvalidArgument(
            field_name, "is not a card number (12 to 19 digits, Luhn-valid)", reason="INVALID_PAN"
        )
    return value


def check_domain(domain: str) -> str:
    if not _DOMAIN.fullmatch(domain):
        raise InvalidArgument(
            "domain", "must be 1 to 64 characters: letters, digits and . _ : / - (starting with a "
            "letter or digit)", reason="INVALID_DOMAIN",
        )
    return domain


def check_token(token: str, field_name: str) -> str:
    """The token, if it can be one. A card number given as a token is refused here,
    before it reaches the database (no FORMAT_PRESERVING token is Luhn-valid)."""
    if not _TOKEN.fullmatch(token):
        raise InvalidArgument(field_name, "is not a token (1 to 32 letters, digits or _)", reason="INVALID_TOKEN")
    if 12 <= len(token) <= 19 and token.isdigit() and luhn_valid(token):
        raise InvalidArgument(field_name, "is a card number, not a token", reason="PAN_GIVEN_AS_TOKEN")
    return token


# -- values -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizeOptions:
    token_format: TokenFormat = TokenFormat.FORMAT_PRESERVING
    # FORMAT_PRESERVING only: keep the first 6 digits (refused per item when fewer
    # than 6 random digits would remain, i.e. PANs under 16 digits).
    keep_bin: bool = False
    # A new token on every call, even for a PAN tokenized before.
    fresh: bool = False
    # The token refuses detokenization after this and is then purged; None: never.
    ttl: timedelta | None = None


@dataclass(frozen=True)
class TokenizeRequest:
    domain: str
    pans: tuple[str, ...] = field(repr=False)
    options: TokenizeOptions = TokenizeOptions()


@dataclass(frozen=True)
class Tokenized:
    token: str
    masked_pan: str
    brand: CardBrand
    # False when the PAN already had this token (deterministic tokenization).
    created: bool
    expires_at: datetime | None
    key_version: int


@dataclass(frozen=True)
class Detokenized:
    token: str
    pan: str = field(repr=False)


@dataclass(frozen=True)
class TokenInfo:
    domain: str
    token: str
    masked_pan: str
    brand: CardBrand
    token_format: TokenFormat
    keep_bin: bool
    deterministic: bool
    key_version: int
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True)
class RewrapReport:
    domain: str
    version: int
    rewrapped: int
    # Rows still under an older data key (0 when the rewrap is complete).
    remaining: int


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


_LENGTH = struct.Struct(">I")


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(_LENGTH.pack(len(part)) + part for part in parts)


def key_binding_message(domain: str, purpose: str, version: int, wrapped_key: bytes) -> bytes:
    """What a domain key's binding tag covers: a wrapped key moved to another domain,
    purpose or version is refused before it is unwrapped."""
    return b"keysvc-token-key-v1" + _length_prefixed(
        domain.encode(), purpose.encode(), str(version).encode(), wrapped_key
    )


def associated_data(domain: str, token: str, version: int) -> bytes:
    """AES-GCM associated data of a token row: its domain, token and key version."""
    return b"keysvc-token-v1" + _length_prefixed(domain.encode(), token.encode(), str(version).encode())


def associated_data_many(domain: str, tokens: list[str], version: int) -> list[bytes]:
    """associated_data(domain, token, version) of each token, the parts they share made once."""
    head = b"keysvc-token-v1" + _length_prefixed(domain.encode())
    tail = _length_prefixed(str(version).encode())
    pack = _LENGTH.pack
    return [head + pack(len(encoded)) + encoded + tail for encoded in (token.encode() for token in tokens)]


# -- token generation ------------------------------------------------------------------------


class TokenGenerator:
    """Random tokens. `random_below(n)` gives a uniform integer in [0, n) (injectable
    for tests). Without it, randomness comes from the operating system's CSPRNG, read
    once per batch: each random character is a byte drawn uniformly from a range whose
    size is a multiple of the alphabet's (others are dropped), taken modulo the
    alphabet's size."""

    def __init__(self, random_below: Callable[[int], int] | None = None) -> None:
        self._random_below = random_below

    def format_preserving(self, pan: str, keep_bin: bool) -> str:
        """Same length, digits only, last 4 kept, BIN6 kept when asked; never
        Luhn-valid, hence never equal to the (Luhn-valid) PAN."""
        return self.tokens([pan], TokenizeOptions(keep_bin=keep_bin))[0]

    def opaque(self) -> str:
        return self.tokens([""], TokenizeOptions(token_format=TokenFormat.OPAQUE))[0]

    def token(self, pan: str, options: TokenizeOptions) -> str:
        return self.tokens([pan], options)[0]

    def tokens(self, pans: list[str], options: TokenizeOptions) -> list[str]:
        """One new random token per PAN (OPAQUE tokens ignore their PAN)."""
        if options.token_format is TokenFormat.OPAQUE:
            if self._random_below is not None:
                return [OPAQUE_PREFIX + "".join(_BASE62[self._random_below(62)]
                                                for _ in range(OPAQUE_RANDOM_CHARACTERS)) for _ in pans]
            characters = _random_characters(len(pans) * OPAQUE_RANDOM_CHARACTERS, _BASE62_OF_BYTE, _NOT_BASE62)
            return [OPAQUE_PREFIX + characters[start:start + OPAQUE_RANDOM_CHARACTERS]
                    for start in range(0, len(characters), OPAQUE_RANDOM_CHARACTERS)]
        kept = 6 if options.keep_bin else 0
        if self._random_below is not None:
            random_below = self._random_below

            def draw(count: int) -> str:
                return str(random_below(10 ** count)).zfill(count)
        else:
            # About one draw in ten is Luhn-valid and drawn again: an eighth more digits.
            pool = _DigitPool(sum(len(pan) - kept - 4 for pan in pans) * 9 // 8 + 16)
            draw = pool.take
        made = []
        for pan in pans:
            head, tail, random_count = pan[:kept], pan[-4:], len(pan) - kept - 4
            while True:
                token = head + draw(random_count) + tail
                if not luhn_valid(token):
                    made.append(token)
                    break
        return made


# Random bytes to characters: a byte maps to its value modulo the alphabet's size;
# bytes at or above the largest multiple of that size are dropped (no modulo bias).
_DIGIT_OF_BYTE = bytes(ord("0") + value % 10 for value in range(256))
_NOT_DIGIT = bytes(range(250, 256))
_BASE62_OF_BYTE = bytes(ord(_BASE62[value % 62]) for value in range(256))
_NOT_BASE62 = bytes(range(248, 256))


def _random_characters(count: int, table: bytes, dropped: bytes) -> str:
    """`count` characters, each uniform over the alphabet `table` maps bytes to."""
    parts, have = [], 0
    while have < count:
        wanted = count - have
        part = os.urandom(wanted + wanted // 16 + 8).translate(table, dropped)
        parts.append(part)
        have += len(part)
    return b"".join(parts)[:count].decode("ascii")


class _DigitPool:
    """Uniform random decimal digits, read from the CSPRNG in bulk."""

    def __init__(self, expected: int) -> None:
        self._expected = expected
        self._digits = _random_characters(expected, _DIGIT_OF_BYTE, _NOT_DIGIT)
        self._position = 0

    def take(self, count: int) -> str:
        start, end = self._position, self._position + count
        if end > len(self._digits):
            self._digits = _random_characters(max(count, self._expected), _DIGIT_OF_BYTE, _NOT_DIGIT)
            start, end = 0, count
        self._position = end
        return self._digits[start:end]


# -- domain keys ready for use --------------------------------------------------------------


class _DomainKeys:
    """A domain's record and its keys unwrapped in the HSM. `released` turns True
    (under the HSM lock) once its handles are freed; users check it under that lock."""

    def __init__(self, record: TokenDomainRecord, fingerprint: hsm.SecretKeyHandle,
                 data: dict[int, hsm.SecretKeyHandle], generation: int, loaded_at: float) -> None:
        self.record = record
        self.fingerprint = fingerprint
        self.data = data
        self.generation = generation
        self.loaded_at = loaded_at
        self.released = False

    def handles(self) -> list[hsm.SecretKeyHandle]:
        return [self.fingerprint, *self.data.values()]


@contextlib.contextmanager
def _hsm_errors() -> Iterator[None]:
    try:
        yield
    except hsm.HsmUnwrapFailed:
        raise IntegrityError("a stored token key could not be unwrapped by the HSM master key") from None
    except hsm.HsmError as error:
        raise Unavailable(f"the HSM is unavailable: {error}") from None


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the deadline passed before the work was done")


class Tokenizer:
    """The TokenService operations over one HSM and one token store. Thread-safe."""

    def __init__(
        self,
        token: hsm.Hsm,
        store: TokenStore,
        *,
        detokenize_allowed: bool = False,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        generator: TokenGenerator | None = None,
        clock: Callable[[], datetime] = _utcnow,
        metadata_ttl: float = 0.25,
        max_domains: int = 256,
    ) -> None:
        self._hsm = token
        self._store = store
        self.detokenize_allowed = detokenize_allowed
        self.max_batch_items = max_batch_items
        self._generator = generator or TokenGenerator()
        self._clock = clock
        self._metadata_ttl = metadata_ttl
        self._max_domains = max_domains
        self._lock = threading.Lock()
        self._domains: OrderedDict[str, _DomainKeys] = OrderedDict()

    # -- domain keys ------------------------------------------------------------------------

    def _new_domain(self, domain: str) -> TokenDomainRecord:
        now = self._clock()
        with _hsm_errors():
            fingerprint_key = self._hsm.generate_wrapped_secret(FINGERPRINT_KEY_BYTES)
            data_key = self._hsm.generate_wrapped_aes_key()
            return TokenDomainRecord(
                domain=domain, fingerprint_key=fingerprint_key,
                fingerprint_binding_tag=self._hsm.bind(key_binding_message(domain, "fingerprint", 1, fingerprint_key)),
                primary_version=1, revision=1, created_at=now,
                data_keys=(DataKeyRecord(
                    version=1, wrapped_key=data_key,
                    binding_tag=self._hsm.bind(key_binding_message(domain, "data", 1, data_key)), created_at=now),),
            )

    def _load_record(self, domain: str, create: bool) -> TokenDomainRecord:
        record = self._store.load_domain(domain)
        if record is None and create:
            self._store.insert_domain(self._new_domain(domain))  # False: another writer won
            record = self._store.load_domain(domain)
        if record is None:
            raise NotFound(f"token domain {domain!r} not found", reason="TOKEN_DOMAIN_NOT_FOUND")
        return record

    def _unwrap_checked(self, domain: str, purpose: str, version: int, wrapped: bytes, tag: bytes,
                        load: Callable[[bytes], hsm.SecretKeyHandle]) -> hsm.SecretKeyHandle:
        with _hsm_errors():
            expected = self._hsm.bind(key_binding_message(domain, purpose, version, wrapped))
            if not hmac.compare_digest(expected, tag):
                raise IntegrityError(
                    f"the stored {purpose} key of token domain {domain!r} failed its integrity check",
                    reason="TOKEN_KEY_INTEGRITY_CHECK_FAILED",
                )
            return load(wrapped)

    def _build(self, record: TokenDomainRecord, reuse: _DomainKeys | None) -> _DomainKeys:
        """Keys for `record`, reusing handles of `reuse` (same generation) where the
        version is the same (a version's key never changes)."""
        generation = self._hsm.generation
        same = reuse is not None and reuse.generation == generation and not reuse.released
        if same:
            fingerprint = reuse.fingerprint
        else:
            fingerprint = self._unwrap_checked(
                record.domain, "fingerprint", 1, record.fingerprint_key, record.fingerprint_binding_tag,
                self._hsm.load_secret)
        data = {}
        for key in record.data_keys:
            if key.wrapped_key is None:
                continue
            if same and key.version in reuse.data:
                data[key.version] = reuse.data[key.version]
            else:
                data[key.version] = self._unwrap_checked(
                    record.domain, "data", key.version, key.wrapped_key, key.binding_tag, self._hsm.load_aes_key)
        return _DomainKeys(record, fingerprint, data, generation, time.monotonic())

    def _release(self, keys: _DomainKeys | None) -> None:
        """Frees a domain's handles, best effort, unless a newer copy still uses them."""
        if keys is None:
            return
        with _hsm_errors(), self._hsm.exclusive():  # exclusive: HsmBusy past the call's deadline
            if keys.released:
                return
            keys.released = True
            with self._lock:
                in_use = {id(handle) for other in self._domains.values() for handle in other.handles()}
            for handle in keys.handles():
                if id(handle) not in in_use:
                    try:
                        self._hsm.release_secret(handle)
                    except hsm.HsmError:
                        pass

    def _domain_keys(self, domain: str, *, create: bool = False, refresh: bool = False) -> _DomainKeys:
        """The domain's keys, fresh to within metadata_ttl (at once with `refresh`).
        Raises NotFound (unless `create`), FailedPrecondition when shredded."""
        with self._lock:
            cached = self._domains.get(domain)
            if cached is not None:
                self._domains.move_to_end(domain)
        now = time.monotonic()
        usable = cached is not None and not cached.released and cached.generation == self._hsm.generation
        if usable and not refresh and now - cached.loaded_at < self._metadata_ttl:
            return cached
        if usable and self._store.load_domain_revision(domain) == cached.record.revision:
            cached.loaded_at = now
            return cached
        record = self._load_record(domain, create)
        if record.shredded_at is not None:
            self._forget(domain)
            raise FailedPrecondition(
                f"token domain {domain!r} was shredded: its tokens are gone for good", reason="TOKEN_DOMAIN_SHREDDED"
            )
        keys = self._build(record, cached if usable else None)
        evicted = []
        with self._lock:
            current = self._domains.get(domain)
            if (current is not None and not current.released and current.generation == keys.generation
                    and current.record.revision >= record.revision):
                # As new as ours (another thread loaded it meanwhile): keep the installed
                # copy, so that callers holding it are not sent to retry.
                keys, superseded = current, keys
            else:
                superseded = current
                self._domains[domain] = keys
                self._domains.move_to_end(domain)
                while len(self._domains) > self._max_domains:
                    evicted.append(self._domains.popitem(last=False)[1])
        for old in [superseded, *evicted]:
            if old is not keys:
                self._release(old)
        return keys

    def _forget(self, domain: str) -> None:
        with self._lock:
            keys = self._domains.pop(domain, None)
        self._release(keys)

    def _with_keys(self, domain: str, work, *, create: bool = False):
        """Runs work(keys) with the HSM lock held from key lookup to use, so that no
        other thread frees the handles in between; reloads keys made stale by an HSM
        re-initialisation."""
        for _attempt in range(3):
            keys = self._domain_keys(domain, create=create)
            with _hsm_errors(), self._hsm.exclusive():
                if keys.released:
                    continue
                try:
                    with _hsm_errors():
                        return work(keys)
                except Unavailable:
                    if keys.generation == self._hsm.generation:
                        raise
            self._forget(domain)
        raise Unavailable("the HSM is unavailable: token keys could not be reloaded")

    # -- tokenize -----------------------------------------------------------------------------

    def _check_batch(self, count: int, field_name: str) -> None:
        if count == 0:
            raise InvalidArgument(field_name, "is empty: give at least one item")
        if count > self.max_batch_items:
            raise InvalidArgument(field_name, f"holds more than {self.max_batch_items} items; split the batch")

    def _check_options(self, options: TokenizeOptions) -> None:
        if options.keep_bin and options.token_format is not TokenFormat.FORMAT_PRESERVING:
            raise InvalidArgument("keep_bin", "applies to FORMAT_PRESERVING tokens only")
        if options.ttl is not None and not timedelta(0) < options.ttl <= MAX_TTL:
            raise InvalidArgument("ttl", f"must be positive and at most {MAX_TTL.days} days")

    def tokenize(self, request: TokenizeRequest, deadline: float | None = None) -> list[Tokenized | KeysvcError]:
        """One Tokenized or one KeysvcError per PAN, in order. A bad PAN fails alone
        (INVALID_ARGUMENT naming `pans[i]`); bad options or domain fail the call."""
        domain = check_domain(request.domain)
        options = request.options
        self._check_options(options)
        self._check_batch(len(request.pans), "pans")
        outcomes: list[Tokenized | KeysvcError | None] = [None] * len(request.pans)
        valid: list[int] = []
        shortest = 16 if options.keep_bin else 12  # keep_bin: at least 6 random digits remain
        for index, pan in enumerate(request.pans):
            if shortest <= len(pan) <= 19 and pan.isascii() and pan.isdigit() and luhn_valid(pan):
                valid.append(index)
                continue
            try:
                check_pan(pan, f"pans[{index}]")
                raise InvalidArgument(
                    f"pans[{index}]", "is too short to keep its BIN: fewer than 6 random digits would remain",
                    reason="PAN_TOO_SHORT_TO_KEEP_BIN",
                )
            except InvalidArgument as error:
                outcomes[index] = error
        if not valid:
            return outcomes
        _check_deadline(deadline)
        pans = request.pans
        fingerprints = self._with_keys(domain, lambda keys: self._hsm.hmac_many(
            keys.fingerprint, hsm.Digest.SHA256, [_FINGERPRINT_PREFIX + pans[index].encode() for index in valid]),
            create=True)
        fingerprint_of = dict(zip(valid, fingerprints))
        # Items of one PAN in one batch share a token (unless fresh): the first makes it.
        # first_of maps each item to that first item of its PAN.
        if options.fresh:
            first_of = {index: index for index in valid}
        else:
            first_by_fingerprint: dict[bytes, int] = {}
            first_of = {index: first_by_fingerprint.setdefault(fingerprint, index)
                        for index, fingerprint in fingerprint_of.items()}
        now = self._clock()
        expires_at = now + options.ttl if options.ttl is not None else None
        results: dict[int, tuple[TokenRecord, bool]] = {}
        # Expired tokens of these PANs: deleted as their PANs get new tokens.
        expired: set[str] = set()
        if not options.fresh:
            found = self._store.find_deterministic(
                domain, list(first_by_fingerprint), options.token_format.value, options.keep_bin)
            for fingerprint, record in found.items():
                if record.expires_at is None or record.expires_at > now:
                    results[first_by_fingerprint[fingerprint]] = (record, False)
                else:
                    expired.add(record.token)
            firsts = [first for first in first_by_fingerprint.values() if first not in results]
        else:
            firsts = valid
        for _attempt in range(TOKEN_ATTEMPTS):
            if not firsts:
                break
            _check_deadline(deadline)
            firsts = self._insert_new(
                domain, pans, firsts, fingerprint_of, options, now, expires_at, results, expired)
        brands = _BRAND_OF_VALUE
        for index in valid:
            first = first_of[index]
            found_result = results.get(first)
            if found_result is not None:
                record, created = found_result
                outcomes[index] = Tokenized(
                    token=record.token, masked_pan=record.masked_pan, brand=brands[record.brand],
                    created=created and first == index, expires_at=record.expires_at, key_version=record.key_version)
            else:  # every try drew a token another row holds
                outcomes[index] = FailedPrecondition(
                    f"pans[{index}]: no free token found after {TOKEN_ATTEMPTS} tries (the token space of this "
                    "BIN and last 4 is nearly full; use OPAQUE or drop keep_bin)", reason="TOKEN_SPACE_EXHAUSTED")
        return outcomes

    def _insert_new(self, domain, pans, indexes, fingerprint_of, options, now, expires_at, results,
                    expired: set[str]) -> list[int]:
        """Makes, encrypts and inserts a token for each PAN at `indexes`; fills
        `results` and returns the indexes to try again (their token was taken, or an
        expired token of their PAN, now in `expired`, stood in the way)."""
        tokens = self._generator.tokens([pans[index] for index in indexes], options)
        again: list[int] = []  # items whose token another item of this batch drew first
        if len(set(tokens)) != len(tokens):
            drawn: dict[str, int] = {}
            for index, token in zip(indexes, tokens):
                if drawn.setdefault(token, index) != index:
                    again.append(index)
            indexes, tokens = list(drawn.values()), list(drawn)
        plaintexts = [pans[index].encode() for index in indexes]

        def encrypt(keys: _DomainKeys):
            version = keys.record.primary_version
            sealed = self._hsm.encrypt_gcm_many(
                keys.data[version], zip(plaintexts, associated_data_many(domain, tokens, version)))
            return version, sealed

        version, sealed = self._with_keys(domain, encrypt)
        deterministic, token_format, keep_bin = not options.fresh, options.token_format.value, options.keep_bin
        records = [
            TokenRecord(
                domain=domain, token=token, fingerprint=fingerprint_of[index], deterministic=deterministic,
                token_format=token_format, keep_bin=keep_bin,
                masked_pan=mask_pan(pans[index]), brand=_brand_value(pans[index]), key_version=version,
                nonce=nonce, ciphertext=ciphertext, created_at=now, expires_at=expires_at,
            )
            for index, token, (nonce, ciphertext) in zip(indexes, tokens, sealed)
        ]
        inserted = self._store.insert_tokens(records, now, sorted(expired))
        expired.clear()
        retry, lost = again, []
        for index, record in zip(indexes, records):
            if record.token in inserted:
                results[index] = (record, True)
            elif options.fresh:
                retry.append(index)
            else:
                lost.append((index, record))
        if lost:
            # Either another call stored this PAN's token first (take it) or the token
            # belonged to another row (try another).
            found = self._store.find_deterministic(
                domain, [record.fingerprint for _, record in lost], options.token_format.value, options.keep_bin)
            for index, record in lost:
                winner = found.get(record.fingerprint)
                if winner is not None and (winner.expires_at is None or winner.expires_at > now):
                    results[index] = (winner, False)
                else:
                    if winner is not None:
                        expired.add(winner.token)
                    retry.append(index)
        return retry

    # -- detokenize -----------------------------------------------------------------------------

    def detokenize(self, domain: str, tokens: list[str], deadline: float | None = None
                   ) -> list[Detokenized | KeysvcError]:
        """One Detokenized or one KeysvcError per token, in order: NotFound for an
        unknown (or deleted, or purged) token, FailedPrecondition TOKEN_EXPIRED, and
        IntegrityError for a row that fails to decrypt (tampered or moved).
        Raises PermissionDenied when this server does not allow detokenization."""
        if not self.detokenize_allowed:
            raise PermissionDenied("detokenization is not allowed on this server", reason="DETOKENIZE_DISABLED")
        check_domain(domain)
        self._check_batch(len(tokens), "tokens")
        outcomes: list[Detokenized | KeysvcError | None] = [None] * len(tokens)
        wanted: dict[int, str] = {}
        for index, token in enumerate(tokens):
            try:
                wanted[index] = check_token(token, f"tokens[{index}]")
            except InvalidArgument as error:
                outcomes[index] = error
        if not wanted:
            return outcomes
        _check_deadline(deadline)
        keys = self._domain_keys(domain)
        rows = self._store.load_tokens(domain, list(set(wanted.values())))
        now = self._clock()
        by_version: dict[int, list[tuple[int, TokenRecord]]] = {}
        for index, token in wanted.items():
            record = rows.get(token)
            if record is None:
                outcomes[index] = NotFound(f"tokens[{index}]: no such token in this domain", reason="TOKEN_NOT_FOUND")
            elif record.expires_at is not None and record.expires_at <= now:
                outcomes[index] = FailedPrecondition(f"tokens[{index}]: the token has expired", reason="TOKEN_EXPIRED")
            else:
                by_version.setdefault(record.key_version, []).append((index, record))
        if any(version not in keys.data for version in by_version):
            self._domain_keys(domain, refresh=True)  # a version another worker just added
        _check_deadline(deadline)
        for version, items in by_version.items():

            def decrypt(keys: _DomainKeys, version=version, items=items):
                handle = keys.data.get(version)
                if handle is None:
                    return None
                return self._hsm.decrypt_gcm_many(handle, [
                    (record.nonce, record.ciphertext, associated_data(domain, record.token, version))
                    for _, record in items])

            plaintexts = self._with_keys(domain, decrypt)
            for position, (index, record) in enumerate(items):
                plaintext = None if plaintexts is None else plaintexts[position]
                if plaintext is None:
                    outcomes[index] = IntegrityError(
                        f"tokens[{index}]: the stored token failed its integrity check",
                        reason="TOKEN_INTEGRITY_CHECK_FAILED")
                else:
                    outcomes[index] = Detokenized(token=record.token, pan=plaintext.decode("ascii"))
        return outcomes

    # -- metadata, deletion, expiry ---------------------------------------------------------------

    def _record(self, domain: str, token: str) -> TokenRecord:
        check_domain(domain)
        check_token(token, "token")
        record = self._store.load_tokens(domain, [token]).get(token)
        if record is None:
            raise NotFound("no such token in this domain", reason="TOKEN_NOT_FOUND")
        return record

    def token_info(self, domain: str, token: str) -> TokenInfo:
        """The token's metadata (no PAN). Raises NotFound."""
        record = self._record(domain, token)
        return TokenInfo(
            domain=record.domain, token=record.token, masked_pan=record.masked_pan, brand=CardBrand(record.brand),
            token_format=TokenFormat(record.token_format), keep_bin=record.keep_bin,
            deterministic=record.deterministic, key_version=record.key_version,
            created_at=record.created_at, expires_at=record.expires_at,
        )

    def delete_token(self, domain: str, token: str) -> None:
        """Deletes the token and its encrypted PAN: it never detokenizes again, and the
        PAN gets a new token next time. Raises NotFound."""
        check_domain(domain)
        check_token(token, "token")
        if not self._store.delete_token(domain, token):
            raise NotFound("no such token in this domain", reason="TOKEN_NOT_FOUND")

    def purge_expired(self) -> int:
        """Deletes every token expired by now; returns how many."""
        total = 0
        now = self._clock()
        while True:
            deleted = self._store.purge_expired(now)
            total += deleted
            if deleted == 0:
                return total

    # -- data keys ----------------------------------------------------------------------------------

    def rotate_data_key(self, domain: str) -> int:
        """Adds a data key version generated in the HSM and makes it the one new tokens
        use; returns its number. Older rows keep theirs until `rewrap`."""
        check_domain(domain)
        for _attempt in range(20):
            record = self._load_record(domain, create=False)
            if record.shredded_at is not None:
                raise FailedPrecondition(f"token domain {domain!r} was shredded", reason="TOKEN_DOMAIN_SHREDDED")
            version = max(key.version for key in record.data_keys) + 1
            with _hsm_errors():
                wrapped = self._hsm.generate_wrapped_aes_key()
                tag = self._hsm.bind(key_binding_message(domain, "data", version, wrapped))
            if self._store.add_data_key(domain, record.revision, DataKeyRecord(
                    version=version, wrapped_key=wrapped, binding_tag=tag, created_at=self._clock())):
                self._domain_keys(domain, refresh=True)
                return version
        raise Unavailable(f"token domain {domain!r} is changing too often; try again")

    def rewrap(self, domain: str, limit: int = 10_000) -> RewrapReport:
        """Moves up to `limit` rows under older data keys to the primary one, a batch at
        a time; each PAN is in the clear only inside one HSM call (decrypt with the old
        key, encrypt with the new). Rows that fail to decrypt are left as they are."""
        check_domain(domain)
        keys = self._domain_keys(domain, refresh=True)
        version = keys.record.primary_version
        done = 0
        skipped: set[str] = set()
        while done < limit:
            batch = [record for record in self._store.tokens_below_version(domain, version, limit=500 + len(skipped))
                     if record.token not in skipped][: limit - done]
            if not batch:
                break
            by_version: dict[int, list[TokenRecord]] = {}
            for record in batch:
                by_version.setdefault(record.key_version, []).append(record)
            moved = []
            for old_version, records in by_version.items():

                def reencrypt(keys: _DomainKeys, old_version=old_version, records=records):
                    old = keys.data.get(old_version)
                    if old is None:
                        return [None] * len(records)
                    return self._hsm.reencrypt_gcm_many(old, keys.data[version], [
                        (record.nonce, record.ciphertext, associated_data(domain, record.token, old_version),
                         associated_data(domain, record.token, version)) for record in records])

                for record, sealed in zip(records, self._with_keys(domain, reencrypt)):
                    if sealed is None:
                        skipped.add(record.token)
                    else:
                        moved.append((record, version, *sealed))
            done += self._store.store_rewrapped(domain, moved)
            if not moved:
                break
        return RewrapReport(domain, version, done, self._store.count_below_version(domain, version))

    def shred_domain(self, domain: str) -> int:
        """Crypto-shredding: erases the domain's fingerprint key and every data key
        version and deletes its tokens. No PAN of the domain can be recovered from
        here on, from this database or any copy of its token rows. Final: the domain
        name stays taken. Returns how many tokens went."""
        check_domain(domain)
        deleted = self._store.shred_domain(domain, self._clock())
        if deleted is None:
            raise NotFound(f"token domain {domain!r} not found", reason="TOKEN_DOMAIN_NOT_FOUND")
        self._forget(domain)
        return deleted
