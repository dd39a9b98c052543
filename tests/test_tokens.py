"""Card tokenization in the domain layer, on the real SoftHSM token and real databases."""

from __future__ import annotations

import re
import secrets
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hsm
from keysvc.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound, PermissionDenied
from keysvc.store import KeyStore
from keysvc.store.schema import token_data_keys, token_domains, tokens
from keysvc.store.tokens import TokenStore
from keysvc.tokens import (
    CardBrand,
    Detokenized,
    TokenFormat,
    TokenGenerator,
    Tokenized,
    TokenizeOptions,
    TokenizeRequest,
    Tokenizer,
    card_brand,
    luhn_valid,
    mask_pan,
)
from tests.conftest import run_together


def with_check_digit(body: str) -> str:
    """`body` plus the Luhn check digit that makes it valid."""
    for digit in "0123456789":
        if luhn_valid(body + digit):
            return body + digit
    raise AssertionError("unreachable")


def same_bin_and_last4(count: int, bin6: str = "411111", last4: str = "0123") -> list[str]:
    """`count` Luhn-valid 16-digit PANs sharing a BIN6 and last 4."""
    found = [p for p in (bin6 + f"{m:06d}" + last4 for m in range(10**6)) if luhn_valid(p)]
    return found[:count]


def random_pan(length: int = 16, prefix: str = "4") -> str:
    body = prefix + "".join(secrets.choice("0123456789") for _ in range(length - 1 - len(prefix)))
    return with_check_digit(body)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def new_tokenizer(hsm_token, database_url: str, **options) -> tuple[Tokenizer, KeyStore]:
    store = KeyStore.open(database_url)
    return Tokenizer(hsm_token, TokenStore(store.engine), detokenize_allowed=True, **options), store


@pytest.fixture
def tokenizer(domain) -> Tokenizer:
    return Tokenizer(domain.hsm, TokenStore(domain.store.engine), detokenize_allowed=True)


@pytest.fixture
def any_db_tokenizer(hsm_token, database_url):
    tokenizer, store = new_tokenizer(hsm_token, database_url)
    yield tokenizer
    store.close()


def tokenize(tokenizer: Tokenizer, domain: str, *pans: str, **options) -> list:
    return tokenizer.tokenize(TokenizeRequest(domain, tuple(pans), TokenizeOptions(**options)))


def one(tokenizer: Tokenizer, domain: str, pan: str, **options) -> Tokenized:
    [result] = tokenize(tokenizer, domain, pan, **options)
    assert isinstance(result, Tokenized), result
    return result


def pan_of(tokenizer: Tokenizer, domain: str, token: str) -> str:
    [result] = tokenizer.detokenize(domain, [token])
    assert isinstance(result, Detokenized), result
    return result.pan


# -- card number rules ------------------------------------------------------------------------


def test_luhn_known_numbers():
    # Test card numbers published by the schemes / processors.
    for pan in ("4111111111111111", "5555555555554444", "378282246310005", "6011111111111117",
                "3530111333300000", "30569309025904", "4012888888881881", "6200000000000005"):
        assert luhn_valid(pan), pan
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("1234567812345678")


def test_card_brands():
    assert card_brand("4111111111111111") is CardBrand.VISA
    assert card_brand("5555555555554444") is CardBrand.MASTERCARD
    assert card_brand("2223003122003222") is CardBrand.MASTERCARD
    assert card_brand("378282246310005") is CardBrand.AMEX
    assert card_brand("6011111111111117") is CardBrand.DISCOVER
    assert card_brand("3530111333300000") is CardBrand.JCB
    assert card_brand("30569309025904") is CardBrand.DINERS_CLUB
    assert card_brand("6200000000000005") is CardBrand.UNIONPAY
    assert card_brand("6759649826438453") is CardBrand.MAESTRO
    assert card_brand("9999999999999995") is CardBrand.OTHER


