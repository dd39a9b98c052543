"""Failures of the parts keysvc stands on reach the caller as clear statuses.

The database is a real PostgreSQL database that is dropped under the running
server; the HSM is a real SoftHSM token whose folder is taken away under a running
`keysvc serve`; a moved key record is made with raw SQL on the real store.
"""

from __future__ import annotations

import subprocess
import time

import grpc
import psycopg
import pytest
import sqlalchemy as sa

from keysvc.model import KeyAlgorithm, KeyPurpose
from keysvc.rpc.server import ServerOptions, create_server
from keysvc.store.schema import key_versions
from keysvc.v1 import keys_pb2, keys_pb2_grpc, seals_pb2, seals_pb2_grpc
from tests.conftest import REPO, TOKEN_LABEL, SoftHsmToken, make_domain
from tests.servers import start_keysvc_server, stop_keysvc_server


@pytest.fixture
def postgres_server(hsm_token, postgres_url):
    domain = make_domain(hsm_token, postgres_url)
    grpc_server, port, _ = create_server("127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False),
                                        signer=domain.signer)
    grpc_server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield keys_pb2_grpc.KeyServiceStub(channel), seals_pb2_grpc.SealServiceStub(channel), postgres_url
    channel.close()
    grpc_server.stop(None)
    domain.store.close()


def _drop_database(url: str) -> None:
    admin_url, _, name = url.rpartition("/")
    with psycopg.connect(admin_url + "/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_database_gone_gives_unavailable_and_the_next_calls_too(postgres_server, merchant):
    keys, _seals, url = postgres_server
    keys.CreateKey(keys_pb2.CreateKeyRequest(
        merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256))
    _drop_database(url)

    for call in (
        lambda: keys.GetKey(keys_pb2.GetKeyRequest(key_id=f"{merchant}/k"), timeout=10),
        lambda: keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=f"{merchant}/k"), timeout=10),
        lambda: keys.CreateKey(keys_pb2.CreateKeyRequest(
            merchant_id=merchant, name="other", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "database is unavailable" in raised.value.details()
        assert "Traceback" not in raised.value.details()


def test_key_record_moved_to_another_version_is_refused_with_data_loss(hsm_token, sqlite_url, merchant):
    writer = make_domain(hsm_token, sqlite_url)
    key = writer.keys.create_key(merchant, "k", KeyPurpose.SEAL, KeyAlgorithm.HMAC_SHA256)
    writer.keys.rotate_key(key.key_id)
    # Copy version 1's wrapped key and binding tag onto version 2, as a tampered database would.
    with writer.store.engine.begin() as connection:
        v1 = connection.execute(
            sa.select(key_versions).where(key_versions.c.key_id == key.key_id, key_versions.c.version == 1)
        ).one()
        connection.execute(
            sa.update(key_versions)
            .where(key_versions.c.key_id == key.key_id, key_versions.c.version == 2)
            .values(wrapped_key=v1.wrapped_key, binding_tag=v1.binding_tag)
        )
    reader = make_domain(hsm_token, sqlite_url)  # a fresh process's view: nothing cached
    grpc_server, port, _ = create_server("127.0.0.1:0", reader.keys, reader.sealer, ServerOptions(reuse_port=False),
                                        signer=reader.signer)
    grpc_server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            seals = seals_pb2_grpc.SealServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                seals.Seal(seals_pb2.SealRequest(key_id=key.key_id, message=b"m"), timeout=10)
            assert raised.value.code() is grpc.StatusCode.DATA_LOSS
            # Version 1 itself is untouched and still seals.
            sealed = seals.Seal(seals_pb2.SealRequest(key_id=key.key_id, message=b"m", version=1), timeout=10)
            assert sealed.version == 1
    finally:
        grpc_server.stop(None)
        writer.store.close()
        reader.store.close()


def test_hsm_token_gone_gives_unavailable_then_service_resumes_by_itself_when_it_is_back(tmp_path, merchant):
    # A server with a token of its own, so that taking the token away touches no other test.
    subprocess.run([str(REPO / "hsm" / "softhsm" / "setup-token.sh"), str(tmp_path / "hsm"), TOKEN_LABEL],
                   check=True, capture_output=True)
    own_token = SoftHsmToken(tmp_path / "hsm", tmp_path / "hsm" / "softhsm2.conf", tmp_path / "hsm" / "pin")
    server = start_keysvc_server(own_token, f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "server.log")
    try:
        with grpc.insecure_channel(server.address) as channel:
            keys = keys_pb2_grpc.KeyServiceStub(channel)
            create = keys_pb2.CreateKeyRequest(
                merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256)
            keys.CreateKey(create, timeout=10)
            (tmp_path / "hsm" / "tokens").rename(tmp_path / "hsm" / "tokens-gone")

            for call in (
                lambda: keys.CreateKey(keys_pb2.CreateKeyRequest(
                    merchant_id=merchant, name="other", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=10),
                lambda: keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=f"{merchant}/k"), timeout=10),
            ):
                with pytest.raises(grpc.RpcError) as raised:
                    call()
                assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
                assert raised.value.details().startswith("the HSM is unavailable")
                assert "Traceback" not in raised.value.details()
            # Nothing half written: the failed rotation added no version.
            key = keys.GetKey(keys_pb2.GetKeyRequest(key_id=f"{merchant}/k"), timeout=10).key
            assert [v.version for v in key.versions] == [1]

            (tmp_path / "hsm" / "tokens-gone").rename(tmp_path / "hsm" / "tokens")
            rotated = _first_success_within(
                5.0, lambda: keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=f"{merchant}/k"), timeout=10))
            assert rotated.version == 2
            seals = seals_pb2_grpc.SealServiceStub(channel)
            sealed = seals.Seal(seals_pb2.SealRequest(key_id=f"{merchant}/k", message=b"m"), timeout=10)
            assert sealed.version == 2
            assert seals.Verify(seals_pb2.VerifyRequest(
                key_id=f"{merchant}/k", message=b"m", seal=sealed.seal), timeout=10).valid
    finally:
        stop_keysvc_server(server)


