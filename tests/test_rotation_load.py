"""Rotation under load: while client threads seal and verify without pause, the key is
rotated 25 times and older versions are retired to VERIFY_ONLY. No answer may be
wrong (a genuine seal always verifies, a tampered one never does) and no call may
fail, in one process (the in-process `server` fixture) and across two worker
processes (`keysvc serve --workers 2`).

No version is ever disabled here: a client may still hold a seal of any version.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import grpc

from keysvc.v1 import keys_pb2
from tests.servers import (
    Client, close_clients, create_key, open_clients_per_worker, start_keysvc_server, stop_keysvc_server,
)

CLIENT_THREADS = 6
LOAD_SECONDS = 8.0
ROTATIONS = 25
RETIRE_EVERY = 4  # rotations between two retirements
TIMEOUT = 10.0
HEX_DIGITS = "0123456789abcdef"


@dataclass
class Tally:
    """What the client threads saw, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    genuine_checked: int = 0
    tampered_checked: int = 0
    wrong_answers: int = 0
    wrong_examples: list[str] = field(default_factory=list)
    rpc_errors: list[str] = field(default_factory=list)
    versions_sealed: set[int] = field(default_factory=set)
    # A few genuine seals, to verify again once every rotation is done.
    kept: list[tuple[bytes, str, int]] = field(default_factory=list)

    def wrong(self, what: str) -> None:
        with self.lock:
            self.wrong_answers += 1
            if len(self.wrong_examples) < 10:
                self.wrong_examples.append(what)


def tampered_seal(seal: str, rng: random.Random) -> str:
    """The seal with one hex digit changed to another."""
    position = rng.randrange(len(seal))
    replacement = rng.choice([digit for digit in HEX_DIGITS if digit != seal[position]])
    return seal[:position] + replacement + seal[position + 1:]


def changed_message(message: bytes, rng: random.Random) -> bytes:
    """The message with one bit flipped."""
    position = rng.randrange(len(message))
    return message[:position] + bytes([message[position] ^ (1 << rng.randrange(8))]) + message[position + 1:]


def seal_and_check(client: Client, key_id: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        message = rng.randbytes(rng.randint(1, 512))
        try:
            sealed = client.seal(key_id, message)
            genuine = client.verify(key_id, message, sealed.seal)
            bad_seal = client.verify(key_id, message, tampered_seal(sealed.seal, rng))
            bad_message = client.verify(key_id, changed_message(message, rng), sealed.seal)
        except grpc.RpcError as error:
            with tally.lock:
                tally.rpc_errors.append(f"{error.code().name}: {error.details()}")
            continue
        if not genuine.valid or genuine.version != sealed.version:
            tally.wrong(f"genuine seal of version {sealed.version}: valid={genuine.valid} version={genuine.version}")
        if bad_seal.valid:
            tally.wrong(f"tampered seal accepted as version {bad_seal.version}")
        if bad_message.valid:
            tally.wrong(f"seal accepted for a changed message as version {bad_message.version}")
        with tally.lock:
            tally.genuine_checked += 1
            tally.tampered_checked += 2
            tally.versions_sealed.add(sealed.version)
            if len(tally.kept) < 200 and rng.random() < 0.1:
                tally.kept.append((message, sealed.seal, sealed.version))


def rotate_and_retire(admin: Client, key_id: str, started: float) -> list[int]:
    """Rotates ROTATIONS times spread over LOAD_SECONDS; every RETIRE_EVERY rotations retires
    to VERIFY_ONLY every version older than the previous primary. Returns the versions made."""
    made = []
    interval = LOAD_SECONDS / (ROTATIONS + 1)
    pace = threading.Event()  # never set: its wait() paces the schedule, it waits for nothing
    for rotation in range(1, ROTATIONS + 1):
        pace.wait(max(0.0, started + rotation * interval - time.monotonic()))
        rotated = admin.keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key_id), timeout=TIMEOUT)
        made.append(rotated.version)
        if rotation % RETIRE_EVERY == 0:
            for version in rotated.key.versions:
                if version.version < rotated.version - 1 and version.state == keys_pb2.KEY_VERSION_STATE_ENABLED:
                    admin.keys.SetKeyVersionState(keys_pb2.SetKeyVersionStateRequest(
                        key_id=key_id, version=version.version, state=keys_pb2.KEY_VERSION_STATE_VERIFY_ONLY),
                        timeout=TIMEOUT)
    pace.wait(max(0.0, started + LOAD_SECONDS - time.monotonic()))
    return made


def run_rotation_under_load(admin: Client, load_clients: list[Client], merchant: str) -> None:
    key_id = create_key(admin, merchant, "under-load")
    tally = Tally()
    stop = threading.Event()
    threads = [
        threading.Thread(target=seal_and_check, args=(client, key_id, stop, tally, seed), daemon=True)
        for seed, client in enumerate(load_clients)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        made = rotate_and_retire(admin, key_id, started)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a client thread hung"

    assert tally.rpc_errors == [], f"{len(tally.rpc_errors)} RPC errors, e.g. {tally.rpc_errors[:5]}"
    assert tally.wrong_answers == 0, f"{tally.wrong_answers} wrong answers, e.g. {tally.wrong_examples}"
    assert len(made) >= 20 and made == list(range(2, len(made) + 2))
    assert tally.genuine_checked >= 300, f"only {tally.genuine_checked} seals checked"
    assert tally.tampered_checked == 2 * tally.genuine_checked
    assert len(tally.versions_sealed) >= 10, f"seals spread over versions {sorted(tally.versions_sealed)} only"

    # Once every rotation is done, every kept seal still verifies, with the version that made it.
    for message, seal_text, version in tally.kept:
        answer = admin.verify(key_id, message, seal_text)
        assert (answer.valid, answer.version) == (True, version)
    key = admin.keys.GetKey(keys_pb2.GetKeyRequest(key_id=key_id), timeout=TIMEOUT).key
    assert key.primary_version == made[-1]
    assert keys_pb2.KEY_VERSION_STATE_DISABLED not in {v.state for v in key.versions}
    assert sum(v.state == keys_pb2.KEY_VERSION_STATE_VERIFY_ONLY for v in key.versions) >= ROTATIONS // 2


def test_rotation_under_load_in_one_process_gives_no_wrong_answer_and_no_rpc_error(server, merchant):
    clients = [Client(server.address) for _ in range(CLIENT_THREADS + 1)]
    try:
        run_rotation_under_load(clients[0], clients[1:], merchant)
    finally:
        close_clients(clients)


def test_rotation_under_load_across_2_workers_gives_no_wrong_answer_and_no_rpc_error(token, tmp_path, merchant):
    server = start_keysvc_server(token, f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "serve.log", workers=2)
    try:
        # CLIENT_THREADS load channels, half on each worker, and an admin channel.
        clients = open_clients_per_worker(server, per_worker=CLIENT_THREADS // 2 + 1)
        try:
            run_rotation_under_load(clients[-1], clients[:CLIENT_THREADS], merchant)
        finally:
            close_clients(clients)
        assert server.terminate(within=15) == 0, server.log()
    finally:
        stop_keysvc_server(server)
