"""This process as one replica among many sharing a database: it follows the log of key
changes, registers and heartbeats, and promotes rotations once every live replica has
loaded them (safe rotation, as Tink advises: distribute the new key, then make it
primary, so that no replica ever receives a seal it cannot verify).

One background thread per serving process (each worker process has its own KeyRing):
- it waits for a key change to be announced (PostgreSQL: keysvc.store.replicas.
  ChangeListener), and at least every POLL_INTERVAL reads `key_changes` past the last
  entry it applied: the announcement only makes it read sooner, the table is the truth,
  so a dropped listening connection or a lost notification costs at most one poll
  interval;
- for each changed key it has cached, it reloads it (KeyRing.invalidate), then writes
  the last entry applied to its row (`seen_change`), with a heartbeat every
  heartbeat_interval; a row whose heartbeat is older than heartbeat_timeout (database
  clock) is not live;
- with safe rotation on, it promotes every pending version whose key's newest change
  every live replica has seen (an optimistic, idempotent update);
- now and then it prunes old changes and the rows of replicas long dead.

Its metrics (keysvc.metrics): the entries it applied, the time since its last complete
read of the log, the rotations this process promoted, and the live processes, counted
at each heartbeat round.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from hsm.deadline import time_left
from keysvc.errors import KeysvcError, NotFound
from keysvc.keyring import KeyRing
from keysvc.keys import promoted
from keysvc.metrics import follower_lag, key_changes_applied_total, replicas_live, rotations_promoted_total
from keysvc.model import Key
from keysvc.store import KeyStore
from keysvc.store.replicas import ChangeListener, PendingPromotion, ReplicaRecord, ReplicaStore

log = logging.getLogger("keysvc.replicas")

# The change log is read at least this often, notification or not.
POLL_INTERVAL = 0.4
# Changes are kept an hour (a follower more than an hour behind has long been dead and
# starts afresh); rows of replicas silent for 10 minutes are deleted.
CHANGE_RETENTION = 3600.0
DEAD_REPLICA_RETENTION = 600.0
PRUNE_INTERVAL = 60.0
FIRST_BACKOFF = 0.1
# What RotateKey keeps of its caller's deadline to answer in: the wait for a promotion
# ends this long before the deadline.
DEADLINE_MARGIN = 0.1
# How long a KeyRing trusts cached metadata while this follower keeps up (instead of
# re-reading a key's revision every 0.25 s): changes arrive by the log within a poll
# interval anyway; this is only the safety net under it.
FOLLOWED_METADATA_TTL = 5.0


@dataclass(frozen=True)
class ReplicaListing:
    """Every registered serving process, and the newest entry of the change log."""

    replicas: tuple[ReplicaRecord, ...]
    latest_change: int


def replica_id_for(address: str) -> str:
    """This process's replica id: host name, port and pid (worker processes share a port)."""
    return f"{socket.gethostname()}:{address.rpartition(':')[2]}:{os.getpid()}"


def advertised_address(listen: str, port: int, configured: str = "") -> str:
    """The address this replica is listed with: `configured`, else the listen address
    with the bound port (and the host name for a wildcard address)."""
    if configured:
        return configured
    host = listen.rpartition(":")[0]
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


