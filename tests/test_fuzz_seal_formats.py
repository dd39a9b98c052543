"""Fuzzing the seal canonicalisation: whatever a caller sends, building the sealed string
either succeeds or raises InvalidArgument with a message that can be sent over gRPC,
never another exception (which the server would answer as INTERNAL)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keysvc.errors import InvalidArgument
from keysvc.model import Charset
from keysvc.seal_formats import SealScheme, build
from keysvc.seals import SealRequest

any_character = st.characters(blacklist_categories=())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
messages = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=6).map(
        lambda pairs: "|".join(f"{n}={v}" for n, v in pairs).encode()
    ),
)
requests = st.builds(
    lambda scheme, message, fields, fields_json, encode_base64: SealRequest(
        key_id="m/k", scheme=scheme, message=message, fields=tuple(fields), fields_json=fields_json,
        encode_base64=encode_base64,
    ),
    st.sampled_from(list(SealScheme)),
    messages,
    # Any code point, lone surrogates included (a Python caller can send them).
    st.lists(st.tuples(st.text(any_character, max_size=12), st.text(any_character, max_size=12)), max_size=6),
    st.one_of(st.just(""), json_values.map(json.dumps), st.text(max_size=30)),
    st.booleans(),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, st.sampled_from(list(Charset)))
def test_building_a_sealed_string_succeeds_or_is_invalid_argument(request, charset):
    try:
        sealed = build(request.scheme, request, charset)
    except InvalidArgument as error:
        error.message.encode("utf-8")
        error.field.encode("utf-8")
        return
    assert isinstance(sealed.data, bytes)
    assert sealed.key_version is None or 1 <= sealed.key_version < 2**31
