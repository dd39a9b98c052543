"""Crash consistency: a worker killed with SIGKILL at random points during rotations,
key creations and tokenizations, 100 times over one real SQLite database and SoftHSM
token. After each kill: every key has exactly one primary version, enabled, and versions
numbered 1..n with none lost; at the end every stored token detokenizes (none half written).

The kills happen in a process of their own, on a token of their own: a process killed
while it holds the module never touches the token the other tests share."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import time
import traceback
from pathlib import Path

import pytest

KILLS = 100
DOMAIN = "crash-shop"
REPO = Path(__file__).resolve().parent.parent


def _victim(token, database_url: str, merchant: str, ready, failures) -> None:
    """Rotations, key creations and tokenizations as fast as it can, forever (a failure
    goes to `failures`: a victim must only ever die of the kill)."""
    try:
        _victim_loop(token, database_url, merchant, ready)
    except BaseException:  # noqa: BLE001
        failures.put(traceback.format_exc())
        raise


def _victim_loop(token, database_url: str, merchant: str, ready) -> None:
    from keysvc.errors import Unavailable
    from keysvc.keyring import KeyRing
    from keysvc.keys import KeyManager
    from keysvc.model import KeyAlgorithm, KeyPurpose
    from keysvc.store import KeyStore
    from keysvc.store.tokens import TokenStore
    from keysvc.tokens import TokenizeRequest, Tokenizer
    from tests.test_tokens import random_pan

    store = KeyStore.open(database_url, run_migrations=False)
    keys = KeyManager(token, store, KeyRing(token, store))
    tokenizer = Tokenizer(token, TokenStore(store.engine), detokenize_allowed=True)
    count = 0
    while True:
        count += 1
        if count == 2:
            ready.set()  # one whole round done: the kill comes at a random point from here
        try:
            keys.rotate_key(f"{merchant}/k{count % 3}")
            tokenizer.tokenize(TokenizeRequest(DOMAIN, tuple(random_pan() for _ in range(20))))
            if count % 5 == 0:
                keys.create_key(merchant, f"n{os.getpid()}-{count}", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
        except Unavailable:
            # As a serving worker would answer UNAVAILABLE and go on: SoftHSM sometimes
            # cannot find the token for a moment after a process was killed mid-call.
            time.sleep(0.02)


def _check_keys(keys, merchant: str) -> None:
    from keysvc.model import KeyVersionState

    for key in keys.list_keys(merchant, 1000)[0]:
        numbers = sorted(version.version for version in key.versions)
        assert numbers == list(range(1, len(numbers) + 1)), f"{key.key_id}: versions {numbers}"
        primary = key.find_version(key.primary_version)
        assert primary is not None and primary.state is KeyVersionState.ENABLED, f"{key.key_id}: primary"


def _crash_loop(config_path: str, pin: str, database_url: str, results) -> None:
    """In a process of its own (spawned): the token is this test's alone."""
    try:
        os.environ["SOFTHSM2_CONF"] = config_path  # before the module is loaded here
        import sqlalchemy as sa

        import hsm
        from keysvc.keyring import KeyRing
        from keysvc.keys import KeyManager
        from keysvc.model import KeyAlgorithm, KeyPurpose
        from keysvc.store import KeyStore
        from keysvc.store.schema import tokens as tokens_table
        from keysvc.store.tokens import TokenStore
        from keysvc.tokens import TokenizeRequest, Tokenizer
        from tests.test_tokens import random_pan

        token = hsm.Hsm.connect(hsm.HsmConfig("crash", pin))
        token.ensure_token_keys()
        store = KeyStore.open(database_url)
        keys = KeyManager(token, store, KeyRing(token, store))
        merchant = "crash"
        for index in range(3):
            keys.create_key(merchant, f"k{index}", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
        tokenizer = Tokenizer(token, TokenStore(store.engine), detokenize_allowed=True)
        tokenizer.tokenize(TokenizeRequest(DOMAIN, (random_pan(),)))
        context = multiprocessing.get_context("fork")
        failures = context.Queue()
        rng = random.Random(20261127)
        for _kill in range(KILLS):
            ready = context.Event()
            victim = context.Process(target=_victim, args=(token, database_url, merchant, ready, failures))
            victim.start()
            assert ready.wait(60), "the worker did not start"
            victim.join(rng.uniform(0.0, 0.25))
            if victim.is_alive():
                os.kill(victim.pid, signal.SIGKILL)
            victim.join(10)
            assert victim.exitcode == -signal.SIGKILL, failures.get(timeout=5)
            _check_keys(keys, merchant)
        with store.engine.connect() as connection:
            stored = connection.execute(
                sa.select(tokens_table.c.token).where(tokens_table.c.domain == DOMAIN)).scalars().all()
        outcomes = [outcome for start in range(0, len(stored), 1000)
                    for outcome in tokenizer.detokenize(DOMAIN, list(stored[start:start + 1000]))]
        assert all(hasattr(outcome, "pan") for outcome in outcomes), "a token does not detokenize"
        rotated = sum(len(key.versions) - 1 for key in keys.list_keys(merchant, 1000)[0] if key.name.startswith("k"))
        results.put(("ok", len(stored), rotated))
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put(("failed", traceback.format_exc(), 0))


@pytest.mark.timeout(600)
def test_sigkill_at_random_points_leaves_keys_and_tokens_whole(tmp_path):
    directory = tmp_path / "softhsm"
    subprocess.run([str(REPO / "hsm/softhsm/setup-token.sh"), str(directory), "crash"], check=True,
                   capture_output=True)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    loop = context.Process(target=_crash_loop, args=(
        str(directory / "softhsm2.conf"), (directory / "pin").read_text().strip(),
        f"sqlite:///{tmp_path / 'k.db'}", results))
    loop.start()
    outcome, detail, rotated = results.get(timeout=550)
    loop.join(30)

    assert outcome == "ok", detail
    assert detail > KILLS  # tokens stored
    assert rotated > KILLS  # the kills did land among rotations
