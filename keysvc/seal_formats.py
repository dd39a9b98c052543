"""The strings payment platforms seal, built byte for byte as their kits build them.

Pure functions, no HSM and no keys: each scheme turns what the caller hands over
(the message as posted, or its fields) into the exact bytes the bank's seal covers,
and reads what the message itself says about the seal (SIPS `keyVersion` and
`sealAlgorithm`). The rules, with the public sources they come from, are in the
README ("Payment platform seals"):

- SIPS_POST: `Data` = name=value pairs joined by `|`, in the caller's order.
- SIPS_JSON_REQUEST / SIPS_JSON_RESPONSE: every scalar value, keys sorted at every
  level, concatenated (requests leave out keyVersion, sealAlgorithm and seal;
  responses only seal).
- MONETICO: all fields but MAC, sorted by name, `name=value` joined by `*`.
- CMCIC_LEGACY_REQUEST / CMCIC_LEGACY_NOTIFICATION: fixed positional lists.

Errors are InvalidArgument naming the field; they never quote a value (a value may
hold a card number).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from dataclasses import dataclass, field

from keysvc.errors import InvalidArgument
from keysvc.model import Charset, KeyPlatform

MAX_FIELDS = 1000
MONETICO_KEY_LENGTH = 40
# What a Monetico / CM-CIC server answers the bank after a notification.
RECEIPT_GENUINE = "version=2\ncdr=0\n"
RECEIPT_NOT_GENUINE = "version=2\ncdr=1\n"
# What SIPS JSON assumes when a message names no sealAlgorithm.
SIPS_JSON_DEFAULT_ALGORITHM = "HMAC-SHA-256"


class SealScheme(enum.Enum):
    """How a message becomes the bytes that are sealed."""

    HMAC = "HMAC"  # the message bytes as given
    SIPS_POST = "SIPS_POST"
    SIPS_JSON_REQUEST = "SIPS_JSON_REQUEST"
    SIPS_JSON_RESPONSE = "SIPS_JSON_RESPONSE"
    MONETICO = "MONETICO"
    CMCIC_LEGACY_REQUEST = "CMCIC_LEGACY_REQUEST"
    CMCIC_LEGACY_NOTIFICATION = "CMCIC_LEGACY_NOTIFICATION"

    @property
    def platform(self) -> KeyPlatform:
        """The platform whose keys make this scheme's seals."""
        if self is SealScheme.HMAC:
            return KeyPlatform.GENERIC
        if self.value.startswith("SIPS"):
            return KeyPlatform.SIPS
        return KeyPlatform.MONETICO

    @property
    def answers_with_receipt(self) -> bool:
        """Whether verifying it gives the receipt body the bank expects back."""
        return self in (SealScheme.MONETICO, SealScheme.CMCIC_LEGACY_NOTIFICATION)


@dataclass(frozen=True)
class SealedText:
    """The exact bytes a seal covers, and what the message says about its seal."""

    data: bytes = field(repr=False)
    # SIPS POST built from fields: the Data to post (base64 when asked); else "".
    built_data: str = field(default="", repr=False)
    # The key version the message names (SIPS keyVersion), if any.
    key_version: int | None = None
    # The algorithm the message names (SIPS sealAlgorithm), if any.
    seal_algorithm: str | None = None


