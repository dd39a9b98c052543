"""Replicas: several `keysvc serve` processes over one PostgreSQL, each with its own SoftHSM
token holding the same master key (restored into each empty token from a backup split
between two custodians), reached through gRPC client-side round-robin load balancing.

- A change made through one replica is in force on every other within a second
  (LISTEN/NOTIFY, with a poll of the change log behind it that outlives a dropped
  connection); a seal made on one verifies on all; a token detokenizes on all.
- Safe rotation: a rotation's new version becomes primary only once every live replica
  has loaded it; a replica that lags (or died) holds it back until its heartbeat is
  older than the timeout. RotateKey waits for that within its caller's deadline, and
  once the version is stored it answers OK whatever happens (a retry would rotate again).
- Under load with 20+ rotations and a replica killed: no wrong answer, no failed call,
  one token per PAN.
- PostgreSQL restarted under load: calls fail fast with UNAVAILABLE, then recover.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from click.testing import CliRunner

import hsm
from hsm.deadline import reset_call_deadline, set_call_deadline
from keysvc import config, masterkey
from keysvc.cli import main as cli_main
from keysvc.client import KeysvcCallError, KeysvcClient
from keysvc.errors import Unavailable
from keysvc.keyring import KeyRing
from keysvc.keys import KeyManager, promoted
from keysvc.model import KeyAlgorithm, KeyPurpose, KeyVersionState
from keysvc.replicas import DEADLINE_MARGIN, Replica
from keysvc.seals import SealRequest
from keysvc.store.replicas import LISTENER_APPLICATION_NAME, ChangeListener, ReplicaStore
from keysvc.v1 import keys_pb2, replicas_pb2, tokens_pb2
from tests.conftest import (
    SoftHsmToken, _as_postgres_user, _postgres_bindir, _start_throwaway_postgres, new_token, run_together,
)
from tests.servers import KEYSVC, KeysvcServer, start_keysvc_server, stop_keysvc_server
from tests.test_tokens import random_pan

REPLICAS = 3
HEARTBEAT_TIMEOUT = 2.0
ROTATION_WAIT = 1.0
REPLICA_ENV = {
    "KEYSVC_REPLICA_HEARTBEAT_INTERVAL": "0.5",
    "KEYSVC_REPLICA_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
    "KEYSVC_ROTATION_WAIT": str(ROTATION_WAIT),
    "KEYSVC_ALLOW_DETOKENIZE": "true",
}
IN_FORCE_WITHIN = 1.0
SHA256 = keys_pb2.KEY_ALGORITHM_HMAC_SHA256
ROUND_ROBIN = [("grpc.lb_policy_name", "round_robin")]


# -- the domain, in one process -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NoWaiting:
    """A rotation gate that promotes nothing: the rotation stays pending."""

    def __init__(self, domain) -> None:
        self._store = domain.store

    def await_promotion(self, stored, version: int):
        return self._store.load_key(stored.key_id)


def test_a_pending_version_verifies_but_does_not_seal_until_promoted_and_stops_waiting_when_retired(
        domain, merchant):
    domain.keys.rotation_gate = NoWaiting(domain)
    key = domain.keys.create_key(merchant, "pending", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
    rotated, version = domain.keys.rotate_key(key.key_id)
    assert (version.version, rotated.primary_version, rotated.pending_primary) == (2, 1, 2)
    assert domain.sealer.compute_seal(SealRequest(key.key_id, b"m")).version == 1
    assert domain.sealer.compute_seal(SealRequest(key.key_id, b"m", version=2)).version == 2  # ENABLED

    assert promoted(rotated, 3) is rotated  # not the pending one: nothing to do
    done = domain.store.update_key(key.key_id, lambda k: promoted(k, 2))
    assert (done.primary_version, done.pending_primary) == (2, None)
    domain.ring.remember(done)
    assert domain.sealer.compute_seal(SealRequest(key.key_id, b"m")).version == 2

    # A pending version retired, or an explicit primary, ends the wait without promotion.
    rotated, _ = domain.keys.rotate_key(key.key_id)
    assert domain.keys.set_version_state(key.key_id, 3, KeyVersionState.VERIFY_ONLY).pending_primary is None
    domain.keys.rotate_key(key.key_id)
    assert domain.keys.set_primary_version(key.key_id, 1).pending_primary is None
    assert promoted(domain.store.load_key(key.key_id), 4).primary_version == 1


class DatabaseAway:
    """A key store whose database went away (or broke) just after a rotation was stored."""

    def __init__(self, error: Exception) -> None:
        self._error = error

    def load_key(self, key_id: str):
        raise self._error

    def update_key(self, key_id: str, change):
        raise self._error


@pytest.mark.parametrize("error", [Unavailable("the database is unavailable (OperationalError)"),
                                   RuntimeError("a bug")], ids=["unavailable", "unexpected"])
def test_a_rotation_stored_then_cut_off_from_the_database_answers_its_version_pending_and_never_fails(
        domain, merchant, monkeypatch, error):
    # Failing would invite the client to retry (it retries UNAVAILABLE): a second rotation.
    replica = Replica(domain.store, domain.ring, database_url="", rotation_wait=0.2)
    domain.keys.rotation_gate = replica
    key_id = domain.keys.create_key(merchant, "cut-off", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256).key_id
    replica._keys = DatabaseAway(error)
    monkeypatch.setattr(replica._store, "pending_promotions", DatabaseAway(error).load_key)

    rotated, version = domain.keys.rotate_key(key_id)
    assert (version.version, rotated.primary_version, rotated.pending_primary) == (2, 1, 2)
    stored = domain.store.load_key(key_id)
    assert (sorted(v.version for v in stored.versions), stored.pending_primary) == ([1, 2], 2)

    replica._keys = domain.store  # the database is back: the replicas promote it by themselves
    monkeypatch.undo()
    replica.promote_ready()
    promoted_key = domain.store.load_key(key_id)
    assert (promoted_key.primary_version, promoted_key.pending_primary) == (2, None)


def test_a_rotation_held_back_answers_before_the_calls_deadline_with_its_version_pending(domain, merchant):
    replica = Replica(domain.store, domain.ring, database_url="", heartbeat_timeout=30, rotation_wait=10)
    domain.keys.rotation_gate = replica
    key_id = domain.keys.create_key(merchant, "hurried", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256).key_id
    ReplicaStore(domain.store.engine).register("laggard", "192.0.2.1:50051", 0)  # live, never follows

    def rotate_within(time_left: float) -> tuple[float, int, int, int]:
        bound = set_call_deadline(time_left)
        try:
            started = time.monotonic()
            rotated, added = domain.keys.rotate_key(key_id)
            return time.monotonic() - started, added.version, rotated.primary_version, rotated.pending_primary
        finally:
            reset_call_deadline(bound)

    took, *versions = rotate_within(0.4)
    assert versions == [2, 1, 2]
    assert 0.4 - DEADLINE_MARGIN - 0.05 < took < 0.4  # waited until DEADLINE_MARGIN before the deadline
    took, *versions = rotate_within(DEADLINE_MARGIN / 2)
    assert versions == [3, 1, 3]
    assert took < 1.0  # no time left to wait (nothing like rotation_wait): answered at once


def test_a_change_listener_hears_announcements_and_survives_losing_its_connection(postgres_url):
    listener = ChangeListener(postgres_url)

    def announce() -> None:
        with psycopg.connect(postgres_url, autocommit=True) as connection:
            connection.execute("SELECT pg_notify('keysvc_key_changes', 'm/k')")

    try:
        assert listener.wait(0.05) is False  # connects; nothing announced
        announce()
        assert listener.wait(5) is True
        assert listener.wait(0.05) is False  # each announcement heard once
        name = postgres_url.rpartition("/")[2]
        with psycopg.connect(postgres_url, autocommit=True) as connection:
            connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = %s AND datname = %s", (LISTENER_APPLICATION_NAME, name))
        assert listener.wait(0.5) is False  # the lost connection is noticed, not raised

        def heard() -> bool:
            announce()
            return listener.wait(0.2)
        seconds_until(heard, "listening again", 5)
    finally:
        listener.close()


def test_the_ring_trusts_its_cache_longer_only_while_the_change_log_is_followed(domain, merchant):
    clock = Clock()
    ring = KeyRing(domain.hsm, domain.store, followed_ttl=5.0, clock=clock)
    key_id = domain.keys.create_key(merchant, "followed", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256).key_id
    ring.mark_followed(clock.now)
    assert ring.key(key_id).revision == 1
    other = KeyManager(domain.hsm, domain.store, KeyRing(domain.hsm, domain.store))
    other.rotate_key(key_id)  # revision 2, not announced to `ring`

    clock.now += 0.5
    ring.mark_followed(clock.now)
    assert ring.key(key_id).revision == 1  # followed: trusted past metadata_ttl
    clock.now += 1.5  # the follower fell behind: the short TTL is back
    assert ring.key(key_id).revision == 2

    # A copy read before a change but installed after the change was announced is
    # checked again at its next use, however fresh the follower.
    stale = domain.store.load_key(key_id)
    other.rotate_key(key_id)
    ring.invalidate(key_id, 3)
    ring.remember(stale)
    ring.mark_followed(clock.now)
    assert ring.key(key_id).revision == 3


# -- replicas ------------------------------------------------------------------------------------


def restored_tokens(source: hsm.Hsm, directory: Path, count: int) -> list[SoftHsmToken]:
    """`count` new tokens, each holding `source`'s master key and nothing else, put there
    as in disaster recovery: a backup split between two custodians, restored with
    `keysvc master-key restore` into each empty token. The replicas then share the
    binding and import keys through the database, as a deployment's replicas do."""
    directory.mkdir(parents=True)
    custodians, arguments = [], []
    for name in ("alice", "bob"):
        private_key, public_key = masterkey.make_custodian_key()
        custodians.append(masterkey.Custodian(name, public_key))
        (directory / f"{name}.key").write_text(masterkey.encode_private_key(private_key))
        arguments += ["--component", str(directory / f"{name}.component"),
                      "--custodian-key", str(directory / f"{name}.key")]
    backup, components = masterkey.backup_master_key(source, custodians)
    (directory / "backup.json").write_text(backup.to_json())
    for custodian, component in zip(custodians, components):
        (directory / f"{custodian.name}.component").write_text(component.to_json())
    tokens = []
    for index in range(count):
        token = new_token(directory / f"hsm-{index}")
        restored = subprocess.run([KEYSVC, "master-key", "restore", "--backup", str(directory / "backup.json"),
                                   *arguments], env=token.env, capture_output=True, text=True, timeout=120)
        assert restored.returncode == 0, restored.stderr
        tokens.append(token)
    return tokens


