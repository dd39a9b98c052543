"""gRPC health reflects reality: NOT_SERVING while the HSM or the database is away,
SERVING again on its own once it is back.

The faults are real: a SoftHSM token folder taken away under a running `keysvc
serve`, and a PostgreSQL server of the test's own stopped and started again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keysvc.health import HealthMonitor, database_check, hsm_check
from keysvc.rpc.server import SERVICE_NAMES, TOKEN_SERVICE_NAME, ServerOptions, create_server, set_serving
from keysvc.v1 import keys_pb2, keys_pb2_grpc
from tests.conftest import (
    REPO,
    TOKEN_LABEL,
    SoftHsmToken,
    _as_postgres_user,
    _free_port,
    _postgres_bindir,
    make_domain,
)
from tests.servers import child_pids, start_keysvc_server, stop_keysvc_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The probe runs every second: a change shows within this, with room for a busy machine.
NOTICED_WITHIN = 3.0
# The promise: service resumes within 5 s of the dependency coming back.
RESUMED_WITHIN = 5.0


def statuses(channel: grpc.Channel) -> dict[str, int]:
    """The health status of the server ("") and of each keysvc service it offers
    (TokenService only where a tokenizer was given)."""
    stub = health_pb2_grpc.HealthStub(channel)
    found = {}
    for name in ("", *SERVICE_NAMES, TOKEN_SERVICE_NAME):
        try:
            found[name] = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.NOT_FOUND or name != TOKEN_SERVICE_NAME:
                raise
    return found


def wait_for_status(channel: grpc.Channel, wanted: int, within: float) -> float:
    """Seconds until every status is `wanted`; fails the test after `within`."""
    start = time.monotonic()
    while True:
        found = statuses(channel)
        if set(found.values()) == {wanted}:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            pytest.fail(f"health still {found} after {within} s, wanted {wanted} everywhere")
        time.sleep(0.05)


class OwnPostgres:
    """A PostgreSQL server for one test module, that a test can stop and start again."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="keysvc-health-postgres-"))
        self.port = _free_port()
        self._as_user = _as_postgres_user()
        if self._as_user:
            shutil.chown(self.directory, "postgres")
        subprocess.run([*self._as_user, str(_postgres_bindir() / "initdb"), "-D", str(self.directory / "pgdata"),
                        "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
        self.start()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self._as_user, str(_postgres_bindir() / "pg_ctl"), "-D", str(self.directory / "pgdata"),
                        *args], check=True, capture_output=True)

    def start(self) -> None:
        self._pg_ctl("-w", "-l", str(self.directory / "log"), "-o",
                     f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")

    def pids(self) -> list[int]:
        """The postmaster first, then its children (backends and helpers)."""
        postmaster = int((self.directory / "pgdata" / "postmaster.pid").read_text().split()[0])
        return [postmaster, *sorted(child_pids(postmaster))]

    def freeze(self) -> list[int]:
        """SIGSTOPs every process of the server: connections hang as behind a network
        partition, instead of being refused. Returns the pids for thaw."""
        frozen = []
        for pid in self.pids():
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
        return frozen

    @staticmethod
    def thaw(frozen: list[int]) -> None:
        for pid in reversed(frozen):
            os.kill(pid, signal.SIGCONT)

    def new_database(self) -> str:
        name = "keysvc_" + str(time.monotonic_ns())
        with psycopg.connect(self.admin_url + "/postgres", autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return f"{self.admin_url}/{name}"

    def remove(self) -> None:
        subprocess.run([*self._as_user, str(_postgres_bindir() / "pg_ctl"), "-D", str(self.directory / "pgdata"),
                        "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def own_postgres():
    server = OwnPostgres()
    yield server
    server.remove()


def _create_key_request(merchant: str, name: str) -> keys_pb2.CreateKeyRequest:
    return keys_pb2.CreateKeyRequest(merchant_id=merchant, name=name, algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256)


def test_hsm_away_turns_health_not_serving_and_back_to_serving_when_it_returns(tmp_path, merchant):
    subprocess.run([str(REPO / "hsm" / "softhsm" / "setup-token.sh"), str(tmp_path / "hsm"), TOKEN_LABEL],
                   check=True, capture_output=True)
    own_token = SoftHsmToken(tmp_path / "hsm", tmp_path / "hsm" / "softhsm2.conf", tmp_path / "hsm" / "pin")
    server = start_keysvc_server(own_token, f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "server.log")
    try:
        with grpc.insecure_channel(server.address) as channel:
            keys = keys_pb2_grpc.KeyServiceStub(channel)
            assert set(statuses(channel).values()) == {SERVING}
            assert TOKEN_SERVICE_NAME in statuses(channel)
            keys.CreateKey(_create_key_request(merchant, "k"), timeout=10)

            (tmp_path / "hsm" / "tokens").rename(tmp_path / "hsm" / "tokens-gone")
            noticed = wait_for_status(channel, NOT_SERVING, NOTICED_WITHIN)
            with pytest.raises(grpc.RpcError) as raised:
                keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=f"{merchant}/k"), timeout=5)
            assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
            # Still not serving a probe later: the verdict does not flap while the HSM is away.
            time.sleep(1.5)
            assert set(statuses(channel).values()) == {NOT_SERVING}

            (tmp_path / "hsm" / "tokens-gone").rename(tmp_path / "hsm" / "tokens")
            resumed = wait_for_status(channel, SERVING, RESUMED_WITHIN)
            assert keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=f"{merchant}/k"), timeout=10).version == 2
        print(f"HSM away noticed in {noticed:.2f} s, back noticed in {resumed:.2f} s")
    finally:
        stop_keysvc_server(server)
    log = server.log()
    assert "health: hsm is unavailable" in log
    assert "health: every dependency is back" in log