def test_masked_pan_shows_bin6_and_last4_at_most_and_hides_six():
    assert mask_pan("4111111111111111") == "411111******1111"
    assert mask_pan("4111111111111111111") == "411111*********1111"
    assert mask_pan("378282246310005") == "37828******0005"  # 15 digits: BIN5, six hidden
    assert mask_pan("411111111119") == "41******1119"
    for length in range(12, 20):
        masked = mask_pan(random_pan(length))
        assert len(masked) == length and masked.count("*") >= 6


# -- tokens --------------------------------------------------------------------------------


def test_format_preserving_token_rules(tokenizer, merchant):
    for length in range(12, 20):
        for keep_bin in (False, True) if length >= 16 else (False,):
            pan = random_pan(length)
            result = one(tokenizer, merchant, pan, keep_bin=keep_bin)
            token = result.token
            assert len(token) == length and token.isdigit()
            assert token[-4:] == pan[-4:]
            assert not luhn_valid(token) and token != pan
            if keep_bin:
                assert token[:6] == pan[:6]
            assert result.masked_pan == mask_pan(pan)
            assert result.brand is CardBrand.VISA
            assert result.created and result.key_version == 1
            assert pan_of(tokenizer, merchant, token) == pan


def test_format_preserving_tokens_are_never_luhn_valid():
    generator = TokenGenerator()
    pan = random_pan(16)
    assert not any(luhn_valid(generator.format_preserving(pan, keep_bin=True)) for _ in range(2000))


def test_opaque_token_shape(tokenizer, merchant):
    pan = random_pan()
    result = one(tokenizer, merchant, pan, token_format=TokenFormat.OPAQUE)
    assert re.fullmatch(r"tok_[0-9A-Za-z]{22}", result.token)
    assert pan_of(tokenizer, merchant, result.token) == pan


def test_deterministic_within_a_domain_fresh_on_request(tokenizer, merchant):
    pan = random_pan()
    first = one(tokenizer, merchant, pan)
    again = one(tokenizer, merchant, pan)
    assert again.token == first.token and first.created and not again.created
    fresh = one(tokenizer, merchant, pan, fresh=True)
    assert fresh.token != first.token and fresh.created
    assert pan_of(tokenizer, merchant, fresh.token) == pan
    # Another format or BIN option is another token, as is another domain.
    assert one(tokenizer, merchant, pan, token_format=TokenFormat.OPAQUE).token != first.token
    assert one(tokenizer, merchant, pan, keep_bin=True).token != first.token
    assert one(tokenizer, merchant + "-other", pan).created


def test_same_pan_twice_in_one_batch_gets_one_token(tokenizer, merchant):
    pan = random_pan()
    results = tokenize(tokenizer, merchant, pan, random_pan(), pan)
    assert results[0].token == results[2].token
    assert results[0].created and not results[2].created


def test_fingerprints_are_keyed_and_per_domain(domain, tokenizer, merchant):
    pan = random_pan()
    one(tokenizer, merchant, pan)
    one(tokenizer, merchant + "-b", pan)
    import hashlib

    with domain.store.engine.connect() as connection:
        fingerprints = connection.execute(sa.select(tokens.c.fingerprint)).scalars().all()
    assert len(set(fingerprints)) == 2
    assert hashlib.sha256(pan.encode()).digest() not in fingerprints


def test_bad_items_fail_alone_and_never_echo_digits(tokenizer, merchant):
    good = random_pan()
    luhn_bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    bad = [luhn_bad, "41111111111", "4" * 20, "4111 1111 1111 1111", "٤١١١١١١١١١١١١١١١", ""]
    results = tokenize(tokenizer, merchant, bad[0], good, *bad[1:])
    assert isinstance(results[1], Tokenized)
    for index, result in enumerate(results):
        if index == 1:
            continue
        assert isinstance(result, InvalidArgument) and result.reason == "INVALID_PAN"
        assert result.field == f"pans[{index}]"
        assert not re.search(r"\d{5}", result.message)
        assert luhn_bad not in repr(result) and luhn_bad not in str(result)


