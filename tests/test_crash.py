"""Crash consistency: a worker killed with SIGKILL at random points during rotations,
key creations and tokenizations, 100 times over one real SQLite database and SoftHSM
token. After each kill: every key has exactly one primary version, enabled, and versions
numbered 1..n with none lost; every stored token detokenizes (none half written)."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal

import pytest

from keysvc.keyring import KeyRing
from keysvc.keys import KeyManager
from keysvc.model import KeyAlgorithm, KeyPurpose, KeyVersionState
from keysvc.store import KeyStore
from keysvc.store.tokens import TokenStore
from keysvc.tokens import TokenizeRequest, Tokenizer
from tests.test_tokens import random_pan

KILLS = 100
DOMAIN = "crash-shop"


def _work(hsm_token, database_url: str, merchant: str, ready) -> None:
    """The victim: rotations, key creations and tokenizations as fast as it can, forever."""
    store = KeyStore.open(database_url, run_migrations=False)
    keys = KeyManager(hsm_token, store, KeyRing(hsm_token, store))
    tokenizer = Tokenizer(hsm_token, TokenStore(store.engine), detokenize_allowed=True)
    ready.set()
    count = 0
    while True:
        count += 1
        keys.rotate_key(f"{merchant}/k{count % 3}")
        tokenizer.tokenize(TokenizeRequest(DOMAIN, tuple(random_pan() for _ in range(20))))
        if count % 5 == 0:
            keys.create_key(merchant, f"n{os.getpid()}-{count}", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)


@pytest.mark.timeout(600)
def test_sigkill_at_random_points_leaves_keys_and_tokens_whole(hsm_token, sqlite_url, merchant):
    import sqlalchemy as sa

    from keysvc.store.schema import tokens as tokens_table

    store = KeyStore.open(sqlite_url)
    keys = KeyManager(hsm_token, store, KeyRing(hsm_token, store))
    for index in range(3):
        keys.create_key(merchant, f"k{index}", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
    tokenizer = Tokenizer(hsm_token, TokenStore(store.engine), detokenize_allowed=True)
    tokenizer.tokenize(TokenizeRequest(DOMAIN, (random_pan(),)))
    context = multiprocessing.get_context("fork")
    rng = random.Random(20261127)
    for _kill in range(KILLS):
        ready = context.Event()
        victim = context.Process(target=_work, args=(hsm_token, sqlite_url, merchant, ready))
        victim.start()
        assert ready.wait(30), "the worker did not start"
        victim.join(rng.uniform(0.0, 0.25))
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        assert victim.exitcode == -signal.SIGKILL

        for key in keys.list_keys(merchant, 1000)[0]:
            numbers = sorted(version.version for version in key.versions)
            assert numbers == list(range(1, len(numbers) + 1)), key.key_id
            primary = key.find_version(key.primary_version)
            assert primary is not None and primary.state is KeyVersionState.ENABLED, key.key_id
    with store.engine.connect() as connection:
        stored = connection.execute(
            sa.select(tokens_table.c.token).where(tokens_table.c.domain == DOMAIN)).scalars().all()
    outcomes = [outcome for start in range(0, len(stored), 1000)
                for outcome in tokenizer.detokenize(DOMAIN, list(stored[start:start + 1000]))]
    assert len(stored) > KILLS and all(hasattr(outcome, "pan") for outcome in outcomes)
    rotated = sum(len(key.versions) - 1 for key in keys.list_keys(merchant, 1000)[0] if key.name.startswith("k"))
    assert rotated > KILLS  # the kills did land among rotations
    store.close()
