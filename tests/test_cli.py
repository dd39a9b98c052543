"""The `keysvc` command line end to end: a real `keysvc serve` subprocess on port 0
(real SoftHSM token, SQLite file) and real `keysvc --server ADDR ...` subprocesses.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import subprocess
from dataclasses import dataclass

import grpc
import pytest

from keysvc.v1 import keys_pb2, keys_pb2_grpc, seals_pb2, seals_pb2_grpc
from tests.crypto_helpers import check_value, hmac_sha256
from tests.servers import KEYSVC, KeysvcServer, start_keysvc_server, stop_keysvc_server

# The SIPS simulation secret, as the bank hands it out: 20 bytes, shorter than SHA-256.
SIPS_SECRET = b"002001000000002_KEY1"
CLI_TIMEOUT = 30.0
EXIT_OK, EXIT_INVALID_SEAL, EXIT_ERROR = 0, 1, 2


# -- running the CLI --------------------------------------------------------------------------


@dataclass
class Api:
    """KeyService and SealService stubs with the few calls the CLI tests set up with."""

    keys: object
    seals: object

    def create(self, key_id: str) -> keys_pb2.Key:
        merchant_id, name = key_id.split("/")
        return self.keys.CreateKey(keys_pb2.CreateKeyRequest(
            merchant_id=merchant_id, name=name, algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=10).key

    def rotate(self, key_id: str) -> int:
        return self.keys.RotateKey(keys_pb2.RotateKeyRequest(key_id=key_id), timeout=10).version

    def create_sealed_and_rotated(self, key_id: str) -> str:
        """Creates the key, seals b"m" with version 1, rotates to version 2; version 1's seal."""
        self.create(key_id)
        old_seal = self.seal(key_id, b"m").seal
        self.rotate(key_id)
        return old_seal

    def get(self, key_id: str) -> keys_pb2.Key:
        return self.keys.GetKey(keys_pb2.GetKeyRequest(key_id=key_id), timeout=10).key

    def seal(self, key_id: str, message: bytes, **fields) -> seals_pb2.SealResponse:
        return self.seals.Seal(seals_pb2.SealRequest(key_id=key_id, message=message, **fields), timeout=10)

    def verify(self, key_id: str, message: bytes, seal_text: str) -> seals_pb2.VerifyResponse:
        return self.seals.Verify(seals_pb2.VerifyRequest(key_id=key_id, message=message, seal=seal_text), timeout=10)


@pytest.fixture(scope="module")
def cli_server(token, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    server = start_keysvc_server(token, f"sqlite:///{directory / 'k.db'}", directory / "serve.log")
    yield server
    stop_keysvc_server(server)


@pytest.fixture(scope="module")
def api(cli_server):
    """gRPC stubs on the same server, for setting up and checking what a command did."""
    channel = grpc.insecure_channel(cli_server.address)
    yield Api(keys_pb2_grpc.KeyServiceStub(channel), seals_pb2_grpc.SealServiceStub(channel))
    channel.close()


def keysvc(server: KeysvcServer, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KEYSVC, "--server", server.address, "--insecure", *args],
        input=stdin, capture_output=True, text=True, timeout=CLI_TIMEOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("KEYSVC_")},
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == EXIT_OK, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def as_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(ok(result))


def version_states(key_json: dict) -> dict[int, str]:
    return {v["version"]: v["state"] for v in key_json["versions"]}


# -- keys -------------------------------------------------------------------------------------------
# Each test runs the command it is about through the CLI; set-up and checks of the effect go
# through gRPC stubs on the same server (each CLI run is a fresh interpreter: ~0.4 s).


def state_name(number: int) -> str:
    return keys_pb2.KeyVersionState.Name(number)


def states_of(key: keys_pb2.Key) -> dict[int, str]:
    return {v.version: state_name(v.state) for v in key.versions}