def test_keep_bin_refused_for_short_pans_per_item(tokenizer, merchant):
    short, long = random_pan(15), random_pan(16)
    results = tokenize(tokenizer, merchant, short, long, keep_bin=True)
    assert isinstance(results[0], InvalidArgument) and results[0].reason == "PAN_TOO_SHORT_TO_KEEP_BIN"
    assert isinstance(results[1], Tokenized) and results[1].token[:6] == long[:6]


def test_request_level_errors(tokenizer, merchant):
    with pytest.raises(InvalidArgument, match="keep_bin"):
        tokenize(tokenizer, merchant, random_pan(), token_format=TokenFormat.OPAQUE, keep_bin=True)
    with pytest.raises(InvalidArgument, match="ttl"):
        tokenize(tokenizer, merchant, random_pan(), ttl=timedelta(0))
    with pytest.raises(InvalidArgument, match="pans"):
        tokenize(tokenizer, merchant)
    with pytest.raises(InvalidArgument, match="pans"):
        tokenize(tokenizer, merchant, *[random_pan() for _ in range(1001)])
    with pytest.raises(InvalidArgument, match="domain"):
        tokenize(tokenizer, "bad domain", random_pan())


def test_request_reprs_hide_pans(tokenizer, merchant):
    pan = random_pan()
    request = TokenizeRequest(merchant, (pan,))
    assert pan not in repr(request)
    result = one(tokenizer, merchant, pan)
    detokenized = tokenizer.detokenize(merchant, [result.token])
    assert pan not in repr(detokenized) and pan not in repr(result)


def drawing_the_same_token_twice(domain, last4: str) -> tuple[Tokenizer, int, list[int]]:
    """A tokenizer whose first two draws give the same middle digits (of a token that
    keeps BIN6 411111 and `last4`), then random ones; those digits; the script left."""
    middle = next(x for x in range(10**6) if not luhn_valid("411111" + f"{x:06d}" + last4))
    scripted = [middle, middle]
    generator = TokenGenerator(lambda bound: scripted.pop(0) if scripted else secrets.randbelow(bound))
    tokenizer = Tokenizer(domain.hsm, TokenStore(domain.store.engine), detokenize_allowed=True, generator=generator)
    return tokenizer, middle, scripted


def test_token_collisions_are_retried(domain, merchant):
    # Two cards with the same BIN6 and last 4: the same token space. The first two draws
    # are the same number: the second PAN's first token is taken.
    pans = same_bin_and_last4(2)
    tokenizer, middle, scripted = drawing_the_same_token_twice(domain, pans[0][-4:])
    a = one(tokenizer, merchant, pans[0], keep_bin=True)
    b = one(tokenizer, merchant, pans[1], keep_bin=True)
    assert a.token[6:12] == f"{middle:06d}" and not scripted
    assert a.token != b.token and b.created
    assert pan_of(tokenizer, merchant, a.token) == pans[0]
    assert pan_of(tokenizer, merchant, b.token) == pans[1]


def test_a_token_drawn_twice_in_one_batch_is_drawn_again(domain, merchant):
    # Two cards with the same BIN6 and last 4 in one batch, given the same first draw:
    # the second draws again instead of both items claiming the one row inserted.
    pans = same_bin_and_last4(2)
    tokenizer, middle, scripted = drawing_the_same_token_twice(domain, pans[0][-4:])
    a, b = tokenize(tokenizer, merchant, *pans, keep_bin=True)
    assert a.created and b.created and a.token != b.token and not scripted
    assert a.token[6:12] == f"{middle:06d}"
    assert [result.pan for result in tokenizer.detokenize(merchant, [a.token, b.token])] == pans


