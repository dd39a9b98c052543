"""Payment platform seals end to end: keys imported as the banks hand them out, seals
computed in a real SoftHSM token and compared with Python's own hmac / hashlib over the
string the platform seals, through the domain and through the real gRPC server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import grpc
import pytest

from keysvc.errors import FailedPrecondition, InvalidArgument, NotFound
from keysvc.keys import KeyProfile
from keysvc.model import Charset, KeyAlgorithm, KeyPlatform, KeyPurpose, KeyVersionState
from keysvc.seal_formats import SealScheme, decode_monetico_key
from keysvc.seals import SealEncoding, SealRequest, VerifyRequest
from keysvc.v1 import keys_pb2, seals_pb2
from tests.crypto_helpers import import_secret

# The SIPS simulation secret (20 bytes) and a Monetico-style 40-character test key.
SIPS_SECRET = b"002001000000001_KEY1"
MONETICO_KEY = "12345678901234567890123456789012345678P0"
SIPS = KeyProfile(KeyPlatform.SIPS)
MONETICO = KeyProfile(KeyPlatform.MONETICO)
TIMEOUT = 10.0


def hmac_hex(secret: bytes, data: bytes, name: str = "sha256") -> str:
    return hmac.new(secret, data, name).hexdigest()


def legacy_sips_hex(secret: bytes, data: bytes) -> str:
    return hashlib.sha256(data + secret).hexdigest()


def sips_hmac_key(domain, merchant, name="sips", version=1, secret=SIPS_SECRET, **options):
    """A SIPS HMAC-SHA-256 key imported as the CLI does: the secret zero-padded to 32 bytes."""
    return import_secret(domain, merchant, name, secret.ljust(32, b"\0"), KeyAlgorithm.HMAC_SHA256,
                         profile=SIPS, version=version, **options)


def sips_legacy_key(domain, merchant, name="legacy", secret=SIPS_SECRET, **options):
    """A SIPS SHA-256 (legacy) key: the secret goes in exactly as it is."""
    return import_secret(domain, merchant, name, secret, KeyAlgorithm.SHA256_DATA_SECRET, profile=SIPS, **options)


def monetico_key(domain, merchant, name="monetico", charset=Charset.UTF_8, key_text=MONETICO_KEY):
    return import_secret(domain, merchant, name, decode_monetico_key(key_text), KeyAlgorithm.HMAC_SHA1,
                         profile=KeyProfile(KeyPlatform.MONETICO, charset))


def seal(domain, key_id, scheme, **request):
    return domain.sealer.compute_seal(SealRequest(key_id=key_id, scheme=scheme, **request))


def verify(domain, key_id, scheme, seal_text, **request):
    return domain.sealer.verify_seal(VerifyRequest(key_id=key_id, scheme=scheme, seal=seal_text, **request))


# -- SIPS ----------------------------------------------------------------------------------------


SIPS_DATA = (b"amount=2500|currencyCode=978|merchantId=002001000000001|normalReturnUrl=https://shop.example/ret|"
             b"transactionReference=TR\xc3\xa9f123|keyVersion=1")


def test_sips_post_hmac_seal_is_hmac_sha256_keyed_with_the_secret_string_over_data(domain, merchant):
    key, _version = sips_hmac_key(domain, merchant)

    sealed = seal(domain, key.key_id, SealScheme.SIPS_POST, message=SIPS_DATA)

    assert sealed.seal == hmac_hex(SIPS_SECRET, SIPS_DATA)
    assert sealed.version == 1
    assert verify(domain, key.key_id, SealScheme.SIPS_POST, sealed.seal, message=SIPS_DATA).valid


def test_sips_post_legacy_seal_is_sha256_of_data_then_secret_inside_the_hsm(domain, merchant):
    key, version = sips_legacy_key(domain, merchant)

    sealed = seal(domain, key.key_id, SealScheme.SIPS_POST, message=SIPS_DATA)

    assert sealed.seal == legacy_sips_hex(SIPS_SECRET, SIPS_DATA)
    assert version.check_value == hashlib.sha256(bytes(16) + SIPS_SECRET).digest()[:3].hex().upper()


@pytest.mark.parametrize("length", [1, 7, 8, 20, 31, 33, 64, 100])
def test_legacy_secret_of_any_length_is_kept_exactly(domain, merchant, length):
    secret = bytes(range(65, 65 + length % 26)) * (length // 26) + bytes(range(65, 65 + length % 26))
    secret = secret[:length].ljust(length, b"z")
    key, _version = sips_legacy_key(domain, merchant, secret=secret)

    assert seal(domain, key.key_id, SealScheme.SIPS_POST, message=b"a=1").seal == legacy_sips_hex(secret, b"a=1")


def test_generated_legacy_key_seals_and_verifies_and_shows_its_check_value(domain, merchant):
    key = domain.keys.create_key(merchant, "gen", KeyPurpose.SEAL, KeyAlgorithm.SHA256_DATA_SECRET, SIPS)

    sealed = seal(domain, key.key_id, SealScheme.SIPS_POST, message=b"amount=1")

    assert verify(domain, key.key_id, SealScheme.SIPS_POST, sealed.seal, message=b"amount=1").valid
    assert not verify(domain, key.key_id, SealScheme.SIPS_POST, sealed.seal, message=b"amount=2").valid
    explained = domain.sealer.explain(SealRequest(key.key_id, b"", SealScheme.SIPS_POST, fields=((("a", "1"),))))
    assert explained.algorithm == "SHA-256"


def test_sips_post_from_fields_returns_the_data_it_built_with_its_seal(domain, merchant):
    key, _version = sips_hmac_key(domain, merchant)
    fields = (("amount", "2500"), ("currencyCode", "978"), ("orderId", "Crème brûlée €"), ("keyVersion", "1"))

    sealed = seal(domain, key.key_id, SealScheme.SIPS_POST, fields=fields)

    assert sealed.data == "amount=2500|currencyCode=978|orderId=Crème brûlée €|keyVersion=1"
    assert sealed.seal == hmac_hex(SIPS_SECRET, sealed.data.encode("utf-8"))


def test_sips_post_base64_seal_covers_the_base64_text(domain, merchant):
    key, _version = sips_hmac_key(domain, merchant)

    sealed = seal(domain, key.key_id, SealScheme.SIPS_POST, fields=(("amount", "1"),), encode_base64=True)

    assert sealed.data == base64.b64encode(b"amount=1").decode()
    assert sealed.seal == hmac_hex(SIPS_SECRET, sealed.data.encode())
    assert verify(domain, key.key_id, SealScheme.SIPS_POST, sealed.seal, message=sealed.data.encode(),
                  encode_base64=True).valid


def test_sips_seal_uses_the_key_version_the_data_names(domain, merchant):
    sips_hmac_key(domain, merchant, version=1, secret=b"first-secret-of-the-bank")
    key, _ = sips_hmac_key(domain, merchant, version=2, secret=SIPS_SECRET)
    sips_hmac_key(domain, merchant, version=3, secret=b"third-secret-of-the-bank", make_primary=True)
    data = b"amount=1|keyVersion=2"

    sealed = seal(domain, key.key_id, SealScheme.SIPS_POST, message=data)

    assert (sealed.version, sealed.seal) == (2, hmac_hex(SIPS_SECRET, data))
    assert verify(domain, key.key_id, SealScheme.SIPS_POST, sealed.seal, message=data).version == 2


def test_sips_response_without_key_version_is_tried_against_every_enabled_version(domain, merchant):
    sips_hmac_key(domain, merchant, version=1, secret=SIPS_SECRET)
    key, _ = sips_hmac_key(domain, merchant, version=2, secret=b"newer-secret-of-the-bank", make_primary=True)
    response = b"responseCode=00|amount=1"

    verification = verify(domain, key.key_id, SealScheme.SIPS_POST, hmac_hex(SIPS_SECRET, response), message=response)

    assert (verification.valid, verification.version) == (True, 1)


def test_sips_key_version_unknown_or_disabled_is_an_error_that_says_so(domain, merchant):
    key, _ = sips_hmac_key(domain, merchant)
    sips_hmac_key(domain, merchant, version=2, secret=b"second-secret-of-the-bank")
    domain.keys.set_version_state(key.key_id, 2, KeyVersionState.DISABLED)

    with pytest.raises(NotFound, match="no version 9"):
        seal(domain, key.key_id, SealScheme.SIPS_POST, message=b"a=1|keyVersion=9")
    with pytest.raises(FailedPrecondition, match="version 2 .* DISABLED"):
        seal(domain, key.key_id, SealScheme.SIPS_POST, message=b"a=1|keyVersion=2")
    with pytest.raises(FailedPrecondition, match="version 2 .* DISABLED"):
        verify(domain, key.key_id, SealScheme.SIPS_POST, "00" * 32, message=b"a=1|keyVersion=2")
    with pytest.raises(InvalidArgument) as conflicting:
        seal(domain, key.key_id, SealScheme.SIPS_POST, message=b"a=1|keyVersion=1", version=2)
    assert conflicting.value.field == "version"


def test_sips_json_request_and_response_seals(domain, merchant):
    key, _ = sips_hmac_key(domain, merchant)
    request = {"amount": 2500, "currencyCode": "978", "keyVersion": 1, "merchantId": "002001000000001",
               "customer": {"firstname": "Zoé", "lastname": "Ñandú"}, "paymentMeanBrandList": ["VISA", "CB"],
               "orderId": "", "sealAlgorithm": "HMAC-SHA-256"}
    expected = "2500978ZoéÑandú002001000000001VISACB".encode()

    sealed = seal(domain, key.key_id, SealScheme.SIPS_JSON_REQUEST, message=json.dumps(request).encode())

    assert sealed.seal == hmac_hex(SIPS_SECRET, expected)
    response = {"responseCode": "00", "keyVersion": 1, "seal": "x"}
    response_seal = hmac_hex(SIPS_SECRET, b"100")
    assert verify(domain, key.key_id, SealScheme.SIPS_JSON_RESPONSE, response_seal,
                  message=json.dumps(response).encode()).version == 1


def test_sips_json_seal_algorithm_must_match_the_key(domain, merchant):
    hmac_key, _ = sips_hmac_key(domain, merchant)
    legacy_key, _ = sips_legacy_key(domain, merchant)

    with pytest.raises(InvalidArgument) as asks_legacy:
        seal(domain, hmac_key.key_id, SealScheme.SIPS_JSON_REQUEST, message=b'{"sealAlgorithm": "SHA-256"}')
    with pytest.raises(InvalidArgument) as implies_hmac:
        seal(domain, legacy_key.key_id, SealScheme.SIPS_JSON_REQUEST, message=b'{"amount": "1"}')
    legacy = seal(domain, legacy_key.key_id, SealScheme.SIPS_JSON_REQUEST,
                  message=b'{"amount": "1", "sealAlgorithm": "SHA-256"}')

    assert asks_legacy.value.field == implies_hmac.value.field == "sealAlgorithm"
    assert legacy.seal == legacy_sips_hex(SIPS_SECRET, b"1")


# -- Monetico / CM-CIC ------------------------------------------------------------------------------


MONETICO_FIELDS = (("TPE", "1234567"), ("date", "27/11/2026:10:00:00"), ("montant", "62.75EUR"),
                   ("reference", "REF123"), ("texte-libre", "Thé & café"), ("version", "3.0"), ("lgue", "FR"),
                   ("societe", "monSite1"), ("mail", "client@example.fr"))


def monetico_string(fields, codec="utf-8") -> bytes:
    return b"*".join(f"{n}={v}".encode(codec) for n, v in sorted(fields, key=lambda f: f[0].encode(codec))
                     if n != "MAC")


def test_monetico_mac_is_hmac_sha1_with_the_decoded_key_over_the_sorted_fields(domain, merchant):
    key, version = monetico_key(domain, merchant)
    secret = decode_monetico_key(MONETICO_KEY)

    sealed = seal(domain, key.key_id, SealScheme.MONETICO, fields=MONETICO_FIELDS)

    assert sealed.seal == hmac_hex(secret, monetico_string(MONETICO_FIELDS), "sha1")
    assert version.check_value == hmac.new(secret, bytes(16), "sha1").digest()[:3].hex().upper()


def test_monetico_notification_verification_is_case_insensitive_and_gives_the_receipt(domain, merchant):
    key, _ = monetico_key(domain, merchant)
    notification = (*MONETICO_FIELDS, ("code-retour", "payetest"), ("cvx", "oui"), ("numauto", ""))
    mac = hmac_hex(decode_monetico_key(MONETICO_KEY), monetico_string(notification), "sha1").upper()

    genuine = verify(domain, key.key_id, SealScheme.MONETICO, mac, fields=(*notification, ("MAC", mac)))
    forged = verify(domain, key.key_id, SealScheme.MONETICO, mac,
                    fields=(*notification[:-1], ("numauto", "123456"), ("MAC", mac)))

    assert (genuine.valid, genuine.receipt) == (True, "version=2\ncdr=0\n")
    assert (forged.valid, forged.receipt) == (False, "version=2\ncdr=1\n")


def test_monetico_iso_8859_1_key_seals_latin1_bytes(domain, merchant):
    key, _ = monetico_key(domain, merchant, charset=Charset.ISO_8859_1)

    sealed = seal(domain, key.key_id, SealScheme.MONETICO, fields=MONETICO_FIELDS)

    expected = hmac_hex(decode_monetico_key(MONETICO_KEY), monetico_string(MONETICO_FIELDS, "iso-8859-1"), "sha1")
    assert sealed.seal == expected
    with pytest.raises(InvalidArgument) as euro:
        seal(domain, key.key_id, SealScheme.MONETICO, fields=(("texte-libre", "10 €"),))
    assert euro.value.field == "fields[texte-libre]"


def test_cmcic_legacy_request_and_notification(domain, merchant):
    key, _ = monetico_key(domain, merchant)
    secret = decode_monetico_key(MONETICO_KEY)
    request = (("TPE", "1234567"), ("date", "05/12/2006:11:55:23"), ("montant", "62.75"), ("devise", "EUR"),
               ("reference", "ABERTYP00145"), ("texte-libre", "libre"), ("version", "3.0"), ("lgue", "FR"),
               ("societe", "monSite1"), ("mail", "a@b.fr"))
    request_string = b"1234567*05/12/2006:11:55:23*62.75EUR*ABERTYP00145*libre*3.0*FR*monSite1*a@b.fr**********"
    notification = (("TPE", "1234567"), ("date", "05/12/2006_a_11:55:23"), ("montant", "62.75EUR"),
                    ("reference", "ABERTYP00145"), ("texte-libre", "libre"), ("version", "3.0"),
                    ("code-retour", "paiement"), ("cvx", "oui"), ("vld", "1208"), ("brand", "VI"))
    notification_string = (b"1234567*05/12/2006_a_11:55:23*62.75EUR*ABERTYP00145*libre*3.0*paiement*oui*1208*VI"
                           b"***********")

    sealed = seal(domain, key.key_id, SealScheme.CMCIC_LEGACY_REQUEST, fields=request)
    verified = verify(domain, key.key_id, SealScheme.CMCIC_LEGACY_NOTIFICATION,
                      hmac_hex(secret, notification_string, "sha1"), fields=notification)

    assert sealed.seal == hmac_hex(secret, request_string, "sha1")
    assert (verified.valid, verified.receipt) == (True, "version=2\ncdr=0\n")


# -- keys and schemes must match -----------------------------------------------------------------


def test_a_key_serves_only_its_platforms_schemes(domain, merchant):
    sips, _ = sips_hmac_key(domain, merchant)
    monetico, _ = monetico_key(domain, merchant)
    generic = domain.keys.create_key(merchant, "generic", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)

    for key_id, scheme in [(sips.key_id, SealScheme.HMAC), (sips.key_id, SealScheme.MONETICO),
                           (monetico.key_id, SealScheme.SIPS_POST), (generic.key_id, SealScheme.SIPS_POST)]:
        with pytest.raises(InvalidArgument) as raised:
            seal(domain, key_id, scheme, message=b"a=1", fields=() if scheme is not SealScheme.MONETICO else (("a", "1"),))
        assert raised.value.field == "scheme"


def test_platform_seals_are_hex_only(domain, merchant):
    key, _ = sips_hmac_key(domain, merchant)

    with pytest.raises(InvalidArgument) as raised:
        seal(domain, key.key_id, SealScheme.SIPS_POST, message=b"a=1", encoding=SealEncoding.BASE64)

    assert raised.value.field == "encoding"


@pytest.mark.parametrize("platform, algorithm", [
    (KeyPlatform.MONETICO, KeyAlgorithm.HMAC_SHA256),
    (KeyPlatform.SIPS, KeyAlgorithm.HMAC_SHA1),
    (KeyPlatform.GENERIC, KeyAlgorithm.SHA256_DATA_SECRET),
])
def test_an_algorithm_the_platform_does_not_use_is_refused_and_nothing_is_stored(domain, merchant, platform, algorithm):
    with pytest.raises(InvalidArgument) as raised:
        domain.keys.create_key(merchant, "k", KeyPurpose.SEAL, algorithm, KeyProfile(platform))

    assert raised.value.field == "algorithm"
    with pytest.raises(NotFound):
        domain.keys.get_key(f"{merchant}/k")


def test_importing_into_a_key_of_another_profile_is_refused(domain, merchant):
    key, _ = sips_hmac_key(domain, merchant)

    with pytest.raises(InvalidArgument) as raised:
        import_secret(domain, merchant, "sips", bytes(32), KeyAlgorithm.HMAC_SHA256, profile=MONETICO)

    assert raised.value.field == "platform"
    assert len(domain.keys.get_key(key.key_id).versions) == 1


# -- batches ---------------------------------------------------------------------------------------


def test_batch_seal_and_verify_answer_every_scheme_item_by_item(domain, merchant):
    sips, _ = sips_hmac_key(domain, merchant)
    legacy, _ = sips_legacy_key(domain, merchant)
    monetico, _ = monetico_key(domain, merchant)
    requests = [
        SealRequest(sips.key_id, SIPS_DATA, SealScheme.SIPS_POST),
        SealRequest(sips.key_id, b'{"amount": 1}', SealScheme.SIPS_JSON_REQUEST),
        SealRequest(legacy.key_id, SIPS_DATA, SealScheme.SIPS_POST),
        SealRequest(monetico.key_id, scheme=SealScheme.MONETICO, fields=MONETICO_FIELDS),
        SealRequest(monetico.key_id, scheme=SealScheme.CMCIC_LEGACY_REQUEST, fields=(("TPE", "1"),)),
        SealRequest(monetico.key_id, scheme=SealScheme.CMCIC_LEGACY_NOTIFICATION, fields=(("TPE", "1"),)),
        SealRequest(sips.key_id, b'{"flag": true}', SealScheme.SIPS_JSON_REQUEST),  # fails alone
    ]

    seals = domain.sealer.compute_seals(requests)

    assert isinstance(seals[-1], InvalidArgument) and seals[-1].field == "message.flag"
    assert seals[0].seal == hmac_hex(SIPS_SECRET, SIPS_DATA)
    assert seals[2].seal == legacy_sips_hex(SIPS_SECRET, SIPS_DATA)
    verifications = domain.sealer.verify_seals([
        VerifyRequest(r.key_id, r.message, s.seal, r.scheme, fields=r.fields) for r, s in zip(requests[:-1], seals)
    ])
    assert [v.valid for v in verifications] == [True] * 6
    assert [v.receipt for v in verifications][3:] == ["version=2\ncdr=0\n", "", "version=2\ncdr=0\n"]


# -- through gRPC ------------------------------------------------------------------------------------


def test_grpc_profile_seal_explain_and_receipt(server, merchant):
    domain = server.domain
    key, _ = monetico_key(domain, merchant)
    fields = [seals_pb2.Field(name=n, value=v) for n, v in MONETICO_FIELDS]

    sealed = server.seals.Seal(seals_pb2.SealRequest(
        key_id=key.key_id, scheme=seals_pb2.SEAL_SCHEME_MONETICO, fields=fields), timeout=TIMEOUT)
    explained = server.seals.ExplainSeal(seals_pb2.SealRequest(
        key_id=key.key_id, scheme=seals_pb2.SEAL_SCHEME_MONETICO, fields=fields), timeout=TIMEOUT)
    verified = server.seals.Verify(seals_pb2.VerifyRequest(
        key_id=key.key_id, scheme=seals_pb2.SEAL_SCHEME_MONETICO, fields=fields, seal=sealed.seal.upper()),
        timeout=TIMEOUT)
    held = server.keys.GetKey(keys_pb2.GetKeyRequest(key_id=key.key_id), timeout=TIMEOUT).key

    assert sealed.seal == hmac_hex(decode_monetico_key(MONETICO_KEY), monetico_string(MONETICO_FIELDS), "sha1")
    assert explained.sealed_data == monetico_string(MONETICO_FIELDS)
    assert (explained.algorithm, explained.charset, explained.version) == ("HMAC-SHA1", "UTF-8", 1)
    assert explained.scheme == seals_pb2.SEAL_SCHEME_MONETICO
    assert sealed.seal not in str(explained)
    assert (verified.valid, verified.receipt) == (True, "version=2\ncdr=0\n")
    assert (held.platform, held.charset) == (keys_pb2.KEY_PLATFORM_MONETICO, keys_pb2.CHARSET_UTF_8)


def test_grpc_sips_post_from_fields_json_returns_data(server, merchant):
    key, _ = sips_hmac_key(server.domain, merchant)

    sealed = server.seals.Seal(seals_pb2.SealRequest(
        key_id=key.key_id, scheme=seals_pb2.SEAL_SCHEME_SIPS_POST,
        fields_json='{"amount": 10, "customer": {"city": "Nantes"}, "keyVersion": 1}'), timeout=TIMEOUT)

    assert sealed.data == "amount=10|customer.city=Nantes|keyVersion=1"
    assert (sealed.seal, sealed.version) == (hmac_hex(SIPS_SECRET, sealed.data.encode()), 1)


def test_grpc_create_key_with_a_profile_and_refusals(server, merchant):
    created = server.keys.CreateKey(keys_pb2.CreateKeyRequest(
        merchant_id=merchant, name="legacy", algorithm=keys_pb2.KEY_ALGORITHM_SHA256_DATA_SECRET,
        platform=keys_pb2.KEY_PLATFORM_SIPS), timeout=TIMEOUT).key
    with pytest.raises(grpc.RpcError) as wrong_algorithm:
        server.keys.CreateKey(keys_pb2.CreateKeyRequest(
            merchant_id=merchant, name="m", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256,
            platform=keys_pb2.KEY_PLATFORM_MONETICO), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as boolean:
        server.seals.Seal(seals_pb2.SealRequest(
            key_id=created.key_id, scheme=seals_pb2.SEAL_SCHEME_SIPS_JSON_REQUEST,
            message=b'{"sealAlgorithm": "SHA-256", "gift": false}'), timeout=TIMEOUT)

    assert (created.platform, created.algorithm) == (keys_pb2.KEY_PLATFORM_SIPS,
                                                     keys_pb2.KEY_ALGORITHM_SHA256_DATA_SECRET)
    assert wrong_algorithm.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "algorithm" in wrong_algorithm.value.details()
    assert boolean.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message.gift" in boolean.value.details()


def test_grpc_batch_seal_with_payment_schemes(server, merchant):
    key, _ = sips_hmac_key(server.domain, merchant)
    requests = [seals_pb2.SealRequest(key_id=key.key_id, scheme=seals_pb2.SEAL_SCHEME_SIPS_POST,
                                      message=f"amount={i}".encode()) for i in range(5)]
    requests.append(seals_pb2.SealRequest(key_id=key.key_id, scheme=seals_pb2.SEAL_SCHEME_MONETICO,
                                          fields=[seals_pb2.Field(name="a", value="1")]))

    results = server.seals.BatchSeal(seals_pb2.BatchSealRequest(requests=requests), timeout=TIMEOUT).results

    assert [r.response.seal for r in results[:5]] == [hmac_hex(SIPS_SECRET, f"amount={i}".encode())
                                                      for i in range(5)]
    assert results[5].error.reason == "INVALID_ARGUMENT" and "scheme" in results[5].error.message


# -- found in review ---------------------------------------------------------------------------------


def test_a_legacy_key_verifies_a_json_response_that_names_no_seal_algorithm(domain, merchant):
    key, _ = sips_legacy_key(domain, merchant)
    response = b'{"responseCode": "00", "keyVersion": 1, "seal": "x"}'

    verified = verify(domain, key.key_id, SealScheme.SIPS_JSON_RESPONSE, legacy_sips_hex(SIPS_SECRET, b"100"),
                      message=response)

    assert (verified.valid, verified.version) == (True, 1)


def test_an_unknown_seal_algorithm_in_a_message_is_not_quoted(domain, merchant):
    key, _ = sips_hmac_key(domain, merchant)
    card = "4111111111111111"

    with pytest.raises(InvalidArgument) as raised:
        seal(domain, key.key_id, SealScheme.SIPS_JSON_REQUEST, message=f'{{"sealAlgorithm": "{card}"}}'.encode())

    assert card not in raised.value.message


def test_a_legacy_secret_over_214_bytes_is_refused_with_the_range(domain, merchant):
    with pytest.raises(InvalidArgument, match="1 to 214 bytes"):
        sips_legacy_key(domain, merchant, secret=b"s" * 215)

    with pytest.raises(NotFound):
        domain.keys.get_key(f"{merchant}/legacy")


def test_a_profile_changed_in_the_database_is_refused_as_data_loss(domain, merchant):
    import sqlalchemy as sa

    from keysvc.errors import IntegrityError
    from keysvc.store.schema import keys

    key, _ = monetico_key(domain, merchant)
    with domain.store.engine.begin() as connection:
        connection.execute(sa.update(keys).where(keys.c.key_id == key.key_id)
                           .values(charset="ISO-8859-1", revision=keys.c.revision + 1))
    domain.ring.refresh(key.key_id)
    domain.ring._release_where(lambda k, v: k == key.key_id)  # as in a fresh worker: no cached handle

    with pytest.raises(IntegrityError):
        seal(domain, key.key_id, SealScheme.MONETICO, fields=MONETICO_FIELDS)


def test_grpc_a_lone_surrogate_in_a_json_name_is_invalid_argument_alone_in_a_batch(server, merchant):
    key, _ = sips_hmac_key(server.domain, merchant)
    bad = seals_pb2.SealRequest(key_id=key.key_id, scheme=seals_pb2.SEAL_SCHEME_SIPS_JSON_REQUEST,
                                message=b'{"\\ud800": true}')
    good = seals_pb2.SealRequest(key_id=key.key_id, scheme=seals_pb2.SEAL_SCHEME_SIPS_JSON_REQUEST,
                                 message=b'{"a": "1"}')

    with pytest.raises(grpc.RpcError) as raised:
        server.seals.Seal(bad, timeout=TIMEOUT)
    results = server.seals.BatchSeal(seals_pb2.BatchSealRequest(requests=[bad, good]), timeout=TIMEOUT).results
    sealed = server.seals.Seal(good, timeout=TIMEOUT)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert results[0].error.reason == "INVALID_ARGUMENT" and results[1].response.seal
    assert sealed.algorithm == "HMAC-SHA-256"
