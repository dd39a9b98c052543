"""Running keysvc: set-up, one serving process, or several workers on one port.

PKCS#11 is serialised per process, so throughput grows with processes. With
`workers > 1` the parent prepares the database and the token, then starts each
worker with the spawn method (a fresh interpreter: no PKCS#11 or gRPC state
inherited across a fork); every worker opens its own HSM session and listens on
the same port (SO_REUSEPORT), and the kernel spreads connections among them.
Workers share the database, where every change bumps a key's revision and is
announced in the key change log that every serving process follows (keysvc.replicas).
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import hsm
from keysvc import deployment
from keysvc.approvals import Approvals
from keysvc.audit import AuditTrail
from keysvc.authz import Policy, PolicyError, dual_control_methods
from keysvc.config import LOG_LEVELS, ConfigurationError, Settings, read_file
from keysvc.health import HealthMonitor, database_check, hsm_check
from keysvc.keyring import KeyRing
from keysvc.keys import KeyManager
from keysvc.limits import Rate, RateLimiter
from keysvc.masterkey import MasterKeyAdmin
from keysvc.metrics import MeasuredHsm, dependency_up
from keysvc.policies import PolicyBook
from keysvc.replicas import FOLLOWED_METADATA_TTL, Replica, advertised_address
from keysvc.seals import Sealer
from keysvc.signing import Signer
from keysvc.store import KeyStore
from keysvc.store.audit import AuditStore
from keysvc.store.policies import PolicyStore
from keysvc.store.tokens import TokenStore
from keysvc.tokens import Tokenizer

log = logging.getLogger("keysvc")

# Seconds that calls in flight get to finish after SIGTERM.
SHUTDOWN_GRACE = 5.0


@dataclass
class Services:
    store: KeyStore
    keys: KeyManager
    sealer: Sealer
    signer: Signer
    tokenizer: Tokenizer | None = None
    audit_trail: AuditTrail | None = None
    replica: Replica | None = None


def prepare(settings: Settings) -> None:
    """Runs database migrations, creates the token's master key if it is the first
    replica's (keysvc.deployment), checks it against the database's, and makes the
    shared keys once per database. Raises ConfigurationError for a token that is not
    the deployment's.

    Servers starting together on one host take turns (a lock file), so that a fresh
    token never gets two master keys.
    """
    store = KeyStore.open(settings.database_url)
    try:
        lock_path = Path(tempfile.gettempdir()) / f"keysvc-token-setup-{settings.token_label}.lock"
        with open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            deployment.prepare_token(hsm.Hsm.connect(settings.hsm_config), store.engine)
    finally:
        store.close()


def open_services(settings: Settings) -> Services:
    store = KeyStore.open(settings.database_url, run_migrations=False)
    deployment.load_shared_keys_into(hsm.Hsm.connect(settings.hsm_config), store.engine)
    token = MeasuredHsm(hsm.Hsm.connect(settings.hsm_config))
    # With PostgreSQL the replica follows key changes as they are announced, so cached
    # keys can be trusted longer while it keeps up (see keysvc.keyring).
    postgresql = settings.database_url.startswith("postgresql")
    ring = KeyRing(token, store, followed_ttl=FOLLOWED_METADATA_TTL if postgresql else None)
    replica = Replica(store, ring, database_url=settings.database_url,
                      heartbeat_interval=settings.heartbeat_interval, heartbeat_timeout=settings.heartbeat_timeout,
                      rotation_wait=settings.rotation_wait)
    sealer = Sealer(
        ring, max_message_bytes=settings.max_seal_message_bytes, max_batch_items=settings.max_batch_items
    )
    # With mutual TLS the detokenizer role decides who may see PANs; in the plain-text
    # development mode nobody may unless the server setting says so.
    tokenizer = Tokenizer(
        token, TokenStore(store.engine),
        detokenize_allowed=settings.allow_detokenize or not settings.insecure_loopback,
        max_batch_items=settings.max_batch_items,
    )
    audit_trail = AuditTrail(token, AuditStore(store.engine))
    keys = KeyManager(token, store, ring, rotation_gate=replica if settings.rotates_safely else None)
    return Services(store, keys, sealer, Signer(ring), tokenizer, audit_trail, replica)


def security_of(settings: Settings):
    """The server's mutual TLS and role policy; None in the insecure-loopback mode."""
    from keysvc.rpc.server import Security, server_credentials  # the gRPC layer stays at the edge

    if settings.insecure_loopback:
        return None
    try:
        policy = Policy.load(Path(settings.policy))
    except PolicyError as error:
        raise ConfigurationError(f"auth.policy: {error}") from None
    return Security(
        server_credentials(Path(settings.tls_cert), Path(settings.tls_key), Path(settings.tls_client_ca)), policy
    )