def test_batch_token_generation_rules():
    generator = TokenGenerator()
    pans = [random_pan(length) for length in (12, 15, 16, 19) for _ in range(500)]
    for keep_bin in (False, True):
        eligible = [pan for pan in pans if not keep_bin or len(pan) >= 16]
        made = generator.tokens(eligible, TokenizeOptions(keep_bin=keep_bin))
        assert len(made) == len(eligible) and len(set(made)) == len(made)
        for pan, token in zip(eligible, made):
            assert len(token) == len(pan) and token.isdigit() and not luhn_valid(token)
            assert token[-4:] == pan[-4:] and (not keep_bin or token[:6] == pan[:6])
        # Every random position takes every digit (a failure here has odds below 10^-40).
        for position in range(6 if keep_bin else 0, 8):
            assert {token[position] for token in made} == set("0123456789")
    opaque = generator.tokens([""] * 2000, TokenizeOptions(token_format=TokenFormat.OPAQUE))
    assert all(re.fullmatch(r"tok_[0-9A-Za-z]{22}", token) for token in opaque) and len(set(opaque)) == 2000
    assert {character for token in opaque for character in token[4:]} == set(
        "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def test_insert_tokens_reports_only_its_own_rows(any_db_tokenizer, merchant):
    """A row whose token or deterministic PAN another row holds is skipped, and only the
    rows this call wrote count as inserted (SQLite tells them by their nonces)."""
    from dataclasses import replace

    store = any_db_tokenizer._store
    held = one(any_db_tokenizer, merchant, random_pan())
    existing = store.load_tokens(merchant, [held.token])[held.token]
    other = one(any_db_tokenizer, merchant, random_pan(), token_format=TokenFormat.OPAQUE)
    same_token = replace(existing, fingerprint=secrets.token_bytes(32), nonce=secrets.token_bytes(12))
    same_pan = replace(existing, token=other.token[:-1] + "x", nonce=secrets.token_bytes(12))
    new = replace(existing, token="tok_" + "n" * 22, fingerprint=secrets.token_bytes(32),
                  nonce=secrets.token_bytes(12))
    now = existing.created_at
    assert store.insert_tokens([same_token, same_pan, new], now) == {new.token}
    assert store.load_tokens(merchant, [held.token])[held.token] == existing
    assert store.load_tokens(merchant, [same_pan.token]) == {}
    with pytest.raises(ValueError):
        store.insert_tokens([new, replace(new, fingerprint=secrets.token_bytes(32))], now)


def test_full_token_space_is_an_item_error(domain, merchant):
    pans = same_bin_and_last4(2)
    middle = next(x for x in range(10**6) if not luhn_valid("411111" + f"{x:06d}" + pans[0][-4:]))
    generator = TokenGenerator(lambda bound: middle)
    tokenizer = Tokenizer(domain.hsm, TokenStore(domain.store.engine), detokenize_allowed=True, generator=generator)
    [first] = tokenize(tokenizer, merchant, pans[0], keep_bin=True)
    [second] = tokenize(tokenizer, merchant, pans[1], keep_bin=True)
    assert isinstance(first, Tokenized)
    assert isinstance(second, FailedPrecondition) and second.reason == "TOKEN_SPACE_EXHAUSTED"


def test_concurrent_tokenization_of_one_pan_gives_one_token(any_db_tokenizer, merchant):
    pan = random_pan()
    results = run_together(8, lambda _index: one(any_db_tokenizer, merchant, pan))
    assert len({result.token for result in results}) == 1
    assert sum(result.created for result in results) == 1
    assert pan_of(any_db_tokenizer, merchant, results[0].token) == pan


def test_concurrent_batches_on_a_new_domain(any_db_tokenizer, merchant):
    pans = [random_pan() for _ in range(50)]
    results = run_together(4, lambda index: tokenize(any_db_tokenizer, merchant, *pans[index:] + pans[:index]))
    by_pan: dict[str, set[str]] = {}
    for index, batch in enumerate(results):
        for pan, result in zip(pans[index:] + pans[:index], batch):
            by_pan.setdefault(pan, set()).add(result.token)
    assert all(len(found) == 1 for found in by_pan.values())
    detokenized = any_db_tokenizer.detokenize(merchant, [next(iter(by_pan[pan])) for pan in pans])
    assert [result.pan for result in detokenized] == pans


# -- detokenize, info, delete, expiry ---------------------------------------------------------


def test_detokenize_is_off_unless_allowed(domain, merchant):
    tokenizer = Tokenizer(domain.hsm, TokenStore(domain.store.engine))
    result = one(tokenizer, merchant, random_pan())
    with pytest.raises(PermissionDenied):
        tokenizer.detokenize(merchant, [result.token])


def test_detokenize_item_errors(tokenizer, merchant):
    pan = random_pan()
    token = one(tokenizer, merchant, pan).token
    results = tokenizer.detokenize(merchant, [token, "0000000000000001", "bad token!", token, pan])
    assert results[0].pan == pan and results[3].pan == pan
    assert isinstance(results[1], NotFound) and results[1].reason == "TOKEN_NOT_FOUND"
    assert isinstance(results[2], InvalidArgument) and results[2].field == "tokens[2]"
    # A card number where a token belongs never reaches the database.
    assert isinstance(results[4], InvalidArgument) and results[4].reason == "PAN_GIVEN_AS_TOKEN"
    assert pan not in str(results[4])
    with pytest.raises(NotFound):
        tokenizer.detokenize(merchant + "-unknown", [token])
    # A token is found in its own domain only.
    one(tokenizer, merchant + "-b", random_pan())
    assert isinstance(tokenizer.detokenize(merchant + "-b", [token])[0], NotFound)


def test_token_info_and_delete(tokenizer, merchant):
    pan = random_pan()
    result = one(tokenizer, merchant, pan, ttl=timedelta(hours=1))
    info = tokenizer.token_info(merchant, result.token)
    assert info.masked_pan == mask_pan(pan) and info.brand is CardBrand.VISA
    assert info.token_format is TokenFormat.FORMAT_PRESERVING and info.deterministic
    assert info.expires_at == result.expires_at and info.expires_at - info.created_at == timedelta(hours=1)
    assert pan not in repr(info)
    tokenizer.delete_token(merchant, result.token)
    assert isinstance(tokenizer.detokenize(merchant, [result.token])[0], NotFound)
    with pytest.raises(NotFound):
        tokenizer.token_info(merchant, result.token)
    with pytest.raises(NotFound):
        tokenizer.delete_token(merchant, result.token)
    again = one(tokenizer, merchant, pan)
    assert again.created and again.token != result.token


def test_expired_tokens_refuse_detokenization_and_are_purged(domain, merchant):
    clock = Clock()
    tokenizer = Tokenizer(domain.hsm, TokenStore(domain.store.engine), detokenize_allowed=True, clock=clock)
    pan, lasting = random_pan(), random_pan()
    expiring = one(tokenizer, merchant, pan, ttl=timedelta(minutes=5))
    kept = one(tokenizer, merchant, lasting)
    clock.now += timedelta(minutes=4)
    assert pan_of(tokenizer, merchant, expiring.token) == pan
    clock.now += timedelta(minutes=1)
    [refused] = tokenizer.detokenize(merchant, [expiring.token])
    assert isinstance(refused, FailedPrecondition) and refused.reason == "TOKEN_EXPIRED"
    # The PAN gets a new token; the expired one gives way.
    renewed = one(tokenizer, merchant, pan)
    assert renewed.created and renewed.expires_at is None
    assert pan_of(tokenizer, merchant, renewed.token) == pan
    fresh_expiring = one(tokenizer, merchant, random_pan(), fresh=True, ttl=timedelta(seconds=1))
    clock.now += timedelta(seconds=1)
    assert tokenizer.purge_expired() == 1
    with pytest.raises(NotFound):
        tokenizer.token_info(merchant, fresh_expiring.token)
    assert pan_of(tokenizer, merchant, kept.token) == lasting


# -- storage: tampering, rotation, rewrap, shredding -------------------------------------------------


def test_tampered_rows_are_refused(domain, tokenizer, merchant):
    pans = [random_pan() for _ in range(4)]
    results = tokenize(tokenizer, merchant, *pans)
    first, second, third, fourth = (result.token for result in results)
    engine = domain.store.engine
    with engine.begin() as connection:
        rows = {row.token: row for row in connection.execute(sa.select(tokens).where(tokens.c.domain == merchant))}
        # Swap the encrypted PANs of two rows (nonce and ciphertext together).
        for token, source in ((first, second), (second, first)):
            connection.execute(sa.update(tokens).where(tokens.c.token == token).values(
                nonce=rows[source].nonce, ciphertext=rows[source].ciphertext))
        flipped = bytes([rows[third].ciphertext[0] ^ 1]) + rows[third].ciphertext[1:]
        connection.execute(sa.update(tokens).where(tokens.c.token == third).values(ciphertext=flipped))
    outcomes = tokenizer.detokenize(merchant, [first, second, third, fourth])
    for outcome in outcomes[:3]:
        assert isinstance(outcome, IntegrityError) and outcome.reason == "TOKEN_INTEGRITY_CHECK_FAILED"
    assert outcomes[3].pan == pans[3]
    # A row moved to another domain does not decrypt there either.
    other = merchant + "-b"
    one(tokenizer, other, random_pan())
    with engine.begin() as connection:
        connection.execute(sa.update(tokens).where(tokens.c.token == fourth).values(domain=other))
    assert isinstance(tokenizer.detokenize(other, [fourth])[0], IntegrityError)


def test_moved_data_key_is_refused(domain, tokenizer, merchant):
    one(tokenizer, merchant, random_pan())
    victim = one(tokenizer, merchant + "-b", random_pan())
    with domain.store.engine.begin() as connection:
        wrapped = connection.execute(sa.select(token_data_keys.c.wrapped_key).where(
            token_data_keys.c.domain == merchant)).scalar_one()
        connection.execute(sa.update(token_data_keys).where(token_data_keys.c.domain == merchant + "-b")
                           .values(wrapped_key=wrapped))
    fresh = Tokenizer(domain.hsm, TokenStore(domain.store.engine), detokenize_allowed=True)
    with pytest.raises(IntegrityError):
        fresh.detokenize(merchant + "-b", [victim.token])


def test_rotation_and_rewrap(any_db_tokenizer, merchant):
    tokenizer = any_db_tokenizer
    old_pans = [random_pan() for _ in range(30)]
    old = tokenize(tokenizer, merchant, *old_pans)
    assert {result.key_version for result in old} == {1}
    assert tokenizer.rotate_data_key(merchant) == 2
    new_pan = random_pan()
    assert one(tokenizer, merchant, new_pan).key_version == 2
    # Old rows still detokenize under version 1 before the rewrap.
    assert [r.pan for r in tokenizer.detokenize(merchant, [r.token for r in old])] == old_pans
    partial = tokenizer.rewrap(merchant, limit=10)
    assert (partial.version, partial.rewrapped, partial.remaining) == (2, 10, 20)
    report = tokenizer.rewrap(merchant)
    assert (report.rewrapped, report.remaining) == (20, 0)
    assert {tokenizer.token_info(merchant, r.token).key_version for r in old} == {2}
    assert [r.pan for r in tokenizer.detokenize(merchant, [r.token for r in old])] == old_pans
    # Deterministic tokens survive rotation: the fingerprint key does not change.
    again = one(tokenizer, merchant, old_pans[0])
    assert again.token == old[0].token and not again.created


def test_rotation_seen_by_another_tokenizer(hsm_token, sqlite_url, merchant):
    first, store_a = new_tokenizer(hsm_token, sqlite_url)
    second, store_b = new_tokenizer(hsm_token, sqlite_url)
    try:
        pan = random_pan()
        one(second, merchant, random_pan())  # second caches version 1
        first.rotate_data_key(merchant)
        made = one(first, merchant, pan, fresh=True)
        assert made.key_version == 2
        assert pan_of(second, merchant, made.token) == pan  # refreshes at once for the unseen version
    finally:
        store_a.close()
        store_b.close()


def test_crypto_shredding_makes_every_pan_unrecoverable(domain, tokenizer, merchant):
    pans = [random_pan() for _ in range(5)]
    made = tokenize(tokenizer, merchant, *pans)
    survivor = one(tokenizer, merchant + "-kept", pans[0])
    engine = domain.store.engine
    with engine.connect() as connection:
        backup = [dict(row._mapping) for row in connection.execute(
            sa.select(tokens).where(tokens.c.domain == merchant))]
    assert tokenizer.shred_domain(merchant) == 5
    with engine.connect() as connection:
        keys = connection.execute(sa.select(token_data_keys.c.wrapped_key).where(
            token_data_keys.c.domain == merchant)).scalars().all()
        fingerprint_key = connection.execute(sa.select(token_domains.c.fingerprint_key).where(
            token_domains.c.domain == merchant)).scalar_one()
    assert keys == [None] and fingerprint_key is None
    # Even with its rows put back (from a copy of the token table), nothing decrypts.
    with engine.begin() as connection:
        connection.execute(sa.insert(tokens), backup)
    for fresh in (tokenizer, Tokenizer(domain.hsm, TokenStore(engine), detokenize_allowed=True)):
        with pytest.raises(FailedPrecondition, match="shredded"):
            fresh.detokenize(merchant, [result.token for result in made])
        with pytest.raises(FailedPrecondition, match="shredded"):
            tokenize(fresh, merchant, pans[0])
        with pytest.raises(FailedPrecondition, match="shredded"):
            fresh.rotate_data_key(merchant)
    # Other domains are untouched.
    assert pan_of(tokenizer, merchant + "-kept", survivor.token) == pans[0]


# -- property: round trip ------------------------------------------------------------------------


@st.composite
def pans(draw) -> str:
    length = draw(st.integers(12, 19))
    body = draw(st.text("0123456789", min_size=length - 1, max_size=length - 1))
    return with_check_digit(body)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pan=pans(), token_format=st.sampled_from(TokenFormat), keep_bin=st.booleans(), fresh=st.booleans())