def build(scheme: SealScheme, request, charset: Charset) -> SealedText:
    """The sealed bytes of `request` (a SealRequest or VerifyRequest of keysvc.seals:
    message, fields, fields_json, encode_base64) under `scheme`."""
    if scheme is SealScheme.HMAC:
        _refuse_structured_input(request, "the HMAC scheme seals the message bytes as given")
        return SealedText(request.message)
    if scheme is SealScheme.SIPS_POST:
        return _sips_post(request, charset)
    if scheme in (SealScheme.SIPS_JSON_REQUEST, SealScheme.SIPS_JSON_RESPONSE):
        _refuse_structured_input(request, "SIPS JSON seals are computed over the JSON message")
        return _sips_json(request.message, charset, response=scheme is SealScheme.SIPS_JSON_RESPONSE)
    if request.message or request.fields_json:
        raise InvalidArgument("fields", f"{scheme.value} seals are built from the form fields: give them in fields")
    if request.encode_base64:
        raise InvalidArgument("encode_base64", "applies to SIPS_POST only")
    if not request.fields:
        raise InvalidArgument("fields", f"is required: the {scheme.value} form fields")
    if scheme is SealScheme.MONETICO:
        return _monetico(_unique_fields(request.fields), charset)
    if scheme is SealScheme.CMCIC_LEGACY_REQUEST:
        return _cmcic_legacy(_unique_fields(request.fields), charset, CMCIC_LEGACY_REQUEST_FIELDS, "request", "")
    return _cmcic_legacy(
        _unique_fields(request.fields), charset, CMCIC_LEGACY_NOTIFICATION_FIELDS, "notification", "*"
    )


def _refuse_structured_input(request, why: str) -> None:
    if request.fields or request.fields_json:
        raise InvalidArgument("fields", f"must be empty: {why}")
    if request.encode_base64:
        raise InvalidArgument("encode_base64", "applies to SIPS_POST only")


def _encode(text: str, charset: Charset, field_name: str) -> bytes:
    try:
        return text.encode(charset.codec)
    except UnicodeEncodeError:
        raise InvalidArgument(field_name, f"has a character that {charset.value} cannot encode") from None


def _unique_fields(fields) -> list[tuple[str, str]]:
    if len(fields) > MAX_FIELDS:
        raise InvalidArgument("fields", f"holds more than {MAX_FIELDS} fields")
    seen: set[str] = set()
    for name, _value in fields:
        if not name:
            raise InvalidArgument("fields", "a field has no name")
        if name in seen:
            raise InvalidArgument(f"fields[{name}]", "is given twice")
        seen.add(name)
    return list(fields)


# -- SIPS Paypage POST ---------------------------------------------------------------------


def _sips_post(request, charset: Charset) -> SealedText:
    given = [bool(request.message), bool(request.fields), bool(request.fields_json)]
    if sum(given) != 1:
        raise InvalidArgument(
            "message", "give exactly one of: the Data as posted (message), or fields or fields_json to build it"
        )
    if request.message:
        return _sips_post_as_posted(request.message, request.encode_base64)
    pairs = _unique_fields(request.fields) if request.fields else _flatten_fields_json(request.fields_json)
    for name, value in pairs:
        if "|" in name or "=" in name:
            raise InvalidArgument(f"fields[{name}]", "a SIPS field name cannot hold '|' or '='")
        if "|" in value:
            raise InvalidArgument(f"fields[{name}]", "a SIPS field value cannot hold '|', the Data separator")
    data_text = "|".join(f"{name}={value}" for name, value in pairs)
    data = _encode(data_text, charset, "fields")
    if request.encode_base64:  # Encode=base64: the bank checks the seal over the base64 text
        data = base64.b64encode(data)
        data_text = data.decode("ascii")
    named = dict(pairs)
    return SealedText(
        data, built_data=data_text,
        key_version=_key_version(named.get("keyVersion"), "fields[keyVersion]"),
        seal_algorithm=named.get("sealAlgorithm"),
    )


