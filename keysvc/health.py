"""Whether this process can serve: a background probe of the HSM and the database.

Every `interval` seconds (and at once when asked with `probe_soon`, e.g. after a
call ended UNAVAILABLE) each dependency is checked with one cheap call: the master
key's check value (one key wrap under the token's master key), which goes through
the process's PKCS#11 lock and, while the HSM is failing, drives its recovery; and
a `SELECT 1` on the database.
A check that does not answer within `timeout` seconds (a database behind a network
partition hangs rather than refuses) counts as failing; it keeps running in its own
thread, and no second copy of it starts until it returns. When the verdict changes,
`on_change(serving, failing)` is called with the names of the failing dependencies. Nothing here knows of gRPC: the rpc layer turns the
verdict into health statuses.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Callable, Mapping

import sqlalchemy as sa

import hsm
from keysvc.store import KeyStore

log = logging.getLogger("keysvc.health")

PROBE_INTERVAL = 1.0
# Long enough for a slow HSM call holding the PKCS#11 lock (an RSA-4096 key generation).
PROBE_TIMEOUT = 5.0

Check = Callable[[], None]


def hsm_check(token: hsm.Hsm) -> Check:
    """A check that raises when the token cannot use its master key (the one token
    object; every other key is a session object, which works on with the token gone)."""

    def check() -> None:
        token.master_key_check_value()

    return check


def database_check(store: KeyStore) -> Check:
    """A check that raises when the database does not answer `SELECT 1`."""

    def check() -> None:
        with store.engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))

    return check


class HealthMonitor:
    """Runs `checks` (name -> callable that raises when unhealthy) in a daemon thread."""

    def __init__(
        self,
        checks: Mapping[str, Check],
        on_change: Callable[[bool, tuple[str, ...]], None],
        *,
        interval: float = PROBE_INTERVAL,
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self._checks = dict(checks)
        self._on_change = on_change
        self._interval = interval
        self._timeout = timeout
        self._runner = futures.ThreadPoolExecutor(max_workers=len(self._checks), thread_name_prefix="keysvc-check")
        self._running: dict[str, futures.Future] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: tuple[str, ...] | None = None  # None: not yet probed

    @property
    def failing(self) -> tuple[str, ...] | None:
        """The dependencies that failed the last probe (None before the first)."""
        return self._failing

    def probe(self) -> tuple[str, ...]:
        """Runs every check now, reports a change, and returns the failing names."""
        failing = []
        for name, check in self._checks.items():
            running = self._running.get(name)
            if running is None or running.done():
                running = self._running[name] = self._runner.submit(check)
            try:
                running.result(timeout=self._timeout)
            except Exception as error:  # noqa: BLE001 - any failure means "not serving"
                failing.append(name)
                if self._failing is None or name not in self._failing:
                    # The type only: an exception's text may quote data.
                    why = "no answer within %s s" % self._timeout if isinstance(error, futures.TimeoutError) \
                        else type(error).__name__
                    log.warning("health: %s is unavailable (%s)", name, why)
        failing = tuple(failing)
        if failing != self._failing:
            if self._failing and not failing:
                log.info("health: every dependency is back, serving")
            self._failing = failing
            self._on_change(not failing, failing)
        return failing

    def probe_soon(self) -> None:
        """Asks the probe thread to check now rather than at its next tick."""
        self._wake.set()

    def start(self) -> "HealthMonitor":
        """Probes once in the caller's thread, then every `interval` in a daemon thread."""
        self.probe()
        self._thread = threading.Thread(target=self._run, name="keysvc-health", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._runner.shutdown(wait=False, cancel_futures=True)  # a hung check is left behind

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.probe()