def test_round_trip(tokenizer, pan, token_format, keep_bin, fresh):
    keep_bin = keep_bin and token_format is TokenFormat.FORMAT_PRESERVING and len(pan) >= 16
    domain = "prop-" + uuid.uuid4().hex[:8] if fresh else "prop"
    result = one(tokenizer, domain, pan, token_format=token_format, keep_bin=keep_bin, fresh=fresh)
    assert result.token != pan
    if token_format is TokenFormat.FORMAT_PRESERVING:
        assert len(result.token) == len(pan) and result.token[-4:] == pan[-4:] and not luhn_valid(result.token)
    assert pan_of(tokenizer, domain, result.token) == pan
    assert one(tokenizer, domain, pan, token_format=token_format, keep_bin=keep_bin).token == result.token or fresh


# -- migration, purge job, HSM recovery ------------------------------------------------------------


def test_migration_0003_matches_the_schema_and_downgrades(database_url):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from keysvc.store import _alembic_config
    from keysvc.store.schema import metadata

    store = KeyStore.open(database_url)
    try:
        with store.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), metadata)
        token_tables = {"tokens", "token_domains", "token_data_keys"}
        assert [d for d in differences if token_tables & set(map(str, _names(d)))] == []
        config = _alembic_config()
        with store.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0002")
        assert not token_tables & set(sa.inspect(store.engine).get_table_names())
        with store.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        assert token_tables <= set(sa.inspect(store.engine).get_table_names())
    finally:
        store.close()