class Replica:
    """This serving process as a replica (see the module docstring). Thread-safe."""

    def __init__(self, store: KeyStore, ring: KeyRing, *, database_url: str, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 5.0, rotation_wait: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._keys = store
        self._store = ReplicaStore(store.engine)
        self._ring = ring
        self._database_url = database_url
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.rotation_wait = rotation_wait
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: ChangeListener | None = None
        self.replica_id = ""
        self.address = ""
        # The last change log entry whose effect this process has applied.
        self.seen_change = 0
        self._failing = False

    # -- life -------------------------------------------------------------------------------------

    def start(self, address: str, replica_id: str = "") -> None:
        """Registers this process (it has cached nothing yet, so it has seen every change
        so far) and starts following. Raises Unavailable when the database is away."""
        self.address = address
        self.replica_id = replica_id or replica_id_for(address)
        self.seen_change = self._store.latest_change()
        self._ring.forget_all()
        self._store.register(self.replica_id, self.address, self.seen_change)
        follower_lag.read_completed()
        replicas_live.set(self._store.count_live(self.heartbeat_timeout))
        if self._keys.engine.dialect.name == "postgresql":
            self._listener = ChangeListener(self._database_url, stop=self._stop, clock=self._clock)
        self._thread = threading.Thread(target=self._run, name="keysvc-replica", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stops following and removes this process's row (best effort: a row left
        behind stops being live after heartbeat_timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        # In a thread of its own: a database that hangs must not hold the shutdown.
        remover = threading.Thread(target=self._deregister, name="keysvc-replica-stop", daemon=True)
        remover.start()
        remover.join(timeout)

    def _deregister(self) -> None:
        try:
            self._store.deregister(self.replica_id)
        except KeysvcError as error:
            log.warning("could not remove this replica's row: %s", error)

    # -- the thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        next_heartbeat = self._clock() + self.heartbeat_interval
        next_prune = self._clock() + random.uniform(0, PRUNE_INTERVAL)
        while not self._stop.is_set():
            try:
                if self._listener is not None:
                    self._listener.wait(POLL_INTERVAL)
                else:
                    self._stop.wait(POLL_INTERVAL)
                if self._stop.is_set():
                    break
                applied = self._catch_up()
                beat = self._clock() >= next_heartbeat
                if beat:
                    next_heartbeat = self._clock() + self.heartbeat_interval
                    self._heartbeat()
                    replicas_live.set(self._store.count_live(self.heartbeat_timeout))
                if applied or beat:
                    self.promote_ready()
                if self._clock() >= next_prune:
                    next_prune = self._clock() + PRUNE_INTERVAL
                    self._prune()
            except Exception as error:  # noqa: BLE001 - the next round tries again
                if not self._failing:
                    log.warning("following key changes failed, retrying: %s", _safe(error))
                self._failing = True
                self._stop.wait(FIRST_BACKOFF)  # never a busy loop, whatever failed
                continue
            if self._failing:
                log.info("following key changes again")
                self._failing = False
        if self._listener is not None:
            self._listener.close()

    def _catch_up(self) -> bool:
        """Applies every change after seen_change; True when there was any."""
        applied = False
        while True:
            started = self._clock()
            changes = self._store.changes_after(self.seen_change)
            newest: dict[str, int] = {}
            for change in changes:
                newest[change.key_id] = max(newest.get(change.key_id, 0), change.revision)
            for key_id, revision in newest.items():
                self._ring.invalidate(key_id, revision)
            if changes:
                self.seen_change = changes[-1].seq
                key_changes_applied_total.inc(len(changes))
                applied = True
                continue  # perhaps more than one page
            self._ring.mark_followed(started)
            follower_lag.read_completed()
            break
        if applied:
            # At once, not at the next heartbeat: a rotation waits for it.
            self._heartbeat()
        return applied

    def _heartbeat(self) -> None:
        latest = self._store.latest_change()
        if latest < self.seen_change:
            # The log went back (a database restored from a backup): nothing says what
            # changed, so the whole cache goes.
            log.warning("the key change log went back from %d to %d; dropping cached keys", self.seen_change, latest)
            self._ring.forget_all()
            self.seen_change = latest
        if not self._store.heartbeat(self.replica_id, self.seen_change):
            self._store.register(self.replica_id, self.address, self.seen_change)

    def _prune(self) -> None:
        changes = self._store.prune_changes(CHANGE_RETENTION)
        dead = self._store.prune_replicas(DEAD_REPLICA_RETENTION)
        if changes or dead:
            log.info("pruned %d old key change(s) and %d dead replica row(s)", changes, dead)

    # -- safe rotation ------------------------------------------------------------------------------------

    def promote_ready(self, key_id: str | None = None, *, excluding: str = "") -> None:
        """Promotes each pending version (of `key_id`, else of every key) whose key's
        newest change every live replica but `excluding` has applied."""
        pending = self._store.pending_promotions(key_id)
        if not pending:
            return
        least = self._store.least_seen_change(self.heartbeat_timeout, excluding=excluding)
        for waiting in pending:
            if least is not None and least < waiting.last_change:
                continue
            try:
                key = self._promote(waiting)
            except NotFound:
                continue
            self._ring.remember(key)

    def _promote(self, waiting: PendingPromotion) -> Key:
        """Makes the waiting version primary unless another process did first (then only
        reads the key). Raises NotFound for a key deleted meanwhile."""
        wrote = False

        def change(key: Key) -> Key:
            # update_key may call this again after a lost race: only its last answer counts.
            nonlocal wrote
            wanted = promoted(key, waiting.pending_primary)
            wrote = wanted is not key
            return wanted

        key = self._keys.update_key(waiting.key_id, change)
        if wrote and key.primary_version == waiting.pending_primary:
            rotations_promoted_total.inc()
        return key

    def await_promotion(self, stored: Key, version: int) -> Key:
        """Waits for `version` of the key to stop pending (promoted by this process or
        any other) and returns the key as last read: promoted, or still pending (the
        replicas then promote it by themselves, later). `stored` is the key as the
        rotation stored it, with `version` pending. This process holds the version
        already (it wrote it), so only the others are waited for: alone, it promotes at
        once.

        The wait lasts rotation_wait at most, and ends DEADLINE_MARGIN before the
        deadline of the call being served (hsm.deadline, set by the rpc layer), so that
        the caller gets the answer, not DEADLINE_EXCEEDED. Never raises: the rotation
        is stored, and an error here (the database away) would make a client rotate the
        key again; it answers the newest copy it read, else `stored`."""
        left = time_left()  # before the call's deadline; None outside a call or without one
        budget = self.rotation_wait if left is None else min(self.rotation_wait, left - DEADLINE_MARGIN)
        if budget <= 0:
            return stored
        deadline = self._clock() + budget
        key, failed, pause = stored, False, 0.005
        while True:
            try:
                self.promote_ready(stored.key_id, excluding=self.replica_id)
                key = self._keys.load_key(stored.key_id) or key
            except Exception as error:  # noqa: BLE001 - the rotation is stored, whatever fails here
                if not failed:
                    log.warning("waiting for the promotion of %s failed, answering it pending: %s",
                                stored.key_id, _safe(error))
                failed = True
            left = deadline - self._clock()
            if key.pending_primary != version or left <= 0:
                break
            self._stop.wait(min(pause, left))
            pause = min(pause * 2, 0.05)
        if key is not stored:
            self._ring.remember(key)
        return key

    # -- listing ---------------------------------------------------------------------------------------------

    def list_replicas(self) -> ReplicaListing:
        """Every registered serving process, live or not, and the change log's newest entry."""
        return ReplicaListing(tuple(self._store.list_replicas(self.heartbeat_timeout)), self._store.latest_change())


def _safe(error: Exception) -> str:
    """A log line for an error: keysvc errors carry safe messages, others only their type."""
    return str(error) if isinstance(error, KeysvcError) else type(error).__name__
