"""The queue for long PKCS#11 calls (hsm/serial.py): RSA signatures run back to back on
one thread of the process, each caller gets its own result or exception, a caller whose
deadline passes before its turn gets HsmBusy and its call never runs, other PKCS#11
callers still get the lock, and a forked child serves its own queue."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

import hsm
from hsm.deadline import reset_call_deadline, set_call_deadline
from hsm.errors import HsmBusy
from keysvc.errors import Unavailable
from keysvc.model import KeyAlgorithm, KeyPurpose
from keysvc.signing import SignatureAlgorithm, SignRequest
from tests.conftest import run_together


@contextlib.contextmanager
def lock_held_by_another_thread(hsm_token) -> Iterator[None]:
    """The process's PKCS#11 lock, held by another thread until the block ends."""
    holding, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with hsm_token.exclusive():
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_lock, daemon=True)
    holder.start()
    assert holding.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join(10)


@contextlib.contextmanager
def call_deadline(seconds: float) -> Iterator[None]:
    """This thread's PKCS#11 calls wait for the lock `seconds` at most inside the block."""
    token = set_call_deadline(seconds)
    try:
        yield
    finally:
        reset_call_deadline(token)


def test_each_caller_gets_its_own_result_from_the_queue(hsm_token):
    def work(thread: int):
        answers = [hsm_token.run_queued(lambda i=i: (thread, i, threading.current_thread().name))
                   for i in range(200)]
        assert [(t, i) for t, i, _ in answers] == [(thread, i) for i in range(200)]
        return {name for _, _, name in answers}

    threads_used = set().union(*run_together(8, work))

    assert threads_used == {"keysvc-hsm-sign"}


def test_an_exception_raised_by_a_queued_call_is_raised_in_its_caller_only(hsm_token):
    def failing():
        raise hsm.HsmKeyRejected("refused for the test")

    with pytest.raises(hsm.HsmKeyRejected, match="refused for the test"):
        hsm_token.run_queued(failing)
    assert hsm_token.run_queued(lambda: "next call") == "next call"


def test_a_call_whose_deadline_passes_before_its_turn_raises_busy_and_never_runs(hsm_token):
    ran = []
    with lock_held_by_another_thread(hsm_token), call_deadline(0.3):
        started = time.monotonic()
        with pytest.raises(HsmBusy):
            hsm_token.run_queued(lambda: ran.append("ran"))
        waited = time.monotonic() - started

    assert 0.25 <= waited < 5
    assert hsm_token.run_queued(lambda: "after") == "after"  # the queue has moved past it
    assert ran == []


def test_a_signature_whose_deadline_passes_before_its_turn_is_unavailable(domain, merchant, hsm_token):
    key = domain.keys.create_key(merchant, "sign", KeyPurpose.SIGN, KeyAlgorithm.RSA_2048)
    request = SignRequest(key_id=key.key_id, algorithm=SignatureAlgorithm.RSA_PSS_SHA256, message=b"m")
    with lock_held_by_another_thread(hsm_token), call_deadline(0.3):
        with pytest.raises(Unavailable, match="HSM is busy"):
            domain.signer.sign(request)

    assert domain.signer.sign(request).version == 1


def test_rsa_signatures_made_from_eight_threads_at_once_all_verify(domain, merchant):
    key = domain.keys.create_key(merchant, "sign", KeyPurpose.SIGN, KeyAlgorithm.RSA_2048)
    public_key = serialization.load_pem_public_key(domain.signer.public_key(key.key_id).pem.encode())

    def sign(thread: int) -> list[tuple[bytes, bytes]]:
        signed = []
        for index in range(25):
            message = f"thread {thread} message {index}".encode()
            signature = domain.signer.sign(SignRequest(
                key_id=key.key_id, algorithm=SignatureAlgorithm.RSA_PKCS1_V15_SHA256, message=message))
            signed.append((message, signature.signature))
        return signed

    for signed in run_together(8, sign):
        for message, signature in signed:
            public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())  # raises if wrong


def test_other_pkcs11_calls_still_get_the_lock_while_signatures_queue(domain, merchant, hsm_token):
    key = domain.keys.create_key(merchant, "sign", KeyPurpose.SIGN, KeyAlgorithm.RSA_2048)
    secret = hsm_token.load_secret(hsm_token.generate_wrapped_secret(32))
    stop = threading.Event()
    request = SignRequest(key_id=key.key_id, algorithm=SignatureAlgorithm.RSA_PSS_SHA256, message=b"m")

    def keep_signing(_thread: int) -> int:
        count = 0
        while not stop.is_set():
            domain.signer.sign(request)
            count += 1
        return count

    signers = threading.Thread(target=lambda: run_together(4, keep_signing), daemon=True)
    signers.start()
    try:
        time.sleep(0.2)
        tags = [hsm_token.hmac(secret, hsm.Digest.SHA256, b"seal while signing") for _ in range(50)]
    finally:
        stop.set()
        signers.join(30)
        hsm_token.release_secret(secret)

    assert len(set(tags)) == 1 and not signers.is_alive()


def test_a_forked_child_runs_queued_calls_on_a_thread_of_its_own(hsm_token):
    assert hsm_token.run_queued(os.getpid) == os.getpid()  # the parent's thread exists

    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            code = 0 if hsm_token.run_queued(os.getpid) == os.getpid() else 3
        except BaseException:  # noqa: BLE001 - the exit code reports it
            code = 2
        finally:
            os._exit(code)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's queued call did not finish")
    assert hsm_token.run_queued(os.getpid) == os.getpid()