def test_keys_create_prints_the_new_key_and_show_prints_the_same(cli_server, merchant):
    created = ok(keysvc(cli_server, "keys", "create", f"{merchant}/sips"))

    assert f"key        {merchant}/sips" in created
    assert "algorithm  HMAC_SHA256" in created
    assert "primary    1" in created
    assert re.search(r"^\s+1\s+ENABLED\s+GENERATED\s+[0-9A-F]{6}\s+\d{4}-\d\d-\d\dT", created, re.M)
    assert ok(keysvc(cli_server, "keys", "show", f"{merchant}/sips")) == created


def test_keys_create_json_parses_as_the_key_the_server_holds(cli_server, api, merchant):
    created = as_json(keysvc(cli_server, "--json", "keys", "create", f"{merchant}/json", "--algorithm", "hmac-sha512"))

    assert created["key_id"] == f"{merchant}/json"
    assert created["merchant_id"] == merchant and created["name"] == "json"
    assert created["algorithm"] == "KEY_ALGORITHM_HMAC_SHA512"
    assert created["primary_version"] == 1
    assert version_states(created) == {1: "KEY_VERSION_STATE_ENABLED"}
    held = api.get(f"{merchant}/json")
    assert created["versions"][0]["check_value"] == held.versions[0].check_value
    assert re.fullmatch(r"[0-9A-F]{6}", held.versions[0].check_value)


def test_keys_list_shows_the_merchants_keys_in_key_id_order(cli_server, api, merchant):
    for key_id in (f"{merchant}/b", f"{merchant}/a", f"{merchant}x/a"):
        api.create(key_id)

    listed = ok(keysvc(cli_server, "keys", "list", "--merchant", merchant))

    assert [line.split()[0] for line in listed.splitlines()] == [f"{merchant}/a", f"{merchant}/b"]
    assert all("HMAC_SHA256" in line and line.rstrip().endswith("primary 1") for line in listed.splitlines())
    everything = [k["key_id"] for k in as_json(keysvc(cli_server, "--json", "keys", "list"))["keys"]]
    assert everything == sorted(everything)
    assert {f"{merchant}/a", f"{merchant}/b", f"{merchant}x/a"} <= set(everything)


def test_keys_list_of_a_merchant_without_keys_says_no_keys(cli_server, merchant):
    assert ok(keysvc(cli_server, "keys", "list", "--merchant", merchant)).strip() == "no keys"


def test_keys_rotate_prints_the_new_primary_and_seals_then_use_it(cli_server, api, merchant):
    key_id = f"{merchant}/rot"
    api.create(key_id)

    rotated = ok(keysvc(cli_server, "keys", "rotate", key_id))
    rotated_json = as_json(keysvc(cli_server, "--json", "keys", "rotate", key_id))

    assert rotated.startswith("new primary version 2\n")
    assert "primary    2" in rotated
    assert rotated_json["version"] == 3 and rotated_json["key"]["primary_version"] == 3
    assert api.seal(key_id, b"m").version == 3


def test_keys_set_state_verify_only_and_disabled_change_what_the_version_may_do(cli_server, api, merchant):
    key_id = f"{merchant}/state"
    old_seal = api.create_sealed_and_rotated(key_id)

    shown = ok(keysvc(cli_server, "keys", "set-state", key_id, "1", "verify-only"))

    assert re.search(r"^\s+1\s+VERIFY_ONLY\s", shown, re.M)
    assert api.verify(key_id, b"m", old_seal).version == 1
    with pytest.raises(grpc.RpcError) as refused:
        api.seal(key_id, b"m", version=1)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION

    disabled = as_json(keysvc(cli_server, "--json", "keys", "set-state", key_id, "1", "disabled"))

    assert version_states(disabled)[1] == "KEY_VERSION_STATE_DISABLED"
    assert api.verify(key_id, b"m", old_seal).valid is False


def test_keys_set_primary_makes_seals_use_that_version(cli_server, api, merchant):
    key_id = f"{merchant}/primary"
    api.create(key_id)
    api.rotate(key_id)

    shown = ok(keysvc(cli_server, "keys", "set-primary", key_id, "1"))

    assert "primary    1" in shown
    assert api.seal(key_id, b"m").version == 1


