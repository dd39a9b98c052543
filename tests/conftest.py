"""Shared fixtures: a real SoftHSM2 token in a temporary folder, real databases,
and a real gRPC server on a loopback port 0.

One token serves the whole test session: PKCS#11 login is per process, and every
test names its keys uniquely (the `merchant` fixture), so tests never collide.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import hsm
from keysvc.keyring import KeyRing
from keysvc.keys import KeyManager
from keysvc.seals import Sealer
from keysvc.signing import Signer
from keysvc.store import KeyStore

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "tests" / "vectors"
TOKEN_LABEL = "keysvc-test"


@dataclass(frozen=True)
class SoftHsmToken:
    directory: Path
    config_path: Path
    pin_path: Path

    @property
    def hsm_config(self) -> hsm.HsmConfig:
        return hsm.HsmConfig(token_label=TOKEN_LABEL, pin=self.pin_path.read_text().strip())

    @property
    def env(self) -> dict[str, str]:
        """Environment for a keysvc process using this token."""
        return {
            **os.environ,
            "SOFTHSM2_CONF": str(self.config_path),
            "KEYSVC_TOKEN_LABEL": TOKEN_LABEL,
            "KEYSVC_HSM_PIN_FILE": str(self.pin_path),
        }


def new_token(directory: Path, *, with_master_key: bool = False) -> SoftHsmToken:
    """A SoftHSM token of its own (no master key unless asked), for keysvc subprocesses."""
    subprocess.run([str(REPO / "hsm" / "softhsm" / "setup-token.sh"), str(directory), TOKEN_LABEL],
                   check=True, capture_output=True)
    token = SoftHsmToken(directory, directory / "softhsm2.conf", directory / "pin")
    if with_master_key:
        subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c",
                        "import hsm, os; hsm.Hsm.connect(hsm.HsmConfig(os.environ['KEYSVC_TOKEN_LABEL'], "
                        "open(os.environ['KEYSVC_HSM_PIN_FILE']).read().strip())).ensure_master_key()"],
                       env=token.env, check=True, capture_output=True)
    return token


@pytest.fixture(scope="session")
def token(tmp_path_factory) -> SoftHsmToken:
    """A fresh SoftHSM2 token with keysvc's token keys, for the whole session."""
    directory = tmp_path_factory.mktemp("softhsm")
    subprocess.run(
        [str(REPO / "hsm" / "softhsm" / "setup-token.sh"), str(directory), TOKEN_LABEL],
        check=True, capture_output=True,
    )
    test_token = SoftHsmToken(directory, directory / "softhsm2.conf", directory / "pin")
    # Must be set before the PKCS#11 module is first loaded in this process.
    os.environ["SOFTHSM2_CONF"] = str(test_token.config_path)
    hsm.Hsm.connect(test_token.hsm_config).ensure_token_keys()
    return test_token


@pytest.fixture(scope="session")
def hsm_token(token) -> hsm.Hsm:
    """This process's connection to the test token."""
    return hsm.Hsm.connect(token.hsm_config)


@pytest.fixture
def merchant() -> str:
    """A merchant id no other test uses."""
    return "m" + uuid.uuid4().hex[:12]


def run_together(count: int, work, timeout: float = 60) -> list:
    """Runs work(index) in `count` threads released at once; returns the results and
    raises the first error. Fails the test if a thread is still running after `timeout`."""
    start = threading.Barrier(count)
    results: list = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = work(index)
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), f"a thread did not finish within {timeout} s"
    if errors:
        raise errors[0]
    return results


# -- databases -------------------------------------------------------------------------


