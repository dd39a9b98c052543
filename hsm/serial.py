"""Long PKCS#11 operations, run back to back by one thread of the process.

An RSA signature keeps SoftHSM busy for 0.5 to 3 ms and lets go of the GIL meanwhile.
When each gRPC thread signs for itself, the process's PKCS#11 lock passes from thread
to thread between two signatures: the signing thread must get the GIL back, return
and release the lock; the next one must wake up, get the GIL, look its key up and start.
The HSM idles through all of it (make bench: about a quarter of the time at 8 calls in
flight). Here one thread takes the lock once and runs every queued job in turn, so the
next signature starts as soon as the last one returns; the callers only wait for their
own result.

The thread takes the lock like every other caller and lets it go after a short run of
jobs, so that the process's other PKCS#11 calls (seals, unwraps) get their turn.
"""

from __future__ import annotations

import contextvars
import os
import queue
import threading
import time
from typing import Callable, TypeVar

from hsm.deadline import lock_wait
from hsm.errors import HsmBusy

T = TypeVar("T")

# The thread lets the lock go after this long, so that other PKCS#11 calls get a turn.
_MAX_HOLD_SECONDS = 0.010


class _Job:
    __slots__ = ("work", "context", "done", "result", "error", "abandoned")

    def __init__(self, work: Callable[[], object]) -> None:
        self.work = work
        self.context = contextvars.copy_context()  # the caller's request id and deadline
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None
        self.abandoned = False


class SerialRunner:
    """Runs jobs one after another on a thread of its own, holding `lock` while it does.

    A job is any callable that may take `lock` again (an RLock): it runs with the
    caller's context variables. The thread starts at the first job of each process
    (a forked worker starts its own).
    """

    def __init__(self, lock: threading.RLock, name: str) -> None:
        self._lock = lock
        self._name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._pid: int | None = None
        self._starting = threading.Lock()

    def run(self, work: Callable[[], T]) -> T:
        """work()'s result, or its exception, raised here. Waits for its turn at most as
        long as a caller may wait for the PKCS#11 lock (hsm/deadline.py), else HsmBusy;
        a job given up on before its turn never runs."""
        self._ensure_thread()
        job = _Job(work)
        self._jobs.put(job)
        if not job.done.wait(lock_wait()):
            job.abandoned = True
            if not job.done.is_set():  # it may have finished meanwhile
                raise HsmBusy("the HSM is busy: the queued call did not start before its deadline")
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        with self._starting:
            if self._pid != os.getpid():
                # After a fork the queue may hold the parent's jobs, which no thread here serves.
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, name=self._name, daemon=True).start()
                self._pid = os.getpid()

    def _serve(self) -> None:
        jobs = self._jobs
        while True:
            job: _Job | None = jobs.get()
            with self._lock:
                until = time.monotonic() + _MAX_HOLD_SECONDS
                while job is not None:
                    if not job.abandoned:
                        try:
                            job.result = job.context.run(job.work)
                        except BaseException as error:  # handed to the caller, raised there
                            job.error = error
                    job.done.set()
                    job = None
                    if time.monotonic() < until:
                        try:
                            job = jobs.get_nowait()
                        except queue.Empty:
                            pass
            # Another thread waiting for the lock takes it now, before the next run of jobs.
            time.sleep(0)