def test_keys_destroy_yes_destroys_and_again_exits_2_failed_precondition(cli_server, api, merchant):
    key_id = f"{merchant}/destroy"
    old_seal = api.create_sealed_and_rotated(key_id)

    destroyed = as_json(keysvc(cli_server, "--json", "keys", "destroy", key_id, "1", "--yes"))

    assert version_states(destroyed)[1] == "KEY_VERSION_STATE_DESTROYED"
    assert "destroy_time" in next(v for v in destroyed["versions"] if v["version"] == 1)
    assert api.verify(key_id, b"m", old_seal).valid is False
    again = keysvc(cli_server, "keys", "destroy", key_id, "1", "--yes")
    assert again.returncode == EXIT_ERROR and again.stderr.startswith("error: FAILED_PRECONDITION")


def test_keys_destroy_without_yes_asks_and_a_no_destroys_nothing(cli_server, api, merchant):
    key_id = f"{merchant}/keep"
    api.create(key_id)
    api.rotate(key_id)

    answered_no = keysvc(cli_server, "keys", "destroy", key_id, "1", stdin="n\n")

    assert answered_no.returncode != EXIT_OK
    assert "Destroy version 1" in answered_no.stdout + answered_no.stderr
    assert states_of(api.get(key_id))[1] == "KEY_VERSION_STATE_ENABLED"


# -- import -----------------------------------------------------------------------------------------


def test_keys_import_of_the_sips_text_secret_prints_its_check_value_and_seals_like_python_hmac(
        cli_server, merchant, tmp_path):
    key_id = f"{merchant}/sips"
    secret_file = tmp_path / "secret.txt"
    secret_file.write_bytes(SIPS_SECRET + b"\n")  # as saved by an editor: the newline is not part of it
    assert len(SIPS_SECRET) == 20

    imported = ok(keysvc(cli_server, "keys", "import", key_id, "--secret-file", str(secret_file),
                         "--secret-format", "text"))

    expected = check_value(SIPS_SECRET)
    assert imported.startswith(f"imported version 1, check value {expected}\n")
    assert re.search(rf"^\s+1\s+ENABLED\s+IMPORTED\s+{expected}\s", imported, re.M)
    message = "amount=55|currencyCode=978|merchantId=002001000000002|transactionReference=cli42"
    sealed = ok(keysvc(cli_server, "seal", "compute", key_id, "--message", message)).strip()
    assert sealed == hmac_sha256(SIPS_SECRET, message.encode()).hex()
    assert ok(keysvc(cli_server, "seal", "verify", key_id, sealed, "--message", message)).strip() == "valid (version 1)"


@pytest.mark.parametrize("secret_format", ["hex", "base64"])
def test_keys_import_of_a_non_ascii_secret_file_exits_2_without_quoting_it(cli_server, merchant, tmp_path,
                                                                         secret_format):
    secret_file = tmp_path / "secret"
    secret_file.write_bytes("clé-secrète".encode())

    result = keysvc(cli_server, "keys", "import", f"{merchant}/k", "--secret-file", str(secret_file),
                    "--secret-format", secret_format)

    assert result.returncode == EXIT_ERROR
    assert f"the secret is not {secret_format}" in result.stderr
    assert "Traceback" not in result.stderr and "0xc3" not in result.stderr


def test_keys_import_hex_secret_from_stdin_as_a_numbered_primary_version(cli_server, api, merchant):
    key_id = f"{merchant}/hex"
    api.create(key_id)
    secret = os.urandom(32)

    imported = as_json(keysvc(cli_server, "--json", "keys", "import", key_id, "--secret-file", "-",
                              "--secret-format", "hex", "--version", "5", "--make-primary",
                              stdin=secret.hex() + "\n"))

    assert imported["version"] == 5
    assert imported["check_value"] == check_value(secret)
    assert imported["key"]["primary_version"] == 5
    sealed = api.seal(key_id, b"x")
    assert (sealed.version, sealed.seal) == (5, hmac_sha256(secret, b"x").hex())


