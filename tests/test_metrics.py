"""Prometheus metrics: scraped over HTTP after real calls through a real server on a
real SoftHSM token; they count what happened and never show a key id, a merchant
id, a message or a seal."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

import grpc
import psycopg
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from keysvc.audit import AuditTrail
from keysvc.authz import Policy
from keysvc.metrics import FollowerLag, MeasuredHsm, serve_metrics
from keysvc.pki import issue_client_certificate, make_dev_pki
from keysvc.rpc.server import Security, ServerOptions, create_server, server_credentials
from keysvc.store.audit import AuditStore
from keysvc.v1 import keys_pb2, keys_pb2_grpc, seals_pb2, seals_pb2_grpc, tokens_pb2, tokens_pb2_grpc
from tests.conftest import _free_port, make_domain
from tests.servers import KEYSVC, Client, close_clients, start_keysvc_server, stop_keysvc_server

SEAL = "keysvc.v1.SealService/Seal"
BATCH_SEAL = "keysvc.v1.SealService/BatchSeal"
GET_KEY = "keysvc.v1.KeyService/GetKey"
# Luhn-valid test card numbers (Visa, Mastercard, Amex test ranges).
PANS = ["4111111111111111", "5555555555554444", "378282246310005"]


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple], float]]:
    """The endpoint's text and its samples by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def two_free_ports() -> int:
    """A port free on 127.0.0.1 whose successor is free too (two workers' metrics)."""
    base = _free_port()
    while True:
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            base = _free_port()


