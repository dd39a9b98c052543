"""How long a call may wait for the process's PKCS#11 lock.

Every PKCS#11 call of a process takes one lock (SoftHSM2 must never be entered by two
threads at once). When the HSM hangs inside a call (a network HSM that stops
answering, a module stuck on a lock of its own) or one call holds it for long (a large
batch), every other call queues behind it. A caller with a deadline should then give
up at its deadline and free its thread, not queue for ever: the layer above says by
when with `set_call_deadline` (the rpc layer: the gRPC call's deadline), and a wait
that reaches it raises HsmBusy (an HsmUnavailable). Without a deadline a wait is
bounded by MAX_LOCK_WAIT.

A call that has the lock is never interrupted: PKCS#11 has no way to cancel a call.
"""

from __future__ import annotations

import contextvars
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from hsm.errors import HsmBusy

# Seconds a caller without a deadline (background jobs, health probes) waits for the lock.
MAX_LOCK_WAIT = 60.0

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("hsm_call_deadline", default=None)


def set_call_deadline(seconds: float | None) -> contextvars.Token:
    """Bounds this thread's waits for the PKCS#11 lock to `seconds` from now (None: to
    MAX_LOCK_WAIT) until reset_call_deadline(the returned token)."""
    return _deadline.set(None if seconds is None else time.monotonic() + seconds)


def reset_call_deadline(token: contextvars.Token) -> None:
    _deadline.reset(token)


def time_left() -> float | None:
    """Seconds before this thread's call deadline (0 once it passed), or None without one."""
    deadline = _deadline.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def lock_wait() -> float:
    """Seconds this thread may wait for the PKCS#11 lock now (0: only if it is free)."""
    left = time_left()
    return MAX_LOCK_WAIT if left is None else min(MAX_LOCK_WAIT, left)


@contextmanager
def acquired(lock: threading.RLock) -> Iterator[None]:
    """Holds `lock`, waiting at most lock_wait(). Raises HsmBusy when it stays taken."""
    if not lock.acquire(timeout=lock_wait()):
        raise HsmBusy("the HSM is busy: another call held it past this call's deadline")
    try:
        yield
    finally:
        lock.release()