def test_keys_import_of_a_version_number_already_taken_exits_2_already_exists(cli_server, api, merchant, tmp_path):
    key_id = f"{merchant}/taken"
    api.create(key_id)
    secret_file = tmp_path / "secret.txt"
    secret_file.write_bytes(SIPS_SECRET)

    again = keysvc(cli_server, "keys", "import", key_id, "--secret-file", str(secret_file), "--version", "1")

    assert again.returncode == EXIT_ERROR
    assert again.stderr.startswith("error: ALREADY_EXISTS")
    assert SIPS_SECRET.decode() not in again.stderr + again.stdout
    assert [v.version for v in api.get(key_id).versions] == [1]


# -- seals ------------------------------------------------------------------------------------------


def test_seal_verify_exits_0_when_valid_and_1_when_the_seal_or_message_is_wrong(cli_server, api, merchant):
    key_id = f"{merchant}/verify"
    api.create(key_id)
    sealed = api.seal(key_id, b"pay 10 EUR").seal
    tampered = ("0" if sealed[0] != "0" else "1") + sealed[1:]

    valid = keysvc(cli_server, "seal", "verify", key_id, sealed, "--message", "pay 10 EUR")
    wrong_seal = keysvc(cli_server, "seal", "verify", key_id, tampered, "--message", "pay 10 EUR")
    wrong_message = keysvc(cli_server, "--json", "seal", "verify", key_id, sealed, "--message", "pay 99 EUR")

    assert (valid.returncode, valid.stdout.strip()) == (EXIT_OK, "valid (version 1)")
    assert (wrong_seal.returncode, wrong_seal.stdout.strip()) == (EXIT_INVALID_SEAL, "INVALID")
    assert wrong_message.returncode == EXIT_INVALID_SEAL
    assert json.loads(wrong_message.stdout).get("valid", False) is False


def test_seal_compute_and_verify_in_base64_from_a_message_file(cli_server, api, merchant, tmp_path):
    key_id = f"{merchant}/b64"
    api.create(key_id)
    message = bytes(range(256))
    message_file = tmp_path / "message.bin"
    message_file.write_bytes(message)

    sealed = ok(keysvc(cli_server, "seal", "compute", key_id, "--message-file", str(message_file),
                       "--encoding", "base64")).strip()
    verified = as_json(keysvc(cli_server, "--json", "seal", "verify", key_id, sealed,
                              "--message-file", str(message_file), "--encoding", "base64"))

    assert base64.b64decode(sealed, validate=True) == bytes.fromhex(api.seal(key_id, message).seal)
    assert verified == {"valid": True, "key_id": key_id, "version": 1}


def test_seal_compute_reads_the_message_from_stdin_as_utf8_bytes(cli_server, api, merchant):
    key_id = f"{merchant}/stdin"
    api.create(key_id)
    from_stdin = ok(keysvc(cli_server, "seal", "compute", key_id, "--message-file", "-", stdin="héllo")).strip()
    assert from_stdin == api.seal(key_id, "héllo".encode()).seal


def test_seal_compute_json_echoes_the_key_version_and_algorithm(cli_server, api, merchant):
    key_id = f"{merchant}/echo"
    api.create(key_id)
    sealed = as_json(keysvc(cli_server, "--json", "seal", "compute", key_id, "--message", "m"))
    assert sealed == {"seal": api.seal(key_id, b"m").seal, "key_id": key_id, "version": 1, "algorithm": "HMAC-SHA-256"}


# -- errors -----------------------------------------------------------------------------------------


def test_unknown_key_exits_2_with_error_not_found_on_stderr(cli_server, merchant):
    for args in (["keys", "show", f"{merchant}/none"], ["seal", "verify", f"{merchant}/none", "00", "--message", "m"]):
        result = keysvc(cli_server, *args)
        assert result.returncode == EXIT_ERROR, args
        assert result.stderr.startswith("error: NOT_FOUND"), result.stderr
        assert result.stdout == ""


