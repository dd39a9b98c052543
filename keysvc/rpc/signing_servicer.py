"""SigningService over gRPC: messages in, Signer calls, messages out."""

from __future__ import annotations

import json

from keysvc.rpc.convert import SIGNATURE_ALGORITHM_NUMBERS, SIGNATURE_ALGORITHMS, from_enum
from keysvc.rpc.errors import deadline_of, translated
from keysvc.rpc.seals_servicer import answer_batch
from keysvc.signing import (
    CertificateSubject,
    Signature,
    SignatureAlgorithm,
    Signer,
    SignRequest,
    VerifySignatureRequest,
)
from keysvc.v1 import signing_pb2, signing_pb2_grpc


def _algorithm(number: int, default: SignatureAlgorithm | None = None) -> SignatureAlgorithm:
    return from_enum(SIGNATURE_ALGORITHMS, number, "algorithm", default=default, required=default is None)


def _sign_request(message: signing_pb2.SignRequest) -> SignRequest:
    return SignRequest(key_id=message.key_id, algorithm=_algorithm(message.algorithm), message=message.message,
                       digest=message.digest, version=message.version)


def _fill_signature(target: signing_pb2.SignResponse, signature: Signature) -> signing_pb2.SignResponse:
    target.signature = signature.signature
    target.key_id = signature.key_id
    target.version = signature.version
    target.algorithm = SIGNATURE_ALGORITHM_NUMBERS[signature.algorithm]
    return target


def _subject(request: signing_pb2.CreateCertificateRequest) -> CertificateSubject:
    return CertificateSubject(
        name=request.subject, dns_names=tuple(request.dns_names), ip_addresses=tuple(request.ip_addresses),
        uris=tuple(request.uris), emails=tuple(request.emails),
    )


class SigningServicer(signing_pb2_grpc.SigningServiceServicer):
    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    @translated
    def Sign(self, request, context):
        signature = self._signer.sign(_sign_request(request), deadline_of(context))
        return _fill_signature(signing_pb2.SignResponse(), signature)

    @translated
    def Verify(self, request, context):
        verification = self._signer.verify(VerifySignatureRequest(
            key_id=request.key_id, algorithm=_algorithm(request.algorithm), signature=request.signature,
            message=request.message, digest=request.digest, version=request.version,
        ))
        return signing_pb2.VerifySignatureResponse(
            valid=verification.valid, key_id=verification.key_id, version=verification.version
        )

    @translated
    def BatchSign(self, request, context):
        deadline = deadline_of(context)
        return answer_batch(
            request.requests, _sign_request, lambda items: self._signer.sign_many(items, deadline),
            _fill_signature, signing_pb2.BatchSignResponse(),
        )

    @translated
    def GetPublicKey(self, request, context):
        public = self._signer.public_key(
            request.key_id, request.version, _algorithm(request.algorithm, SignatureAlgorithm.RSA_PSS_SHA256)
        )
        return signing_pb2.GetPublicKeyResponse(
            key_id=public.key_id, version=public.version, public_key_pem=public.pem,
            jwk=json.dumps(public.jwk, sort_keys=True),
        )

    @translated
    def CreateCertificateSigningRequest(self, request, context):
        document = self._signer.certificate_signing_request(
            request.key_id, _subject(request), request.version,
            _algorithm(request.algorithm, SignatureAlgorithm.RSA_PKCS1_V15_SHA256),
        )
        return signing_pb2.CreateCertificateResponse(
            pem=document.pem, key_id=document.key_id, version=document.version
        )

    @translated
    def CreateSelfSignedCertificate(self, request, context):
        document = self._signer.self_signed_certificate(
            request.key_id, _subject(request), request.version, request.days or 30,
            _algorithm(request.algorithm, SignatureAlgorithm.RSA_PKCS1_V15_SHA256),
        )
        return signing_pb2.CreateCertificateResponse(
            pem=document.pem, key_id=document.key_id, version=document.version
        )