def _first_success_within(seconds: float, call):
    """The first answer of `call` that is not UNAVAILABLE, polling until the deadline."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def test_a_frozen_hsm_ends_calls_at_their_deadline_and_the_server_keeps_answering(hsm_token, sqlite_url, merchant):
    """A frozen HSM, as keysvc sees one: the process's PKCS#11 lock held and not given back
    (a module call that hangs holds it so). Here a thread of the server's own process
    holds it for 6 s making real HMAC calls. Calls that need the HSM must end at their
    deadline and give their server thread back, so that calls that do not need it (and
    the HSM's next callers, once it is free) are still served."""
    import threading

    import hsm

    frozen_for = 6.0
    domain = make_domain(hsm_token, sqlite_url)
    # Two threads: without bounded waits, two callers waiting for the HSM take the whole server.
    grpc_server, port, _ = create_server("127.0.0.1:0", domain.keys, domain.sealer,
                                        ServerOptions(reuse_port=False, max_threads=2), signer=domain.signer)
    grpc_server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    keys, seals = keys_pb2_grpc.KeyServiceStub(channel), seals_pb2_grpc.SealServiceStub(channel)
    handle = hsm_token.load_secret(hsm_token.generate_wrapped_secret(32))
    frozen, thawed = threading.Event(), threading.Event()

    def freeze() -> None:
        with hsm_token.exclusive():
            frozen.set()
            until = time.monotonic() + frozen_for
            while time.monotonic() < until:
                hsm_token.hmac_many(handle, hsm.Digest.SHA256, [b"busy"] * 100)
        thawed.set()

    def seal_within(timeout: float) -> tuple[grpc.StatusCode, float]:
        start = time.monotonic()
        try:
            seals.Seal(seals_pb2.SealRequest(key_id=key_id, message=b"m"), timeout=timeout)
            return grpc.StatusCode.OK, time.monotonic() - start
        except grpc.RpcError as error:
            return error.code(), time.monotonic() - start

    try:
        key_id = keys.CreateKey(keys_pb2.CreateKeyRequest(
            merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=10).key.key_id
        assert seal_within(10)[0] is grpc.StatusCode.OK
        holder = threading.Thread(target=freeze, daemon=True)
        holder.start()
        assert frozen.wait(10)

        waiting = []
        callers = [threading.Thread(target=lambda: waiting.append(seal_within(0.5))) for _ in range(4)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(10)
        # The server's threads are free again while the HSM is still frozen.
        listed = keys.ListKeys(keys_pb2.ListKeysRequest(merchant_id=merchant), timeout=2)
        still_frozen = not thawed.is_set()
        holder.join(frozen_for + 10)
        after = seal_within(10)
    finally:
        channel.close()
        grpc_server.stop(None)
        hsm_token.release_secret(handle)
        domain.store.close()

    assert len(waiting) == 4
    for code, seconds in waiting:
        assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), code
        assert seconds < 2.0
    assert [key.key_id for key in listed.keys] == [key_id] and still_frozen
    assert after[0] is grpc.StatusCode.OK