def test_malformed_key_id_and_duplicate_create_exit_2_with_their_status(cli_server, api, merchant):
    malformed = keysvc(cli_server, "keys", "show", "no-slash")
    assert malformed.returncode == EXIT_ERROR
    assert malformed.stderr.startswith("error: INVALID_ARGUMENT")
    api.create(f"{merchant}/dup")
    duplicate = keysvc(cli_server, "keys", "create", f"{merchant}/dup")
    assert duplicate.returncode == EXIT_ERROR
    assert duplicate.stderr.startswith("error: ALREADY_EXISTS")


def test_unreachable_server_exits_2_with_error_unavailable(tmp_path):
    unreachable = KeysvcServer(None, "127.0.0.1:1", 1, tmp_path / "none.log", queue.Queue())
    result = keysvc(unreachable, "--timeout", "5", "keys", "list")
    assert result.returncode == EXIT_ERROR
    assert result.stderr.startswith("error: UNAVAILABLE"), result.stderr


# -- shutdown (last: it stops the module's server) -------------------------------------------------


# -- payment platform seals ---------------------------------------------------------------------

MONETICO_KEY = "12345678901234567890123456789012345678P0"


def test_monetico_key_import_seal_verify_with_receipt_and_explain(cli_server, merchant):
    import hashlib
    import hmac

    from keysvc.seal_formats import decode_monetico_key

    key_id = f"{merchant}/monetico"
    imported = ok(keysvc(cli_server, "keys", "import", key_id, "--platform", "monetico", "--secret-format",
                         "monetico", "--secret-file", "-", stdin=MONETICO_KEY + "\n"))
    fields = ["--field", "TPE=1234567", "--field", "montant=62.75EUR", "--field", "texte-libre=Thé",
              "--field", "version=3.0"]
    sealed = ok(keysvc(cli_server, "seal", "compute", key_id, "--scheme", "monetico", *fields)).strip()
    verified = ok(keysvc(cli_server, "seal", "verify", key_id, sealed.upper(), "--scheme", "monetico", *fields))
    forged = keysvc(cli_server, "seal", "verify", key_id, sealed, "--scheme", "monetico", *fields[:-2],
                    "--field", "version=9.9")
    explained = ok(keysvc(cli_server, "seal", "explain", key_id, "--scheme", "monetico", *fields))

    secret = decode_monetico_key(MONETICO_KEY)
    sealed_string = "TPE=1234567*montant=62.75EUR*texte-libre=Thé*version=3.0"
    assert hmac.new(secret, bytes(16), hashlib.sha1).digest()[:3].hex().upper() in imported
    assert "platform   MONETICO (UTF-8)" in imported
    assert sealed == hmac.new(secret, sealed_string.encode(), hashlib.sha1).hexdigest()
    assert "valid (version 1)" in verified and "version=2\\ncdr=0\\n" in verified
    assert forged.returncode == EXIT_INVALID_SEAL and "cdr=1" in forged.stdout
    assert sealed_string in explained and "HMAC-SHA1" in explained and sealed not in explained


def test_sips_legacy_key_import_and_sips_post_seal_from_fields(cli_server, merchant):
    import hashlib

    key_id = f"{merchant}/sips-legacy"
    ok(keysvc(cli_server, "keys", "import", key_id, "--platform", "sips", "--algorithm", "sha256-data-secret",
              "--secret-file", "-", stdin=SIPS_SECRET.decode() + "\n"))

    result = as_json(keysvc(cli_server, "--json", "seal", "compute", key_id, "--scheme", "sips-post",
                            "--field", "amount=100", "--field", "keyVersion=1"))

    assert result["data"] == "amount=100|keyVersion=1"
    assert result["seal"] == hashlib.sha256(b"amount=100|keyVersion=1" + SIPS_SECRET).hexdigest()


@pytest.mark.parametrize("key_text", ["12345678901234567890123456789012345678P", "zz" * 20])
def test_a_monetico_key_that_does_not_decode_is_refused_without_quoting_it(cli_server, merchant, key_text):
    result = keysvc(cli_server, "keys", "import", f"{merchant}/bad", "--platform", "monetico",
                    "--secret-format", "monetico", "--secret-file", "-", stdin=key_text)

    assert result.returncode == EXIT_ERROR
    assert "Monetico key" in result.stderr
    assert key_text not in result.stderr + result.stdout