def _sips_post_as_posted(message: bytes, base64_encoded: bool) -> SealedText:
    """Data exactly as posted or received; only read to find keyVersion."""
    text = message
    if base64_encoded:
        try:
            text = base64.b64decode(message, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument("message", "is not base64 text (encode_base64 is set)") from None
    named: dict[str, str] = {}
    for pair in text.decode("utf-8", errors="replace").split("|"):
        name, _equals, value = pair.partition("=")
        if name in named and name in ("keyVersion", "sealAlgorithm"):
            raise InvalidArgument("message", f"Data names {name} twice")
        named.setdefault(name, value)
    return SealedText(
        message,
        key_version=_key_version(named.get("keyVersion"), "message (keyVersion)"),
        seal_algorithm=named.get("sealAlgorithm"),
    )


def _flatten_fields_json(fields_json: str) -> list[tuple[str, str]]:
    """SIPS POST fields from a JSON object, in its order: nested objects become dotted
    names, lists of scalars one comma-joined value."""
    try:
        encoded = fields_json.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a Python caller can send one, gRPC cannot
        raise InvalidArgument("fields_json", "is not a JSON document in UTF-8") from None
    document = _load_json_object(encoded, "fields_json")
    pairs: list[tuple[str, str]] = []

    def add(name: str, value) -> None:
        if isinstance(value, dict):
            for child, child_value in value.items():
                add(f"{name}.{child}", child_value)
        elif isinstance(value, list):
            if any(isinstance(item, (dict, list)) for item in value):
                raise InvalidArgument(f"fields_json.{name}", "a list in SIPS POST Data can hold only scalars")
            rendered = [_post_scalar(item, f"fields_json.{name}") for item in value]
            pairs.append((name, ",".join(item for item in rendered if item is not None)))
        else:
            rendered = _post_scalar(value, f"fields_json.{name}")
            if rendered is not None:  # null: the field is not sent
                pairs.append((name, rendered))

    for name, value in document.items():
        if not name:
            raise InvalidArgument("fields_json", "a field has no name")
        add(name, value)
    if len(pairs) > MAX_FIELDS:
        raise InvalidArgument("fields_json", f"holds more than {MAX_FIELDS} fields")
    return _unique_fields(pairs)  # {"a.b": 1, "a": {"b": 2}} would name a.b twice


def _post_scalar(value, path: str) -> str | None:
    if isinstance(value, bool):
        raise InvalidArgument(path, "is a JSON boolean, which has no portable rendering in a seal: send a string")
    if value is None:
        return None
    return str(value)  # strings, and numbers as their JSON text


# -- SIPS JSON -------------------------------------------------------------------------------


class _JsonNumber(str):
    """A JSON number kept as written (1.50 stays "1.50", not 1.5)."""


def _load_json_object(text: bytes, field_name: str) -> dict:
    def no_duplicates(pairs):
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise InvalidArgument(f"{field_name}.{duplicate}", "is given twice")
        return dict(pairs)

    try:
        document = json.loads(
            text.decode("utf-8"), object_pairs_hook=no_duplicates, parse_int=_JsonNumber, parse_float=_JsonNumber,
            parse_constant=lambda name: _refuse_constant(name, field_name),
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidArgument(field_name, "is not a JSON document in UTF-8") from None
    except RecursionError:
        raise InvalidArgument(field_name, "is nested too deeply") from None
    if not isinstance(document, dict):
        raise InvalidArgument(field_name, "must be a JSON object")
    return document


def _refuse_constant(name: str, field_name: str):
    raise InvalidArgument(field_name, f"holds {name}, which is not JSON")


def _sips_json(message: bytes, charset: Charset, *, response: bool) -> SealedText:
    document = _load_json_object(message, "message")
    left_out = ("seal",) if response else ("keyVersion", "sealAlgorithm", "seal")
    values: list[str] = []

    def collect(value, path: str) -> None:
        if isinstance(value, dict):
            for name in sorted(value):  # code point order is UTF-8 byte order
                collect(value[name], f"{path}.{name}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                collect(item, f"{path}[{index}]")
        elif isinstance(value, bool):
            raise InvalidArgument(path, "is a JSON boolean, which has no portable rendering in a SIPS seal: "
                                        "send a string")
        elif value is not None:  # null and "" add nothing
            values.append(value)

    for name in sorted(document):
        if name not in left_out:
            collect(document[name], f"message.{name}")
    algorithm = document.get("sealAlgorithm")
    if algorithm is not None and not isinstance(algorithm, str):
        raise InvalidArgument("message.sealAlgorithm", "must be a string such as 'HMAC-SHA-256'")
    if not algorithm and not response:
        # A request that names none asks for HMAC-SHA-256; a response that names none
        # is sealed with the request's algorithm, which is the key's.
        algorithm = SIPS_JSON_DEFAULT_ALGORITHM
    return SealedText(
        _encode("".join(values), charset, "message"),
        key_version=_key_version(document.get("keyVersion"), "message.keyVersion"),
        seal_algorithm=algorithm or None,
    )


def _key_version(value, field_name: str) -> int | None:
    if value is None or value == "":
        return None
    text = str(value)
    if len(text) > 10 or not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 2**31 - 1:
        raise InvalidArgument(field_name, "keyVersion must be a whole number from 1")
    return int(text)


# -- Monetico / CM-CIC ------------------------------------------------------------------------


def _monetico(fields: list[tuple[str, str]], charset: Charset) -> SealedText:
    encoded = [
        (_encode(name, charset, f"fields[{name}]"), _encode(value, charset, f"fields[{name}]"))
        for name, value in fields
        if name != "MAC"
    ]
    encoded.sort(key=lambda pair: pair[0])  # byte order of the name
    return SealedText(b"*".join(name + b"=" + value for name, value in encoded))


# Positional fields; a tuple is glued without a separator (amount and currency).
CMCIC_LEGACY_REQUEST_FIELDS = (
    "TPE", "date", ("montant", "devise"), "reference", "texte-libre", "version", "lgue", "societe", "mail",
    "nbrech", "dateech1", "montantech1", "dateech2", "montantech2", "dateech3", "montantech3",
    "dateech4", "montantech4", "options",
)
CMCIC_LEGACY_NOTIFICATION_FIELDS = (
    "TPE", "date", "montant", "reference", "texte-libre", "version", "code-retour", "cvx", "vld", "brand",
    "status3ds", "numauto", "motifrefus", "originecb", "bincb", "hpancb", "ipclient", "originetr", "veres",
    "pares",
)


def _cmcic_legacy(fields: list[tuple[str, str]], charset: Charset, layout: tuple, kind: str,
                  trailer: str) -> SealedText:
    known = {name for slot in layout for name in (slot if isinstance(slot, tuple) else (slot,))}
    named = dict(fields)
    for name in named:
        if name not in known and name != "MAC":
            raise InvalidArgument(
                f"fields[{name}]", f"is not part of the CM-CIC legacy {kind} seal; give only its fields and MAC"
            )
    slots = ["".join(named.get(name, "") for name in slot) if isinstance(slot, tuple) else named.get(slot, "")
             for slot in layout]
    text = "*".join(slots) + trailer
    return SealedText(_encode(text, charset, "fields"))


def decode_monetico_key(key_text: str) -> bytes:
    """The 20 bytes of a 40-character Monetico / CM-CIC key, decoded as the kits do:
    characters 0-37 are hex; the 39th, when its code c is 71-96, stands for chr(c - 23),
    otherwise a final 'M' stands for '0'; then all is hex-decoded.

    Raises ValueError with a message that never quotes the key."""
    if len(key_text) != MONETICO_KEY_LENGTH:
        raise ValueError(f"a Monetico key has {MONETICO_KEY_LENGTH} characters, this one {len(key_text)}")
    hex_part, penultimate, last = key_text[:38], key_text[38], key_text[39]
    if 71 <= ord(penultimate) <= 96:
        penultimate = chr(ord(penultimate) - 23)
    elif last == "M":
        last = "0"
    try:
        secret = bytes.fromhex(hex_part + penultimate + last)
    except ValueError:
        raise ValueError("a Monetico key must decode to 20 bytes of hex") from None
    if len(secret) != 20:
        raise ValueError("a Monetico key must decode to 20 bytes of hex")
    return secret
