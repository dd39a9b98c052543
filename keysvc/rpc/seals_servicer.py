"""SealService over gRPC: messages in, Sealer calls, messages out."""

from __future__ import annotations

from keysvc.errors import KeysvcError
from keysvc.rpc.convert import ENCODINGS, SCHEME_NUMBERS, SCHEMES, from_enum
from keysvc.rpc.errors import deadline_of, status_code_of, translated
from keysvc.seals import Seal, SealEncoding, Sealer, SealRequest, SealScheme, Verification, VerifyRequest
from keysvc.v1 import seals_pb2, seals_pb2_grpc


def _scheme(message) -> SealScheme:
    number = message.scheme  # 0 (unset) on most calls: no table lookup
    return SealScheme.HMAC if not number else from_enum(SCHEMES, number, "scheme")


def _encoding(message) -> SealEncoding:
    number = message.encoding
    return SealEncoding.HEX if not number else from_enum(ENCODINGS, number, "encoding")


def _fields(message) -> tuple[tuple[str, str], ...]:
    return tuple((item.name, item.value) for item in message.fields) if message.fields else ()


# Built positionally, field by field: this runs for every item of a batch.
def _seal_request(message: seals_pb2.SealRequest) -> SealRequest:
    return SealRequest(message.key_id, message.message, _scheme(message), _encoding(message), message.version,
                       _fields(message), message.fields_json, message.encode_base64)


def _verify_request(message: seals_pb2.VerifyRequest) -> VerifyRequest:
    return VerifyRequest(message.key_id, message.message, message.seal, _scheme(message), _encoding(message),
                         message.version, _fields(message), message.fields_json, message.encode_base64)


def _fill_seal(target: seals_pb2.SealResponse, seal: Seal) -> seals_pb2.SealResponse:
    target.seal = seal.seal
    target.key_id = seal.key_id
    target.version = seal.version
    target.data = seal.data
    target.algorithm = seal.algorithm
    return target


def _fill_verification(target: seals_pb2.VerifyResponse, verification: Verification) -> seals_pb2.VerifyResponse:
    target.valid = verification.valid
    target.key_id = verification.key_id
    target.version = verification.version
    target.receipt = verification.receipt
    return target


def _fill_item_error(target: seals_pb2.ItemError, error: KeysvcError) -> None:
    target.code = status_code_of(error).value[0]
    target.reason = error.reason
    target.message = error.message


def answer_batch(messages, parse, run, fill, response):
    """Parses each item (one that does not parse fails alone), runs the parsed ones
    in one domain call, and fills `response.results` item by item in request order."""
    answers: dict[int, object] = {}
    parsed = []
    for index, message in enumerate(messages):
        try:
            parsed.append((index, parse(message)))
        except KeysvcError as error:
            answers[index] = error
    outcomes = run([item for _, item in parsed])
    answers.update((index, outcome) for (index, _), outcome in zip(parsed, outcomes))
    for index in range(len(messages)):
        answer = answers[index]
        result = response.results.add()  # built in place: no copy per item
        if isinstance(answer, KeysvcError):
            _fill_item_error(result.error, answer)
        else:
            fill(result.response, answer)
    return response


class SealServicer(seals_pb2_grpc.SealServiceServicer):
    def __init__(self, sealer: Sealer) -> None:
        self._sealer = sealer

    @translated
    def Seal(self, request, context):
        seal = self._sealer.compute_seal(_seal_request(request), deadline_of(context))
        return seals_pb2.SealResponse(seal=seal.seal, key_id=seal.key_id, version=seal.version, data=seal.data,
                                      algorithm=seal.algorithm)

    @translated
    def Verify(self, request, context):
        verification = self._sealer.verify_seal(_verify_request(request), deadline_of(context))
        return _fill_verification(seals_pb2.VerifyResponse(), verification)

    @translated
    def ExplainSeal(self, request, context):
        explanation = self._sealer.explain(_seal_request(request))
        return seals_pb2.ExplainSealResponse(
            key_id=explanation.key_id,
            version=explanation.version,
            scheme=SCHEME_NUMBERS[explanation.scheme],
            algorithm=explanation.algorithm,
            charset=explanation.charset,
            sealed_data=explanation.sealed_data,
        )

    @translated
    def BatchSeal(self, request, context):
        deadline = deadline_of(context)
        return answer_batch(
            request.requests, _seal_request, lambda items: self._sealer.compute_seals(items, deadline),
            _fill_seal, seals_pb2.BatchSealResponse(),
        )

    @translated
    def BatchVerify(self, request, context):
        deadline = deadline_of(context)
        return answer_batch(
            request.requests, _verify_request, lambda items: self._sealer.verify_seals(items, deadline),
            _fill_verification, seals_pb2.BatchVerifyResponse(),
        )