def _postgres_usable(admin_url: str) -> bool:
    """Whether we can log in to that server as it is set up (trust auth, as here)."""
    import psycopg

    try:
        with psycopg.connect(admin_url + "/postgres", connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _postgres_bindir() -> Path:
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bindirs:
        raise RuntimeError("no PostgreSQL server: install Debian's postgresql package (make deps)")
    return bindirs[-1]


def _as_postgres_user() -> list[str]:
    # initdb refuses to run as root.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _start_throwaway_postgres(directory: Path) -> str:
    """Starts a PostgreSQL server from Debian's package in `directory` (as pytest-postgresql
    does) and returns the admin URL. Runs as the postgres user when we are root."""
    bindir = _postgres_bindir()
    as_user = _as_postgres_user()
    if as_user:
        shutil.chown(directory, "postgres")
    datadir = directory / "pgdata"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    port = _free_port()
    subprocess.run(
        [*as_user, str(bindir / "pg_ctl"), "-D", str(datadir), "-w", "-l", str(directory / "log"),
         "-o", f"-p {port} -k {directory} -c listen_addresses=127.0.0.1", "start"],
        check=True, capture_output=True,
    )
    return f"postgresql://postgres@127.0.0.1:{port}"


@pytest.fixture(scope="session")
def postgres_admin_url():
    """The PostgreSQL server at 127.0.0.1:5432 where one runs and lets us in without a
    password, else a throwaway one (KEYSVC_TEST_THROWAWAY_POSTGRES=1 forces it)."""
    local = "postgresql://postgres@127.0.0.1:5432"
    if not os.environ.get("KEYSVC_TEST_THROWAWAY_POSTGRES") and _postgres_usable(local):
        yield local
        return
    # Not under pytest's tmp folder: the postgres user must be able to reach it.
    directory = Path(tempfile.mkdtemp(prefix="keysvc-postgres-"))
    yield _start_throwaway_postgres(directory)
    subprocess.run(
        [*_as_postgres_user(), str(_postgres_bindir() / "pg_ctl"), "-D", str(directory / "pgdata"),
         "-m", "fast", "stop"],
        capture_output=True,
    )
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_admin_url):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = "keysvc_test_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_admin_url + "/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"{postgres_admin_url}/{name}"
    with psycopg.connect(postgres_admin_url + "/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'keysvc.db'}"


@pytest.fixture(params=["sqlite", "postgres"], ids=["sqlite", "postgresql"])
def database_url(request) -> str:
    """Each test using this runs against SQLite and against PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


# -- the domain ----------------------------------------------------------------------------


@dataclass
class Domain:
    hsm: hsm.Hsm
    store: KeyStore
    ring: KeyRing
    keys: KeyManager
    sealer: Sealer
    signer: Signer


def make_domain(token_connection: hsm.Hsm, database_url: str) -> Domain:
    store = KeyStore.open(database_url)
    ring = KeyRing(token_connection, store)
    return Domain(token_connection, store, ring, KeyManager(token_connection, store, ring), Sealer(ring), Signer(ring))


@pytest.fixture
def domain(hsm_token, sqlite_url):
    """The domain layer on the test token and a fresh SQLite database."""
    built = make_domain(hsm_token, sqlite_url)
    yield built
    built.store.close()


# -- a real gRPC server ------------------------------------------------------------------------


@dataclass
class RunningServer:
    address: str
    domain: Domain
    channel: object
    keys: object
    seals: object
    health: object
    signing: object


@pytest.fixture
def server(domain):
    """The real gRPC server, in this process, on a loopback port 0, with stubs to call it."""
    import grpc

    from keysvc.rpc.server import ServerOptions, create_server
    from keysvc.v1 import keys_pb2_grpc, seals_pb2_grpc, signing_pb2_grpc
    from grpc_health.v1 import health_pb2_grpc

    grpc_server, port, _health = create_server(
        "127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False), signer=domain.signer
    )
    grpc_server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    yield RunningServer(
        address, domain, channel,
        keys_pb2_grpc.KeyServiceStub(channel),
        seals_pb2_grpc.SealServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
        signing_pb2_grpc.SigningServiceStub(channel),
    )
    channel.close()
    grpc_server.stop(None)