def policy_book_of(settings: Settings, services: Services, security) -> PolicyBook | None:
    """The book of security's policy (None without security), with the newest approved
    policy already in force: a server never serves with the file once one is approved.
    With policy changes under dual control, a proposed policy must keep two key-admins."""
    if security is None:
        return None
    book = PolicyBook(security.policy, PolicyStore(services.store.engine), hsm.Hsm.connect(settings.hsm_config),
                      file_path=Path(settings.policy),
                      min_key_admins=2 if settings.dual_control and "ProposePolicy" in settings.dual_control_names else 1)
    book.refresh()
    return book


def _purge_expired_tokens(tokenizer: Tokenizer, interval: float, stop: threading.Event) -> None:
    """Deletes expired tokens every `interval` seconds until `stop` is set. Every worker
    runs it; the deletes are idempotent."""
    while not stop.wait(interval):
        try:
            purged = tokenizer.purge_expired()
        except Exception as error:  # noqa: BLE001 - the next round tries again
            log.warning("purging expired tokens failed: %s", type(error).__name__)
            continue
        if purged:
            log.info("purged %d expired token(s)", purged)


def _stop_event_on_signals() -> threading.Event:
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    return stop


def metrics_address(listen: str, worker_index: int) -> str:
    """Worker `worker_index`'s metrics address: the port of `listen` plus the index
    (port 0 stays 0: each worker picks its own)."""
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + worker_index if int(port) else 0}"


def start_health_monitor(settings: Settings, services: Services, on_change) -> HealthMonitor:
    """Probes the HSM and the database every settings.health_interval seconds;
    on_change(serving, failing) hears each change of verdict."""
    def changed(serving: bool, failing: tuple[str, ...]) -> None:
        for name in ("hsm", "database"):
            dependency_up.labels(name).set(0 if name in failing else 1)
        on_change(serving, failing)

    # The process's one connection (not measured: probes stay out of the HSM metrics).
    checks = {"hsm": hsm_check(hsm.Hsm.connect(settings.hsm_config)), "database": database_check(services.store)}
    return HealthMonitor(checks, changed, interval=settings.health_interval, timeout=settings.health_timeout)


def serve_here(settings: Settings, on_ready=None, worker_index: int = 0) -> None:
    """Serves in this process until SIGTERM or SIGINT; calls on_ready(port) once listening."""
    from keysvc.rpc.server import ServerOptions, create_server, set_serving  # the gRPC layer stays at the edge

    services = open_services(settings)
    metrics_server = None
    if settings.metrics_listen:
        from keysvc.metrics import serve_metrics, tokens_stored

        vault = TokenStore(services.store.engine)
        tokens_stored.track(lambda: vault.count_live(datetime.now(timezone.utc)))
        metrics_server, _ = serve_metrics(metrics_address(settings.metrics_listen, worker_index))
    monitor = start_health_monitor(
        settings, services, lambda serving, _failing: set_serving(health_servicer, serving))
    options = ServerOptions(
        max_message_bytes=settings.max_message_bytes,
        reflection=settings.reflection,
        reuse_port=settings.workers > 1,
        access_log=settings.log_access,
    )
    security = security_of(settings)
    policies = policy_book_of(settings, services, security)
    server, port, health_servicer = create_server(
        settings.listen, services.keys, services.sealer, options, signer=services.signer,
        tokenizer=services.tokenizer, on_unavailable=monitor.probe_soon, audit_trail=services.audit_trail,
        security=security,
        approvals=Approvals(services.store.engine, hsm.Hsm.connect(settings.hsm_config), audit=services.audit_trail,
                            methods=dual_control_methods(settings.dual_control_names))
        if settings.dual_control else None,
        limiter=RateLimiter({"verify": Rate.of(settings.verify_rate), "detokenize": Rate.of(settings.detokenize_rate)}),
        replicas=services.replica,
        master_keys=MasterKeyAdmin(MeasuredHsm(hsm.Hsm.connect(settings.hsm_config)), services.store.engine),
        policies=policies,
    )
    services.replica.start(advertised_address(settings.listen, port, settings.replica_address))
    monitor.start()
    stop = _stop_event_on_signals()
    signal.signal(signal.SIGHUP, lambda *_: _reload(settings, policies))
    server.start()
    if policies is not None:
        policies.follow(stop)
    threading.Thread(
        target=_purge_expired_tokens, args=(services.tokenizer, settings.token_purge_interval, stop),
        name="keysvc-token-purge", daemon=True,
    ).start()
    if on_ready is not None:
        on_ready(port)
    stop.wait()
    monitor.stop()
    health_servicer.enter_graceful_shutdown()
    server.stop(SHUTDOWN_GRACE).wait()
    services.replica.stop()
    if metrics_server is not None:
        metrics_server.shutdown()
    services.store.close()


