"""TokenService through a real gRPC server and client; the leak test; the CLI."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from keysvc.rpc.server import ServerOptions, create_server
from keysvc.store.tokens import TokenStore
from keysvc.tokens import Tokenizer, luhn_valid
from keysvc.v1 import tokens_pb2, tokens_pb2_grpc
from tests.conftest import make_domain
from tests.servers import KEYSVC, start_keysvc_server, stop_keysvc_server
from tests.test_tokens import random_pan

TIMEOUT = 30


class TokenServer:
    def __init__(self, built, allow_detokenize: bool) -> None:
        self.domain = built
        self.tokenizer = Tokenizer(built.hsm, TokenStore(built.store.engine), detokenize_allowed=allow_detokenize)
        self.server, port, _ = create_server(
            "127.0.0.1:0", built.keys, built.sealer, ServerOptions(reuse_port=False), signer=built.signer,
            tokenizer=self.tokenizer)
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = tokens_pb2_grpc.TokenServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)

    def tokenize(self, domain: str, pans, **fields) -> tokens_pb2.TokenizeResponse:
        return self.stub.Tokenize(tokens_pb2.TokenizeRequest(domain=domain, pans=pans, **fields), timeout=TIMEOUT)

    def detokenize(self, domain: str, token_values) -> tokens_pb2.DetokenizeResponse:
        return self.stub.Detokenize(tokens_pb2.DetokenizeRequest(domain=domain, tokens=token_values), timeout=TIMEOUT)


@pytest.fixture
def tokens_server(domain):
    running = TokenServer(domain, allow_detokenize=True)
    yield running
    running.close()


def error_info(error: grpc.RpcError) -> tuple[str, list[str]]:
    status = rpc_status.from_call(error)
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [violation.field for violation in bad.field_violations]
    return reason, fields


def test_tokenize_detokenize_info_delete(tokens_server, merchant):
    pans = [random_pan(16), random_pan(19, "51"), random_pan(15, "37")]
    response = tokens_server.tokenize(merchant, pans, keep_bin=False)
    assert response.domain == merchant
    made = [result.token for result in response.results]
    assert [t.masked_pan for t in made] == [pans[0][:6] + "******" + pans[0][-4:],
                                             pans[1][:6] + "*********" + pans[1][-4:],
                                             pans[2][:5] + "******" + pans[2][-4:]]
    assert [tokens_pb2.CardBrand.Name(t.brand) for t in made] == [
        "CARD_BRAND_VISA", "CARD_BRAND_MASTERCARD", "CARD_BRAND_AMEX"]
    assert all(t.created and not t.HasField("expire_time") and t.key_version == 1 for t in made)
    assert all(len(t.token) == len(p) and not luhn_valid(t.token) for t, p in zip(made, pans))
    detokenized = tokens_server.detokenize(merchant, [t.token for t in made])
    assert [result.token.pan for result in detokenized.results] == pans
    info = tokens_server.stub.GetTokenInfo(
        tokens_pb2.GetTokenInfoRequest(domain=merchant, token=made[0].token), timeout=TIMEOUT).info
    assert info.masked_pan == made[0].masked_pan and info.format == tokens_pb2.TOKEN_FORMAT_PRESERVING
    assert info.deterministic and info.HasField("create_time") and not info.HasField("expire_time")
    tokens_server.stub.DeleteToken(tokens_pb2.DeleteTokenRequest(domain=merchant, token=made[0].token),
                                   timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as caught:
        tokens_server.stub.GetTokenInfo(
            tokens_pb2.GetTokenInfoRequest(domain=merchant, token=made[0].token), timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value)[0] == "TOKEN_NOT_FOUND"
    [gone] = tokens_server.detokenize(merchant, [made[0].token]).results
    assert gone.error.code == grpc.StatusCode.NOT_FOUND.value[0] and gone.error.reason == "TOKEN_NOT_FOUND"


def test_options_over_grpc(tokens_server, merchant):
    pan = random_pan()
    opaque = tokens_server.tokenize(merchant, [pan], format=tokens_pb2.TOKEN_FORMAT_OPAQUE).results[0].token
    assert opaque.token.startswith("tok_") and len(opaque.token) == 26
    kept = tokens_server.tokenize(merchant, [pan], keep_bin=True).results[0].token
    assert kept.token[:6] == pan[:6]
    request = tokens_pb2.TokenizeRequest(domain=merchant, pans=[pan], fresh=True)
    request.ttl.FromSeconds(3600)
    expiring = tokens_server.stub.Tokenize(request, timeout=TIMEOUT).results[0].token
    assert expiring.created and expiring.HasField("expire_time")
    again = tokens_server.tokenize(merchant, [pan], format=tokens_pb2.TOKEN_FORMAT_OPAQUE).results[0].token
    assert again.token == opaque.token and not again.created


def test_bad_items_and_bad_requests(tokens_server, merchant):
    good = random_pan()
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    response = tokens_server.tokenize(merchant, [bad, good, "12ab"])
    assert response.results[1].WhichOneof("outcome") == "token"
    for index in (0, 2):
        error = response.results[index].error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and error.reason == "INVALID_PAN"
        assert error.message.startswith(f"pans[{index}]:") and bad not in error.message
    cases = [
        (tokens_pb2.TokenizeRequest(domain=merchant, pans=[]), "pans"),
        (tokens_pb2.TokenizeRequest(domain="", pans=[good]), "domain"),
        (tokens_pb2.TokenizeRequest(domain=merchant, pans=[good], format=7), "format"),
        (tokens_pb2.TokenizeRequest(domain=merchant, pans=[good], format=tokens_pb2.TOKEN_FORMAT_OPAQUE,
                                    keep_bin=True), "keep_bin"),
        (tokens_pb2.TokenizeRequest(domain=merchant, pans=[good] * 1001), "pans"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as caught:
            tokens_server.stub.Tokenize(request, timeout=TIMEOUT)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, field
        assert error_info(caught.value)[1] == [field]
        assert good not in caught.value.details()
    negative = tokens_pb2.TokenizeRequest(domain=merchant, pans=[good])
    negative.ttl.FromSeconds(-5)
    with pytest.raises(grpc.RpcError) as caught:
        tokens_server.stub.Tokenize(negative, timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # Nothing half written: the refused requests stored no token.
    with tokens_server.domain.store.engine.connect() as connection:
        count = connection.execute(sa.text("SELECT count(*) FROM tokens WHERE domain = :d"), {"d": merchant}).scalar()
    assert count == 1


def test_detokenize_is_refused_by_default(domain, merchant):
    running = TokenServer(domain, allow_detokenize=False)
    try:
        token = running.tokenize(merchant, [random_pan()]).results[0].token.token
        with pytest.raises(grpc.RpcError) as caught:
            running.detokenize(merchant, [token])
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value)[0] == "DETOKENIZE_DISABLED"
    finally:
        running.close()


def test_rotate_rewrap_shred_over_grpc(tokens_server, merchant):
    pans = [random_pan() for _ in range(5)]
    made = [r.token.token for r in tokens_server.tokenize(merchant, pans).results]
    rotated = tokens_server.stub.RotateTokenKey(tokens_pb2.RotateTokenKeyRequest(domain=merchant), timeout=TIMEOUT)
    assert rotated.key_version == 2
    rewrapped = tokens_server.stub.RewrapTokens(tokens_pb2.RewrapTokensRequest(domain=merchant), timeout=TIMEOUT)
    assert (rewrapped.key_version, rewrapped.rewrapped, rewrapped.remaining) == (2, 5, 0)
    assert [r.token.pan for r in tokens_server.detokenize(merchant, made).results] == pans
    shredded = tokens_server.stub.ShredTokenDomain(tokens_pb2.ShredTokenDomainRequest(domain=merchant),
                                                   timeout=TIMEOUT)
    assert shredded.tokens_destroyed == 5
    with pytest.raises(grpc.RpcError) as caught:
        tokens_server.detokenize(merchant, made)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value)[0] == "TOKEN_DOMAIN_SHREDDED"
    with pytest.raises(grpc.RpcError) as caught:
        tokens_server.stub.ShredTokenDomain(tokens_pb2.ShredTokenDomainRequest(domain=merchant + "-none"),
                                            timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


# -- the leak test -------------------------------------------------------------------------------


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _database_text(built, database_url: str) -> bytes:
    """Every byte the database holds for keysvc: the SQLite files, or every row of every
    table of the PostgreSQL database as text (bytea as hex)."""
    if database_url.startswith("sqlite"):
        path = Path(database_url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    chunks = []
    with built.store.engine.connect() as connection:
        for table in ("keys", "key_versions", "token_domains", "token_data_keys", "tokens"):
            for row in connection.execute(sa.text(f"SELECT t::text FROM {table} t")).scalars():
                chunks.append(row.encode())
    return b"\n".join(chunks)


def test_no_pan_leaks_to_database_logs_or_errors(hsm_token, database_url, merchant):
    built = make_domain(hsm_token, database_url)
    running = TokenServer(built, allow_detokenize=True)
    capture = Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    # SQLAlchemy logs every statement with its parameters at INFO: what reaches the database.
    sql_log = logging.getLogger("sqlalchemy.engine")
    old_sql_level = sql_log.level
    sql_log.setLevel(logging.INFO)
    try:
        pans = [random_pan(length, prefix) for length, prefix in zip(
            [12 + i % 8 for i in range(1000)], ["4", "51", "37", "6011", "35", "62", "9"] * 200)]
        assert len(set(pans)) == 1000
        # Luhn-broken variants of every PAN: refused item by item, never echoed.
        broken = [pan[:-1] + str((int(pan[-1]) + 1) % 10) for pan in pans]
        messages: list[str] = []
        made: list[str] = []
        for start in range(0, 1000, 100):
            batch = pans[start:start + 100]
            mixed = [value for pair in zip(batch, broken[start:start + 100]) for value in pair]
            response = running.tokenize(merchant, mixed, fresh=start % 200 == 100)
            for index, result in enumerate(response.results):
                if index % 2:
                    assert result.error.reason == "INVALID_PAN"
                    messages.append(result.error.message)
                else:
                    made.append(result.token.token)
        # Tokens back to PANs, and every kind of failure once.
        detokenized = running.detokenize(merchant, made)
        assert [r.token.pan for r in detokenized.results] == pans
        failures = [
            lambda: running.tokenize(merchant, pans[:3] + ["x" * 20], keep_bin=True,
                                     format=tokens_pb2.TOKEN_FORMAT_OPAQUE),
            lambda: running.tokenize("bad domain", pans[:2]),
            lambda: running.tokenize(merchant, pans * 2),
            lambda: running.detokenize(merchant + "-unknown", made[:2]),
            lambda: running.stub.GetTokenInfo(tokens_pb2.GetTokenInfoRequest(domain=merchant, token=pans[0]),
                                              timeout=TIMEOUT),
        ]
        for failure in failures:
            with pytest.raises(grpc.RpcError) as caught:
                failure()
            messages.append(caught.value.details() or "")
            messages.append(str(rpc_status.from_call(caught.value)))
        # PANs given where tokens belong are refused before they reach the database.
        for result in running.detokenize(merchant, pans[:100]).results:
            assert result.error.reason == "PAN_GIVEN_AS_TOKEN"
            messages.append(result.error.message)
        for token in made[:20]:
            info = running.stub.GetTokenInfo(tokens_pb2.GetTokenInfoRequest(domain=merchant, token=token),
                                             timeout=TIMEOUT)
            messages.append(str(info))
        running.tokenizer.rotate_data_key(merchant)
        running.tokenizer.rewrap(merchant)
        stored = _database_text(built, database_url)
        logs = "\n".join(capture.lines)
        assert any("INSERT INTO tokens" in line for line in capture.lines), "the capture saw no SQL"
        everything = "\n".join(messages) + "\n" + logs
        secrets_to_find = pans + broken
        hits = [value for value in secrets_to_find
                if value in everything or value.encode() in stored or value.encode().hex() in stored.decode("latin-1")]
        assert hits == [], f"{len(hits)} PAN(s) found"
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
        sql_log.setLevel(old_sql_level)
        running.close()
        built.store.close()


# -- the command line ------------------------------------------------------------------------------


def test_cli_tokens(token, tmp_path, merchant, monkeypatch):
    database_url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("KEYSVC_ALLOW_DETOKENIZE", "1")  # token.env passes it to `keysvc serve`
    env_server = start_keysvc_server(token, database_url, tmp_path / "server.log")
    try:
        env = {**token.env, "KEYSVC_SERVER": env_server.address, "KEYSVC_INSECURE": "1"}
        pans = [random_pan(), random_pan(16, "51")]

        def cli(*args, stdin: str = "") -> subprocess.CompletedProcess:
            return subprocess.run([KEYSVC, *args], env=env, input=stdin, capture_output=True, text=True,
                                  timeout=60)

        made = cli("--json", "tokens", "tokenize", merchant, "--keep-bin", "--ttl", "3600",
                   stdin="\n".join(pans) + "\n")
        assert made.returncode == 0, made.stderr
        results = json.loads(made.stdout)["results"]
        token_values = [result["token"]["token"] for result in results]
        assert [t[:6] for t in token_values] == [p[:6] for p in pans]
        shown = cli("tokens", "detokenize", merchant, *token_values)
        assert shown.returncode == 0 and shown.stdout.split() == pans
        info = cli("tokens", "info", merchant, token_values[0])
        assert info.returncode == 0 and pans[0][:6] + "******" + pans[0][-4:] in info.stdout
        assert pans[0] not in info.stdout
        bad = cli("tokens", "tokenize", merchant, stdin=pans[0][:-1] + "x\n")
        assert bad.returncode == 2 and "INVALID_PAN" in bad.stdout
        assert cli("tokens", "delete", merchant, token_values[0]).returncode == 0
        gone = cli("tokens", "info", merchant, token_values[0])
        assert gone.returncode == 2 and "NOT_FOUND" in gone.stderr
        assert "version 2" in cli("tokens", "rotate-key", merchant).stdout
        assert "rewrapped 1 token(s) to version 2; 0 remaining" in cli("tokens", "rewrap", merchant).stdout
        assert "1 token(s) destroyed" in cli("tokens", "shred", merchant, "--yes").stdout
    finally:
        stop_keysvc_server(env_server)
    log = env_server.log()
    assert not any(pan in log for pan in pans)

