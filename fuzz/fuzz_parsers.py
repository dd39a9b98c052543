"""Coverage-guided fuzzing (atheris, libFuzzer) of what keysvc parses from callers: the
seal canonicalisation (keysvc.seal_formats) and card number / token / domain checks
(keysvc.tokens).

Each input either works or is refused the documented way: InvalidArgument for a
request (with a message that can be sent over gRPC and never quotes a card number),
ValueError for a Monetico key. Any other exception, or a broken promise about what
was accepted (a PAN that is not 12 to 19 Luhn-valid digits, a masked PAN showing too
much, a Luhn-valid token), is a crash: libFuzzer stops and writes the input to
crash-<sha1> in the current folder.

    make fuzz SECONDS=60
    .venv/bin/python fuzz/fuzz_parsers.py -max_total_time=60 [-runs=N] [CORPUS_DIR]

tests/test_fuzz_atheris.py runs it for a few thousand inputs.
"""

from __future__ import annotations

import itertools
import sys

import atheris

# Dependencies first, uninstrumented: coverage is wanted in keysvc's parsers only.
import hsm  # noqa: F401
import keysvc.errors  # noqa: F401
import keysvc.model  # noqa: F401
import keysvc.store.tokens  # noqa: F401

with atheris.instrument_imports(include=["keysvc.seal_formats", "keysvc.tokens"]):
    from keysvc.seal_formats import SealScheme, build, decode_monetico_key
    from keysvc.tokens import CardBrand, TokenGenerator, card_brand, check_domain, check_pan, check_token, \
        luhn_valid, mask_pan

from keysvc.errors import InvalidArgument  # noqa: E402
from keysvc.model import Charset  # noqa: E402
from keysvc.seals import SealRequest  # noqa: E402

SCHEMES = list(SealScheme)
CHARSETS = list(Charset)


def _refused(error: InvalidArgument, value: str = "") -> None:
    """An InvalidArgument must be sendable and must not quote what it refuses."""
    error.message.encode("utf-8")
    error.field.encode("utf-8")
    if len(value) >= 12 and value.isdigit():
        assert value not in error.message, "an error quotes a digit run"


def _seal(data: atheris.FuzzedDataProvider) -> None:
    scheme = data.PickValueInList(SCHEMES)
    charset = data.PickValueInList(CHARSETS)
    fields = tuple((data.ConsumeUnicode(data.ConsumeIntInRange(0, 16)),
                    data.ConsumeUnicode(data.ConsumeIntInRange(0, 24)))
                   for _ in range(data.ConsumeIntInRange(0, 8)))
    fields_json = data.ConsumeUnicode(data.ConsumeIntInRange(0, 200)) if data.ConsumeBool() else ""
    encode_base64 = data.ConsumeBool()
    message = data.ConsumeBytes(data.remaining_bytes())
    request = SealRequest(key_id="m/k", scheme=scheme, message=message, fields=fields, fields_json=fields_json,
                          encode_base64=encode_base64)
    try:
        sealed = build(scheme, request, charset)
    except InvalidArgument as error:
        _refused(error)
        return
    assert isinstance(sealed.data, bytes)
    assert sealed.key_version is None or 1 <= sealed.key_version < 2**31
    assert sealed.seal_algorithm is None or isinstance(sealed.seal_algorithm, str)


def _card_number(data: atheris.FuzzedDataProvider) -> None:
    # Mostly digit strings (where card numbers are), sometimes anything.
    if data.ConsumeBool():
        value = "".join(chr(48 + byte % 10) for byte in data.ConsumeBytes(data.ConsumeIntInRange(0, 22)))
    else:
        value = data.ConsumeUnicode(data.ConsumeIntInRange(0, 24))
    try:
        pan = check_pan(value, "pans[0]")
    except InvalidArgument as error:
        assert error.reason == "INVALID_PAN"
        _refused(error, value)
    else:
        assert 12 <= len(pan) <= 19 and pan.isascii() and pan.isdigit() and luhn_valid(pan)
        masked = mask_pan(pan)
        assert len(masked) == len(pan) and masked.endswith(pan[-4:])
        assert masked.count("*") >= 6 and sum(c.isdigit() for c in masked) <= 10
        assert isinstance(card_brand(pan), CardBrand)
        keep_bin = len(pan) >= 16 and data.ConsumeBool()
        # Randomness from the input, plus a counter: an exhausted input gives zeros, and a
        # generator that retries on Luhn-valid draws would then retry forever.
        draws = itertools.count()
        token = TokenGenerator(lambda below: (data.ConsumeIntInRange(0, below - 1) + next(draws)) % below) \
            .format_preserving(pan, keep_bin)
        assert len(token) == len(pan) and token.isdigit() and not luhn_valid(token) and token != pan
        assert token.endswith(pan[-4:]) and (not keep_bin or token[:6] == pan[:6])
        check_token(token, "tokens[0]")  # every token keysvc makes passes as one
    try:
        check_token(value, "tokens[0]")
    except InvalidArgument as error:
        assert error.reason in ("INVALID_TOKEN", "PAN_GIVEN_AS_TOKEN")
        _refused(error, value)
    try:
        check_domain(value)
    except InvalidArgument as error:
        assert error.reason == "INVALID_DOMAIN"
        _refused(error, value)


def _monetico_key(data: atheris.FuzzedDataProvider) -> None:
    text = data.ConsumeUnicode(data.ConsumeIntInRange(0, 48))
    try:
        key = decode_monetico_key(text)
    except ValueError:
        return
    assert len(key) == 20


TARGETS = [_seal, _seal, _card_number, _monetico_key]


def test_one_input(raw: bytes) -> None:
    data = atheris.FuzzedDataProvider(raw)
    data.PickValueInList(TARGETS)(data)


def main(argv: list[str]) -> None:
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
