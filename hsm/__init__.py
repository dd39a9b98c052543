"""The PKCS#11 layer of keysvc: one logged-in session per process, keys used by handle.

It knows keys, mechanisms and sessions, and nothing of payments.
"""

from hsm.errors import (
    HsmConfigurationError,
    HsmError,
    HsmKeyCheckFailed,
    HsmKeyNotPreserved,
    HsmKeyRejected,
    HsmStaleHandle,
    HsmUnavailable,
    HsmUnwrapFailed,
)
from hsm.token import (
    DEFAULT_MODULE_PATH,
    MASTER_CHECK_VALUE_DIGITS,
    MASTER_LONG_CHECK_VALUE_DIGITS,
    TRANSPORT_KEY_BITS,
    TRANSPORT_KEY_LABEL_PREFIX,
    Digest,
    Hsm,
    HsmConfig,
    RsaPadding,
    SecretKeyHandle,
    WrappedSharedKeys,
)

__all__ = [
    "DEFAULT_MODULE_PATH",
    "Digest",
    "Hsm",
    "HsmConfig",
    "HsmConfigurationError",
    "HsmError",
    "HsmKeyCheckFailed",
    "HsmKeyNotPreserved",
    "HsmKeyRejected",
    "HsmStaleHandle",
    "HsmUnavailable",
    "HsmUnwrapFailed",
    "MASTER_CHECK_VALUE_DIGITS",
    "MASTER_LONG_CHECK_VALUE_DIGITS",
    "RsaPadding",
    "SecretKeyHandle",
    "TRANSPORT_KEY_BITS",
    "TRANSPORT_KEY_LABEL_PREFIX",
    "WrappedSharedKeys",
]
