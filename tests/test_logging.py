"""Structured logs: one JSON event per line with the call's fields, a human format,
and a redaction filter that keeps PANs, PINs and key material out of every line."""

from __future__ import annotations

import io
import json
import logging
from concurrent import futures

import grpc
import pytest

from keysvc.logs import configure_logging, handler_for, redact
from keysvc.rpc.interceptors import ObservingInterceptor
from keysvc.rpc.server import ServerOptions, create_server
from keysvc.v1 import keys_pb2, keys_pb2_grpc, seals_pb2, seals_pb2_grpc
from tests.servers import start_keysvc_server, stop_keysvc_server

PANS = ["4111111111111111", "4111 1111 1111 1111", "5555-5555-5555-4444", "378282246310005",
        "6011000990139424", "123456789012", "4000000000000000006", "00004111111111111111"]
HEX_KEY = "3f1c9a0b7d2e4c6f8a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e2f"


@pytest.mark.parametrize("pan", PANS)
def test_pan_like_digit_runs_are_redacted(pan):
    for text in (pan, f"card={pan}", f"pan:{pan};", f"amount=100|cardNumber={pan}|x=1", f'{{"pan": "{pan}"}}'):
        cleaned = redact(text)
        assert pan not in cleaned and pan.replace(" ", "").replace("-", "") not in cleaned.replace(" ", "")
        assert "[REDACTED-PAN]" in cleaned


@pytest.mark.parametrize("text, secret", [
    ("pin=1234", "1234"),
    ("PIN: 987654", "987654"),
    ("user_pin=s3cr3t-pin-value", "s3cr3t-pin-value"),
    ("KEYSVC_HSM_PIN=abcd1234", "abcd1234"),
    ('{"so_pin": "Hunter22"}', "Hunter22"),
    ("login with pin 'x9y8z7' failed; pin='x9y8z7'", "x9y8z7"),
    ("PIN 4321 refused", "4321"),
    ("secret=002001000000002_KEY1", "002001000000002_KEY1"),
    ("password: correct-horse", "correct-horse"),
    (f"wrapped key {HEX_KEY}", HEX_KEY),
    (f"key={HEX_KEY.upper()}", HEX_KEY.upper()),
])
def test_pins_secrets_and_hex_key_material_are_redacted(text, secret):
    assert secret not in redact(text)


@pytest.mark.parametrize("text", [
    "keysvc.v1.SealService/Seal OK", "mapping=3 spinning: yes", "version 2 of key m1/sips",
    "took 12.5 ms", "the PIN file /data/pin is readable by others", "request_id=6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f", "KCV EBC454",
])
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text


def test_every_line_of_the_json_handler_is_one_redacted_event():
    stream = io.StringIO()
    log = logging.getLogger("keysvc.test_logging")
    handler = handler_for("json", stream)
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("sealing %s for card %s", "amount=100", "4111111111111111",
                    extra={"request_id": "r-1", "rpc": "keysvc.v1.SealService/Seal", "status": "OK",
                           "duration_ms": 1.5, "peer": "ipv4:127.0.0.1:5555"})
        try:
            raise ValueError(f"bad key {HEX_KEY} with pin=1234 for 5555555555554444")
        except ValueError:
            log.exception("call failed\nsecond line with user_pin=9999")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the multi-line message and the stack stay inside one event
    events = [json.loads(line) for line in lines]
    assert events[0]["message"] == "sealing amount=100 for card [REDACTED-PAN]"
    assert {k: events[0][k] for k in ("request_id", "rpc", "status", "duration_ms", "peer", "level")} == {
        "request_id": "r-1", "rpc": "keysvc.v1.SealService/Seal", "status": "OK", "duration_ms": 1.5,
        "peer": "ipv4:127.0.0.1:5555", "level": "WARNING"}
    assert events[0]["time"].endswith("Z")
    assert "Traceback" in events[1]["exception"]
    for secret in ("4111111111111111", "5555555555554444", HEX_KEY, "1234", "9999"):
        assert secret not in stream.getvalue()


def test_human_format_redacts_too():
    stream = io.StringIO()
    log = logging.getLogger("keysvc.test_logging_human")
    handler = handler_for("human", stream)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.info("pan %s", "4111111111111111", extra={"rpc": "r", "status": "OK"})
    finally:
        log.removeHandler(handler)
        log.propagate = True
    line = stream.getvalue().strip()
    assert line.endswith("keysvc.test_logging_human: pan [REDACTED-PAN] rpc=r status=OK")


