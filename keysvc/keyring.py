"""Keys ready for use: briefly cached metadata and cached HSM handles.

Seal and Verify must not read the database or unwrap a key on every call, yet a
change made by another worker or replica must be in force within a second. So:
- a key's metadata is reused for `metadata_ttl` seconds, then its revision is
  re-read (one indexed read) and the key reloaded only when the revision moved;
- a version's unwrapped handle is cached (LRU, bounded) and released when the
  version is destroyed or evicted;
- callers that meet something the cache cannot explain (a seal no known version
  verifies) call `refresh` to check the revision at once;
- in a serving process, keysvc.replicas follows the database's log of key changes
  and calls `invalidate` for each (within milliseconds on PostgreSQL, LISTEN/NOTIFY).
  While it keeps up (`mark_followed` less than FOLLOW_SLACK ago), the cache is known
  to be at most that stale, so cached metadata is trusted for `followed_ttl` instead
  of `metadata_ttl`; when the follower falls behind, the short TTL is back at once.
Every wrapped key is checked against its binding tag before it is unwrapped, so a
record moved to another key or version in the database is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import struct
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterable, Iterator

from cryptography.hazmat.primitives import serialization

import hsm
from keysvc.errors import FailedPrecondition, IntegrityError, NotFound, Unavailable
from keysvc.metrics import key_cache_total
from keysvc.model import Charset, Key, KeyAlgorithm, KeyPlatform, KeyVersion
from keysvc.store import KeyStore

CHECK_VALUE_MESSAGE = bytes(16)
# How recent the follower's last complete read of the change log must be for the
# cache to rely on it (it reads at least every 0.4 s; see keysvc.replicas).
FOLLOW_SLACK = 0.9
# How long `invalidate` remembers a key's newest revision, to catch a copy read just
# before the change but installed after it (a read takes milliseconds).
_FLOOR_SECONDS = 10.0


@contextlib.contextmanager
def hsm_errors() -> Iterator[None]:
    """Translates HSM-layer errors at the domain boundary."""
    try:
        yield
    except hsm.HsmUnwrapFailed:
        raise IntegrityError("a stored key could not be unwrapped by the HSM master key") from None
    except hsm.HsmKeyRejected:
        raise FailedPrecondition("the HSM refused this key for its algorithm") from None
    except hsm.HsmError as error:
        raise Unavailable(f"the HSM is unavailable: {error}") from None


def binding_message(key: Key, version: KeyVersion) -> bytes:
    """What a version's binding tag covers: every field that must not move, length-prefixed."""
    parts = [
        key.key_id.encode(),
        key.purpose.value.encode(),
        key.algorithm.value.encode(),
        str(version.version).encode(),
        version.wrapping_key_label.encode(),
        version.wrapped_key or b"",
    ]
    if version.public_key is not None:
        parts.append(version.public_key)
    if (key.platform, key.charset) != (KeyPlatform.GENERIC, Charset.UTF_8):
        # The profile too, so a record cannot be moved to another platform or charset.
        # Only when it is not the default, which keeps the tags of keys made before
        # profiles existed valid.
        parts += [key.platform.value.encode(), key.charset.value.encode()]
    return b"keysvc-binding-v1" + b"".join(struct.pack(">I", len(p)) + p for p in parts)


def check_value(tag_over_zero_block: bytes) -> str:
    """Key check value: the first 3 bytes of the key's own tag over 16 zero bytes, as
    hex: its HMAC, or for SHA256_DATA_SECRET SHA-256(16 zero bytes ‖ secret)."""
    return tag_over_zero_block[:3].hex().upper()


def subject_public_key_info(public_key_der: bytes) -> bytes:
    """DER SubjectPublicKeyInfo of a DER public key (e.g. the HSM layer's RSAPublicKey)."""
    return serialization.load_der_public_key(public_key_der).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_check_value(public_key_der: bytes) -> str:
    """An RSA key's check value: the first 3 bytes of SHA-256 over its public key
    (DER SubjectPublicKeyInfo), as hex."""
    return hashlib.sha256(subject_public_key_info(public_key_der)).digest()[:3].hex().upper()


def load_handle(token: hsm.Hsm, algorithm: KeyAlgorithm, wrapped_key: bytes) -> hsm.SecretKeyHandle:
    """Unwraps stored key material of `algorithm` into the HSM session."""
    if algorithm.is_rsa:
        return token.load_private_key(wrapped_key)
    if algorithm.is_hmac:
        return token.load_secret(wrapped_key)
    return token.load_enveloped_secret(wrapped_key)


def compute_tags(token: hsm.Hsm, handle: hsm.SecretKeyHandle, algorithm: KeyAlgorithm,
                 messages: Iterable[bytes]) -> list[bytes]:
    """The key's tag of each message under `algorithm`, computed in the HSM."""
    if algorithm.is_hmac:
        return token.hmac_many(handle, algorithm.digest, messages)
    return token.hash_with_secret_many(handle, algorithm.digest, messages)