def wait_for(condition, what: str, within: float = 5.0) -> None:
    """Polls condition() until it holds; fails the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def measured_server(hsm_token, sqlite_url):
    domain = make_domain(MeasuredHsm(hsm_token), sqlite_url)
    grpc_server, port, _health = create_server(
        "127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False), signer=domain.signer)
    grpc_server.start()
    metrics_server, metrics_port = serve_metrics("127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield domain, channel, metrics_port
    channel.close()
    metrics_server.shutdown()
    grpc_server.stop(None)
    domain.store.close()


def test_metrics_count_calls_codes_latency_batches_hsm_calls_and_cache_lookups(measured_server, merchant):
    domain, channel, metrics_port = measured_server
    keys = keys_pb2_grpc.KeyServiceStub(channel)
    seals = seals_pb2_grpc.SealServiceStub(channel)
    _, before = scrape(metrics_port)

    key_id = keys.CreateKey(keys_pb2.CreateKeyRequest(
        merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=10).key.key_id
    message = b"amount=4111111111111111|secret message"
    seal_values = [seals.Seal(seals_pb2.SealRequest(key_id=key_id, message=message), timeout=10).seal
                   for _ in range(3)]
    seals.BatchSeal(seals_pb2.BatchSealRequest(
        requests=[seals_pb2.SealRequest(key_id=key_id, message=b"m%d" % i) for i in range(5)]), timeout=10)
    with pytest.raises(grpc.RpcError) as raised:
        keys.GetKey(keys_pb2.GetKeyRequest(key_id=f"{merchant}/missing"), timeout=10)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(Exception):
        domain.hsm.load_secret(b"not a wrapped key at all")  # a real HSM call that fails

    text, after = scrape(metrics_port)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # No policy (the insecure loopback mode): no role.
    assert delta("keysvc_requests_total", rpc=SEAL, code="OK", role="none") == 3
    assert delta("keysvc_requests_total", rpc=BATCH_SEAL, code="OK", role="none") == 1
    assert delta("keysvc_requests_total", rpc=GET_KEY, code="NOT_FOUND", role="none") == 1
    assert delta("keysvc_request_duration_seconds_count", rpc=SEAL, role="none") == 3
    assert delta("keysvc_request_duration_seconds_sum", rpc=SEAL, role="none") > 0
    assert delta("keysvc_batch_items_count", rpc=BATCH_SEAL) == 1
    assert delta("keysvc_batch_items_sum", rpc=BATCH_SEAL) == 5
    # The first use of the version loads it (a miss), the next ones find it (hits).
    assert delta("keysvc_key_cache_lookups_total", result="miss") >= 1
    assert delta("keysvc_key_cache_lookups_total", result="hit") >= 3
    assert delta("keysvc_hsm_call_duration_seconds_count", operation="hmac_many") >= 4
    assert delta("keysvc_hsm_call_duration_seconds_count", operation="generate_wrapped_secret") == 1
    assert delta("keysvc_hsm_errors_total", operation="load_secret", error="HsmUnwrapFailed") == 1
    assert "process_resident_memory_bytes" in text

    # Nothing the caller sent or got back.
    for secret in (merchant, key_id, "4111111111111111", "secret message", *seal_values):
        assert secret not in text


@pytest.fixture
def secure_measured_server(domain, tmp_path):
    """A mutual-TLS server with the development PKI's policy and an audit trail, and the
    metrics endpoint."""
    pki = tmp_path / "pki"
    make_dev_pki(pki)
    issue_client_certificate(pki, "client-stranger", "spiffe://keysvc.dev/stranger")  # no grant
    security = Security(server_credentials(pki / "server.crt", pki / "server.key", pki / "ca.crt"),
                        Policy.load(pki / "policy.toml"))
    grpc_server, port, _health = create_server(
        "127.0.0.1:0", domain.keys, domain.sealer, ServerOptions(reuse_port=False), signer=domain.signer,
        audit_trail=AuditTrail(domain.hsm, AuditStore(domain.store.engine)), security=security)
    grpc_server.start()
    metrics_server, metrics_port = serve_metrics("127.0.0.1:0")

    def channel_as(name: str) -> grpc.Channel:
        return grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(
            (pki / "ca.crt").read_bytes(), (pki / f"{name}.key").read_bytes(), (pki / f"{name}.crt").read_bytes()))

    yield channel_as, metrics_port
    metrics_server.shutdown()
    grpc_server.stop(None)


def _code(call, request) -> str:
    try:
        call(request, timeout=10)
        return "OK"
    except grpc.RpcError as error:
        return error.code().name


def test_requests_carry_the_callers_role_and_audit_writes_count_written_and_failed(
        secure_measured_server, domain, merchant):
    channel_as, metrics_port = secure_measured_server
    _, before = scrape(metrics_port)
    with channel_as("client-key-admin") as admin, channel_as("client-gateway") as gateway, \
            channel_as("client-stranger") as stranger:
        created = _code(keys_pb2_grpc.KeyServiceStub(admin).CreateKey, keys_pb2.CreateKeyRequest(
            merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256))
        sealed = [_code(seals_pb2_grpc.SealServiceStub(gateway).Seal,
                        seals_pb2.SealRequest(key_id=f"{merchant}/k", message=b"m")) for _ in range(2)]
        denied = _code(keys_pb2_grpc.KeyServiceStub(gateway).RotateKey, keys_pb2.RotateKeyRequest(
            key_id=f"{merchant}/k"))
        strange = _code(seals_pb2_grpc.SealServiceStub(stranger).Seal,
                        seals_pb2.SealRequest(key_id=f"{merchant}/k", message=b"m"))
        # Health checks bypass the policy: no role, not even the one the pool thread served last.
        health_pb2_grpc.HealthStub(gateway).Check(health_pb2.HealthCheckRequest(), timeout=10)
        with domain.store.engine.begin() as connection:
            connection.execute(sa.text("DROP TABLE audit_records"))
        unrecorded = _code(keys_pb2_grpc.KeyServiceStub(admin).CreateKey, keys_pb2.CreateKeyRequest(
            merchant_id=merchant, name="k2", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256))
    text, after = scrape(metrics_port)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert (created, sealed, denied, strange, unrecorded) == (
        "OK", ["OK", "OK"], "PERMISSION_DENIED", "PERMISSION_DENIED", "UNAVAILABLE")
    create_key = "keysvc.v1.KeyService/CreateKey"
    assert delta("keysvc_requests_total", rpc=create_key, code="OK", role="key-admin") == 1
    assert delta("keysvc_requests_total", rpc=create_key, code="UNAVAILABLE", role="key-admin") == 1
    assert delta("keysvc_requests_total", rpc=SEAL, code="OK", role="gateway") == 2
    assert delta("keysvc_request_duration_seconds_count", rpc=SEAL, role="gateway") == 2
    assert delta("keysvc_requests_total", rpc="keysvc.v1.KeyService/RotateKey", code="PERMISSION_DENIED",
                 role="gateway") == 1
    assert delta("keysvc_requests_total", rpc=SEAL, code="PERMISSION_DENIED", role="none") == 1
    assert delta("keysvc_requests_total", rpc="grpc.health.v1.Health/Check", code="OK", role="none") == 1
    # CreateKey: STARTED and OK; RotateKey and the stranger's Seal: their refusals. Then the
    # table is gone: the second CreateKey's STARTED record fails, and it does not run.
    assert delta("keysvc_audit_writes_total", outcome="written") == 4
    assert delta("keysvc_audit_writes_total", outcome="failed") >= 1
    assert domain.store.load_key(f"{merchant}/k2") is None
    # Roles, never identities.
    assert "spiffe://" not in text and merchant not in text


def test_serve_metrics_listen_serves_the_endpoint_with_the_dependencies_up(token, tmp_path, merchant):
    metrics_port = _free_port()
    server = start_keysvc_server(token, f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "server.log",
                                 extra_args=("--metrics-listen", f"127.0.0.1:{metrics_port}"))
    try:
        with grpc.insecure_channel(server.address) as channel:
            keys = keys_pb2_grpc.KeyServiceStub(channel)
            keys.CreateKey(keys_pb2.CreateKeyRequest(
                merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=10)
            tokens = tokens_pb2_grpc.TokenServiceStub(channel)
            tokens.Tokenize(tokens_pb2.TokenizeRequest(domain=merchant, pans=PANS[:2]), timeout=10)
            tokens.Tokenize(tokens_pb2.TokenizeRequest(domain="other-shop", pans=PANS), timeout=10)
        # On SQLite too the process follows the change log (by polling), its own changes included.
        wait_for(lambda: value(scrape(metrics_port)[1], "keysvc_key_changes_applied_total") >= 1,
                 "the key's creation applied by the follower")
        text, samples = scrape(metrics_port)
    finally:
        stop_keysvc_server(server)
    # Every token domain together; counted at the scrape, never a domain or a PAN shown.
    assert value(samples, "keysvc_tokens_stored") == 5
    assert merchant not in text and "other-shop" not in text
    assert not any(pan in text for pan in PANS)
    # CreateKey is audited: once before it runs, once with its outcome.
    assert value(samples, "keysvc_audit_writes_total", outcome="written") == 2
    assert value(samples, "keysvc_audit_writes_total", outcome="failed") == 0
    assert value(samples, "keysvc_requests_total", rpc="keysvc.v1.KeyService/CreateKey", code="OK", role="none") == 1
    assert value(samples, "keysvc_dependency_up", dependency="hsm") == 1
    assert value(samples, "keysvc_dependency_up", dependency="database") == 1
    assert 0 <= value(samples, "keysvc_key_change_follower_lag_seconds") < 2.0
    assert value(samples, "keysvc_replicas_live") == 1
    assert value(samples, "keysvc_rotations_promoted_total") == 0  # no safe rotation on SQLite by default
    # One for the new key, one for the audit trail's checkpoint key, made at its first record,
    # one for each token domain's fingerprint key.
    assert value(samples, "keysvc_hsm_call_duration_seconds_count", operation="generate_wrapped_secret") == 4


def test_each_worker_serves_its_metrics_on_the_port_plus_its_index(token, tmp_path, merchant):
    base = two_free_ports()
    server = start_keysvc_server(token, f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "server.log", workers=2,
                                 extra_args=("--metrics-listen", f"127.0.0.1:{base}"))
    try:
        clients = [Client(server.address) for _ in range(6)]  # one ListKeys each, on its own connection
        close_clients(clients)
        listed = 0
        for port in (base, base + 1):
            _, samples = scrape(port)
            assert value(samples, "keysvc_dependency_up", dependency="hsm") == 1
            listed += value(samples, "keysvc_requests_total", rpc="keysvc.v1.KeyService/ListKeys", code="OK",
                            role="none")
        assert listed == 6  # each call counted once, by the worker that served it
    finally:
        stop_keysvc_server(server)


def test_a_metrics_port_in_use_stops_serve_with_a_message_naming_the_setting(token, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [KEYSVC, "serve", "--listen", "127.0.0.1:0", "--database", f"sqlite:///{tmp_path / 'k.db'}",
             "--metrics-listen", f"127.0.0.1:{port}", "--insecure-loopback"],
            env=token.env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_follower_lag_is_computed_when_scraped_so_a_stuck_follower_shows_it_growing():
    clock = FakeClock()
    lag = FollowerLag(clock)
    assert list(lag.collect()) == []  # no follower yet: no sample rather than a wrong one
    lag.read_completed()
    clock.now += 0.3
    assert [family.samples[0].value for family in lag.collect()] == [pytest.approx(0.3)]
    clock.now += 7.0  # no read completed since
    assert [family.samples[0].value for family in lag.collect()] == [pytest.approx(7.3)]
    lag.read_completed()
    assert [family.samples[0].value for family in lag.collect()] == [0.0]


def key_changes_logged(database_url: str) -> int:
    with psycopg.connect(database_url) as connection:
        return connection.execute("SELECT count(*) FROM key_changes").fetchone()[0]


def test_each_workers_follower_reports_changes_applied_rotations_promoted_its_lag_and_the_live_processes(
        token, postgres_url, tmp_path, merchant):
    base = two_free_ports()
    ports = (base, base + 1)
    # PostgreSQL: every worker follows the change log and safe rotation is on.
    server = start_keysvc_server(token, postgres_url, tmp_path / "server.log", workers=2,
                                 extra_args=("--metrics-listen", f"127.0.0.1:{base}"))
    try:
        logged_before = key_changes_logged(postgres_url)
        before = [scrape(port)[1] for port in ports]
        with grpc.insecure_channel(server.address) as channel:
            keys = keys_pb2_grpc.KeyServiceStub(channel)
            key_id = keys.CreateKey(keys_pb2.CreateKeyRequest(
                merchant_id=merchant, name="followed", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256),
                timeout=10).key.key_id
            rotated = keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key_id), timeout=10)
        # Both workers loaded version 2 before RotateKey answered it primary.
        assert (rotated.key.primary_version, rotated.key.pending_primary) == (2, 0)
        logged = key_changes_logged(postgres_url) - logged_before  # creation, rotation, promotion at least
        assert logged >= 3

        def delta(index: int, samples, name: str) -> float:
            return value(samples, name) - value(before[index], name)

        def every_worker_applied_every_change() -> bool:
            return all(delta(index, scrape(port)[1], "keysvc_key_changes_applied_total") >= logged
                       for index, port in enumerate(ports))

        # Each worker's follower applies every entry of the log, its own worker's included.
        wait_for(every_worker_applied_every_change, "every change applied by both workers")
        # Each counts two live processes (its heartbeat round refreshes the count every second).
        wait_for(lambda: all(value(scrape(port)[1], "keysvc_replicas_live") == 2 for port in ports),
                 "both workers counted live")
        scraped = [scrape(port) for port in ports]
        for index, (text, samples) in enumerate(scraped):
            assert delta(index, samples, "keysvc_key_changes_applied_total") == logged
            assert 0 <= value(samples, "keysvc_key_change_follower_lag_seconds") < 2.0
            assert key_id not in text and merchant not in text
        # One rotation, promoted once: by whichever worker got there first.
        assert sum(delta(index, samples, "keysvc_rotations_promoted_total")
                   for index, (_, samples) in enumerate(scraped)) == 1
    finally:
        stop_keysvc_server(server)


def test_remembered_label_children_are_the_librarys_and_removal_forgets_them():
    """keysvc's metrics answer labels() from a dict after the first time; the child is
    the one the library made, so what it counts is scraped, and remove/clear are honoured."""
    from prometheus_client import CollectorRegistry, generate_latest

    from keysvc.metrics import _Counter, _Histogram

    registry = CollectorRegistry()
    calls = _Counter("test_calls", "Calls.", ("rpc",), registry=registry)
    seconds = _Histogram("test_seconds", "Seconds.", ("rpc",), buckets=(0.1, 1.0), registry=registry)
    first = calls.labels("Seal")
    assert calls.labels("Seal") is first and calls.labels(rpc="Seal") is first
    first.inc()
    calls.labels("Seal").inc()
    seconds.labels("Seal").observe(0.05)
    assert registry.get_sample_value("test_calls_total", {"rpc": "Seal"}) == 2
    assert registry.get_sample_value("test_seconds_bucket", {"rpc": "Seal", "le": "0.1"}) == 1
    calls.remove("Seal")
    assert registry.get_sample_value("test_calls_total", {"rpc": "Seal"}) is None
    calls.labels("Seal").inc()  # a new child, not the removed one
    assert registry.get_sample_value("test_calls_total", {"rpc": "Seal"}) == 1
    calls.clear()
    assert b"test_calls_total{" not in generate_latest(registry)
    calls.labels("Seal").inc()
    assert registry.get_sample_value("test_calls_total", {"rpc": "Seal"}) == 1