def test_database_away_turns_health_not_serving_and_back_to_serving_when_it_returns(
        token, own_postgres, tmp_path, merchant):
    server = start_keysvc_server(token, own_postgres.new_database(), tmp_path / "server.log")
    try:
        with grpc.insecure_channel(server.address) as channel:
            keys = keys_pb2_grpc.KeyServiceStub(channel)
            assert set(statuses(channel).values()) == {SERVING}
            keys.CreateKey(_create_key_request(merchant, "k"), timeout=10)

            own_postgres.stop()
            try:
                noticed = wait_for_status(channel, NOT_SERVING, NOTICED_WITHIN)
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as raised:
                    keys.GetKey(keys_pb2.GetKeyRequest(key_id=f"{merchant}/k"), timeout=5)
                assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 5
            finally:
                own_postgres.start()
            resumed = wait_for_status(channel, SERVING, RESUMED_WITHIN)
            assert keys.GetKey(keys_pb2.GetKeyRequest(key_id=f"{merchant}/k"), timeout=10).key.primary_version == 1
        print(f"database away noticed in {noticed:.2f} s, back noticed in {resumed:.2f} s")
    finally:
        stop_keysvc_server(server)
    assert "health: database is unavailable" in server.log()


def test_a_call_ending_unavailable_marks_not_serving_without_waiting_for_the_next_probe(
        hsm_token, own_postgres, merchant):
    domain = make_domain(hsm_token, own_postgres.new_database())
    # A probe interval far longer than the test: only the failed call can trigger one.
    monitor = HealthMonitor({"hsm": hsm_check(hsm_token), "database": database_check(domain.store)},
                            lambda serving, _failing: set_serving(health_servicer, serving), interval=3600)
    grpc_server, port, health_servicer = create_server(
        "127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False), signer=domain.signer,
        on_unavailable=monitor.probe_soon)
    monitor.start()
    grpc_server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            keys = keys_pb2_grpc.KeyServiceStub(channel)
            keys.CreateKey(_create_key_request(merchant, "k"), timeout=10)
            assert set(statuses(channel).values()) == {SERVING}
            own_postgres.stop()
            try:
                with pytest.raises(grpc.RpcError) as raised:
                    keys.GetKey(keys_pb2.GetKeyRequest(key_id=f"{merchant}/k"), timeout=5)
                assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
                wait_for_status(channel, NOT_SERVING, 1.0)
                assert monitor.failing == ("database",)
            finally:
                own_postgres.start()
            monitor.probe_soon()
            wait_for_status(channel, SERVING, RESUMED_WITHIN)
    finally:
        monitor.stop()
        grpc_server.stop(None)
        domain.store.close()


def test_a_database_that_hangs_turns_health_not_serving_within_the_probe_timeout(
        token, own_postgres, tmp_path, merchant):
    server = start_keysvc_server(token, own_postgres.new_database(), tmp_path / "server.log",
                                 extra_env={"KEYSVC_HEALTH_TIMEOUT": "1"})
    try:
        with grpc.insecure_channel(server.address) as channel:
            keys_pb2_grpc.KeyServiceStub(channel).CreateKey(_create_key_request(merchant, "k"), timeout=10)
            frozen = own_postgres.freeze()
            try:
                # A probe every 1 s, each waiting at most 1 s for the database.
                noticed = wait_for_status(channel, NOT_SERVING, 1 + 1 + NOTICED_WITHIN)
            finally:
                own_postgres.thaw(frozen)
            resumed = wait_for_status(channel, SERVING, RESUMED_WITHIN)
            key = keys_pb2_grpc.KeyServiceStub(channel).GetKey(
                keys_pb2.GetKeyRequest(key_id=f"{merchant}/k"), timeout=10).key
            assert key.primary_version == 1
        print(f"hung database noticed in {noticed:.2f} s, back noticed in {resumed:.2f} s")
    finally:
        stop_keysvc_server(server)
    assert "health: database is unavailable (no answer within 1.0 s)" in server.log()
