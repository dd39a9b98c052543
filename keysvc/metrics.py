"""Prometheus metrics of one keysvc process, and the HTTP endpoint that serves them.

Labels are closed sets chosen by keysvc (RPC names, status codes, caller roles,
HSM operation names, error class names, outcomes): never a key id, a merchant id, a
token domain, a caller identity, a message or anything a caller sends. Nothing here
knows of gRPC; the rpc layer's interceptor fills the request metrics.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

import hsm
from keysvc.config import ConfigurationError

log = logging.getLogger("keysvc.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)
# process_* (CPU, resident memory, open files) and python_info, as the default registry has.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Unary calls take ~0.1 ms to a few ms; RSA-4096 and key creation take longer.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_HSM_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

# The caller's role label: the role the policy let it call with (or, for a refused call,
# the roles it holds joined by "+"); NO_ROLE without a policy (insecure loopback), for
# unauthenticated callers and for identities with no grant. Roles are keysvc.authz.ROLES:
# a closed set, whereas identities are not, and never become labels.
NO_ROLE = "none"


class _RememberedChildren:
    """labels() answered from a plain dict once a label set has been seen.

    The library's labels() validates, converts every value to str and takes the
    metric's lock on each call; the request path asks for several children per call.
    A child is the library's own (made by its labels() the first time), so samples
    and exposition are unchanged; remove() and clear() forget the remembered ones."""

    def __init__(self, *args, **kwargs) -> None:
        self._remembered: dict[tuple, Any] = {}
        super().__init__(*args, **kwargs)

    def labels(self, *labelvalues, **labelkwargs):
        if not labelkwargs:
            child = self._remembered.get(labelvalues)
            if child is not None:
                return child
        child = super().labels(*labelvalues, **labelkwargs)
        if not labelkwargs:
            self._remembered[labelvalues] = child
        return child

    def remove(self, *labelvalues) -> None:
        self._remembered.clear()
        super().remove(*labelvalues)

    def clear(self) -> None:
        self._remembered.clear()
        super().clear()


class _Counter(_RememberedChildren, Counter):
    pass


class _Histogram(_RememberedChildren, Histogram):
    pass


requests_total = _Counter(
    "keysvc_requests", "gRPC calls handled, by RPC, status code and caller role.", ("rpc", "code", "role"),
    registry=REGISTRY,
)
request_seconds = _Histogram(
    "keysvc_request_duration_seconds", "Time to answer a gRPC call, by RPC and caller role.", ("rpc", "role"),
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
batch_items = _Histogram(
    "keysvc_batch_items", "Items in a batch call, by RPC.", ("rpc",), buckets=_BATCH_BUCKETS, registry=REGISTRY,
)
hsm_call_seconds = _Histogram(
    "keysvc_hsm_call_duration_seconds",
    "Time of a call into the HSM layer (waiting for the process's PKCS#11 lock included), by operation.",
    ("operation",), buckets=_HSM_BUCKETS, registry=REGISTRY,
)
hsm_errors_total = _Counter(
    "keysvc_hsm_errors", "Calls into the HSM layer that failed, by operation and error class.",
    ("operation", "error"), registry=REGISTRY,
)
key_cache_total = _Counter(
    "keysvc_key_cache_lookups", "Lookups of an unwrapped key handle in the key cache, by result (hit, miss).",
    ("result",), registry=REGISTRY,
)
audit_writes_total = _Counter(
    "keysvc_audit_writes", "Audit records appended (written), or that could not be (failed: the operation "
    "they were for did not run), by outcome.", ("outcome",), registry=REGISTRY,
)
dependency_up = Gauge(
    "keysvc_dependency_up", "1 when the last health probe of a dependency (hsm, database) passed, else 0.",
    ("dependency",), registry=REGISTRY,
)

# The replica follower's (keysvc.replicas): they move only in a process that runs one.
key_changes_applied_total = Counter(
    "keysvc_key_changes_applied", "Entries of the key change log this process's follower applied (its own "
    "changes included).", registry=REGISTRY,
)
rotations_promoted_total = Counter(
    "keysvc_rotations_promoted", "Pending key versions this process made primary (safe rotation).",
    registry=REGISTRY,
)
replicas_live = Gauge(
    "keysvc_replicas_live", "Serving processes whose heartbeat is recent by the database's clock, counted at "
    "this process's last heartbeat round (the same in every process sharing the database).", registry=REGISTRY,
)


class FollowerLag:
    """The keysvc_key_change_follower_lag_seconds gauge: seconds since this process's
    follower last completed a read of the key change log (or registered, before its
    first), computed when scraped from the time the follower recorded, so that a follower
    stuck or failing shows a growing value. No sample while no follower has started."""

    NAME = "keysvc_key_change_follower_lag_seconds"
    HELP = "Seconds since this process's follower last completed a read of the key change log."

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._read_at: float | None = None

    def read_completed(self) -> None:
        """Records that the follower has just read the change log to its end."""
        self._read_at = self._clock()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        read_at = self._read_at
        if read_at is None:
            return
        yield GaugeMetricFamily(self.NAME, self.HELP, value=max(0.0, self._clock() - read_at))


follower_lag = FollowerLag()
REGISTRY.register(follower_lag)


class StoredTokens:
    """The keysvc_tokens_stored gauge: live (unexpired) tokens in the vault, all token
    domains together (a domain name may be anything a caller chose, so never a label).

    Counted in the database when scraped, at most once every `max_age` seconds (a count
    scans the table: scrapes must not add load with the vault's size), and never on the
    tokenization path. The vault is shared: every worker and replica reports the same
    total (aggregate with max, not sum). No sample while nothing is tracked or when the
    count fails (a missing series rather than a wrong one)."""

    NAME = "keysvc_tokens_stored"
    HELP = "Live tokens in the vault (all token domains; the same in every process sharing the database)."

    def __init__(self, max_age: float = 10.0) -> None:
        self.max_age = max_age
        self._count: Callable[[], int] | None = None
        self._lock = threading.Lock()
        self._cached: tuple[float, int] | None = None

    def track(self, count: Callable[[], int] | None) -> None:
        """Reports count() from now on (None: nothing)."""
        with self._lock:
            self._count, self._cached = count, None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:  # one count at a time, whatever the number of scrapers
            if self._count is None:
                return
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.max_age:
                try:
                    self._cached = (now, self._count())
                except Exception as error:  # noqa: BLE001 - a scrape must not fail for it
                    log.warning("tokens stored not counted: %s", type(error).__name__)
                    self._cached = None
                    return
            value = self._cached[1]
        yield GaugeMetricFamily(self.NAME, self.HELP, value=value)


tokens_stored = StoredTokens()
REGISTRY.register(tokens_stored)

# Methods of hsm.Hsm that are not calls into the HSM (properties are never wrapped).
_NOT_HSM_CALLS = frozenset({"exclusive", "connect", "run_queued"})  # wrappers around HSM calls


class MeasuredHsm:
    """An hsm.Hsm whose public methods record their latency and errors; every other
    attribute (generation, signs_directly...) is the wrapped object's own."""

    def __init__(self, token: hsm.Hsm) -> None:
        self._token = token

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._token, name)
        if name.startswith("_") or name in _NOT_HSM_CALLS or not callable(attribute):
            return attribute
        seconds = hsm_call_seconds.labels(name)

        @functools.wraps(attribute)
        def measured(*args, **kwargs):
            start = time.perf_counter()
            try:
                return attribute(*args, **kwargs)
            except hsm.HsmError as error:
                hsm_errors_total.labels(name, type(error).__name__).inc()
                raise
            finally:
                seconds.observe(time.perf_counter() - start)

        self.__dict__[name] = measured  # found directly from now on
        return measured


def serve_metrics(listen: str) -> tuple[object, int]:
    """Serves /metrics over HTTP on `listen` ('host:port', port 0 picks one) in a daemon
    thread; returns the HTTP server (call shutdown() to stop it) and the bound port.
    Raises ConfigurationError when the address cannot be bound."""
    host, _, port = listen.rpartition(":")
    try:
        server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=REGISTRY)
    except OSError as error:
        raise ConfigurationError(f"metrics.listen: cannot listen on {listen}: {error.strerror}") from None
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return server, bound
