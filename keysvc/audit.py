"""A tamper-evident audit trail (PCI DSS 10): who did what to which key or token domain,
and with what outcome. Never a secret, a PIN or a PAN: callers pass identities, operation
names, key ids and versions, token domains and status codes only.

Each record holds the SHA-256 hash of the one before, so a record edited, deleted or
moved breaks the chain at that point. Records are also checkpointed: their hash is
signed with an Ed25519 key (PyNaCl) whose seed is derived in the HSM from a key stored
wrapped under the master key, so whoever can write the database cannot rewrite the
chain and sign it again. Removing the newest records leaves a shorter but intact
chain: compare the count with one noted earlier (`verify(expect_at_least=...)`).

If a record cannot be written the caller must not go ahead (as Vault does): `record`
raises Unavailable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

import nacl.exceptions
import nacl.signing

import hsm
from keysvc.errors import IntegrityError, Unavailable
from keysvc.keyring import hsm_errors
from keysvc.metrics import audit_writes_total
from keysvc.store.audit import AuditRow, AuditStore

GENESIS_HASH = bytes(32)
_SEED_LABEL = b"keysvc audit checkpoint signing seed v1"
_BINDING_PREFIX = b"keysvc-audit-signing-key-v1"
DEFAULT_CHECKPOINT_EVERY = 1


@dataclass(frozen=True)
class AuditVerification:
    intact: bool
    records: int
    checkpoints: int
    # The first record found changed, missing or out of place; 0 when intact.
    first_bad_seq: int = 0
    problem: str = ""


def _record_hash(prev_hash: bytes, seq: int, recorded_at: str, identity: str, operation: str, target: str,
                 outcome: str, request_id: str) -> bytes:
    fields = [seq, recorded_at, identity, operation, target, outcome, request_id]
    return hashlib.sha256(prev_hash + json.dumps(fields, ensure_ascii=True).encode()).digest()


def _hash_of(row: AuditRow, prev_hash: bytes) -> bytes:
    return _record_hash(prev_hash, row.seq, row.recorded_at, row.identity, row.operation, row.target, row.outcome,
                        row.request_id)


def _checkpoint_message(seq: int, record_hash: bytes) -> bytes:
    return b"keysvc-audit-checkpoint-v1" + seq.to_bytes(8, "big") + record_hash


class AuditTrail:
    """Appends and verifies the trail. Thread-safe; one per process."""

    def __init__(self, token: hsm.Hsm, store: AuditStore, *, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY) -> None:
        self._hsm = token
        self._store = store
        self._checkpoint_every = checkpoint_every
        self._lock = threading.Lock()
        self._key: nacl.signing.SigningKey | None = None

    # -- the checkpoint key -------------------------------------------------------------

    def _signing_key(self) -> nacl.signing.SigningKey:
        with self._lock:
            if self._key is None:
                self._key = self._load_signing_key()
            return self._key

    def _load_signing_key(self) -> nacl.signing.SigningKey:
        with hsm_errors():
            stored = self._store.signing_key()
            if stored is None:
                wrapped = self._hsm.generate_wrapped_secret(32)
                self._store.insert_signing_key(wrapped, self._hsm.bind(_BINDING_PREFIX + wrapped))
                stored = self._store.signing_key()
            wrapped, tag = stored
            if not hmac.compare_digest(self._hsm.bind(_BINDING_PREFIX + wrapped), tag):
                raise IntegrityError("the audit signing key's record failed its integrity check")
            handle = self._hsm.load_secret(wrapped)
            try:
                seed = self._hsm.hmac(handle, hsm.Digest.SHA256, _SEED_LABEL)
            finally:
                self._hsm.release_secret(handle)
        return nacl.signing.SigningKey(seed)

    @property
    def public_key(self) -> bytes:
        """The checkpoint verification key (raw Ed25519), for auditors to pin."""
        return bytes(self._signing_key().verify_key)

    # -- writing ------------------------------------------------------------------------

    def record(self, *, identity: str, operation: str, target: str, outcome: str, request_id: str = "") -> int:
        """Appends one record and returns its sequence number. Raises Unavailable (or
        IntegrityError) when it cannot be written: the operation must then not run."""
        try:
            seq = self._append(identity=identity, operation=operation, target=target, outcome=outcome,
                               request_id=request_id)
        except BaseException:
            audit_writes_total.labels("failed").inc()
            raise
        audit_writes_total.labels("written").inc()
        return seq

    def _append(self, *, identity: str, operation: str, target: str, outcome: str, request_id: str) -> int:
        key = self._signing_key()
        recorded_at = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        values = dict(recorded_at=recorded_at, identity=identity[:512], operation=operation[:128],
                      target=target[:512], outcome=outcome[:64], request_id=request_id[:64])

        def build(seq: int, prev_hash: bytes) -> AuditRow:
            prev_hash = prev_hash or GENESIS_HASH
            return AuditRow(seq=seq, prev_hash=prev_hash, record_hash=_record_hash(prev_hash, seq, **values), **values)

        def sign(row: AuditRow) -> bytes | None:
            if row.seq % self._checkpoint_every:
                return None
            return key.sign(_checkpoint_message(row.seq, row.record_hash)).signature

        try:
            return self._store.append(build, sign).seq
        except Unavailable as error:
            raise Unavailable(f"the audit trail cannot be written ({error.message}); nothing was done") from None

    # -- reading ------------------------------------------------------------------------

    def read(self, *, after_seq: int = 0, limit: int = 100, identity: str = "", operation: str = "") -> list[AuditRow]:
        return self._store.records(after_seq=after_seq, limit=limit, identity=identity, operation=operation)

    def verify(self, *, expect_at_least: int = 0) -> AuditVerification:
        """Walks the whole chain and every checkpoint; names the first record that was
        modified, deleted or reordered."""
        verify_key = self._signing_key().verify_key
        hashes: dict[int, bytes] = {}
        prev_hash, expected_seq, count = GENESIS_HASH, 1, 0

        def bad(seq: int, problem: str) -> AuditVerification:
            return AuditVerification(False, count, 0, seq, problem)

        for row in self._store.iter_records():
            if row.seq != expected_seq:
                return bad(expected_seq, f"record {expected_seq} is missing (deleted)")
            if row.prev_hash != prev_hash:
                return bad(row.seq, f"record {row.seq} does not follow record {row.seq - 1} (moved, or one before "
                                    "it changed)")
            if _hash_of(row, prev_hash) != row.record_hash:
                return bad(row.seq, f"record {row.seq} was modified")
            hashes[row.seq] = prev_hash = row.record_hash
            expected_seq, count = expected_seq + 1, count + 1
        checkpoints = self._store.checkpoints()
        for checkpoint in checkpoints:
            try:
                verify_key.verify(_checkpoint_message(checkpoint.seq, checkpoint.record_hash), checkpoint.signature)
            except nacl.exceptions.BadSignatureError:
                return bad(checkpoint.seq, f"the checkpoint of record {checkpoint.seq} has a bad signature")
            if checkpoint.seq not in hashes:
                return bad(checkpoint.seq, f"record {checkpoint.seq}, which was checkpointed, is gone (truncated)")
            if hashes[checkpoint.seq] != checkpoint.record_hash:
                return bad(checkpoint.seq, f"record {checkpoint.seq} differs from its signed checkpoint (the chain "
                                           "was rewritten)")
        if count < expect_at_least:
            return bad(count + 1, f"the trail holds {count} records, fewer than the {expect_at_least} expected "
                                  "(the newest were removed)")
        return AuditVerification(True, count, len(checkpoints))
