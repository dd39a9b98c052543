"""The one error tree of keysvc's domain. The rpc layer maps each class to one status.

Messages are written for the caller to act on and never carry a secret or a PAN.
`reason` is a stable, machine-readable word (google.rpc.ErrorInfo.reason).
"""

from __future__ import annotations


def _encodable(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (a lone surrogate from a JSON escape in a
    field name) escaped, so that the error can always be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class KeysvcError(Exception):
    """Base of every error the domain raises on purpose."""

    reason = "KEYSVC_ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None) -> None:
        message = _encodable(message)
        super().__init__(message)
        self.message = message
        # Machine-readable facts for the caller (google.rpc.ErrorInfo.metadata).
        self.metadata = metadata or {}
        if reason is not None:
            self.reason = reason


class InvalidArgument(KeysvcError):
    """The request is malformed; `field` names the offending field."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, *, reason: str | None = None) -> None:
        super().__init__(f"{field}: {message}", reason=reason)
        self.field = _encodable(field)


class NotFound(KeysvcError):
    reason = "NOT_FOUND"


class AlreadyExists(KeysvcError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(KeysvcError):
    """The request is well formed but the key's state does not allow it."""

    reason = "FAILED_PRECONDITION"


class Unavailable(KeysvcError):
    """The HSM or the database cannot serve right now; retrying later may succeed."""

    reason = "UNAVAILABLE"


class DeadlineExceeded(KeysvcError):
    reason = "DEADLINE_EXCEEDED"


class IntegrityError(KeysvcError):
    """Stored data failed its integrity check (e.g. a key record moved to another key)."""

    reason = "INTEGRITY_CHECK_FAILED"


class PermissionDenied(KeysvcError):
    """The caller may not do this (e.g. Detokenize while the server does not allow it)."""

    reason = "PERMISSION_DENIED"


class Unauthenticated(KeysvcError):
    """The caller did not prove who it is (no valid client certificate)."""

    reason = "UNAUTHENTICATED"