def test_monetico_key_text_format_is_refused_and_monetico_is_the_default(cli_server, merchant):
    key_id = f"{merchant}/monetico-default"

    refused = keysvc(cli_server, "keys", "import", key_id, "--platform", "monetico", "--secret-format", "text",
                     "--secret-file", "-", stdin=MONETICO_KEY)
    imported = ok(keysvc(cli_server, "keys", "import", key_id, "--platform", "monetico", "--secret-file", "-",
                         stdin=MONETICO_KEY))

    import hashlib
    import hmac

    from keysvc.seal_formats import decode_monetico_key

    assert refused.returncode == EXIT_ERROR and "--secret-format monetico" in refused.stderr
    assert hmac.new(decode_monetico_key(MONETICO_KEY), bytes(16), hashlib.sha1).digest()[:3].hex().upper() in imported


def test_sign_verify_public_key_and_csr_commands(cli_server, merchant, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    key_id = f"{merchant}/signing"
    created = ok(keysvc(cli_server, "keys", "create", key_id, "--purpose", "sign", "--algorithm", "rsa-2048"))
    signature = ok(keysvc(cli_server, "sign", key_id, "--algorithm", "rsa-pkcs1-v15-sha256",
                          "--message", "settlement")).strip()
    valid = keysvc(cli_server, "verify-signature", key_id, signature, "--algorithm", "rsa-pkcs1-v15-sha256",
                   "--message", "settlement")
    invalid = keysvc(cli_server, "verify-signature", key_id, signature, "--algorithm", "rsa-pkcs1-v15-sha256",
                     "--message", "settlemenT")
    pem = ok(keysvc(cli_server, "keys", "public-key", key_id))
    jwk = json.loads(ok(keysvc(cli_server, "keys", "public-key", key_id, "--jwk")))
    csr = ok(keysvc(cli_server, "keys", "csr", key_id, "--subject", "CN=shop.example,C=FR", "--dns", "shop.example"))

    assert "purpose    SIGN" in created and "algorithm  RSA_2048" in created
    serialization.load_pem_public_key(pem.encode()).verify(
        base64.b64decode(signature), b"settlement", padding.PKCS1v15(), hashes.SHA256())
    assert valid.returncode == EXIT_OK and invalid.returncode == EXIT_INVALID_SEAL
    assert jwk["kid"] == f"{key_id}#1" and jwk["alg"] == "PS256"
    assert x509.load_pem_x509_csr(csr.encode()).is_signature_valid


def test_keys_import_private_key_signs_like_the_original(cli_server, merchant, tmp_path):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(private_key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                                   serialization.NoEncryption()))
    key_id = f"{merchant}/imported-rsa"

    imported = ok(keysvc(cli_server, "keys", "import-private-key", key_id, "--private-key-file", str(key_file)))
    signature = ok(keysvc(cli_server, "sign", key_id, "--algorithm", "rsa-pss-sha512", "--message", "m")).strip()
    garbage = keysvc(cli_server, "keys", "import-private-key", f"{merchant}/bad", "--private-key-file", "-",
                     stdin="-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")

    assert "imported version 1" in imported
    private_key.public_key().verify(base64.b64decode(signature), b"m",
                                    padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=64), hashes.SHA512())
    assert garbage.returncode == EXIT_ERROR and "not a key" not in garbage.stderr

# Last: it stops the module's server.
def test_sigterm_stops_the_server_with_exit_code_0_within_10_s(cli_server, api):
    api.keys.ListKeys(keys_pb2.ListKeysRequest(page_size=1), timeout=10)

    assert cli_server.terminate(within=10) == 0, cli_server.log()

    with pytest.raises(grpc.RpcError) as refused:
        api.keys.ListKeys(keys_pb2.ListKeysRequest(page_size=1), timeout=2)
    assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