class KeyRing:
    """Thread-safe cache of keys and handles over one HSM and one store."""

    def __init__(
        self,
        token: hsm.Hsm,
        store: KeyStore,
        *,
        metadata_ttl: float = 0.25,
        followed_ttl: float | None = None,
        max_handles: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hsm = token
        self._store = store
        self._metadata_ttl = metadata_ttl
        self._followed_ttl = followed_ttl
        self._followed_at = float("-inf")
        # key id -> (the newest revision a change announced, when): see invalidate.
        self._floors: dict[str, tuple[int, float]] = {}
        self._max_handles = max_handles
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[Key, float]] = {}
        self._handles: OrderedDict[tuple[str, int], hsm.SecretKeyHandle] = OrderedDict()
        # Public keys whose records passed the binding check, by (key id, version).
        self._checked_public_keys: dict[tuple[str, int], bytes] = {}

    # -- metadata -----------------------------------------------------------------------

    def key(self, key_id: str) -> Key:
        """The key, fresh to within metadata_ttl. Raises NotFound."""
        now = self._clock()
        with self._lock:
            cached = self._keys.get(key_id)
        ttl = self._metadata_ttl
        if self._followed_ttl is not None and now - self._followed_at < FOLLOW_SLACK:
            ttl = max(ttl, self._followed_ttl)
        if cached is not None and now - cached[1] < ttl:
            return cached[0]
        if cached is not None:
            revision = self._store.load_revision(key_id)
            if revision == cached[0].revision:
                with self._lock:
                    if self._keys.get(key_id) is cached:  # not replaced by a newer copy meanwhile
                        self._keys[key_id] = (cached[0], now)
                return cached[0]
        return self._reload(key_id)

    def refresh(self, key_id: str) -> Key | None:
        """Re-reads the key's revision now; returns the reloaded key if it changed, else None."""
        with self._lock:
            cached = self._keys.get(key_id)
        if cached is not None and self._store.load_revision(key_id) == cached[0].revision:
            return None
        return self._reload(key_id)

    def with_fresh_key(self, key: Key, choose: Callable[[Key], object]):
        """(key, choose(key)); when choose raises NotFound or FailedPrecondition (a version
        this cache has not seen, or holds in a state that refuses), re-reads the key once
        and tries again: another worker may just have added or re-enabled it."""
        try:
            return key, choose(key)
        except (NotFound, FailedPrecondition):
            fresh = self.refresh(key.key_id)
            if fresh is None:
                raise
            return fresh, choose(fresh)

    def remember(self, key: Key) -> None:
        """Takes a key this process just wrote, so its own next call sees the change."""
        self._install(key)

    def invalidate(self, key_id: str, revision: int) -> None:
        """The key changed to `revision` (made known by the change log): a cached copy
        older than that is reloaded now (dropped when the reload fails, so that the
        next use reads the database), and an older copy installed later by a read
        that began before the change is checked again at its next use."""
        now = self._clock()
        with self._lock:
            for name in [name for name, (_, noted) in self._floors.items() if now - noted > _FLOOR_SECONDS]:
                del self._floors[name]
            floor = self._floors.get(key_id, (0, now))[0]
            self._floors[key_id] = (max(floor, revision), now)
            cached = self._keys.get(key_id)
        if cached is None or cached[0].revision >= revision:
            return
        try:
            self._reload(key_id)
        except NotFound:
            pass  # gone: _reload dropped it and its handles
        except Unavailable:
            self.forget(key_id)

    def forget(self, key_id: str) -> None:
        """Drops the key's cached metadata: its next use reads the database."""
        with self._lock:
            self._keys.pop(key_id, None)

    def forget_all(self) -> None:
        """Drops every key's cached metadata (the change log cannot say what changed)."""
        with self._lock:
            self._keys.clear()

    def mark_followed(self, as_of: float) -> None:
        """Every change committed before `as_of` (this ring's clock) has been passed to
        `invalidate`: the cache is that fresh."""
        with self._lock:
            self._followed_at = max(self._followed_at, as_of)

    def _reload(self, key_id: str) -> Key:
        key = self._store.load_key(key_id)
        if key is None:
            with self._lock:
                self._keys.pop(key_id, None)
            self._release_where(lambda k, v: k == key_id)
            raise NotFound(f"key {key_id!r} not found")
        self._install(key)
        return key

    def _install(self, key: Key) -> None:
        with self._lock:
            cached = self._keys.get(key.key_id)
            if cached is not None and cached[0].revision > key.revision:
                return  # a newer copy is already here
            floor = self._floors.get(key.key_id, (0, 0.0))[0]
            # Older than a change already announced: usable, but checked at its next use.
            self._keys[key.key_id] = (key, self._clock() if key.revision >= floor else float("-inf"))
        usable = {v.version for v in key.versions if v.wrapped_key is not None}
        self._release_where(lambda k, v: k == key.key_id and v not in usable)

    # -- handles --------------------------------------------------------------------------

    def _release_where(self, doomed: Callable[[str, int], bool]) -> None:
        """Drops matching handles from the cache and frees them in the HSM, best effort:
        a failure here must not fail a change already stored (and a handle the HSM
        cannot free now dies anyway when the module is re-initialised)."""
        with self._lock:
            released = [self._handles.pop(name) for name in list(self._handles) if doomed(*name)]
        self._free(released)

    def _free(self, handles: list[hsm.SecretKeyHandle]) -> None:
        """Frees session keys in the HSM, best effort (see _release_where)."""
        for handle in handles:
            try:
                self._hsm.release_secret(handle)
            except hsm.HsmError:
                pass

    def _check_binding(self, key: Key, version: KeyVersion) -> None:
        """Raises IntegrityError unless the version's record is the one the HSM bound."""
        with hsm_errors():
            expected = self._hsm.bind(binding_message(key, version))
        if not hmac.compare_digest(expected, version.binding_tag):
            raise IntegrityError(
                f"the stored record of version {version.version} of key {key.key_id!r} failed its integrity check"
            )

    def public_key(self, key: Key, version: KeyVersion) -> bytes:
        """The RSA version's stored public key (DER SubjectPublicKeyInfo), once its record
        passed the binding check: a public key swapped in the database is refused. The
        check needs the HSM once per version and process; verifying does not after that."""
        if version.public_key is None or version.wrapped_key is None:
            raise FailedPrecondition(f"version {version.version} of key {key.key_id!r} has no usable public key")
        name = (key.key_id, version.version)
        with self._lock:
            if self._checked_public_keys.get(name) == version.public_key:
                return version.public_key
        self._check_binding(key, version)
        with self._lock:
            if len(self._checked_public_keys) >= self._max_handles:
                self._checked_public_keys.clear()  # rare; they are checked again on use
            self._checked_public_keys[name] = version.public_key
        return version.public_key

    def _handle(self, key: Key, version: KeyVersion) -> hsm.SecretKeyHandle:
        name = (key.key_id, version.version)
        with self._lock:
            handle = self._handles.get(name)
            if handle is not None:
                self._handles.move_to_end(name)
                key_cache_total.labels("hit").inc()
                return handle
        key_cache_total.labels("miss").inc()
        if version.wrapped_key is None:
            raise FailedPrecondition(f"version {version.version} of key {key.key_id!r} is destroyed")
        self._check_binding(key, version)
        with hsm_errors():
            handle = load_handle(self._hsm, key.algorithm, version.wrapped_key)
        evicted = []
        with self._lock:
            existing = self._handles.get(name)
            if existing is not None:  # another thread loaded it meanwhile
                evicted.append(handle)
                handle = existing
            else:
                self._handles[name] = handle
                while len(self._handles) > self._max_handles:
                    evicted.append(self._handles.popitem(last=False)[1])
        self._free(evicted)
        return handle

    def _use(self, key: Key, version: KeyVersion, use: Callable[[hsm.SecretKeyHandle], object]):
        """use(handle) on the version's loaded key, in the HSM, reloading it once when the
        module was re-initialised (after a fork or an HSM failure) since it was cached."""
        for _attempt in range(2):
            # Held from lookup to use, so that no other thread releases the handle in between.
            with hsm_errors(), self._hsm.exclusive():  # exclusive: HsmBusy past the call's deadline
                handle = self._handle(key, version)
                try:
                    with hsm_errors():
                        return use(handle)
                except Unavailable:
                    if handle.generation == self._hsm.generation:
                        raise
                # Stale: drop the handle and load the key again.
                self._release_where(lambda k, v: (k, v) == (key.key_id, version.version))
        raise Unavailable("the HSM is unavailable: key handle could not be reloaded")

    def tags(self, key: Key, version: KeyVersion, messages: Iterable[bytes]) -> list[bytes]:
        """The key version's tag (HMAC, or legacy hash) of each message, computed in the HSM."""
        messages = list(messages)
        return self._use(key, version, lambda handle: compute_tags(self._hsm, handle, key.algorithm, messages))

    def signatures(self, key: Key, version: KeyVersion, padding: hsm.RsaPadding, digest: hsm.Digest,
                   digests: list[bytes]) -> list[bytes]:
        """The RSA key version's signature of each precomputed hash, made in the HSM."""
        # Queued: a thread of the HSM layer runs signatures back to back (hsm/serial.py);
        # HsmBusy when this call's deadline passes before its turn.
        with hsm_errors():
            return self._hsm.run_queued(lambda: self._use(
                key, version, lambda handle: self._hsm.rsa_sign_digests(handle, padding, digest, digests)))