def _reload(settings: Settings, policies: PolicyBook | None) -> None:
    """SIGHUP: the policy file again (unless two key-admins approved a policy since), and
    the configuration file's log level. A file that does not load leaves what is in
    force as it was."""
    if policies is not None:
        try:
            if policies.reload_file():
                log.info("policy reloaded from %s", settings.policy)
        except PolicyError as error:
            log.error("policy not reloaded, the one in force stays: %s", error)
    if settings.config_file:
        try:
            level = read_file(settings.config_file).get("log_level", settings.log_level)
        except ConfigurationError as error:
            log.error("log level not reloaded: %s", error)
            return
        if level not in LOG_LEVELS:
            log.error("log level not reloaded: log.level must be one of %s", ", ".join(LOG_LEVELS))
            return
        logging.getLogger().setLevel(level)
        log.info("log level %s", level)


def _worker_main(settings: Settings, ready, worker_index: int = 0) -> None:
    from keysvc.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    serve_here(settings, on_ready=lambda port: ready.put(port), worker_index=worker_index)


def _reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Binds (without listening) a SO_REUSEPORT socket so that port 0 becomes one real
    port that every worker then shares; kept open while the workers run."""
    host, _, port = listen.rpartition(":")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind((host.strip("[]"), int(port)))
    return reserved, f"{host}:{reserved.getsockname()[1]}"


def announce(listen: str, workers: int) -> None:
    # Tests and scripts wait for this line: keep its shape.
    print(f"keysvc serving on {listen} with {workers} worker(s)", flush=True)


def serve(settings: Settings) -> None:
    """Prepares, then serves with settings.workers processes until SIGTERM/SIGINT."""
    prepare(settings)
    if settings.workers == 1:
        host = settings.listen.rpartition(":")[0]
        serve_here(settings, on_ready=lambda port: announce(f"{host}:{port}", 1))
        return
    reserved, listen = _reserve_port(settings.listen)
    worker_settings = replace(settings, listen=listen)
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    stop = _stop_event_on_signals()
    # SIGHUP (reload the policy) goes on to every worker.
    signal.signal(signal.SIGHUP, lambda *_: [os.kill(worker.pid, signal.SIGHUP) for worker in workers
                                             if worker.pid and worker.is_alive()])
    workers = [context.Process(target=_worker_main, args=(worker_settings, ready, index), daemon=True)
               for index in range(settings.workers)]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=120)
    announce(listen, settings.workers)
    while not stop.wait(0.5):
        for index, worker in enumerate(workers):
            if not worker.is_alive():
                log.error("worker %d exited with code %s; starting another", worker.pid, worker.exitcode)
                workers[index] = context.Process(
                    target=_worker_main, args=(worker_settings, ready, index), daemon=True)
                workers[index].start()
    for worker in workers:
        worker.terminate()  # SIGTERM: each worker drains its calls in flight
    for worker in workers:
        worker.join(SHUTDOWN_GRACE + 5)
    reserved.close()
    sys.stdout.flush()