def test_serve_json_logs_one_event_per_call_with_request_id_rpc_status_duration_and_peer(token, tmp_path, merchant):
    server = start_keysvc_server(token, f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "server.log",
                                 extra_args=("--log-format", "json", "--log-access", "all"))
    pan = "4111111111111111"
    try:
        with grpc.insecure_channel(server.address) as channel:
            keys = keys_pb2_grpc.KeyServiceStub(channel)
            seals = seals_pb2_grpc.SealServiceStub(channel)
            key_id = keys.CreateKey(keys_pb2.CreateKeyRequest(
                merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=10).key.key_id
            sealed, call = seals.Seal.with_call(
                seals_pb2.SealRequest(key_id=key_id, message=f"cardNumber={pan}".encode()), timeout=10,
                metadata=[("x-request-id", "gateway-req-42")])
            assert ("x-request-id", "gateway-req-42") in call.trailing_metadata()
            with pytest.raises(grpc.RpcError) as raised:
                keys.GetKey(keys_pb2.GetKeyRequest(key_id=f"{pan}/missing"), timeout=10)
            assert raised.value.code() is grpc.StatusCode.NOT_FOUND
            generated_id = dict(raised.value.trailing_metadata())["x-request-id"]
            assert len(generated_id) == 22 and generated_id.isalpha()
    finally:
        stop_keysvc_server(server)
    log_text = server.log()
    events = [json.loads(line) for line in log_text.splitlines()]  # every line is one JSON event
    access = {event["request_id"]: event for event in events if event["logger"] == "keysvc.access"}
    seal_event = access["gateway-req-42"]
    assert seal_event["rpc"] == "keysvc.v1.SealService/Seal" and seal_event["status"] == "OK"
    assert seal_event["duration_ms"] > 0 and seal_event["peer"].startswith("ipv")
    assert access[generated_id]["status"] == "NOT_FOUND"
    for secret in (pan, sealed.seal, merchant):
        assert secret not in log_text


def test_configure_logging_replaces_the_root_handlers():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("json", "WARNING", stream)
        logging.getLogger("keysvc.x").info("not shown")
        logging.getLogger("keysvc.x").warning("pin=4321 shown")
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["message"] == "pin=[REDACTED] shown"


@pytest.mark.parametrize("mode, wanted", [("all", ["OK", "NOT_FOUND"]), ("errors", ["NOT_FOUND"]), ("off", [])])
def test_access_events_for_all_calls_for_failed_calls_only_or_none(domain, merchant, mode, wanted):
    stream = io.StringIO()
    access = logging.getLogger("keysvc.access")
    handler = handler_for("json", stream)
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    grpc_server, port, _ = create_server("127.0.0.1:0", domain.keys, domain.sealer,
                                         ServerOptions(reuse_port=False, access_log=mode), signer=domain.signer)
    grpc_server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            keys = keys_pb2_grpc.KeyServiceStub(channel)
            keys.ListKeys(keys_pb2.ListKeysRequest(page_size=1), timeout=10)
            with pytest.raises(grpc.RpcError):
                keys.GetKey(keys_pb2.GetKeyRequest(key_id=f"{merchant}/missing"), timeout=10)
    finally:
        grpc_server.stop(None)
        access.removeHandler(handler)
        access.setLevel(logging.NOTSET)
    assert [json.loads(line)["status"] for line in stream.getvalue().splitlines()] == wanted


def test_every_line_logged_during_a_call_carries_its_request_id():
    """A real server whose one method logs: the line carries the call's request id,
    which the caller also gets back; a line logged outside any call carries none."""
    stream = io.StringIO()
    log = logging.getLogger("keysvc.test_inside_a_call")
    handler = handler_for("json", stream)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    def answer(request: bytes, context) -> bytes:
        log.info("working on it")
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[ObservingInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(answer)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _, call = channel.unary_unary("/test.Echo/Say").with_call(b"hi", timeout=10)
        log.info("outside")
    finally:
        server.stop(None)
        log.removeHandler(handler)
        log.propagate = True
    inside, outside = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert inside["request_id"] == dict(call.trailing_metadata())["x-request-id"]
    assert "request_id" not in outside