def start_replicas(source: hsm.Hsm, database_url: str, directory: Path, count: int) -> list[KeysvcServer]:
    """`count` replicas started together (their migrations race), each on its own token."""
    tokens = restored_tokens(source, directory / "hsm", count)
    with ThreadPoolExecutor(count) as pool:
        starting = [pool.submit(start_keysvc_server, tokens[index], database_url, directory / f"replica-{index}.log",
                                extra_env=REPLICA_ENV) for index in range(count)]
        return [future.result() for future in starting]


@dataclass
class Cluster:
    database_url: str
    servers: list[KeysvcServer]
    clients: list[KeysvcClient] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [server.address for server in self.servers]

    def round_robin(self, servers: list[KeysvcServer] | None = None) -> KeysvcClient:
        """A client spreading its calls over the replicas (client-side load balancing)."""
        target = "ipv4:" + ",".join(server.address for server in servers or self.servers)
        client = KeysvcClient(target, options=ROUND_ROBIN)
        self.clients.append(client)
        return client

    def one(self, index: int) -> KeysvcClient:
        """A client of replica `index` only."""
        client = KeysvcClient(self.servers[index].address)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for server in self.servers:
            stop_keysvc_server(server)


def new_database(admin_url: str) -> str:
    name = "keysvc_replicas_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin_url + "/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"{admin_url}/{name}"


