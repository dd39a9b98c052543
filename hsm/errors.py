"""Errors of the HSM layer. They name what went wrong, never key material."""


class HsmError(Exception):
    """Base of every error raised by the hsm package."""


class HsmUnavailable(HsmError):
    """The module, token or session cannot be used right now (retrying may help)."""


class HsmConfigurationError(HsmError):
    """The module or token is not set up as configured (wrong path, label or PIN)."""


class HsmKeyRejected(HsmError):
    """The HSM refused a key for this mechanism, e.g. an HMAC key shorter than the digest."""


class HsmKeyNotPreserved(HsmKeyRejected):
    """Wrapping would change the key (SoftHSM pads keys to a multiple of 8 bytes)."""


class HsmUnwrapFailed(HsmError):
    """A wrapped key could not be unwrapped: wrong wrapping key or damaged data."""


class HsmStaleHandle(HsmError):
    """A key handle from before the module was re-initialised (after a fork)."""


class HsmKeyCheckFailed(HsmError):
    """A key that entered the HSM does not have the check value it must have (a wrong
    backup component, a master key from another deployment); it was not kept."""


class HsmBusy(HsmUnavailable):
    """The process's PKCS#11 lock was not free before the call's deadline: another call
    holds the HSM (a long batch, or a module call that hangs)."""
