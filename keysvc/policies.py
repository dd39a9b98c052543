"""Dual control of role policy changes (PCI DSS 3.6.1.2, 7.2): who may call what
changes only when two key-admins agree.

A server starts with its policy file: the bootstrap, in force until a policy is
approved. A key-admin proposes a whole new policy (PolicyService.ProposePolicy); it
is checked at once and waits as a pending operation (keysvc.approvals) until a
different key-admin approves it. It is then stored in the database as the next
revision, with a tag computed by the HSM's binding key over its revision, digest and
approvers, so a row written straight into the database is never applied. Every
serving process (workers, replicas) reads the newest revision every second and
applies it; from then on the file is no longer read (SIGHUP keeps the approved
policy). A stored policy that fails its tag or no longer parses is refused and
logged, and the policy in force stays.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import hsm
from keysvc.authz import Policy, PolicyError
from keysvc.errors import InvalidArgument
from keysvc.keyring import hsm_errors
from keysvc.store.policies import PolicyRow, PolicyStore

log = logging.getLogger("keysvc.policy")

FILE, DATABASE = "file", "database"
# Seconds between two reads of the newest revision, in every serving process.
FOLLOW_INTERVAL = 1.0
MAX_POLICY_BYTES = 1024 * 1024
_BINDING_PREFIX = b"keysvc-policy-v1"


def digest_of(document: str) -> str:
    """SHA-256 of the policy's text (UTF-8), in hex."""
    return hashlib.sha256(document.encode("utf-8", "surrogatepass")).hexdigest()


def _binding_message(revision: int, sha256: str, proposed_by: str, approved_by: str) -> bytes:
    parts = [str(revision).encode(), sha256.encode(), proposed_by.encode(), approved_by.encode()]
    return _BINDING_PREFIX + b"".join(len(part).to_bytes(4, "big") + part for part in parts)


@dataclass(frozen=True)
class PolicyRecord:
    """A policy and how it came to be in force."""

    source: str  # FILE or DATABASE
    revision: int  # 0 for the file
    document: str
    sha256: str
    proposed_by: str = ""
    approved_by: str = ""
    approved_at: datetime | None = None


class PolicyBook:
    """The policy in force in this process, and the way to change it.

    `policy` is the object the auth interceptor decides with (loaded from the file at
    start); this book swaps its grants when a newer approved policy appears. With dual
    control on (`min_key_admins` 2), a policy that grants key-admin to fewer than two
    identities is refused: no later policy could ever be approved. Thread-safe.
    """

    def __init__(self, policy: Policy, store: PolicyStore, token: hsm.Hsm, *, file_path: Path | None = None,
                 min_key_admins: int = 1) -> None:
        self._policy = policy
        self._store = store
        self._hsm = token
        self._file_path = Path(file_path) if file_path else None
        self.min_key_admins = min_key_admins
        self._lock = threading.Lock()
        document = self._read_file() if self._file_path else ""
        self._record = PolicyRecord(FILE, 0, document, digest_of(document))
        self._refused_revision = 0  # logged once, not every second

    def _read_file(self) -> str:
        try:
            return self._file_path.read_text()
        except (OSError, UnicodeDecodeError):
            return ""

    def current(self) -> PolicyRecord:
        return self._record

    def check(self, document: str) -> Policy:
        """The policy `document` describes. Raises InvalidArgument (reason
        INVALID_POLICY) naming the grant and setting at fault."""
        if len(document.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
            raise InvalidArgument("policy_toml", f"is larger than {MAX_POLICY_BYTES} bytes", reason="INVALID_POLICY")
        try:
            policy = Policy.parse(document, "policy_toml")
        except PolicyError as error:
            raise InvalidArgument("policy_toml", str(error), reason="INVALID_POLICY") from None
        admins = len(policy.holders_of("key-admin"))
        if admins < self.min_key_admins:
            raise InvalidArgument(
                "policy_toml", f"grants key-admin to {admins} identit{'y' if admins == 1 else 'ies'}: with dual "
                f"control at least {self.min_key_admins} are needed, or no later policy could be approved",
                reason="INVALID_POLICY")
        return policy

    def adopt(self, document: str, *, proposed_by: str, approved_by: str) -> PolicyRecord:
        """Stores `document` as the newest policy (approved by `approved_by`) and puts it
        in force here; the other processes follow within FOLLOW_INTERVAL. Raises
        InvalidArgument, Unavailable, FailedPrecondition (a policy approved at the same time)."""
        self.check(document)
        sha256 = digest_of(document)

        def build(revision: int) -> PolicyRow:
            with hsm_errors():
                tag = self._hsm.bind(_binding_message(revision, sha256, proposed_by, approved_by))
            return PolicyRow(revision, document, sha256, proposed_by[:512], approved_by[:512],
                             datetime.now(timezone.utc), tag)

        row = self._store.add(build)
        log.info("policy revision %d (sha256 %s) approved by %s, proposed by %s", row.revision, sha256[:16],
                 approved_by, proposed_by)
        self.refresh()
        return self.current()

    def refresh(self) -> bool:
        """Applies the newest approved policy if it is newer than the one in force;
        whether it did. A policy that fails its tag or does not parse is not applied."""
        with self._lock:
            latest = self._store.latest_revision()
            if latest <= self._record.revision or latest == self._refused_revision:
                return False
            row = self._store.load(latest)
            if row is None:
                return False
            problem = self._problem_of(row)
            if problem:
                self._refused_revision = latest
                log.error("policy revision %d refused, the policy in force stays: %s", latest, problem)
                return False
            self._policy.take(Policy.parse(row.document, f"policy revision {latest}"))
            self._record = PolicyRecord(DATABASE, row.revision, row.document, row.sha256, row.proposed_by,
                                        row.approved_by, row.approved_at)
        log.info("policy revision %d (sha256 %s) in force", row.revision, row.sha256[:16])
        return True

    def _problem_of(self, row: PolicyRow) -> str:
        if digest_of(row.document) != row.sha256:
            return "its text does not match its digest"
        with hsm_errors():
            expected = self._hsm.bind(_binding_message(row.revision, row.sha256, row.proposed_by, row.approved_by))
        if not hmac.compare_digest(expected, row.tag):
            return "its integrity check failed (not written by keysvc)"
        try:
            Policy.parse(row.document)
        except PolicyError as error:
            return f"it does not parse ({error})"
        return ""

    def reload_file(self) -> bool:
        """SIGHUP: applies the policy file again, unless an approved policy is in force
        (the file is only the bootstrap); whether it did. Raises PolicyError."""
        if self._file_path is None:
            return False
        with self._lock:
            if self._record.source == DATABASE:
                log.warning("policy file not applied: revision %d, approved by two key-admins, is in force "
                            "(keysvc policy propose changes it)", self._record.revision)
                return False
            newer = Policy.load(self._file_path)
            document = self._read_file()
            self._policy.take(newer)
            self._record = PolicyRecord(FILE, 0, document, digest_of(document))
        return True

    def follow(self, stop: threading.Event, interval: float = FOLLOW_INTERVAL) -> threading.Thread:
        """Applies newer approved policies every `interval` seconds until `stop` is set,
        in a daemon thread (every serving process runs one)."""
        def run() -> None:
            while not stop.wait(interval):
                try:
                    self.refresh()
                except Exception as error:  # noqa: BLE001 - the next round tries again
                    log.warning("policy not refreshed: %s", type(error).__name__)

        thread = threading.Thread(target=run, name="keysvc-policy-follow", daemon=True)
        thread.start()
        return thread
