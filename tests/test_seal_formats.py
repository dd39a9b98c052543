"""The strings the payment platforms seal (keysvc.seal_formats), checked against strings
written out by hand from the platforms' rules: no HSM, no keys, just bytes."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keysvc.errors import InvalidArgument
from keysvc.model import Charset
from keysvc.seal_formats import SealScheme, build, decode_monetico_key
from keysvc.seals import SealRequest

UTF_8, LATIN_1 = Charset.UTF_8, Charset.ISO_8859_1


def sealed(scheme: SealScheme, charset: Charset = UTF_8, **request):
    return build(scheme, SealRequest(key_id="m/k", scheme=scheme, **request), charset)


def refused(scheme: SealScheme, charset: Charset = UTF_8, **request) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        sealed(scheme, charset, **request)
    return raised.value


# -- SIPS Paypage POST -------------------------------------------------------------------------


def test_sips_post_data_as_posted_is_sealed_exactly_and_its_key_version_read():
    data = b"amount=1000|currencyCode=978|merchantId=002001000000001|keyVersion=3|orderId=caf\xc3\xa9"

    result = sealed(SealScheme.SIPS_POST, message=data)

    assert result.data == data
    assert result.key_version == 3
    assert result.built_data == ""


def test_sips_post_built_from_fields_joins_name_value_pairs_with_bars_in_the_given_order():
    fields = (("merchantId", "002001000000001"), ("amount", "1000"), ("orderId", ""), ("keyVersion", "1"))

    result = sealed(SealScheme.SIPS_POST, fields=fields)

    assert result.built_data == "merchantId=002001000000001|amount=1000|orderId=|keyVersion=1"
    assert result.data == result.built_data.encode()
    assert result.key_version == 1


def test_sips_post_from_json_flattens_nested_objects_to_dotted_names_and_lists_to_commas():
    fields_json = json.dumps({
        "amount": 1000,
        "billingAddress": {"city": "Nantes", "street": {"name": "Rue de l'Église", "number": "4"}},
        "paymentMeanBrandList": ["VISA", "MASTERCARD"],
        "customerId": None,
        "keyVersion": "2",
    })

    result = sealed(SealScheme.SIPS_POST, fields_json=fields_json)

    assert result.built_data == (
        "amount=1000|billingAddress.city=Nantes|billingAddress.street.name=Rue de l'Église|"
        "billingAddress.street.number=4|paymentMeanBrandList=VISA,MASTERCARD|keyVersion=2"
    )
    assert result.data == result.built_data.encode("utf-8")
    assert result.key_version == 2


def test_sips_post_numbers_from_json_keep_their_written_form():
    result = sealed(SealScheme.SIPS_POST, fields_json='{"amount": 10.50, "zero": 0}')

    assert result.built_data == "amount=10.50|zero=0"


def test_sips_post_encode_base64_seals_the_base64_text_and_returns_it_as_data():
    result = sealed(SealScheme.SIPS_POST, fields=(("amount", "1000"), ("currencyCode", "978")), encode_base64=True)

    assert result.data == base64.b64encode(b"amount=1000|currencyCode=978")
    assert result.built_data == result.data.decode()


def test_sips_post_base64_data_as_received_is_sealed_as_received_and_its_key_version_read():
    posted = base64.b64encode(b"amount=1000|keyVersion=7")

    result = sealed(SealScheme.SIPS_POST, message=posted, encode_base64=True)

    assert (result.data, result.key_version) == (posted, 7)


def test_sips_post_three_kilobytes_of_accented_text_is_sealed_in_utf8():
    text = "é€ à la carte " * 200

    result = sealed(SealScheme.SIPS_POST, fields=(("orderDescription", text),))

    assert result.data == f"orderDescription={text}".encode("utf-8")
    assert len(result.data) > 3000


@pytest.mark.parametrize("request_fields, field", [
    ({"message": b"a=1", "fields": (("a", "1"),)}, "message"),
    ({}, "message"),
    ({"fields": (("a", "x|y"),)}, "fields[a]"),
    ({"fields": (("a|b", "1"),)}, "fields[a|b]"),
    ({"fields": (("a", "1"), ("a", "2"))}, "fields[a]"),
    ({"fields_json": '{"flag": true}'}, "fields_json.flag"),
    ({"fields_json": '{"items": [{"a": 1}]}'}, "fields_json.items"),
    ({"fields_json": "[1, 2]"}, "fields_json"),
    ({"fields_json": '{"a": 1, "a": 2}'}, "fields_json.a"),
    ({"fields_json": "{not json"}, "fields_json"),
    ({"message": b"amount=1|keyVersion=x"}, "message (keyVersion)"),
    ({"message": b"not base64!", "encode_base64": True}, "message"),
])
def test_sips_post_refusals_name_the_field(request_fields, field):
    assert refused(SealScheme.SIPS_POST, **request_fields).field == field


def test_sips_post_refusal_never_quotes_a_value():
    card = "4111111111111111"

    error = refused(SealScheme.SIPS_POST, fields=(("cardNumber", card + "|x"),))

    assert card not in error.message


# -- SIPS JSON -------------------------------------------------------------------------------------


def test_sips_json_request_concatenates_values_sorted_by_key_at_every_level_without_seal_fields():
    message = {
        "seal": "ignored", "keyVersion": 1, "sealAlgorithm": "HMAC-SHA-256",
        "orderId": "A1", "amount": 0, "customerContact": {"lastname": "Dupré", "email": "a@b.fr"},
        "paymentMeanBrandList": ["VISA", "CB"], "empty": "", "nothing": None,
        "cart": [{"qty": 2, "name": "tea"}, {"qty": 1, "name": "cup"}],
        "Zeta": "upper-case first",
    }

    result = sealed(SealScheme.SIPS_JSON_REQUEST, message=json.dumps(message).encode())

    # Byte order: "Zeta" < "amount" < "cart" < "customerContact" < "empty" < ... ; lists keep order.
    assert result.data.decode() == "upper-case first" "0" "tea2" "cup1" "a@b.frDupré" "A1" "VISACB"
    assert result.key_version == 1
    assert result.seal_algorithm == "HMAC-SHA-256"


def test_sips_json_response_keeps_key_version_and_seal_algorithm_and_drops_only_seal():
    message = {"responseCode": "00", "keyVersion": 2, "sealAlgorithm": "SHA-256", "seal": "ab"}

    result = sealed(SealScheme.SIPS_JSON_RESPONSE, message=json.dumps(message).encode())

    assert result.data == b"2" b"00" b"SHA-256"
    assert (result.key_version, result.seal_algorithm) == (2, "SHA-256")


def test_sips_json_without_seal_algorithm_means_hmac_sha_256():
    assert sealed(SealScheme.SIPS_JSON_REQUEST, message=b'{"a": "1"}').seal_algorithm == "HMAC-SHA-256"


def test_sips_json_numbers_keep_their_written_form():
    assert sealed(SealScheme.SIPS_JSON_REQUEST, message=b'{"a": 1.50, "b": 1e3, "c": -0}').data == b"1.501e3-0"


@pytest.mark.parametrize("message, field", [
    (b'{"cart": [{"gift": false}]}', "message.cart[0].gift"),
    (b'{"active": true}', "message.active"),
    (b'["a"]', "message"),
    (b'{"a": NaN}', "message"),
    (b'{"a": "1", "a": "2"}', "message.a"),
    (b"\xff\xfe", "message"),
    (b"[" * 100_000 + b"]" * 100_000, "message"),
])
def test_sips_json_refusals_name_the_field(message, field):
    assert refused(SealScheme.SIPS_JSON_REQUEST, message=message).field == field


def test_sips_json_takes_no_fields():
    assert refused(SealScheme.SIPS_JSON_REQUEST, message=b"{}", fields=(("a", "1"),)).field == "fields"


# -- Monetico --------------------------------------------------------------------------------------


MONETICO_FIELDS = (
    ("TPE", "1234567"), ("date", "05/12/2006:11:55:23"), ("montant", "62.75EUR"), ("reference", "ABERTYP00145"),
    ("MAC", "ignored"), ("texte-libre", ""), ("version", "3.0"), ("lgue", "FR"), ("societe", "monSite1"),
    ("contexte_commande", "eyJhIjoiw6kifQ=="), ("mail", "client@test.fr"),
)


def test_monetico_seals_every_field_but_mac_sorted_by_name_joined_by_stars_keeping_empty_values():
    result = sealed(SealScheme.MONETICO, fields=MONETICO_FIELDS)

    assert result.data.decode() == (
        "TPE=1234567*contexte_commande=eyJhIjoiw6kifQ==*date=05/12/2006:11:55:23*lgue=FR*mail=client@test.fr*"
        "montant=62.75EUR*reference=ABERTYP00145*societe=monSite1*texte-libre=*version=3.0"
    )


def test_monetico_notification_seals_fields_it_does_not_know_too():
    result = sealed(SealScheme.MONETICO, fields=(("code-retour", "payetest"), ("zz-new-field", "x"), ("MAC", "0")))

    assert result.data == b"code-retour=payetest*zz-new-field=x"


def test_monetico_in_iso_8859_1_encodes_accents_in_one_byte_and_refuses_what_it_cannot_encode():
    assert sealed(SealScheme.MONETICO, LATIN_1, fields=(("texte-libre", "été"),)).data == b"texte-libre=\xe9t\xe9"
    assert sealed(SealScheme.MONETICO, UTF_8, fields=(("texte-libre", "été"),)).data == b"texte-libre=\xc3\xa9t\xc3\xa9"
    assert refused(SealScheme.MONETICO, LATIN_1, fields=(("texte-libre", "10 €"),)).field == "fields[texte-libre]"


def test_monetico_sorts_by_bytes_so_upper_case_names_come_first():
    result = sealed(SealScheme.MONETICO, fields=(("b", "2"), ("a", "1"), ("B", "3"), ("_x", "4")))

    assert result.data == b"B=3*_x=4*a=1*b=2"


@pytest.mark.parametrize("request_fields, field", [
    ({"message": b"TPE=1"}, "fields"),
    ({"fields": (("TPE", "1"), ("TPE", "2"))}, "fields[TPE]"),
    ({"fields": (("", "1"),)}, "fields"),
])
def test_monetico_refusals_name_the_field(request_fields, field):
    assert refused(SealScheme.MONETICO, **request_fields).field == field


# -- CM-CIC legacy positional ------------------------------------------------------------------


def test_cmcic_legacy_request_is_positional_with_amount_and_currency_glued_and_empty_fields_kept():
    fields = (("TPE", "1234567"), ("date", "05/12/2006:11:55:23"), ("montant", "62.75"), ("devise", "EUR"),
              ("reference", "ABERTYP00145"), ("texte-libre", "ExempleTexteLibre"), ("version", "3.0"),
              ("lgue", "FR"), ("societe", "monSite1"), ("mail", "test@test.zz"))

    result = sealed(SealScheme.CMCIC_LEGACY_REQUEST, fields=fields)

    assert result.data.decode() == (
        "1234567*05/12/2006:11:55:23*62.75EUR*ABERTYP00145*ExempleTexteLibre*3.0*FR*monSite1*test@test.zz"
        "**********"
    )


def test_cmcic_legacy_notification_is_positional_with_a_trailing_star():
    fields = (("MAC", "x"), ("TPE", "1234567"), ("date", "05/12/2006_a_11:55:23"), ("montant", "62.75EUR"),
              ("reference", "ABERTYP00145"), ("texte-libre", "libre"), ("version", "3.0"),
              ("code-retour", "payetest"), ("cvx", "oui"), ("vld", "1208"), ("brand", "VI"),
              ("status3ds", "-1"), ("numauto", ""), ("motifrefus", ""), ("originecb", "FRA"),
              ("bincb", "010101"), ("hpancb", "74E94B03C22D786E0F2C2CADBFC1C00B004B7C45"),
              ("ipclient", "127.0.0.1"), ("originetr", "FRA"), ("veres", ""), ("pares", ""))

    result = sealed(SealScheme.CMCIC_LEGACY_NOTIFICATION, fields=fields)

    assert result.data.decode() == (
        "1234567*05/12/2006_a_11:55:23*62.75EUR*ABERTYP00145*libre*3.0*payetest*oui*1208*VI*-1***FRA*010101*"
        "74E94B03C22D786E0F2C2CADBFC1C00B004B7C45*127.0.0.1*FRA***"
    )


def test_cmcic_legacy_refuses_a_field_outside_its_layout():
    error = refused(SealScheme.CMCIC_LEGACY_REQUEST, fields=(("TPE", "1"), ("contexte_commande", "x")))

    assert error.field == "fields[contexte_commande]"


# -- the HMAC scheme ---------------------------------------------------------------------------


def test_hmac_scheme_seals_the_message_as_given_and_takes_no_fields():
    assert sealed(SealScheme.HMAC, message=b"\x00raw").data == b"\x00raw"
    assert refused(SealScheme.HMAC, message=b"x", fields=(("a", "1"),)).field == "fields"
    assert refused(SealScheme.HMAC, message=b"x", encode_base64=True).field == "encode_base64"


# -- Monetico keys -----------------------------------------------------------------------------


def test_monetico_key_decoding_follows_the_kits_rules():
    # 39th character 'P' (80, in 71-96) stands for chr(80 - 23) = '9'.
    assert decode_monetico_key("12345678901234567890123456789012345678P0") == bytes.fromhex(
        "1234567890123456789012345678901234567890"
    )
    # Otherwise a final 'M' stands for '0'.
    assert decode_monetico_key("0123456789ABCDEF0123456789ABCDEF012345AM") == bytes.fromhex(
        "0123456789ABCDEF0123456789ABCDEF012345A0"
    )
    # Plain hex stays as it is.
    assert decode_monetico_key("00" * 20) == bytes(20)


@pytest.mark.parametrize("key_text", ["", "12345678901234567890123456789012345678P", "x" * 40,
                                      "1234567890123456789012345678901234567 P0", "é" * 40])
def test_monetico_key_that_is_not_40_characters_of_hex_is_refused_without_quoting_it(key_text):
    with pytest.raises(ValueError) as raised:
        decode_monetico_key(key_text)

    assert key_text not in str(raised.value) or not key_text


@given(st.lists(st.tuples(st.text(min_size=1, max_size=8).filter(lambda n: n != "MAC"), st.text(max_size=8)),
                min_size=1, max_size=8, unique_by=lambda pair: pair[0]))
def test_monetico_string_holds_each_field_once_in_name_byte_order(fields):
    data = sealed(SealScheme.MONETICO, fields=tuple(fields)).data

    names = sorted(name.encode() for name, _ in fields)
    expected = b"*".join(name + b"=" + dict((n.encode(), v.encode()) for n, v in fields)[name] for name in names)
    assert data == expected


# -- refusals found in review -------------------------------------------------------------------


@pytest.mark.parametrize("scheme, request_fields, field", [
    (SealScheme.SIPS_POST, {"message": b"a=1|keyVersion=" + b"9" * 5000}, "message (keyVersion)"),
    (SealScheme.SIPS_JSON_REQUEST, {"message": b'{"keyVersion": "' + b"9" * 5000 + b'"}'}, "message.keyVersion"),
    (SealScheme.SIPS_POST, {"message": b"keyVersion=1|a=1|keyVersion=2"}, "message"),
    (SealScheme.SIPS_POST, {"fields_json": '{"": 1}'}, "fields_json"),
    (SealScheme.SIPS_POST, {"fields_json": '{"a.b": 1, "a": {"b": 2}}'}, "fields[a.b]"),
    (SealScheme.SIPS_JSON_REQUEST, {"message": b"\xef\xbb\xbf{}"}, "message"),
    (SealScheme.SIPS_JSON_REQUEST, {"message": '{"a": 1}'.encode("utf-16")}, "message"),
    (SealScheme.MONETICO, {"fields": (("TPE", "1"),), "encode_base64": True}, "encode_base64"),
    (SealScheme.MONETICO, {}, "fields"),
    (SealScheme.CMCIC_LEGACY_NOTIFICATION, {}, "fields"),
])
def test_malformed_platform_input_is_invalid_argument_naming_the_field(scheme, request_fields, field):
    assert refused(scheme, **request_fields).field == field


def test_a_json_response_that_names_no_seal_algorithm_leaves_it_to_the_key():
    assert sealed(SealScheme.SIPS_JSON_RESPONSE, message=b'{"a": "1"}').seal_algorithm is None
    assert sealed(SealScheme.SIPS_JSON_REQUEST, message=b'{"a": "1"}').seal_algorithm == "HMAC-SHA-256"


def test_a_lone_surrogate_in_a_field_name_gives_an_error_that_can_be_sent():
    error = refused(SealScheme.SIPS_JSON_REQUEST, message=b'{"\\ud800": true}')

    error.message.encode("utf-8")
    error.field.encode("utf-8")
