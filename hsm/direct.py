"""The HMAC hot path, called into the PKCS#11 module directly with the GIL held.

python-pkcs11 releases the GIL around C_SignInit and C_Sign. In keysvc every
PKCS#11 call already runs under one process lock, so letting go of the GIL buys
no parallelism; it only hands the interpreter to a gRPC thread twice per seal and
makes the seal wait to get it back (make bench: a third of the server's time per
unary Seal). Calling the same module through ctypes.PyDLL keeps the GIL for the
few microseconds of an HMAC. Everything else still goes through python-pkcs11,
and Hsm checks this path against python-pkcs11 before it uses it.
"""

from __future__ import annotations

import ctypes

CKR_OK = 0
CKR_KEY_SIZE_RANGE = 0x62
_MAX_TAG = 64  # SHA-512


class DirectSignError(Exception):
    """A PKCS#11 return code other than CKR_OK."""

    def __init__(self, return_value: int) -> None:
        super().__init__(f"PKCS#11 call failed with CKR 0x{return_value:x}")
        self.return_value = return_value


class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", ctypes.c_ulong), ("parameter", ctypes.c_void_p), ("parameter_length", ctypes.c_ulong)]


# C_SignInit, C_EncryptInit, C_DecryptInit: (session, mechanism, key).
_INIT_ARGUMENTS = [ctypes.c_ulong, ctypes.POINTER(_Mechanism), ctypes.c_ulong]
# C_Sign, C_Encrypt, C_Decrypt: (session, input, input length, output, output length).
_RUN_ARGUMENTS = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.POINTER(ctypes.c_ulong)]


def _function(library: ctypes.CDLL, name: str, arguments: list) -> ctypes._CFuncPtr:
    """The module's function `name`, typed; a PyDLL's keeps the GIL, a CDLL's releases it."""
    function = getattr(library, name)
    function.argtypes = arguments
    function.restype = ctypes.c_ulong
    return function


def _sign_each(sign_init, sign, session_handle: int, mechanism_pointer, key_handle: int, values,
               output, length: ctypes.c_ulong) -> list[bytes]:
    """C_SignInit then C_Sign of each value, each signature written to `output` (the
    whole buffer offered every time). Raises DirectSignError with the module's code."""
    size, length_pointer = len(output), ctypes.byref(length)
    signatures = []
    for value in values:
        result = sign_init(session_handle, mechanism_pointer, key_handle)
        if result != CKR_OK:
            raise DirectSignError(result)
        length.value = size
        result = sign(session_handle, value, len(value), output, length_pointer)
        if result != CKR_OK:
            raise DirectSignError(result)
        signatures.append(output.raw[: length.value])
    return signatures


class DirectSigner:
    """C_SignInit + C_Sign of the module at `module_path`, without releasing the GIL.

    Not thread-safe by itself: the caller holds the process's PKCS#11 lock.
    """

    def __init__(self, module_path: str) -> None:
        # The same path dlopens the same library instance python-pkcs11 initialised.
        module = ctypes.PyDLL(module_path)
        self._sign_init = _function(module, "C_SignInit", _INIT_ARGUMENTS)
        self._sign = _function(module, "C_Sign", _RUN_ARGUMENTS)
        self._mechanisms: dict[int, _Mechanism] = {}

    def sign_many(self, session_handle: int, key_handle: int, mechanism: int, messages) -> list[bytes]:
        """Raises DirectSignError with the module's return code."""
        prepared = self._mechanisms.get(mechanism)
        if prepared is None:
            prepared = self._mechanisms[mechanism] = _Mechanism(mechanism, None, 0)
        return _sign_each(self._sign_init, self._sign, session_handle, ctypes.byref(prepared), key_handle,
                          messages, ctypes.create_string_buffer(_MAX_TAG), ctypes.c_ulong())


class _PssParams(ctypes.Structure):
    # CK_RSA_PKCS_PSS_PARAMS: hash mechanism, MGF, salt length in bytes.
    _fields_ = [("hash_mechanism", ctypes.c_ulong), ("mgf", ctypes.c_ulong), ("salt_length", ctypes.c_ulong)]


# Room for the largest signature: an 8192-bit modulus.
_MAX_RSA_SIGNATURE = 1024


