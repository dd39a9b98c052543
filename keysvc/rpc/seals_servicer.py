"""SealService over gRPC: messages in, Sealer calls, messages out."""

from __future__ import annotations

from keysvc.errors import KeysvcError
from keysvc.rpc.convert import ENCODINGS, SCHEMES, from_enum
from keysvc.rpc.errors import deadline_of, status_code_of, translated
from keysvc.seals import Seal, SealEncoding, Sealer, SealRequest, SealScheme, Verification, VerifyRequest
from keysvc.v1 import seals_pb2, seals_pb2_grpc


def _seal_request(message: seals_pb2.SealRequest) -> SealRequest:
    return SealRequest(
        key_id=message.key_id,
        message=message.message,
        scheme=from_enum(SCHEMES, message.scheme, "scheme", default=SealScheme.HMAC),
        encoding=from_enum(ENCODINGS, message.encoding, "encoding", default=SealEncoding.HEX),
        version=message.version,
    )


def _verify_request(message: seals_pb2.VerifyRequest) -> VerifyRequest:
    return VerifyRequest(
        key_id=message.key_id,
        message=message.message,
        seal=message.seal,
        scheme=from_enum(SCHEMES, message.scheme, "scheme", default=SealScheme.HMAC),
        encoding=from_enum(ENCODINGS, message.encoding, "encoding", default=SealEncoding.HEX),
        version=message.version,
    )


def _seal_response(seal: Seal) -> seals_pb2.SealResponse:
    return seals_pb2.SealResponse(seal=seal.seal, key_id=seal.key_id, version=seal.version)


def _verify_response(verification: Verification) -> seals_pb2.VerifyResponse:
    return seals_pb2.VerifyResponse(
        valid=verification.valid, key_id=verification.key_id, version=verification.version
    )


def _item_error(error: KeysvcError) -> seals_pb2.ItemError:
    return seals_pb2.ItemError(code=status_code_of(error).value[0], reason=error.reason, message=error.message)


def _answer_batch(messages, parse, run, respond, result_type) -> list:
    """Parses each item (one that does not parse fails alone), runs the parsed ones
    in one domain call, and answers item by item in request order."""
    answers: dict[int, object] = {}
    parsed = []
    for index, message in enumerate(messages):
        try:
            parsed.append((index, parse(message)))
        except KeysvcError as error:
            answers[index] = error
    outcomes = run([item for _, item in parsed])
    answers.update((index, outcome) for (index, _), outcome in zip(parsed, outcomes))
    return [
        result_type(error=_item_error(answer))
        if isinstance(answer, KeysvcError)
        else result_type(response=respond(answer))
        for answer in (answers[i] for i in range(len(messages)))
    ]


class SealServicer(seals_pb2_grpc.SealServiceServicer):
    def __init__(self, sealer: Sealer) -> None:
        self._sealer = sealer

    @translated
    def Seal(self, request, context):
        return _seal_response(self._sealer.compute_seal(_seal_request(request), deadline_of(context)))

    @translated
    def Verify(self, request, context):
        return _verify_response(self._sealer.verify_seal(_verify_request(request), deadline_of(context)))

    @translated
    def BatchSeal(self, request, context):
        deadline = deadline_of(context)
        results = _answer_batch(
            request.requests, _seal_request, lambda items: self._sealer.compute_seals(items, deadline),
            _seal_response, seals_pb2.BatchSealResult,
        )
        return seals_pb2.BatchSealResponse(results=results)

    @translated
    def BatchVerify(self, request, context):
        deadline = deadline_of(context)
        results = _answer_batch(
            request.requests, _verify_request, lambda items: self._sealer.verify_seals(items, deadline),
            _verify_response, seals_pb2.BatchVerifyResult,
        )
        return seals_pb2.BatchVerifyResponse(results=results)