def drop_database(url: str) -> None:
    admin_url, _, name = url.rpartition("/")
    with psycopg.connect(admin_url + "/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def cluster(hsm_token, postgres_admin_url, tmp_path_factory):
    database_url = new_database(postgres_admin_url)
    started = Cluster(database_url, start_replicas(hsm_token, database_url, tmp_path_factory.mktemp("replicas"), REPLICAS))
    yield started
    started.close()
    drop_database(database_url)


# -- helpers ----------------------------------------------------------------------------------------


def create_key(client: KeysvcClient, merchant: str, name: str) -> str:
    return client.call(client.keys.CreateKey, keys_pb2.CreateKeyRequest(
        merchant_id=merchant, name=name, algorithm=SHA256)).key.key_id


def get_key(client: KeysvcClient, key_id: str) -> keys_pb2.Key:
    return client.call(client.keys.GetKey, keys_pb2.GetKeyRequest(key_id=key_id)).key


def rotate(client: KeysvcClient, key_id: str) -> keys_pb2.RotateKeyResponse:
    return client.call(client.keys.RotateKey, keys_pb2.RotateKeyRequest(key_id=key_id))


def set_state(client: KeysvcClient, key_id: str, version: int, state: int) -> None:
    client.call(client.keys.SetKeyVersionState, keys_pb2.SetKeyVersionStateRequest(
        key_id=key_id, version=version, state=state))


def seconds_until(condition, what: str, within: float) -> float:
    """Seconds until condition() holds, polled; fails the test after `within`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            pytest.fail(f"not within {within} s: {what}")
        time.sleep(0.005)
    return time.monotonic() - started


def live_addresses(client: KeysvcClient) -> set[str]:
    listing = client.call(client.replicas.ListReplicas, replicas_pb2.ListReplicasRequest())
    return {replica.address for replica in listing.replicas if replica.live}


def pans_tokens(response: tokens_pb2.TokenizeResponse, pans: list[str]) -> dict[str, tuple[str, bool]]:
    return {pan: (result.token.token, result.token.created) for pan, result in zip(pans, response.results)}


# -- registration -----------------------------------------------------------------------------------------


def test_replicas_started_together_register_and_each_lists_every_live_replica(cluster):
    for index in range(REPLICAS):
        assert live_addresses(cluster.one(index)) == set(cluster.addresses)

    listed = CliRunner().invoke(cli_main, ["--insecure", "--server", cluster.addresses[1], "replica", "list"])
    assert listed.exit_code == 0, listed.output
    assert all(address in listed.output for address in cluster.addresses)
    assert "latest key change" in listed.output


# -- coherence --------------------------------------------------------------------------------------------


def test_rotation_and_disabling_through_one_replica_are_in_force_on_every_other_within_1_s(cluster, merchant):
    a, b, c = (cluster.one(index) for index in range(REPLICAS))
    key_id = create_key(a, merchant, "coherent")
    for client in (a, b, c):  # every replica caches version 1
        assert client.seal(key_id, b"warm").version == 1

    started = time.monotonic()
    rotated = rotate(a, key_id)
    rotation_seconds = time.monotonic() - started
    # Every live replica loaded version 2 before RotateKey answered it primary.
    assert (rotated.version, rotated.key.primary_version, rotated.key.pending_primary) == (2, 2, 0)
    seen = [seconds_until(lambda client=client: client.seal(key_id, b"probe").version == 2,
                          "sealing with version 2", IN_FORCE_WITHIN) for client in (b, c)]

    # A seal made on any replica verifies on every replica.
    for index, sealer in enumerate((a, b, c)):
        sealed = sealer.seal(key_id, b"made on replica %d" % index)
        for verifier in (a, b, c):
            answer = verifier.verify(key_id, b"made on replica %d" % index, sealed.seal)
            assert (answer.valid, answer.version) == (True, 2)

    old_seal = a.seal(key_id, b"old", version=1).seal
    for client in (a, b, c):  # version 1 is cached ENABLED everywhere
        assert client.verify(key_id, b"old", old_seal).valid
    set_state(b, key_id, 1, keys_pb2.KEY_VERSION_STATE_DISABLED)
    disabled = [seconds_until(lambda client=client: not client.verify(key_id, b"old", old_seal).valid,
                              "version 1 seals refused", IN_FORCE_WITHIN) for client in (a, c)]
    print(f"rotation answered promoted in {rotation_seconds * 1000:.0f} ms; new primary sealing on the others "
          f"after {max(seen) * 1000:.0f} ms more; disabling in force on the others after {max(disabled) * 1000:.0f} ms")


def test_rotation_waits_for_a_live_replica_that_has_not_loaded_it_and_promotes_once_that_one_is_dead(
        cluster, merchant):
    a, b, c = (cluster.one(index) for index in range(REPLICAS))
    key_id = create_key(a, merchant, "held-back")
    # A replica that registered, heartbeat just now, and never follows anything.
    laggard = f"laggard-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.database_url, autocommit=True) as connection:
        connection.execute("INSERT INTO replicas (replica_id, address, started_at, heartbeat_at, seen_change) "
                           "VALUES (%s, '192.0.2.1:50051', now(), now(), 0)", (laggard,))
    try:
        started = time.monotonic()
        rotated = rotate(a, key_id)
        waited = time.monotonic() - started
        assert (rotated.version, rotated.key.primary_version, rotated.key.pending_primary) == (2, 1, 2)
        assert waited >= ROTATION_WAIT

        # Pending: distributed (it verifies everywhere, and seals when named) but not primary.
        for client in (a, b, c):
            assert client.seal(key_id, b"pending").version == 1
            named = client.seal(key_id, b"named", version=2)
            for verifier in (a, b, c):
                assert verifier.verify(key_id, b"named", named.seal).version == 2

        # The laggard's heartbeat ages past the timeout: the replicas promote by themselves.
        promoted = seconds_until(lambda: get_key(c, key_id).primary_version == 2, "promotion",
                                 HEARTBEAT_TIMEOUT + 2)
        assert get_key(b, key_id).pending_primary == 0
        for client in (a, b, c):
            seconds_until(lambda client=client: client.seal(key_id, b"probe").version == 2, "sealing with 2",
                          IN_FORCE_WITHIN)
        print(f"rotation held back {waited:.2f} s by a live laggard, promoted {promoted:.2f} s after")
    finally:
        with psycopg.connect(cluster.database_url, autocommit=True) as connection:
            connection.execute("DELETE FROM replicas WHERE replica_id = %s", (laggard,))


def test_a_rotation_held_back_answers_ok_before_a_short_deadline_and_is_promoted_later_by_itself(
        cluster, merchant):
    a, b = cluster.one(0), cluster.one(1)
    key_id = create_key(a, merchant, "short-deadline")
    laggard = f"laggard-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.database_url, autocommit=True) as connection:
        connection.execute("INSERT INTO replicas (replica_id, address, started_at, heartbeat_at, seen_change) "
                           "VALUES (%s, '192.0.2.1:50051', now(), now(), 0)", (laggard,))
    try:
        timeout = 0.7  # shorter than ROTATION_WAIT: the deadline ends the wait, and not in DEADLINE_EXCEEDED
        started = time.monotonic()
        rotated = a.call(a.keys.RotateKey, keys_pb2.RotateKeyRequest(key_id=key_id), timeout=timeout)
        took = time.monotonic() - started
        assert (rotated.version, rotated.key.primary_version, rotated.key.pending_primary) == (2, 1, 2)
        assert took < timeout
    finally:
        with psycopg.connect(cluster.database_url, autocommit=True) as connection:
            connection.execute("DELETE FROM replicas WHERE replica_id = %s", (laggard,))
    # The laggard gone, the replicas promote the version at their next heartbeat; one rotation only.
    seconds_until(lambda: get_key(b, key_id).primary_version == 2, "promotion", HEARTBEAT_TIMEOUT)
    assert sorted(version.version for version in get_key(b, key_id).versions) == [1, 2]


def listener_pids(database_url: str) -> list[int]:
    name = database_url.rpartition("/")[2]
    with psycopg.connect(database_url, autocommit=True) as connection:
        return [row[0] for row in connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
            (LISTENER_APPLICATION_NAME, name))]


def test_changes_still_arrive_within_1_s_when_the_listen_connections_are_dropped(cluster, merchant):
    a, b, c = (cluster.one(index) for index in range(REPLICAS))
    key_id = create_key(a, merchant, "unheard")
    for client in (a, b, c):
        client.seal(key_id, b"warm")
    assert len(listener_pids(cluster.database_url)) == REPLICAS

    with psycopg.connect(cluster.database_url, autocommit=True) as connection:
        for pid in listener_pids(cluster.database_url):
            connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
    rotated = rotate(a, key_id)
    assert rotated.key.primary_version == 2  # every replica acknowledged it: still following
    for client in (b, c):
        seconds_until(lambda client=client: client.seal(key_id, b"probe").version == 2, "sealing with 2",
                      IN_FORCE_WITHIN)

    # The listeners come back by themselves, and the replicas stay live meanwhile.
    seconds_until(lambda: len(listener_pids(cluster.database_url)) == REPLICAS, "listeners reconnected", 10)
    assert live_addresses(b) == set(cluster.addresses)
    set_state(c, key_id, 1, keys_pb2.KEY_VERSION_STATE_VERIFY_ONLY)
    for client in (a, b):
        seconds_until(lambda client=client: _refuses_to_seal_with(client, key_id, 1), "version 1 retired",
                      IN_FORCE_WITHIN)


def _refuses_to_seal_with(client: KeysvcClient, key_id: str, version: int) -> bool:
    try:
        client.seal(key_id, b"probe", version=version)
    except KeysvcCallError as error:
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION, error.message
        return True
    return False


# -- tokens ---------------------------------------------------------------------------------------------------


def test_replicas_racing_to_tokenize_the_same_pans_give_one_token_per_pan(cluster):
    domain = "race-" + uuid.uuid4().hex[:8]
    pans = [random_pan() for _ in range(40)]
    clients = [cluster.one(index % REPLICAS) for index in range(6)]

    def tokenize(index: int) -> dict[str, tuple[str, bool]]:
        order = pans[index:] + pans[:index]
        return pans_tokens(clients[index].tokenize(domain, order), order)

    answers = run_together(len(clients), tokenize)  # the domain itself is created in the race
    tokens = {pan: answers[0][pan][0] for pan in pans}
    assert all({pan: answer[pan][0] for pan in pans} == tokens for answer in answers)
    assert all(sum(answer[pan][1] for answer in answers) == 1 for pan in pans), "one creation per PAN"
    with psycopg.connect(cluster.database_url) as connection:
        assert connection.execute("SELECT count(*) FROM tokens WHERE domain = %s", (domain,)).fetchone()[0] == len(pans)
    for client in clients[:REPLICAS]:
        response = client.call(client.tokens.Detokenize, tokens_pb2.DetokenizeRequest(
            domain=domain, tokens=[tokens[pan] for pan in pans]))
        assert [result.token.pan for result in response.results] == pans


def test_with_sqlite_and_safe_rotation_turned_on_the_workers_register_and_promote_rotations(
        token, tmp_path, merchant):
    server = start_keysvc_server(token, f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "server.log", workers=2,
                                 extra_env={**REPLICA_ENV, "KEYSVC_SAFE_ROTATION": "on"})
    try:
        with KeysvcClient(server.address) as client:
            listing = client.call(client.replicas.ListReplicas, replicas_pb2.ListReplicasRequest())
            assert [replica.address for replica in listing.replicas if replica.live] == [server.address] * 2
            key_id = create_key(client, merchant, "sqlite")
            rotated = rotate(client, key_id)
            # Both workers follow the change log (by polling): the rotation is promoted
            # before RotateKey answers.
            assert (rotated.key.primary_version, rotated.key.pending_primary) == (2, 0)
    finally:
        stop_keysvc_server(server)


def test_replica_settings_are_read_from_the_file_and_the_environment_and_checked(tmp_path):
    path = tmp_path / "keysvc.toml"
    path.write_text('insecure_loopback = true\n[database]\nurl = "postgresql://db/keysvc"\n'
                    '[replicas]\naddress = "10.0.0.7:50051"\nheartbeat_interval = 0.5\nrotation_wait = 2\n')
    settings, sources = config.load_settings(str(path), environ={
        "KEYSVC_HSM_PIN": "1", "KEYSVC_REPLICA_HEARTBEAT_TIMEOUT": "3"})
    assert (settings.replica_address, settings.heartbeat_interval, settings.heartbeat_timeout,
            settings.rotation_wait) == ("10.0.0.7:50051", 0.5, 3.0, 2.0)
    assert sources["heartbeat_timeout"] == "KEYSVC_REPLICA_HEARTBEAT_TIMEOUT"
    assert settings.rotates_safely  # "auto" with PostgreSQL
    sqlite, _ = config.load_settings(None, environ={"KEYSVC_HSM_PIN": "1", "KEYSVC_INSECURE_LOOPBACK": "1"})
    assert not sqlite.rotates_safely
    for name, value, message in [
        ("KEYSVC_SAFE_ROTATION", "sometimes", "replicas.safe_rotation: must be one of auto, on, off"),
        ("KEYSVC_REPLICA_HEARTBEAT_TIMEOUT", "0.5", "replicas.heartbeat_timeout: must be at least twice"),
        ("KEYSVC_REPLICA_ADDRESS", "nowhere", "replicas.address: must be host:port"),
        ("KEYSVC_ROTATION_WAIT", "-1", "replicas.rotation_wait: must be between 0 and 60 seconds"),
    ]:
        with pytest.raises(config.ConfigurationError, match=message):
            config.load_settings(None, environ={"KEYSVC_HSM_PIN": "1", "KEYSVC_INSECURE_LOOPBACK": "1", name: value})


# -- load, and a replica killed (last: it leaves the module's cluster one replica short) ------------------------


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    checked: int = 0
    wrong: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    versions: set[int] = field(default_factory=set)
    tokens: dict[str, set[str]] = field(default_factory=dict)

    def note(self, what: str, into: list[str]) -> None:
        with self.lock:
            into.append(what)


def seal_and_verify(client: KeysvcClient, key_id: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    """Seals and verifies through a round-robin channel: consecutive calls go to different
    replicas, so most seals are verified on another replica than the one that made them."""
    rng = random.Random(seed)
    while not stop.is_set():
        message = rng.randbytes(rng.randint(1, 256))
        try:
            sealed = client.seal(key_id, message)
            genuine = client.verify(key_id, message, sealed.seal)
            forged = client.verify(key_id, message + b"!", sealed.seal)
        except KeysvcCallError as error:
            tally.note(str(error), tally.errors)
            continue
        if (genuine.valid, genuine.version) != (True, sealed.version):
            tally.note(f"seal of version {sealed.version}: {genuine.valid} {genuine.version}", tally.wrong)
        if forged.valid:
            tally.note(f"changed message accepted as version {forged.version}", tally.wrong)
        with tally.lock:
            tally.checked += 1
            tally.versions.add(sealed.version)


def tokenize_shared_pans(client: KeysvcClient, domain: str, pans: list[str], stop: threading.Event,
                         tally: Tally, seed: int) -> None:
    """Tokenizes, again and again, PANs that the other threads tokenize too."""
    rng = random.Random(seed)
    while not stop.is_set():
        batch = rng.sample(pans, 10)
        try:
            response = client.tokenize(domain, batch)
        except KeysvcCallError as error:
            tally.note(str(error), tally.errors)
            continue
        with tally.lock:
            for pan, (token, _created) in pans_tokens(response, batch).items():
                tally.tokens.setdefault(pan, set()).add(token)


def test_three_replicas_under_load_with_24_rotations_and_one_killed_give_no_wrong_answer_nor_failed_call(
        cluster, merchant):
    admin = cluster.one(0)
    key_id = create_key(admin, merchant, "under-load")
    domain = "load-" + uuid.uuid4().hex[:8]
    pans = [random_pan() for _ in range(30)]
    tally = Tally()
    stop = threading.Event()
    threads = [threading.Thread(target=seal_and_verify, args=(cluster.round_robin(), key_id, stop, tally, seed))
               for seed in range(3)]
    threads += [threading.Thread(target=tokenize_shared_pans,
                                 args=(cluster.round_robin(), domain, pans, stop, tally, seed)) for seed in range(2)]
    victim = cluster.servers[2]
    made, promoted_at_once, killed_at, dropped_out = [], [], 0.0, 0.0
    for thread in threads:
        thread.start()
    try:
        for rotation in range(1, 25):
            time.sleep(0.2)  # pacing the schedule, not waiting for anything
            if rotation == 12:
                victim.kill_group()  # SIGKILL, mid-load
                killed_at = time.monotonic()
            rotated = rotate(admin, key_id)
            made.append(rotated.version)
            promoted_at_once.append(rotated.key.pending_primary == 0)
            if killed_at and not dropped_out and victim.address not in live_addresses(admin):
                dropped_out = time.monotonic() - killed_at
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)

    assert tally.errors == [], f"{len(tally.errors)} failed calls, e.g. {tally.errors[:5]}"
    assert tally.wrong == [], f"{len(tally.wrong)} wrong answers, e.g. {tally.wrong[:5]}"
    assert tally.checked >= 100 and len(tally.versions) >= 5, (tally.checked, sorted(tally.versions))
    assert made == list(range(2, 26))
    # Before the kill every rotation was promoted by RotateKey itself; after it, once the dead
    # replica dropped out of the live set, again.
    assert all(promoted_at_once[:11])
    assert dropped_out and dropped_out <= HEARTBEAT_TIMEOUT + 1.5, dropped_out
    assert promoted_at_once[-1]
    key = get_key(admin, key_id)
    assert (key.primary_version, key.pending_primary) == (25, 0)

    # One token per PAN, whichever replica made it, and each detokenizes on the survivors.
    assert set(tally.tokens) == set(pans) and all(len(found) == 1 for found in tally.tokens.values()), tally.tokens
    with psycopg.connect(cluster.database_url) as connection:
        assert connection.execute("SELECT count(*) FROM tokens WHERE domain = %s", (domain,)).fetchone()[0] == len(pans)
    tokens = [next(iter(tally.tokens[pan])) for pan in pans]
    for index in (0, 1):
        client = cluster.one(index)
        response = client.call(client.tokens.Detokenize, tokens_pb2.DetokenizeRequest(domain=domain, tokens=tokens))
        assert [result.token.pan for result in response.results] == pans
    print(f"{tally.checked} seal/verify rounds over {len(tally.versions)} versions; the killed replica left the "
          f"live set {dropped_out:.2f} s after SIGKILL; {sum(promoted_at_once)}/24 rotations promoted at once")


# -- PostgreSQL restarted ----------------------------------------------------------------------------------------


class RestartablePostgres:
    """A throwaway PostgreSQL server (never the machine's shared one) that a test restarts."""

    def __init__(self) -> None:
        # Not under pytest's tmp folder: the postgres user must be able to reach it.
        self.directory = Path(tempfile.mkdtemp(prefix="keysvc-replicas-postgres-"))
        self.admin_url = _start_throwaway_postgres(self.directory)
        self.port = int(self.admin_url.rpartition(":")[2])

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*_as_postgres_user(), str(_postgres_bindir() / "pg_ctl"), "-D",
                        str(self.directory / "pgdata"), *args], check=True, capture_output=True)

    def stop(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        self._pg_ctl("-w", "-l", str(self.directory / "log"), "-o",
                     f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1", "start")

    def remove(self) -> None:
        subprocess.run([*_as_postgres_user(), str(_postgres_bindir() / "pg_ctl"), "-D",
                        str(self.directory / "pgdata"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def restartable_postgres():
    server = RestartablePostgres()
    yield server
    server.remove()


def test_postgresql_restarted_under_load_calls_fail_fast_with_unavailable_then_recover_by_themselves(
        hsm_token, restartable_postgres, tmp_path, merchant):
    database_url = new_database(restartable_postgres.admin_url)
    replicas = Cluster(database_url, start_replicas(hsm_token, database_url, tmp_path, 2))
    try:
        a, b = replicas.one(0), replicas.one(1)
        key_id = create_key(a, merchant, "through-restart")
        # No retries: every failure is seen as it happens.
        client = KeysvcClient("ipv4:" + ",".join(replicas.addresses), options=ROUND_ROBIN, retries=0, timeout=5)
        replicas.clients.append(client)
        outcomes: list[tuple[float, str, float]] = []  # (when, status, seconds taken)
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    sealed = client.seal(key_id, b"through the restart")
                    assert client.verify(key_id, b"through the restart", sealed.seal).valid
                    status = "OK"
                except KeysvcCallError as error:
                    status = error.code.name
                outcomes.append((started, status, time.monotonic() - started))
                time.sleep(0.01)  # a client's pace

        thread = threading.Thread(target=load)
        thread.start()
        try:
            time.sleep(1.0)  # load before the restart
            restartable_postgres.stop()
            stopped_at = time.monotonic()
            seconds_until(lambda: any(s != "OK" for when, s, _ in outcomes if when > stopped_at), "calls failing", 5)
            time.sleep(1.0)  # the database stays away a while
            restartable_postgres.start()
            started_at = time.monotonic()
            recovered = seconds_until(lambda: [s for when, s, _ in outcomes if when > started_at][-20:] == ["OK"] * 20,
                                      "calls succeeding again", 15)
        finally:
            stop.set()
            thread.join(timeout=30)
        failed = [(status, took) for when, status, took in outcomes if status != "OK"]
        assert failed and {status for status, _ in failed} == {"UNAVAILABLE"}, {status for status, _ in failed}
        assert max(took for _, took in failed) < 2.0, "a call did not fail fast"

        # Both replicas follow changes again: a rotation is promoted by RotateKey and sealed with everywhere.
        seconds_until(lambda: live_addresses(a) == set(replicas.addresses), "both replicas live again", 5)
        rotated = rotate(a, key_id)
        assert rotated.key.primary_version == rotated.version == 2
        seconds_until(lambda: b.seal(key_id, b"probe").version == 2, "sealing with 2 on the other replica",
                      IN_FORCE_WITHIN)
        print(f"{len(failed)} calls failed (UNAVAILABLE, slowest {max(took for _, took in failed):.2f} s); "
              f"recovered {recovered:.2f} s after the database came back")
    finally:
        replicas.close()
