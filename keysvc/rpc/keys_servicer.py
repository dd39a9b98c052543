"""KeyService over gRPC: messages in, KeyManager calls, messages out."""

from __future__ import annotations

from keysvc.keys import KeyManager, KeyProfile
from keysvc.model import Charset, KeyPlatform, KeyPurpose
from keysvc.rpc.convert import ALGORITHMS, CHARSETS, PLATFORMS, PURPOSES, STATES, from_enum, key_message
from keysvc.rpc.errors import translated
from keysvc.v1 import keys_pb2, keys_pb2_grpc


def _purpose(number: int) -> KeyPurpose:
    return from_enum(PURPOSES, number, "purpose", default=KeyPurpose.SEAL)


def _profile(request) -> KeyProfile | None:
    """The profile a request asks for; None when it names none (keep or default)."""
    if not request.platform and not request.charset:
        return None
    return KeyProfile(
        from_enum(PLATFORMS, request.platform, "platform", default=KeyPlatform.GENERIC),
        from_enum(CHARSETS, request.charset, "charset", default=Charset.UTF_8),
    )


class KeyServicer(keys_pb2_grpc.KeyServiceServicer):
    def __init__(self, keys: KeyManager) -> None:
        self._keys = keys

    @translated
    def CreateKey(self, request, context):
        key = self._keys.create_key(
            request.merchant_id,
            request.name,
            _purpose(request.purpose),
            from_enum(ALGORITHMS, request.algorithm, "algorithm", required=True),
            _profile(request) or KeyProfile(),
        )
        return keys_pb2.CreateKeyResponse(key=key_message(key))

    @translated
    def GetImportParameters(self, request, context):
        parameters = self._keys.import_parameters()
        return keys_pb2.GetImportParametersResponse(
            public_key_pem=parameters.public_key_pem,
            wrapping_algorithm=parameters.wrapping_algorithm,
            private_key_wrapping_algorithm=parameters.private_key_wrapping_algorithm,
            import_key_id=parameters.import_key_id,
        )

    @translated
    def ImportKey(self, request, context):
        key, version = self._keys.import_key(
            request.merchant_id,
            request.name,
            _purpose(request.purpose),
            from_enum(ALGORITHMS, request.algorithm, "algorithm"),
            request.wrapped_secret,
            request.import_key_id,
            version=request.version,
            make_primary=request.make_primary,
            profile=_profile(request),
        )
        return keys_pb2.ImportKeyResponse(
            key=key_message(key), version=version.version, check_value=version.check_value
        )

    @translated
    def RotateKey(self, request, context):
        key, version = self._keys.rotate_key(request.key_id)
        return keys_pb2.RotateKeyResponse(key=key_message(key), version=version.version)

    @translated
    def GetKey(self, request, context):
        return keys_pb2.GetKeyResponse(key=key_message(self._keys.get_key(request.key_id)))

    @translated
    def ListKeys(self, request, context):
        page, next_token = self._keys.list_keys(request.merchant_id, request.page_size, request.page_token)
        return keys_pb2.ListKeysResponse(keys=[key_message(k) for k in page], next_page_token=next_token)

    @translated
    def SetKeyVersionState(self, request, context):
        state = from_enum(STATES, request.state, "state", required=True)
        key = self._keys.set_version_state(request.key_id, request.version, state)
        return keys_pb2.SetKeyVersionStateResponse(key=key_message(key))

    @translated
    def SetPrimaryVersion(self, request, context):
        key = self._keys.set_primary_version(request.key_id, request.version)
        return keys_pb2.SetPrimaryVersionResponse(key=key_message(key))

    @translated
    def DestroyKeyVersion(self, request, context):
        key = self._keys.destroy_version(request.key_id, request.version)
        return keys_pb2.DestroyKeyVersionResponse(key=key_message(key))
