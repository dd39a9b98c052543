"""`keysvc serve --workers 2`: worker processes sharing one port (SO_REUSEPORT) and one
database stay coherent. A change made through one connection is in force on every
connection, whichever worker serves it, within a second.

Each channel below has its own TCP connection (a local subchannel pool), so the
kernel spreads them over the workers; the tests check from /proc that both workers
serve some of them, so "every channel" really means "every worker".
"""

from __future__ import annotations

import time

import grpc
import pytest

from keysvc.v1 import keys_pb2, seals_pb2
from tests.servers import (
    TIMEOUT, WORKERS, Client, alive, child_pids, close_clients, create_key, open_clients_per_worker,
    start_keysvc_server, stop_keysvc_server,
)

CHANNELS = 8
PROPAGATION_SECONDS = 1.0


# -- channels -------------------------------------------------------------------------------------------


def wait_until_every_client(clients: list[Client], condition, what: str, within: float = PROPAGATION_SECONDS) -> None:
    """Polls condition(client) on every client until all hold, failing after `within` seconds."""
    deadline = time.monotonic() + within
    pending = list(range(len(clients)))
    while pending:
        pending = [i for i in pending if not condition(clients[i])]
        if pending and time.monotonic() > deadline:
            pytest.fail(f"after {within} s, channels {pending} still do not show {what}")


def seals_with_version(key_id: str, version: int):
    def condition(client: Client) -> bool:
        return client.seal(key_id, b"probe").version == version
    return condition


def refuses_to_seal_with(key_id: str, version: int):
    def condition(client: Client) -> bool:
        try:
            client.seal(key_id, b"probe", version=version)
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, error.details()
            return True
        return False
    return condition


# -- the coherence checks, shared by the SQLite and PostgreSQL servers ---------------------------------------


def check_rotation_reaches_every_channel(clients: list[Client], merchant: str) -> None:
    key_id = create_key(clients[0], merchant, "rotation")
    for client in clients:  # warm every worker's cache with version 1
        assert client.seal(key_id, b"warm").version == 1

    rotated = clients[0].keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key_id), timeout=TIMEOUT)

    assert rotated.version == 2
    wait_until_every_client(clients, seals_with_version(key_id, 2), "sealing with version 2")


def check_seals_verify_across_channels(clients: list[Client], merchant: str) -> None:
    key_id = create_key(clients[0], merchant, "crossing")
    for client in clients:
        client.seal(key_id, b"warm")
    clients[-1].keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key_id), timeout=TIMEOUT)
    # Version 2 exists only from here on; a worker that has not seen it yet must still
    # verify a version-2 seal at once (it re-reads the key when no known version matches).
    sealed = [(index, client.seals.Seal(seals_pb2.SealRequest(key_id=key_id, message=b"m%d" % index, version=2),
                                        timeout=TIMEOUT))
              for index, client in enumerate(clients)]
    wrong = []
    for index, seal in sealed:
        for verifier_index, verifier in enumerate(clients):
            answer = verifier.verify(key_id, b"m%d" % index, seal.seal)
            if (answer.valid, answer.version) != (True, 2):
                wrong.append((index, verifier_index, answer.valid, answer.version))
    assert wrong == [], "(sealed on, verified on, valid, version)"


def check_disabling_reaches_every_channel(clients: list[Client], merchant: str) -> None:
    key_id = create_key(clients[0], merchant, "disabling")
    clients[0].keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key_id), timeout=TIMEOUT)
    wait_until_every_client(clients, seals_with_version(key_id, 2), "sealing with version 2")
    old_seal = clients[0].seal(key_id, b"old", version=1).seal
    for client in clients:  # every worker now has version 1 in its cache, enabled
        assert client.seal(key_id, b"old", version=1).seal == old_seal

    clients[len(clients) // 2].keys.SetKeyVersionState(keys_pb2.SetKeyVersionStateRequest(
        key_id=key_id, version=1, state=keys_pb2.KEY_VERSION_STATE_DISABLED), timeout=TIMEOUT)

    wait_until_every_client(clients, refuses_to_seal_with(key_id, 1), "version 1 refused for sealing")
    wait_until_every_client(clients, lambda c: not c.verify(key_id, b"old", old_seal).valid,
                            "version-1 seals no longer verifying")


# -- SQLite ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers_server(token, tmp_path_factory):
    directory = tmp_path_factory.mktemp("workers")
    server = start_keysvc_server(token, f"sqlite:///{directory / 'k.db'}", directory / "serve.log",
                                 workers=WORKERS)
    yield server
    stop_keysvc_server(server)


@pytest.fixture(scope="module")
def clients(workers_server):
    opened = open_clients_per_worker(workers_server, CHANNELS // WORKERS)
    yield opened
    close_clients(opened)


def test_serve_with_2_workers_spreads_8_connections_over_both_worker_processes(workers_server, clients):
    workers = child_pids(workers_server.process.pid)
    assert len(clients) == CHANNELS
    assert {client.worker_pid for client in clients} <= workers
    assert len({client.worker_pid for client in clients}) == WORKERS


def test_rotation_through_one_channel_seals_with_the_new_version_on_every_channel_within_1_s(clients, merchant):
    check_rotation_reaches_every_channel(clients, merchant)


def test_seal_made_on_any_channel_verifies_on_every_channel_at_once(clients, merchant):
    check_seals_verify_across_channels(clients, merchant)


def test_disabled_version_is_refused_for_sealing_on_every_channel_within_1_s(clients, merchant):
    check_disabling_reaches_every_channel(clients, merchant)


# -- PostgreSQL --------------------------------------------------------------------------------------------


def test_workers_sharing_postgresql_stay_coherent_for_rotation_verification_and_disabling(
        token, postgres_url, tmp_path, merchant):
    server = start_keysvc_server(token, postgres_url, tmp_path / "serve.log", workers=WORKERS)
    try:
        opened = open_clients_per_worker(server, CHANNELS // WORKERS)
        try:
            check_rotation_reaches_every_channel(opened, merchant)
            check_seals_verify_across_channels(opened, merchant)
            check_disabling_reaches_every_channel(opened, merchant)
        finally:
            close_clients(opened)
    finally:
        stop_keysvc_server(server)


# -- shutdown (last: it stops the module's server) -----------------------------------------------------------


def test_sigterm_shuts_every_worker_down_and_the_server_exits_0_within_15_s(workers_server):
    children = child_pids(workers_server.process.pid)
    assert len(children) >= WORKERS

    started = time.monotonic()
    exit_code = workers_server.terminate(within=15)

    assert exit_code == 0, f"exit code {exit_code} after {time.monotonic() - started:.1f} s\n{workers_server.log()}"
    # The server joins its workers before it exits; allow init a moment to reap any straggler.
    deadline = time.monotonic() + 2
    while (still_alive := {pid for pid in children if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert still_alive == set(), "worker processes outlived the server"