class DirectRsaSigner:
    """RSA signatures: C_SignInit with the GIL held, C_Sign with it released.

    python-pkcs11 releases the GIL around both calls, so each signature waits twice to
    get the interpreter back from the gRPC threads that took it meanwhile. C_SignInit
    takes microseconds and keeps the GIL here; C_Sign does the private-key operation
    (0.4 to 3 ms) and lets the other threads run. The signature's length is the
    modulus's, so one C_Sign call with a buffer large enough replaces python-pkcs11's
    two (length, then signature).

    Not thread-safe by itself: the caller holds the process's PKCS#11 lock.
    """

    def __init__(self, module_path: str) -> None:
        self._sign_init = _function(ctypes.PyDLL(module_path), "C_SignInit", _INIT_ARGUMENTS)
        self._sign = _function(ctypes.CDLL(module_path), "C_Sign", _RUN_ARGUMENTS)
        self._output = ctypes.create_string_buffer(_MAX_RSA_SIGNATURE)
        self._length = ctypes.c_ulong()

    def sign_many(self, session_handle: int, key_handle: int, mechanism: int,
                  pss: tuple[int, int, int] | None, values) -> list[bytes]:
        """The signature of each value (a DigestInfo for CKM_RSA_PKCS, a hash for
        CKM_RSA_PKCS_PSS with `pss` = (hash mechanism, MGF, salt length)).
        Raises DirectSignError with the module's return code."""
        if pss is None:
            prepared = _Mechanism(mechanism, None, 0)
        else:
            parameters = _PssParams(*pss)
            prepared = _Mechanism(mechanism, ctypes.cast(ctypes.pointer(parameters), ctypes.c_void_p),
                                  ctypes.sizeof(parameters))
        return _sign_each(self._sign_init, self._sign, session_handle, ctypes.byref(prepared), key_handle,
                          values, self._output, self._length)


class _GcmParams(ctypes.Structure):
    # CK_GCM_PARAMS as SoftHSM 2.6 and python-pkcs11 declare it (PKCS#11 v2.40, with ulIvBits).
    _fields_ = [
        ("iv", ctypes.c_char_p), ("iv_length", ctypes.c_ulong), ("iv_bits", ctypes.c_ulong),
        ("aad", ctypes.c_char_p), ("aad_length", ctypes.c_ulong), ("tag_bits", ctypes.c_ulong),
    ]


CKM_AES_GCM = 0x1087


class DirectCipher:
    """AES-GCM through C_EncryptInit/C_Encrypt and C_DecryptInit/C_Decrypt of the module
    at `module_path`, without releasing the GIL (for the reason DirectSigner gives).

    Not thread-safe by itself: the caller holds the process's PKCS#11 lock.
    """

    def __init__(self, module_path: str) -> None:
        module = ctypes.PyDLL(module_path)
        self._encrypt_init = _function(module, "C_EncryptInit", _INIT_ARGUMENTS)
        self._encrypt = _function(module, "C_Encrypt", _RUN_ARGUMENTS)
        self._decrypt_init = _function(module, "C_DecryptInit", _INIT_ARGUMENTS)
        self._decrypt = _function(module, "C_Decrypt", _RUN_ARGUMENTS)
        # Made once and refilled per call: building ctypes objects costs more than the HSM's work.
        self._params = _GcmParams()
        self._mechanism = _Mechanism(CKM_AES_GCM, ctypes.cast(ctypes.pointer(self._params), ctypes.c_void_p),
                                     ctypes.sizeof(self._params))
        self._mechanism_pointer = ctypes.byref(self._mechanism)
        self._output = ctypes.create_string_buffer(4096)
        self._length = ctypes.c_ulong()
        self._length_pointer = ctypes.byref(self._length)

    def _run(self, init, run, session_handle: int, key_handle: int, nonce: bytes, data: bytes, aad: bytes,
             tag_bits: int, output_length: int) -> bytes:
        params = self._params
        params.iv, params.iv_length, params.iv_bits = nonce, len(nonce), len(nonce) * 8
        params.aad, params.aad_length, params.tag_bits = aad, len(aad), tag_bits
        result = init(session_handle, self._mechanism_pointer, key_handle)
        if result != CKR_OK:
            raise DirectSignError(result)
        output = self._output if output_length <= len(self._output) else ctypes.create_string_buffer(output_length)
        self._length.value = len(output)
        result = run(session_handle, data, len(data), output, self._length_pointer)
        if result != CKR_OK:
            raise DirectSignError(result)
        return ctypes.string_at(output, self._length.value)

    def gcm_encrypt(self, session_handle: int, key_handle: int, nonce: bytes, plaintext: bytes, aad: bytes,
                    tag_bits: int) -> bytes:
        """The ciphertext followed by its tag. Raises DirectSignError with the module's return code."""
        return self._run(self._encrypt_init, self._encrypt, session_handle, key_handle, nonce, plaintext, aad,
                         tag_bits, len(plaintext) + tag_bits // 8)

    def gcm_decrypt(self, session_handle: int, key_handle: int, nonce: bytes, ciphertext: bytes, aad: bytes,
                    tag_bits: int) -> bytes:
        """The plaintext. Raises DirectSignError with the module's return code (a failed
        tag check included)."""
        return self._run(self._decrypt_init, self._decrypt, session_handle, key_handle, nonce, ciphertext, aad,
                         tag_bits, len(ciphertext))
