"""TokenService over gRPC: messages in, Tokenizer calls, messages out."""

from __future__ import annotations

from keysvc.errors import InvalidArgument, KeysvcError
from keysvc.rpc.convert import from_enum, timestamp
from keysvc.rpc.errors import deadline_of, status_code_of, translated
from keysvc.tokens import CardBrand, TokenFormat, TokenizeOptions, TokenizeRequest, Tokenizer
from keysvc.v1 import tokens_pb2, tokens_pb2_grpc

FORMATS = {
    tokens_pb2.TOKEN_FORMAT_PRESERVING: TokenFormat.FORMAT_PRESERVING,
    tokens_pb2.TOKEN_FORMAT_OPAQUE: TokenFormat.OPAQUE,
}
FORMAT_NUMBERS = {value: number for number, value in FORMATS.items()}
BRAND_NUMBERS = {brand: tokens_pb2.CardBrand.Value(f"CARD_BRAND_{brand.value}") for brand in CardBrand}
DEFAULT_REWRAP_LIMIT = 10_000


def _fill_item_error(target: tokens_pb2.TokenItemError, error: KeysvcError) -> None:
    target.code = status_code_of(error).value[0]
    target.reason = error.reason
    target.message = error.message


def _tokenize_request(message: tokens_pb2.TokenizeRequest) -> TokenizeRequest:
    ttl = None
    if message.HasField("ttl"):
        if message.ttl.seconds < 0 or message.ttl.nanos < 0:
            raise InvalidArgument("ttl", "must be positive")
        ttl = message.ttl.ToTimedelta()
    return TokenizeRequest(
        domain=message.domain,
        pans=tuple(message.pans),
        options=TokenizeOptions(
            token_format=from_enum(FORMATS, message.format, "format", default=TokenFormat.FORMAT_PRESERVING),
            keep_bin=message.keep_bin,
            fresh=message.fresh,
            ttl=ttl,
        ),
    )


class TokenServicer(tokens_pb2_grpc.TokenServiceServicer):
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    @translated
    def Tokenize(self, request, context):
        outcomes = self._tokenizer.tokenize(_tokenize_request(request), deadline_of(context))
        response = tokens_pb2.TokenizeResponse(domain=request.domain)
        for outcome in outcomes:
            result = response.results.add()
            if isinstance(outcome, KeysvcError):
                _fill_item_error(result.error, outcome)
                continue
            token = result.token
            token.token = outcome.token
            token.masked_pan = outcome.masked_pan
            token.brand = BRAND_NUMBERS[outcome.brand]
            token.created = outcome.created
            token.key_version = outcome.key_version
            if outcome.expires_at is not None:
                token.expire_time.FromDatetime(outcome.expires_at)
        return response

    @translated
    def Detokenize(self, request, context):
        outcomes = self._tokenizer.detokenize(request.domain, list(request.tokens), deadline_of(context))
        response = tokens_pb2.DetokenizeResponse(domain=request.domain)
        for outcome in outcomes:
            result = response.results.add()
            if isinstance(outcome, KeysvcError):
                _fill_item_error(result.error, outcome)
            else:
                result.token.token = outcome.token
                result.token.pan = outcome.pan
        return response

    @translated
    def GetTokenInfo(self, request, context):
        info = self._tokenizer.token_info(request.domain, request.token)
        return tokens_pb2.GetTokenInfoResponse(info=tokens_pb2.TokenInfo(
            domain=info.domain, token=info.token, masked_pan=info.masked_pan, brand=BRAND_NUMBERS[info.brand],
            format=FORMAT_NUMBERS[info.token_format], keep_bin=info.keep_bin, deterministic=info.deterministic,
            key_version=info.key_version, create_time=timestamp(info.created_at),
            expire_time=timestamp(info.expires_at),
        ))

    @translated
    def DeleteToken(self, request, context):
        self._tokenizer.delete_token(request.domain, request.token)
        return tokens_pb2.DeleteTokenResponse()

    @translated
    def RotateTokenKey(self, request, context):
        version = self._tokenizer.rotate_data_key(request.domain)
        return tokens_pb2.RotateTokenKeyResponse(domain=request.domain, key_version=version)

    @translated
    def RewrapTokens(self, request, context):
        report = self._tokenizer.rewrap(request.domain, limit=request.limit or DEFAULT_REWRAP_LIMIT)
        return tokens_pb2.RewrapTokensResponse(
            domain=report.domain, key_version=report.version, rewrapped=report.rewrapped, remaining=report.remaining)

    @translated
    def ShredTokenDomain(self, request, context):
        destroyed = self._tokenizer.shred_domain(request.domain)
        return tokens_pb2.ShredTokenDomainResponse(domain=request.domain, tokens_destroyed=destroyed)