def _names(difference) -> list:
    """Table names an autogenerate difference mentions (it nests tuples and objects)."""
    found = []
    for part in difference if isinstance(difference, (list, tuple)) else [difference]:
        if isinstance(part, (list, tuple)):
            found += _names(part)
        elif isinstance(part, sa.Table):
            found.append(part.name)
        elif isinstance(part, (sa.Index, sa.Column)) and part.table is not None:
            found.append(part.table.name)
        elif isinstance(part, str):
            found.append(part)
    return found


def test_serving_processes_purge_expired_tokens(domain, merchant):
    import threading
    import time

    from keysvc.service import _purge_expired_tokens

    clock = Clock()
    tokenizer = Tokenizer(domain.hsm, TokenStore(domain.store.engine), detokenize_allowed=True, clock=clock)
    made = one(tokenizer, merchant, random_pan(), ttl=timedelta(seconds=30))
    clock.now += timedelta(seconds=30)
    stop = threading.Event()
    job = threading.Thread(target=_purge_expired_tokens, args=(tokenizer, 0.01, stop))
    job.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not TokenStore(domain.store.engine).load_tokens(merchant, [made.token]):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the purge job did not delete the expired token within 10 s")
    finally:
        stop.set()
        job.join(5)


def test_tokens_survive_an_hsm_reinitialisation(hsm_token, tokenizer, merchant):
    pan = random_pan()
    made = one(tokenizer, merchant, pan)  # the domain's handles are cached now
    generation = hsm_token.generation
    with hsm_token.exclusive():
        hsm_token._schedule_recovery()  # as after an HSM failure: the next call re-opens the module
    assert pan_of(tokenizer, merchant, made.token) == pan
    assert hsm_token.generation == generation + 1
    assert one(tokenizer, merchant, pan).token == made.token


def test_a_worker_with_fresh_cached_keys_writes_nothing_into_a_shredded_domain(hsm_token, database_url, merchant):
    late, store_a = new_tokenizer(hsm_token, database_url, metadata_ttl=3600)
    shredder, store_b = new_tokenizer(hsm_token, database_url)
    try:
        one(late, merchant, random_pan())  # `late` caches the domain's keys for an hour
        shredder.shred_domain(merchant)
        with pytest.raises(FailedPrecondition, match="shredded"):
            tokenize(late, merchant, random_pan(), fresh=True)
        with store_a.engine.connect() as connection:
            assert connection.execute(sa.select(sa.func.count()).select_from(tokens)
                                      .where(tokens.c.domain == merchant)).scalar_one() == 0
    finally:
        store_a.close()
        store_b.close()


def test_token_operations_running_together_all_succeed(hsm_token, tokenizer, merchant):
    """Detokenize, rotate + rewrap, tokenize, new domains and HMACs at once in one process:
    cached domain keys replaced or freed under one thread never fail another."""
    import time

    pans = [random_pan() for _ in range(40)]
    made = [result.token for result in tokenize(tokenizer, merchant, *pans)]
    mac_key = hsm_token.load_secret(hsm_token.generate_wrapped_secret(32))
    stop_at = time.monotonic() + 2.0

    def work(index: int) -> int:
        rounds = 0
        while time.monotonic() < stop_at:
            rounds += 1
            if index == 0:
                assert [r.pan for r in tokenizer.detokenize(merchant, made)] == pans
            elif index == 1:
                tokenizer.rotate_data_key(merchant)
                tokenizer.rewrap(merchant)
            elif index == 2:
                assert all(isinstance(r, Tokenized) for r in tokenize(tokenizer, merchant, *pans[:20]))
            elif index == 3:
                result = one(tokenizer, f"{merchant}-{rounds}", random_pan(), fresh=True)
                assert result.created
            elif index == 4:
                hsm_token.hmac_many(mac_key, hsm.Digest.SHA256, [b"x" * 64] * 50)
            else:
                tokenize(tokenizer, merchant, random_pan(), token_format=TokenFormat.OPAQUE, fresh=True)
        return rounds

    try:
        rounds = run_together(6, work)
    finally:
        hsm_token.release_secret(mac_key)
    assert all(count > 0 for count in rounds)
    assert [r.pan for r in tokenizer.detokenize(merchant, made)] == pans
    assert tokenizer.rewrap(merchant).remaining == 0
