"""`keysvc`: the service (`serve`) and its admin command line (a gRPC client).

Output is for people by default and JSON with --json. Exit codes: 0 success
(and a valid seal), 1 a seal that does not verify, 2 an error.
Secrets are read from files or standard input, never from arguments.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import sys
from pathlib import Path

import click
import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from google.protobuf.json_format import MessageToDict

from keysvc import config as config_module
from keysvc.authz import ROLES
from keysvc.client import KeysvcCallError, KeysvcClient, TlsIdentity
from keysvc.seal_formats import decode_monetico_key
from keysvc.v1 import (
    approvals_pb2,
    audit_pb2,
    keys_pb2,
    masterkey_pb2,
    policy_pb2,
    replicas_pb2,
    seals_pb2,
    signing_pb2,
    tokens_pb2,
)

ALGORITHM_CHOICES = {
    "hmac-sha1": keys_pb2.KEY_ALGORITHM_HMAC_SHA1,
    "hmac-sha256": keys_pb2.KEY_ALGORITHM_HMAC_SHA256,
    "hmac-sha384": keys_pb2.KEY_ALGORITHM_HMAC_SHA384,
    "hmac-sha512": keys_pb2.KEY_ALGORITHM_HMAC_SHA512,
    "sha256-data-secret": keys_pb2.KEY_ALGORITHM_SHA256_DATA_SECRET,
    "rsa-2048": keys_pb2.KEY_ALGORITHM_RSA_2048,
    "rsa-3072": keys_pb2.KEY_ALGORITHM_RSA_3072,
    "rsa-4096": keys_pb2.KEY_ALGORITHM_RSA_4096,
}
PURPOSE_CHOICES = {"seal": keys_pb2.KEY_PURPOSE_SEAL, "sign": keys_pb2.KEY_PURPOSE_SIGN}
SIGNATURE_ALGORITHM_CHOICES = {
    name.removeprefix("SIGNATURE_ALGORITHM_").lower().replace("_", "-"): number
    for name, number in signing_pb2.SignatureAlgorithm.items() if number
}
PLATFORM_CHOICES = {
    "generic": keys_pb2.KEY_PLATFORM_GENERIC,
    "sips": keys_pb2.KEY_PLATFORM_SIPS,
    "monetico": keys_pb2.KEY_PLATFORM_MONETICO,
}
# The algorithm of a platform's keys when --algorithm is not given.
PLATFORM_DEFAULT_ALGORITHMS = {"generic": "hmac-sha256", "sips": "hmac-sha256", "monetico": "hmac-sha1"}
CHARSET_CHOICES = {"utf-8": keys_pb2.CHARSET_UTF_8, "iso-8859-1": keys_pb2.CHARSET_ISO_8859_1}
SCHEME_CHOICES = {
    "hmac": seals_pb2.SEAL_SCHEME_HMAC,
    "sips-post": seals_pb2.SEAL_SCHEME_SIPS_POST,
    "sips-json-request": seals_pb2.SEAL_SCHEME_SIPS_JSON_REQUEST,
    "sips-json-response": seals_pb2.SEAL_SCHEME_SIPS_JSON_RESPONSE,
    "monetico": seals_pb2.SEAL_SCHEME_MONETICO,
    "cmcic-legacy-request": seals_pb2.SEAL_SCHEME_CMCIC_LEGACY_REQUEST,
    "cmcic-legacy-notification": seals_pb2.SEAL_SCHEME_CMCIC_LEGACY_NOTIFICATION,
}
# Digest sizes (the least SoftHSM accepts for an HMAC key) and hashes for local check values.
DIGESTS = {
    keys_pb2.KEY_ALGORITHM_HMAC_SHA1: (20, hashlib.sha1),
    keys_pb2.KEY_ALGORITHM_HMAC_SHA256: (32, hashlib.sha256),
    keys_pb2.KEY_ALGORITHM_HMAC_SHA384: (48, hashlib.sha384),
    keys_pb2.KEY_ALGORITHM_HMAC_SHA512: (64, hashlib.sha512),
}
STATE_CHOICES = {
    "enabled": keys_pb2.KEY_VERSION_STATE_ENABLED,
    "verify-only": keys_pb2.KEY_VERSION_STATE_VERIFY_ONLY,
    "disabled": keys_pb2.KEY_VERSION_STATE_DISABLED,
}
ENCODING_CHOICES = {"hex": seals_pb2.SEAL_ENCODING_HEX, "base64": seals_pb2.SEAL_ENCODING_BASE64}

EXIT_INVALID_SEAL = 1
EXIT_ERROR = 2


@click.group()
@click.option("--server", envvar="KEYSVC_SERVER", default=config_module.DEFAULT_LISTEN, show_default=True,
              help="Address of the keysvc server (env KEYSVC_SERVER).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--timeout", default=10.0, show_default=True, help="Deadline of each call, in seconds.")
@click.option("--pki", envvar="KEYSVC_PKI_DIR", default="data/pki", show_default=True,
              help="Folder with ca.crt and client-<role>.crt/.key (as `keysvc dev-pki` makes; env KEYSVC_PKI_DIR).")
@click.option("--as", "role", type=click.Choice(ROLES), default=None,
              help="Call with this role's certificate (default: the role the command needs).")
@click.option("--insecure", is_flag=True, envvar="KEYSVC_INSECURE",
              help="Plain text, no certificate: for a server run with --insecure-loopback.")
@click.pass_context
def main(ctx: click.Context, server: str, as_json: bool, timeout: float, pki: str, role: str | None,
         insecure: bool) -> None:
    """keysvc: merchant keys, message seals, signatures and tokens in an HSM, behind gRPC."""
    ctx.obj = {"server": server, "json": as_json, "timeout": timeout, "pki": pki, "role": role, "insecure": insecure}


# The role each command needs, by command path prefix (longest first); else key-admin.
COMMAND_ROLES = (
    ("keys public-key", "signer"), ("keys csr", "signer"), ("seal", "gateway"), ("sign", "signer"),
    ("verify-signature", "signer"), ("tokens tokenize", "gateway"), ("tokens info", "gateway"),
    ("tokens detokenize", "detokenizer"), ("audit", "auditor"),
)


def _role_for(command_path: str) -> str:
    path = " ".join(command_path.split()[1:])  # without the program's name
    for prefix, role in COMMAND_ROLES:
        if path == prefix or path.startswith(prefix + " "):
            return role
    return "key-admin"


def _tls(ctx: click.Context) -> TlsIdentity | None:
    if ctx.obj["insecure"]:
        return None
    directory = Path(ctx.obj["pki"])
    role = ctx.obj["role"] or _role_for(click.get_current_context().command_path)
    try:
        return TlsIdentity.from_pki(directory, role)
    except OSError:
        raise click.UsageError(
            f"no {role} certificate in {directory} (make run creates them; --pki DIR, or --insecure for a server "
            "run with --insecure-loopback)"
        ) from None


def _client(ctx: click.Context) -> KeysvcClient:
    """The client library's client (keysvc.client), made on first use."""
    if "client" not in ctx.obj:
        ctx.obj["client"] = KeysvcClient(ctx.obj["server"], tls=_tls(ctx), timeout=ctx.obj["timeout"])
    return ctx.obj["client"]


def _call(ctx: click.Context, method, request):
    """The call through the client library (its deadline, retries on UNAVAILABLE)."""
    try:
        return _client(ctx).call(method, request)
    except KeysvcCallError as error:
        click.echo(f"error: {error.code.name}: {error.message}", err=True)
        ctx.exit(EXIT_ERROR)


def _call_or_pending(ctx: click.Context, method, request, **facts: str):
    """_call for a dual-control request: the response, or None when it now waits for a
    second key-admin (APPROVAL_REQUIRED), after printing the pending operation's id and
    `facts` (JSON with --json; exit 0). Other errors exit as _call's do."""
    try:
        return _client(ctx).call(method, request)
    except KeysvcCallError as error:
        if error.reason != "APPROVAL_REQUIRED":
            click.echo(f"error: {error.code.name}: {error.message}", err=True)
            ctx.exit(EXIT_ERROR)
        operation_id = error.metadata.get("operation_id", "")
    if ctx.obj["json"]:
        click.echo(json.dumps({"pending_operation": {"operation_id": operation_id, **facts}}, indent=2,
                              sort_keys=True))
    else:
        described = "".join(f" ({name.replace('_', ' ')} {value})" for name, value in facts.items())
        click.echo(f"pending operation {operation_id}{described}: a second key-admin approves it with "
                   f"keysvc approvals approve {operation_id}")
    return None


def _print(ctx: click.Context, message, human: str) -> None:
    if ctx.obj["json"]:
        click.echo(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2, sort_keys=True))
    else:
        click.echo(human)


def _split_key_id(key_id: str) -> tuple[str, str]:
    merchant_id, slash, name = key_id.partition("/")
    if not slash:
        raise click.BadParameter("must be MERCHANT_ID/NAME, e.g. 002001000000002/sips", param_hint="KEY_ID")
    return merchant_id, name


def _enum_name(enum_type, number: int, prefix: str) -> str:
    return enum_type.Name(number).removeprefix(prefix)


def describe_key(key: keys_pb2.Key) -> str:
    lines = [
        f"key        {key.key_id}",
        f"algorithm  {_enum_name(keys_pb2.KeyAlgorithm, key.algorithm, 'KEY_ALGORITHM_')}",
        f"platform   {_enum_name(keys_pb2.KeyPlatform, key.platform, 'KEY_PLATFORM_')} "
        f"({_enum_name(keys_pb2.Charset, key.charset, 'CHARSET_').replace('_', '-')})",
        f"purpose    {_enum_name(keys_pb2.KeyPurpose, key.purpose, 'KEY_PURPOSE_')}",
        f"primary    {key.primary_version}"
        + (f" (version {key.pending_primary} pending: primary once every live replica has it)"
           if key.pending_primary else ""),
        f"{'VERSION':>7}  {'STATE':<11}  {'ORIGIN':<9}  {'KCV':<6}  CREATED",
    ]
    for version in key.versions:
        lines.append(
            f"{version.version:>7}  {_enum_name(keys_pb2.KeyVersionState, version.state, 'KEY_VERSION_STATE_'):<11}  "
            f"{_enum_name(keys_pb2.KeyOrigin, version.origin, 'KEY_ORIGIN_'):<9}  {version.check_value:<6}  "
            f"{version.create_time.ToDatetime().isoformat(timespec='seconds')}Z"
        )
    return "\n".join(lines)


def _options(options: list):
    """A decorator that adds every option of `options` to a command, in order."""
    def add(command):
        for option in reversed(options):
            command = option(command)
        return command
    return add


# -- serve ----------------------------------------------------------------------------------


def _serve_overrides(ctx: click.Context, params: dict) -> dict:
    """The serve options given on the command line, by Settings field (the file and
    the environment are read by config.load_settings, under them)."""
    from click.core import ParameterSource

    return {name: value for name, value in params.items()
            if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE}


class _ConfigurationFailed(click.ClickException):
    exit_code = EXIT_ERROR


def _load_settings(config_file, overrides=None):
    try:
        return config_module.load_settings(config_file, overrides=overrides)
    except config_module.ConfigurationError as error:
        raise _ConfigurationFailed(f"configuration: {error}") from None


_config_option = click.option(
    "--config", "config_file", default=None, type=click.Path(dir_okay=False),
    help=f"TOML configuration file (or {config_module.CONFIG_ENV}); environment variables and options override it.")


@main.command()
@_config_option
@click.option("--listen", default=None, help=f"HOST:PORT to serve on [default: {config_module.DEFAULT_LISTEN}].")
@click.option("--database", "database_url", default=None,
              help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB "
                   f"[default: {config_module.DEFAULT_DATABASE_URL}].")
@click.option("--hsm-module", default=None, help=f"PKCS#11 module path [default: {config_module.Settings.hsm_module}].")
@click.option("--token-label", default=None, help=f"[default: {config_module.DEFAULT_TOKEN_LABEL}]")
@click.option("--pin-file", default=None, help="File holding the HSM user PIN (or set KEYSVC_HSM_PIN).")
@click.option("--workers", type=int, default=None, help="Processes serving on the one port [default: 1].")
@click.option("--reflection/--no-reflection", default=None, help="gRPC server reflection [default: on].")
@click.option("--metrics-listen", default=None,
              help="HOST:PORT for Prometheus /metrics (worker N uses PORT+N) [default: off].")
@click.option("--log-format", type=click.Choice(config_module.LOG_FORMATS), default=None,
              help="[default: human]")
@click.option("--log-level", type=click.Choice(config_module.LOG_LEVELS), default=None, help="[default: INFO]")
@click.option("--log-access", type=click.Choice(config_module.ACCESS_LOG_MODES), default=None,
              help="One log event per call: for every call, for calls not OK, or none [default: errors].")
@click.option("--allow-detokenize/--no-allow-detokenize", default=None,
              help="In --insecure-loopback mode, let Detokenize return PANs (with TLS the detokenizer role "
                   "decides) [default: off].")
@click.option("--tls-cert", default=None, help="The server's certificate (PEM).")
@click.option("--tls-key", default=None, help="The server's private key (PEM).")
@click.option("--tls-client-ca", default=None, help="CA certificate(s) that client certificates must chain to.")
@click.option("--policy", default=None, help="The role policy (TOML): which identity may call what.")
@click.option("--dual-control/--no-dual-control", default=None,
              help="With TLS: the operations of --dual-control-operations need a second key-admin "
                   "[default: on].")
@click.option("--dual-control-operations", default=None,
              help="Comma-separated: which of ImportKey, DestroyKeyVersion, ShredTokenDomain, ProposePolicy "
                   "need a second key-admin [default: all four; DeliverMasterKey always does].")
@click.option("--insecure-loopback", is_flag=True, default=None,
              help="Development only: plain text, no client certificates, every caller may do everything; "
                   "refused on any non-loopback address.")
@click.pass_context
def serve(ctx, config_file, **params) -> None:
    """Run the keysvc gRPC server.

    Each option can also be set in the --config file or by its environment variable
    (KEYSVC_LISTEN, KEYSVC_DATABASE_URL, ... see `keysvc config check`).
    """
    from keysvc import service
    from keysvc.logs import configure_logging

    settings, _sources = _load_settings(config_file, _serve_overrides(ctx, params))
    configure_logging(settings.log_format, settings.log_level)
    try:
        service.serve(settings)
    except config_module.ConfigurationError as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # hsm and store set-up errors carry safe messages
        from hsm import HsmError
        from keysvc.errors import KeysvcError

        if isinstance(error, (HsmError, KeysvcError)):
            raise click.ClickException(str(error)) from None
        raise


@main.command("dev-pki")
@click.argument("directory", type=click.Path(file_okay=False), default="data/pki")
def dev_pki(directory) -> None:
    """Make a development CA, a server certificate for localhost, a client certificate per
    role and a policy granting each its role, in DIRECTORY (once; keys mode 0600)."""
    from pathlib import Path

    from keysvc.pki import make_dev_pki

    if make_dev_pki(Path(directory)):
        click.echo(f"created a development CA, certificates and policy in {directory}")


@main.group("config")
def config_group() -> None:
    """Check the server's configuration."""


@config_group.command("check")
@_config_option
def config_check(config_file) -> None:
    """Validate the configuration (file, environment) and print it, secrets masked."""
    settings, sources = _load_settings(config_file)
    click.echo(config_module.describe(settings, sources))


# -- keys -------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Create, import, rotate and retire merchant keys."""


_profile_options = [
    click.option("--platform", type=click.Choice(list(PLATFORM_CHOICES)), default=None,
                 help="The payment platform whose seals the key makes (a new key: generic by default)."),
    click.option("--charset", type=click.Choice(list(CHARSET_CHOICES)), default=None,
                 help="How platform seal text becomes bytes (a new key: utf-8 by default; iso-8859-1 for "
                      "some Monetico contracts)."),
    click.option("--algorithm", type=click.Choice(list(ALGORITHM_CHOICES)), default=None,
                 help="A new key: hmac-sha1 for monetico, else hmac-sha256 by default. sha256-data-secret is "
                      "the legacy SIPS SHA-256 seal."),
]


_with_profile_options = _options(_profile_options)


def _algorithm_number(platform: str | None, algorithm: str | None) -> int:
    return ALGORITHM_CHOICES[algorithm or PLATFORM_DEFAULT_ALGORITHMS[platform or "generic"]]


def _profile_fields(platform: str | None, charset: str | None) -> dict:
    """The request's profile fields; unspecified (0) where the option was not given."""
    return {"platform": PLATFORM_CHOICES.get(platform, 0), "charset": CHARSET_CHOICES.get(charset, 0)}


def _existing_key(ctx: click.Context, key_id: str) -> keys_pb2.Key | None:
    client = _client(ctx)
    try:
        return client.call(client.keys.GetKey, keys_pb2.GetKeyRequest(key_id=key_id)).key
    except KeysvcCallError as error:
        if error.code == grpc.StatusCode.NOT_FOUND:
            return None
        click.echo(f"error: {error.code.name}: {error.message}", err=True)
        ctx.exit(EXIT_ERROR)


@keys.command("create")
@click.argument("key_id")
@_with_profile_options
@click.option("--purpose", type=click.Choice(list(PURPOSE_CHOICES)), default="seal", show_default=True,
              help="sign: an RSA signing key (--algorithm rsa-2048, rsa-3072 or rsa-4096).")
@click.pass_context
def keys_create(ctx, key_id, platform, charset, algorithm, purpose) -> None:
    """Create KEY_ID (MERCHANT_ID/NAME) with a version 1 generated in the HSM."""
    merchant_id, name = _split_key_id(key_id)
    if purpose == "sign" and algorithm is None:
        algorithm = "rsa-2048"
    response = _call(ctx, _client(ctx).keys.CreateKey, keys_pb2.CreateKeyRequest(
        merchant_id=merchant_id, name=name, purpose=PURPOSE_CHOICES[purpose],
        algorithm=_algorithm_number(platform, algorithm), **_profile_fields(platform, charset)))
    _print(ctx, response.key, describe_key(response.key))


def read_secret(secret_file, secret_format: str) -> bytes:
    raw = secret_file.read()
    if secret_format == "text":
        # As banks hand them out: the UTF-8 bytes of the string (a final newline is not part of it).
        return raw.rstrip(b"\r\n")
    if secret_format == "monetico":
        try:
            key_text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise click.BadParameter("a Monetico key is 40 ASCII characters", param_hint="--secret-file") from None
        try:
            return decode_monetico_key(key_text)
        except ValueError as error:  # its message never quotes the key
            raise click.BadParameter(str(error), param_hint="--secret-file") from None
    try:
        text = raw.decode("ascii").strip()
        return bytes.fromhex(text) if secret_format == "hex" else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):  # UnicodeDecodeError too; its text would quote the secret
        raise click.BadParameter(f"the secret is not {secret_format}", param_hint="--secret-file") from None


@keys.command("import")
@click.argument("key_id")
@click.option("--secret-file", type=click.File("rb"), required=True,
              help="File holding the secret the bank handed out ('-' for standard input).")
@click.option("--secret-format", type=click.Choice(["text", "hex", "base64", "monetico"]), default=None,
              help="text (default): the secret string's UTF-8 bytes, as SIPS uses it; monetico (the default, "
                   "and the only text form, for Monetico keys): the 40-character Monetico / CM-CIC key, "
                   "decoded to its 20 bytes as the kits do.")
@_with_profile_options
@click.option("--version", type=click.IntRange(0), default=0, help="The bank's version number (default: the next).")
@click.option("--make-primary", is_flag=True, help="Seal with this version from now on.")
@click.pass_context
def keys_import(ctx, key_id, secret_file, secret_format, platform, charset, algorithm, version,
                make_primary) -> None:
    """Import a bank-issued secret as a version of KEY_ID, wrapped for the HSM in transit.

    For HMAC a secret shorter than the digest is zero-padded to the digest length
    before wrapping (HMAC gives the same tags); for sha256-data-secret it goes as it
    is. The printed check value is compared with one computed here from the secret.
    """
    merchant_id, name = _split_key_id(key_id)
    existing = _existing_key(ctx, key_id)
    monetico = platform == "monetico" or (existing is not None and existing.platform == keys_pb2.KEY_PLATFORM_MONETICO)
    if monetico and secret_format == "text":
        # Its 40 characters are not the key: they encode the 20 bytes that are.
        raise click.BadParameter("a Monetico key is read with --secret-format monetico (or hex of its 20 bytes)",
                                 param_hint="--secret-format")
    secret = read_secret(secret_file, secret_format or ("monetico" if monetico else "text"))
    if not secret:
        raise click.BadParameter("the secret is empty", param_hint="--secret-file")
    if existing is not None and algorithm is None:
        algorithm_number = existing.algorithm  # a new version of the key as it is
    else:
        algorithm_number = _algorithm_number(platform, algorithm)
    if algorithm_number == keys_pb2.KEY_ALGORITHM_SHA256_DATA_SECRET:
        # Its check value is SHA-256(16 zero bytes || secret); the secret is hashed as data, unpadded.
        expected_check_value = hashlib.sha256(bytes(16) + secret).digest()[:3].hex().upper()
        to_wrap = secret
    else:
        digest_size, hash_function = DIGESTS[algorithm_number]
        expected_check_value = hmac.new(secret, bytes(16), hash_function).digest()[:3].hex().upper()
        to_wrap = secret.ljust(digest_size, b"\0")
    client = _client(ctx)
    parameters = _call(ctx, client.keys.GetImportParameters, keys_pb2.GetImportParametersRequest())
    public_key = serialization.load_pem_public_key(parameters.public_key_pem.encode())
    wrapped = public_key.encrypt(
        to_wrap, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
    )
    response = _call(ctx, client.keys.ImportKey, keys_pb2.ImportKeyRequest(
        merchant_id=merchant_id, name=name, purpose=keys_pb2.KEY_PURPOSE_SEAL, algorithm=algorithm_number,
        wrapped_secret=wrapped, import_key_id=parameters.import_key_id, version=version,
        make_primary=make_primary, **_profile_fields(platform, charset)))
    if response.check_value != expected_check_value:
        click.echo(f"error: the HSM's check value {response.check_value} differs from the secret's "
                   f"{expected_check_value}", err=True)
        ctx.exit(EXIT_ERROR)
    _print(ctx, response, f"imported version {response.version}, check value {response.check_value}\n"
           + describe_key(response.key))


@keys.command("import-private-key")
@click.argument("key_id")
@click.option("--private-key-file", type=click.File("rb"), required=True,
              help="An unencrypted RSA private key, PEM or DER, PKCS#8 or PKCS#1 ('-' for standard input).")
@click.option("--version", type=click.IntRange(0), default=0, help="A version number (default: the next).")
@click.option("--make-primary", is_flag=True, help="Sign with this version from now on.")
@click.pass_context
def keys_import_private_key(ctx, key_id, private_key_file, version, make_primary) -> None:
    """Import an RSA private key as a version of the SIGN key KEY_ID, wrapped for the HSM in transit
    (RSA_AES_KEY_WRAP_SHA1). The printed check value is compared with the public key's."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

    merchant_id, name = _split_key_id(key_id)
    raw = private_key_file.read()
    try:
        loader = serialization.load_pem_private_key if raw.lstrip().startswith(b"-----") \
            else serialization.load_der_private_key
        private_key = loader(raw, password=None)
    except (ValueError, TypeError):  # their text may quote the key
        raise click.BadParameter("not an unencrypted PEM or DER private key", param_hint="--private-key-file") \
            from None
    if not isinstance(private_key, rsa.RSAPrivateKey) or private_key.key_size not in (2048, 3072, 4096):
        raise click.BadParameter("must be an RSA key of 2048, 3072 or 4096 bits", param_hint="--private-key-file")
    spki = private_key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    expected_check_value = hashlib.sha256(spki).digest()[:3].hex().upper()
    client = _client(ctx)
    parameters = _call(ctx, client.keys.GetImportParameters, keys_pb2.GetImportParametersRequest())
    public_key = serialization.load_pem_public_key(parameters.public_key_pem.encode())
    transport_key = os.urandom(32)
    wrapped = public_key.encrypt(
        transport_key, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    ) + aes_key_wrap_with_padding(transport_key, private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    response = _call(ctx, client.keys.ImportKey, keys_pb2.ImportKeyRequest(
        merchant_id=merchant_id, name=name, purpose=keys_pb2.KEY_PURPOSE_SIGN,
        algorithm=ALGORITHM_CHOICES[f"rsa-{private_key.key_size}"], wrapped_secret=wrapped,
        import_key_id=parameters.import_key_id, version=version, make_primary=make_primary))
    if response.check_value != expected_check_value:
        click.echo(f"error: the HSM's check value {response.check_value} differs from the key's "
                   f"{expected_check_value}", err=True)
        ctx.exit(EXIT_ERROR)
    _print(ctx, response, f"imported version {response.version}, check value {response.check_value}\n"
           + describe_key(response.key))


@keys.command("rotate")
@click.argument("key_id")
@click.pass_context
def keys_rotate(ctx, key_id) -> None:
    """Add a version generated in the HSM and make it primary."""
    response = _call(ctx, _client(ctx).keys.RotateKey, keys_pb2.RotateKeyRequest(key_id=key_id))
    made = (f"new version {response.version}, pending: primary once every live replica has it"
            if response.key.pending_primary == response.version else f"new primary version {response.version}")
    _print(ctx, response, made + "\n" + describe_key(response.key))


@keys.command("show")
@click.argument("key_id")
@click.pass_context
def keys_show(ctx, key_id) -> None:
    """Show a key and its versions."""
    response = _call(ctx, _client(ctx).keys.GetKey, keys_pb2.GetKeyRequest(key_id=key_id))
    _print(ctx, response.key, describe_key(response.key))


@keys.command("list")
@click.option("--merchant", "merchant_id", default="", help="Only this merchant's keys.")
@click.pass_context
def keys_list(ctx, merchant_id) -> None:
    """List keys (every page)."""
    client = _client(ctx)
    found: list[keys_pb2.Key] = []
    token = ""
    while True:
        page = _call(ctx, client.keys.ListKeys, keys_pb2.ListKeysRequest(
            merchant_id=merchant_id, page_size=1000, page_token=token))
        found.extend(page.keys)
        token = page.next_page_token
        if not token:
            break
    human = "\n".join(
        f"{key.key_id:<40} {_enum_name(keys_pb2.KeyAlgorithm, key.algorithm, 'KEY_ALGORITHM_'):<12} "
        f"primary {key.primary_version}" for key in found
    ) or "no keys"
    _print(ctx, keys_pb2.ListKeysResponse(keys=found), human)


@keys.command("set-state")
@click.argument("key_id")
@click.argument("version", type=click.IntRange(0))
@click.argument("state", type=click.Choice(list(STATE_CHOICES)))
@click.pass_context
def keys_set_state(ctx, key_id, version, state) -> None:
    """Set a version ENABLED, VERIFY-ONLY (retired) or DISABLED."""
    response = _call(ctx, _client(ctx).keys.SetKeyVersionState, keys_pb2.SetKeyVersionStateRequest(
        key_id=key_id, version=version, state=STATE_CHOICES[state]))
    _print(ctx, response.key, describe_key(response.key))


@keys.command("set-primary")
@click.argument("key_id")
@click.argument("version", type=click.IntRange(0))
@click.pass_context
def keys_set_primary(ctx, key_id, version) -> None:
    """Seal with VERSION from now on."""
    response = _call(ctx, _client(ctx).keys.SetPrimaryVersion, keys_pb2.SetPrimaryVersionRequest(
        key_id=key_id, version=version))
    _print(ctx, response.key, describe_key(response.key))


@keys.command("destroy")
@click.argument("key_id")
@click.argument("version", type=click.IntRange(0))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def keys_destroy(ctx, key_id, version, yes) -> None:
    """Destroy a version's key material for good."""
    if not yes:
        click.confirm(f"Destroy version {version} of {key_id}? This cannot be undone", abort=True)
    response = _call(ctx, _client(ctx).keys.DestroyKeyVersion, keys_pb2.DestroyKeyVersionRequest(
        key_id=key_id, version=version))
    _print(ctx, response.key, describe_key(response.key))


# -- seals ------------------------------------------------------------------------------------


@main.group()
def seal() -> None:
    """Compute and verify message seals."""


def _field(text: str) -> seals_pb2.Field:
    name, equals, value = text.partition("=")
    if not equals:
        raise click.BadParameter("must be NAME=VALUE", param_hint="--field")
    return seals_pb2.Field(name=name, value=value)


def _seal_input(scheme, message, message_file, fields, fields_json, base64_data, encoding, version) -> dict:
    """The request fields SealRequest and VerifyRequest share, from the options."""
    if message is not None and message_file is not None:
        raise click.UsageError("give at most one of --message and --message-file")
    if message is None and message_file is None and not fields and fields_json is None:
        raise click.UsageError("give the message (--message, --message-file) or its fields (--field, --fields-json)")
    body = message.encode() if message is not None else message_file.read() if message_file is not None else b""
    return dict(
        message=body, scheme=SCHEME_CHOICES[scheme], encoding=ENCODING_CHOICES[encoding], version=version,
        fields=[_field(item) for item in fields], fields_json=fields_json or "", encode_base64=base64_data,
    )


_message_options = [
    click.option("--scheme", type=click.Choice(list(SCHEME_CHOICES)), default="hmac", show_default=True,
                 help="How the message becomes the sealed bytes (the key's platform must serve it)."),
    click.option("--message", default=None, help="The message, as UTF-8 text (SIPS: the Data or the JSON)."),
    click.option("--message-file", type=click.File("rb"), default=None, help="The message bytes ('-': stdin)."),
    click.option("--field", "fields", multiple=True, metavar="NAME=VALUE",
                 help="A form field, repeatable, in order (Monetico, CM-CIC, SIPS POST)."),
    click.option("--fields-json", default=None, help="SIPS POST: a JSON object to build Data from."),
    click.option("--base64-data", is_flag=True, help="SIPS POST with Encode=base64."),
    click.option("--encoding", type=click.Choice(list(ENCODING_CHOICES)), default="hex", show_default=True),
    click.option("--version", type=click.IntRange(0), default=0, help="A given version (default: primary / all)."),
]


_with_message_options = _options(_message_options)


@seal.command("compute")
@click.argument("key_id")
@_with_message_options
@click.pass_context
def seal_compute(ctx, key_id, **options) -> None:
    """Print the seal of a message under KEY_ID (and the Data built, for SIPS POST fields)."""
    response = _call(ctx, _client(ctx).seals.Seal, seals_pb2.SealRequest(key_id=key_id, **_seal_input(**options)))
    _print(ctx, response, response.seal + (f"\nData: {response.data}" if response.data else ""))


@seal.command("verify")
@click.argument("key_id")
@click.argument("seal_text", metavar="SEAL")
@_with_message_options
@click.pass_context
def seal_verify(ctx, key_id, seal_text, **options) -> None:
    """Check SEAL over a message; exit 0 when valid, 1 when not."""
    response = _call(ctx, _client(ctx).seals.Verify, seals_pb2.VerifyRequest(
        key_id=key_id, seal=seal_text, **_seal_input(**options)))
    human = f"valid (version {response.version})" if response.valid else "INVALID"
    if response.receipt:
        human += "\nreceipt for the bank: " + response.receipt.replace("\n", "\\n")
    _print(ctx, response, human)
    if not response.valid:
        ctx.exit(EXIT_INVALID_SEAL)


@seal.command("explain")
@click.argument("key_id")
@_with_message_options
@click.pass_context
def seal_explain(ctx, key_id, **options) -> None:
    """Show exactly what Seal would seal, with which version, algorithm and charset."""
    response = _call(ctx, _client(ctx).seals.ExplainSeal,
                     seals_pb2.SealRequest(key_id=key_id, **_seal_input(**options)))
    text = response.sealed_data.decode("utf-8" if response.charset == "UTF-8" else "iso-8859-1", errors="replace")
    _print(ctx, response, "\n".join([
        f"key        {response.key_id}",
        f"version    {response.version}",
        f"scheme     {_enum_name(seals_pb2.SealScheme, response.scheme, 'SEAL_SCHEME_')}",
        f"algorithm  {response.algorithm}",
        f"charset    {response.charset}",
        f"sealed     {len(response.sealed_data)} bytes:",
        text,
    ]))


# -- signatures --------------------------------------------------------------------------------


def _signed_input(message, message_file, digest) -> dict:
    given = [value is not None for value in (message, message_file, digest)]
    if sum(given) != 1:
        raise click.UsageError("give exactly one of --message, --message-file and --digest")
    if digest is not None:
        try:
            return {"digest": bytes.fromhex(digest)}
        except ValueError:
            raise click.BadParameter("must be hex", param_hint="--digest") from None
    return {"message": message.encode() if message is not None else message_file.read()}


_signature_options = [
    click.option("--algorithm", type=click.Choice(list(SIGNATURE_ALGORITHM_CHOICES)), default="rsa-pss-sha256",
                 show_default=True),
    click.option("--message", default=None, help="The message, as UTF-8 text."),
    click.option("--message-file", type=click.File("rb"), default=None, help="The message bytes ('-': stdin)."),
    click.option("--digest", default=None, help="The message's hash (hex) instead of the message."),
    click.option("--version", type=click.IntRange(0), default=0, help="A given version (default: primary / all)."),
]


_with_signature_options = _options(_signature_options)


@main.command("sign")
@click.argument("key_id")
@_with_signature_options
@click.pass_context
def sign(ctx, key_id, algorithm, message, message_file, digest, version) -> None:
    """Sign a message (or its hash) with KEY_ID's RSA key in the HSM; prints the signature in base64."""
    response = _call(ctx, _client(ctx).signing.Sign, signing_pb2.SignRequest(
        key_id=key_id, algorithm=SIGNATURE_ALGORITHM_CHOICES[algorithm], version=version,
        **_signed_input(message, message_file, digest)))
    _print(ctx, response, base64.b64encode(response.signature).decode())


@main.command("verify-signature")
@click.argument("key_id")
@click.argument("signature")
@_with_signature_options
@click.pass_context
def verify_signature(ctx, key_id, signature, algorithm, message, message_file, digest, version) -> None:
    """Check a base64 SIGNATURE; exit 0 when valid, 1 when not."""
    try:
        signature_bytes = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error):
        raise click.BadParameter("must be base64", param_hint="SIGNATURE") from None
    response = _call(ctx, _client(ctx).signing.Verify, signing_pb2.VerifySignatureRequest(
        key_id=key_id, algorithm=SIGNATURE_ALGORITHM_CHOICES[algorithm], version=version,
        signature=signature_bytes, **_signed_input(message, message_file, digest)))
    _print(ctx, response, f"valid (version {response.version})" if response.valid else "INVALID")
    if not response.valid:
        ctx.exit(EXIT_INVALID_SEAL)


@keys.command("public-key")
@click.argument("key_id")
@click.option("--version", type=click.IntRange(0), default=0, help="Default: the primary.")
@click.option("--jwk", is_flag=True, help="Print the JSON Web Key instead of PEM.")
@click.option("--algorithm", type=click.Choice(list(SIGNATURE_ALGORITHM_CHOICES)), default="rsa-pss-sha256",
              show_default=True, help="The JWK's alg.")
@click.pass_context
def keys_public_key(ctx, key_id, version, jwk, algorithm) -> None:
    """Print a signing key's public key (PEM SubjectPublicKeyInfo, or JWK)."""
    response = _call(ctx, _client(ctx).signing.GetPublicKey, signing_pb2.GetPublicKeyRequest(
        key_id=key_id, version=version, algorithm=SIGNATURE_ALGORITHM_CHOICES[algorithm]))
    _print(ctx, response, response.jwk if jwk else response.public_key_pem.rstrip("\n"))


@keys.command("csr")
@click.argument("key_id")
@click.option("--subject", required=True, help="RFC 4514 name, e.g. 'CN=shop.example,O=Shop SA,C=FR'.")
@click.option("--dns", "dns_names", multiple=True, help="A DNS subject alternative name (repeatable).")
@click.option("--ip", "ip_addresses", multiple=True, help="An IP address alternative name (repeatable).")
@click.option("--uri", "uris", multiple=True, help="A URI alternative name (repeatable).")
@click.option("--email", "emails", multiple=True, help="An e-mail alternative name (repeatable).")
@click.option("--version", type=click.IntRange(0), default=0, help="Default: the primary.")
@click.option("--algorithm", type=click.Choice(list(SIGNATURE_ALGORITHM_CHOICES)), default="rsa-pkcs1-v15-sha256",
              show_default=True)
@click.option("--self-signed", is_flag=True, help="A self-signed certificate (for tests) instead of a CSR.")
@click.option("--days", type=click.IntRange(1, 825), default=30, show_default=True,
              help="Validity of a self-signed certificate.")
@click.pass_context
def keys_csr(ctx, key_id, subject, dns_names, ip_addresses, uris, emails, version, algorithm, self_signed,
             days) -> None:
    """Print a PKCS#10 CSR (or a self-signed certificate) for a signing key, signed in the HSM."""
    client = _client(ctx)
    method = client.signing.CreateSelfSignedCertificate if self_signed else client.signing.CreateCertificateSigningRequest
    response = _call(ctx, method, signing_pb2.CreateCertificateRequest(
        key_id=key_id, version=version, subject=subject, dns_names=dns_names, ip_addresses=ip_addresses, uris=uris,
        emails=emails, algorithm=SIGNATURE_ALGORITHM_CHOICES[algorithm], days=days))
    _print(ctx, response, response.pem.rstrip("\n"))

# -- tokens -----------------------------------------------------------------------------------

TOKEN_FORMAT_CHOICES = {"format-preserving": tokens_pb2.TOKEN_FORMAT_PRESERVING,
                        "opaque": tokens_pb2.TOKEN_FORMAT_OPAQUE}
# Item errors in a batch: the command prints what worked and exits with this code.
EXIT_ITEM_ERRORS = 2


@main.group()
def tokens() -> None:
    """Tokenize card numbers, read token metadata, delete tokens, manage a domain's keys."""


def describe_token_info(info: tokens_pb2.TokenInfo) -> str:
    expires = (info.expire_time.ToDatetime().isoformat(timespec="seconds") + "Z"
               if info.HasField("expire_time") else "never")
    return "\n".join([
        f"token       {info.token}",
        f"domain      {info.domain}",
        f"masked PAN  {info.masked_pan}",
        f"brand       {_enum_name(tokens_pb2.CardBrand, info.brand, 'CARD_BRAND_')}",
        f"format      {_enum_name(tokens_pb2.TokenFormat, info.format, 'TOKEN_FORMAT_')}"
        + (" (BIN kept)" if info.keep_bin else ""),
        f"kind        {'deterministic' if info.deterministic else 'fresh'}",
        f"key version {info.key_version}",
        f"created     {info.create_time.ToDatetime().isoformat(timespec='seconds')}Z",
        f"expires     {expires}",
    ])


@tokens.command("tokenize")
@click.argument("domain")
@click.option("--pan-file", type=click.File("r"), default="-", show_default=True,
              help="PANs, one per line ('-': standard input). Never on the command line.")
@click.option("--format", "token_format", type=click.Choice(list(TOKEN_FORMAT_CHOICES)),
              default="format-preserving", show_default=True)
@click.option("--keep-bin", is_flag=True, help="Keep the first 6 digits (format-preserving, 16+ digits).")
@click.option("--fresh", is_flag=True, help="A new token even for a PAN tokenized before.")
@click.option("--ttl", type=int, default=0, help="Seconds until the token expires (0: never).")
@click.pass_context
def tokens_tokenize(ctx, domain, pan_file, token_format, keep_bin, fresh, ttl) -> None:
    """Print a token (and masked PAN) for each PAN read from --pan-file."""
    pans = [line.strip() for line in pan_file if line.strip()]
    if not pans:
        raise click.UsageError("no PANs given on --pan-file")
    request = tokens_pb2.TokenizeRequest(domain=domain, pans=pans, format=TOKEN_FORMAT_CHOICES[token_format],
                                         keep_bin=keep_bin, fresh=fresh)
    if ttl:
        request.ttl.FromSeconds(ttl)
    response = _call(ctx, _client(ctx).tokens.Tokenize, request)
    lines, failed = [], False
    for index, result in enumerate(response.results):
        if result.WhichOneof("outcome") == "token":
            lines.append(f"{result.token.token}  {result.token.masked_pan}  "
                         f"{'new' if result.token.created else 'existing'}")
        else:
            failed = True
            lines.append(f"error: item {index}: {result.error.reason}: {result.error.message}")
    _print(ctx, response, "\n".join(lines))
    if failed:
        ctx.exit(EXIT_ITEM_ERRORS)


@tokens.command("detokenize")
@click.argument("domain")
@click.argument("token_values", metavar="TOKEN...", nargs=-1, required=True)
@click.pass_context
def tokens_detokenize(ctx, domain, token_values) -> None:
    """Print the PAN behind each TOKEN (the server must allow it)."""
    response = _call(ctx, _client(ctx).tokens.Detokenize,
                     tokens_pb2.DetokenizeRequest(domain=domain, tokens=list(token_values)))
    lines, failed = [], False
    for index, result in enumerate(response.results):
        if result.WhichOneof("outcome") == "token":
            lines.append(result.token.pan)
        else:
            failed = True
            lines.append(f"error: item {index}: {result.error.reason}: {result.error.message}")
    _print(ctx, response, "\n".join(lines))
    if failed:
        ctx.exit(EXIT_ITEM_ERRORS)


@tokens.command("info")
@click.argument("domain")
@click.argument("token")
@click.pass_context
def tokens_info(ctx, domain, token) -> None:
    """Show a token's metadata (never its PAN)."""
    response = _call(ctx, _client(ctx).tokens.GetTokenInfo, tokens_pb2.GetTokenInfoRequest(domain=domain, token=token))
    _print(ctx, response.info, describe_token_info(response.info))


@tokens.command("delete")
@click.argument("domain")
@click.argument("token")
@click.pass_context
def tokens_delete(ctx, domain, token) -> None:
    """Delete a token and its encrypted PAN."""
    response = _call(ctx, _client(ctx).tokens.DeleteToken, tokens_pb2.DeleteTokenRequest(domain=domain, token=token))
    _print(ctx, response, f"deleted {token}")


@tokens.command("rotate-key")
@click.argument("domain")
@click.pass_context
def tokens_rotate_key(ctx, domain) -> None:
    """Add a data key version for DOMAIN; new tokens use it."""
    response = _call(ctx, _client(ctx).tokens.RotateTokenKey, tokens_pb2.RotateTokenKeyRequest(domain=domain))
    _print(ctx, response, f"new data key version {response.key_version}")


@tokens.command("rewrap")
@click.argument("domain")
@click.option("--limit", type=int, default=0, help="At most this many tokens (0: the server's default).")
@click.pass_context
def tokens_rewrap(ctx, domain, limit) -> None:
    """Re-encrypt DOMAIN's PANs under its newest data key version."""
    response = _call(ctx, _client(ctx).tokens.RewrapTokens, tokens_pb2.RewrapTokensRequest(domain=domain, limit=limit))
    _print(ctx, response, f"rewrapped {response.rewrapped} token(s) to version {response.key_version}; "
           f"{response.remaining} remaining")


@tokens.command("shred")
@click.argument("domain")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def tokens_shred(ctx, domain, yes) -> None:
    """Destroy DOMAIN's keys and tokens: every PAN of it becomes unrecoverable."""
    if not yes:
        click.confirm(f"Shred token domain {domain}? Its PANs become unrecoverable", abort=True)
    response = _call(ctx, _client(ctx).tokens.ShredTokenDomain, tokens_pb2.ShredTokenDomainRequest(domain=domain))
    _print(ctx, response, f"shredded {domain}: {response.tokens_destroyed} token(s) destroyed")


# -- approvals ------------------------------------------------------------------------------------


@main.group()
def approvals() -> None:
    """Dual control: list, approve or reject another key-admin's pending operations."""


def _describe_operation(operation) -> str:
    return (f"{operation.operation_id}  {operation.method.rpartition('/')[2]}  {operation.target}  "
            f"asked by {operation.requested_by}  until {operation.expire_time.ToDatetime().isoformat()}Z")


@approvals.command("list")
@click.pass_context
def approvals_list(ctx) -> None:
    """List the operations waiting for a second key-admin."""
    response = _call(ctx, _client(ctx).approvals.ListPendingOperations,
                     approvals_pb2.ListPendingOperationsRequest())
    _print(ctx, response, "\n".join(map(_describe_operation, response.operations)) or "nothing pending")


@approvals.command("approve")
@click.argument("operation_id")
@click.pass_context
def approvals_approve(ctx, operation_id) -> None:
    """Approve OPERATION_ID, which then runs (never your own request)."""
    response = _call(ctx, _client(ctx).approvals.ApproveOperation,
                     approvals_pb2.DecideOperationRequest(operation_id=operation_id))
    _print(ctx, response, f"approved and done: {_describe_operation(response.operation)}")


@approvals.command("reject")
@click.argument("operation_id")
@click.pass_context
def approvals_reject(ctx, operation_id) -> None:
    """Reject OPERATION_ID: it never runs."""
    response = _call(ctx, _client(ctx).approvals.RejectOperation,
                     approvals_pb2.DecideOperationRequest(operation_id=operation_id))
    _print(ctx, response, f"rejected: {_describe_operation(response.operation)}")


# -- policy ---------------------------------------------------------------------------------------


@main.group()
def policy() -> None:
    """Who may call what: show the policy in force, propose a new one (two key-admins)."""


def _describe_policy(policy_message) -> str:
    if policy_message.source == policy_pb2.POLICY_SOURCE_DATABASE:
        approved = policy_message.approve_time.ToDatetime().isoformat(timespec="seconds")
        return (f"revision {policy_message.revision} (sha256 {policy_message.sha256}), proposed by "
                f"{policy_message.proposed_by}, approved by {policy_message.approved_by} at {approved}Z")
    return f"the server's policy file (sha256 {policy_message.sha256}): no policy approved yet"


@policy.command("show")
@click.pass_context
def policy_show(ctx) -> None:
    """Print the policy in force and where it comes from."""
    response = _call(ctx, _client(ctx).policy.GetPolicy, policy_pb2.GetPolicyRequest())
    _print(ctx, response, f"# {_describe_policy(response.policy)}\n{response.policy.policy_toml}")


@policy.command("propose")
@click.argument("policy_file", type=click.File("r", encoding="utf-8"))
@click.pass_context
def policy_propose(ctx, policy_file) -> None:
    """Propose POLICY_FILE (TOML [[grant]] tables) as the whole new policy. With dual
    control a second key-admin approves it (keysvc approvals approve ID), after
    checking its digest (sha256sum POLICY_FILE) against the one the pending operation names."""
    text = policy_file.read()
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    response = _call_or_pending(ctx, _client(ctx).policy.ProposePolicy,
                                policy_pb2.ProposePolicyRequest(policy_toml=text), policy_sha256=digest)
    if response is not None:
        _print(ctx, response, f"in force: {_describe_policy(response.policy)}")


# -- audit ----------------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """Read and check the audit trail (role auditor)."""


@audit.command("list")
@click.option("--after", type=click.IntRange(0), default=0, help="Records after this sequence number.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--identity", default="", help="Only this caller identity.")
@click.option("--operation", default="", help="Only this method, e.g. /keysvc.v1.KeyService/DestroyKeyVersion.")
@click.pass_context
def audit_list(ctx, after, limit, identity, operation) -> None:
    """List audit records in sequence order."""
    response = _call(ctx, _client(ctx).audit.ListAuditRecords, audit_pb2.ListAuditRecordsRequest(
        after_seq=after, limit=limit, identity=identity, operation=operation))
    human = "\n".join(f"{r.seq:>6}  {r.recorded_at}  {r.identity}  {r.operation}  {r.target}  {r.outcome}"
                      for r in response.records) or "no records"
    _print(ctx, response, human)


@audit.command("verify")
@click.option("--expect-at-least", type=click.IntRange(0), default=0,
              help="Records counted at an earlier check: fewer now means the newest were removed.")
@click.pass_context
def audit_verify(ctx, expect_at_least) -> None:
    """Check the hash chain and the signed checkpoints; exit 0 when intact, 1 naming the first bad record."""
    response = _call(ctx, _client(ctx).audit.VerifyAuditTrail, audit_pb2.VerifyAuditTrailRequest(
        expect_at_least=expect_at_least))
    if response.intact:
        human = (f"intact: {response.records} records, {response.checkpoints} signed checkpoints "
                 f"(checkpoint key {response.public_key})")
    else:
        human = f"TAMPERED at record {response.first_bad_seq}: {response.problem}"
    _print(ctx, response, human)
    if not response.intact:
        ctx.exit(EXIT_INVALID_SEAL)


# -- replicas -------------------------------------------------------------------------------------


@main.group()
def replica() -> None:
    """The keysvc processes sharing this server's database."""


@replica.command("list")
@click.pass_context
def replica_list(ctx) -> None:
    """List every registered serving process: live or not, and how far it follows key changes."""
    response = _call(ctx, _client(ctx).replicas.ListReplicas, replicas_pb2.ListReplicasRequest())
    lines = [f"{'REPLICA':<36}  {'ADDRESS':<22}  {'LIVE':<4}  {'SEEN':>6}  HEARTBEAT"]
    for found in response.replicas:
        lines.append(f"{found.replica_id:<36}  {found.address:<22}  {'yes' if found.live else 'no':<4}  "
                     f"{found.seen_change:>6}  {found.heartbeat_time.ToDatetime().isoformat(timespec='seconds')}Z")
    lines.append(f"latest key change {response.latest_change}")
    _print(ctx, response, "\n".join(lines))


# -- master key: enrollment, backup, restore (local commands on the HSM's host) -------------------
#
# These run on the host of an HSM, with the token's options as `keysvc serve` takes them;
# only `replica deliver` and `replica enrollments` call a server.

_hsm_options = [
    click.option("--hsm-module", envvar="KEYSVC_HSM_MODULE", default=config_module.Settings.hsm_module,
                 show_default=True, help="PKCS#11 module path (env KEYSVC_HSM_MODULE)."),
    click.option("--token-label", envvar="KEYSVC_TOKEN_LABEL", default=config_module.DEFAULT_TOKEN_LABEL,
                 show_default=True, help="The token's label (env KEYSVC_TOKEN_LABEL)."),
    click.option("--pin-file", envvar="KEYSVC_HSM_PIN_FILE", default=None,
                 help="File holding the HSM user PIN (env KEYSVC_HSM_PIN_FILE, or the PIN in KEYSVC_HSM_PIN)."),
]
_with_hsm_options = _options(_hsm_options)


class _LocalCommandFailed(click.ClickException):
    exit_code = EXIT_ERROR

    def format_message(self) -> str:
        return self.message

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


@contextlib.contextmanager
def _local_errors():
    """Turns the domain's, the HSM's and the configuration's errors into `error: message`, exit 2."""
    from hsm import HsmError
    from keysvc.errors import KeysvcError

    try:
        yield
    except (KeysvcError, HsmError, config_module.ConfigurationError) as error:
        raise _LocalCommandFailed(str(error)) from None


def _local_token(hsm_module: str, token_label: str, pin_file: str | None):
    """This host's token, logged in (raises what _local_errors reports)."""
    import hsm

    return hsm.Hsm.connect(hsm.HsmConfig(token_label=token_label, pin=config_module.read_pin(pin_file),
                                         module_path=hsm_module))


@contextlib.contextmanager
def _database_engine(database_url: str):
    """The deployment's database, for an admin command: never migrated from here (the
    serving replicas migrate it), and closed when the command ends."""
    from keysvc.store import KeyStore

    store = KeyStore.open(database_url, run_migrations=False)
    try:
        yield store.engine
    finally:
        store.close()


@replica.command("enroll")
@click.option("--database", "database_url", envvar="KEYSVC_DATABASE_URL", required=True,
              help="The deployment's database, postgresql://USER@HOST:PORT/DB (env KEYSVC_DATABASE_URL).")
@click.option("--name", "replica_name", default=None, help="This replica's name [default: the host name].")
@click.option("--complete", "complete_id", default=None, metavar="ID",
              help="Take the master key delivered to enrollment ID into this token (with --check-value).")
@click.option("--check-value", "expected_check_value", default=None, metavar="VALUE",
              help="With --complete: the master key's long check value (32 hex digits), read on a serving "
                   "replica (keysvc master-key check on its host, or GetMasterKeyCheckValue over mutual TLS), "
                   "never from the database.")
@_with_hsm_options
def replica_enroll(database_url, replica_name, complete_id, expected_check_value, hsm_module, token_label,
                   pin_file) -> None:
    """On a new replica's host (its token holds no master key): ask for the master key.

    Without --complete: makes an RSA transport key pair in this HSM and records the request;
    prints the enrollment id and the transport key's fingerprint, which the key-admins check
    (keysvc replica deliver ID --fingerprint ...; a second key-admin approves). With
    --complete ID --check-value VALUE: unwraps the delivered master key into this token, keeps
    it only if its long check value is VALUE, and prints it. Run it again if it stopped
    part-way: it finishes what is left."""
    import socket

    from keysvc import masterkey

    if complete_id and not expected_check_value:
        raise click.UsageError("--complete needs --check-value: the master key's long check value, read on a "
                               "serving replica (keysvc master-key check on its host)")
    if expected_check_value and not complete_id:
        raise click.UsageError("--check-value goes with --complete")
    with _local_errors(), _database_engine(database_url) as engine:
        token = _local_token(hsm_module, token_label, pin_file)
        if complete_id:
            check_value = masterkey.complete_enrollment(token, engine, complete_id, expected_check_value)
            click.echo(f"enrollment {complete_id} completed: this token holds the master key, check value "
                       f"{masterkey.short_check_value(check_value)}, long check value {check_value}")
            return
        enrollment = masterkey.request_enrollment(token, engine, replica_name or socket.gethostname())
    click.echo(f"enrollment {enrollment.enrollment_id}\n"
               f"transport key fingerprint {masterkey.fingerprint_of(enrollment.transport_public_key)}\n"
               f"expires {enrollment.expires_at.isoformat(timespec='seconds')}\n"
               f"next: a key-admin runs keysvc replica deliver {enrollment.enrollment_id} --fingerprint "
               "<the fingerprint above>, a second one approves it, then run keysvc replica enroll --complete "
               f"{enrollment.enrollment_id} --check-value <the long check value keysvc master-key check prints "
               "on a serving replica's host>")


@replica.command("deliver")
@click.argument("enrollment_id")
@click.option("--fingerprint", required=True,
              help="The transport key fingerprint the new replica's operator read out to you.")
@click.pass_context
def replica_deliver(ctx, enrollment_id, fingerprint) -> None:
    """Ask the server to deliver its master key to ENROLLMENT_ID (a second key-admin approves)."""
    response = _call_or_pending(ctx, _client(ctx).master_keys.DeliverMasterKey,
                                masterkey_pb2.DeliverMasterKeyRequest(enrollment_id=enrollment_id,
                                                                      transport_key_fingerprint=fingerprint))
    if response is not None:
        _print(ctx, response, f"delivered to {response.enrollment.enrollment_id}")


def _describe_enrollment(enrollment) -> str:
    state = _enum_name(masterkey_pb2.EnrollmentState, enrollment.state, "ENROLLMENT_STATE_")
    return (f"{enrollment.enrollment_id}  {state:<9}  {enrollment.replica_name}  "
            f"until {enrollment.expire_time.ToDatetime().isoformat(timespec='seconds')}Z  "
            f"transport key {enrollment.transport_key_fingerprint}"
            + (f"  master {enrollment.master_check_value} by {enrollment.delivered_by}"
               if enrollment.master_check_value else ""))


@replica.command("enrollments")
@click.pass_context
def replica_enrollments(ctx) -> None:
    """List the enrollments of new replicas."""
    client = _client(ctx)
    response = _call(ctx, client.master_keys.ListEnrollments, masterkey_pb2.ListEnrollmentsRequest())
    _print(ctx, response, "\n".join(map(_describe_enrollment, response.enrollments)) or "no enrollments")


@main.group("master-key")
def master_key() -> None:
    """The HSM master key on this host: check value, backup and restore under split knowledge."""


@master_key.command("check")
@click.option("--database", "database_url", default=None,
              help="Also compare with the check value this database records.")
@_with_hsm_options
@click.pass_context
def master_key_check(ctx, database_url, hsm_module, token_label, pin_file) -> None:
    """Print the token's master key check value and long check value (exit 1 when it is
    not the database's). The long one is what replica enroll --complete --check-value takes."""
    from keysvc.masterkey import short_check_value
    from keysvc.store.shared_keys import MASTER, SharedKeyStore

    with _local_errors():
        long_check_value = _local_token(hsm_module, token_label, pin_file).master_key_long_check_value()
        recorded = None
        if database_url:
            with _database_engine(database_url) as engine:
                recorded = SharedKeyStore(engine).get(MASTER)
    click.echo(f"master key check value {short_check_value(long_check_value)}\nlong check value {long_check_value}")
    if database_url:
        if recorded is None:
            click.echo("the database records no master key yet")
        elif recorded.check_value == long_check_value:
            click.echo("matches the database's record")
        else:
            click.echo(f"DIFFERS from the database's record {recorded.check_value}")
            ctx.exit(EXIT_INVALID_SEAL)


def _write_new(path: Path, text: str, mode: int) -> None:
    """Writes a file that must not exist yet, with `mode` from its creation."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


@master_key.command("custodian-keys")
@click.option("--name", required=True, help="The custodian's name.")
@click.option("--out", "directory", required=True, type=click.Path(file_okay=False),
              help="Folder for NAME.key (private, mode 0600) and NAME.pub.")
def master_key_custodian_keys(name, directory) -> None:
    """Make a custodian's X25519 key pair: the public half goes to whoever makes backups."""
    from keysvc import masterkey

    with _local_errors():
        masterkey.Custodian(name, bytes(32))  # checks the name
        private, public = masterkey.make_custodian_key()
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            _write_new(folder / f"{name}.key", masterkey.encode_private_key(private), 0o600)
            _write_new(folder / f"{name}.pub", masterkey.encode_public_key(public), 0o644)
        except FileExistsError as error:
            raise _LocalCommandFailed(f"{error.filename} exists: keep it, or choose another folder") from None
    click.echo(f"private key {folder / f'{name}.key'} (keep it to yourself)\npublic key {folder / f'{name}.pub'}")


@master_key.command("backup")
@click.option("--custodian", "custodians", multiple=True, required=True, metavar="NAME=PUBKEYFILE",
              help="A custodian and their public key file (repeat: at least two).")
@click.option("--out", "directory", required=True, type=click.Path(file_okay=False),
              help="Folder for the backup file and one component file per custodian.")
@_with_hsm_options
def master_key_backup(custodians, directory, hsm_module, token_label, pin_file) -> None:
    """Back the master key up under a backup key split among custodians (every one is
    needed to restore): the backup file, and one sealed component file per custodian."""
    from keysvc import masterkey

    with _local_errors():
        parsed = []
        for item in custodians:
            name, equals, public_path = item.partition("=")
            if not equals:
                raise click.BadParameter("must be NAME=PUBKEYFILE", param_hint="--custodian")
            try:
                public_key = masterkey.decode_public_key(Path(public_path).read_text())
            except OSError as error:
                raise _LocalCommandFailed(f"cannot read {public_path}: {error.strerror}") from None
            parsed.append(masterkey.Custodian(name, public_key))
        token = _local_token(hsm_module, token_label, pin_file)
        backup, sealed = masterkey.backup_master_key(token, parsed)
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        backup_path = folder / f"master-key-backup-{backup.backup_id}.json"
        _write_new(backup_path, backup.to_json(), 0o600)
        paths = []
        for component in sealed:
            path = folder / f"master-key-component-{backup.backup_id}-{component.custodian}.json"
            _write_new(path, component.to_json(), 0o600)
            paths.append((component, path))
    click.echo(f"backup {backup_path}\nmaster key check value {backup.master_check_value}\n"
               f"backup key check value {backup.backup_key_check_value}")
    for component, path in paths:
        click.echo(f"component for {component.custodian}: {path} (check value {component.check_value})")


@master_key.command("restore")
@click.option("--backup", "backup_file", required=True, type=click.File("r"), help="The backup file.")
@click.option("--component", "component_files", multiple=True, type=click.File("r"),
              help="A custodian's sealed component file (repeat, each with its --custodian-key); "
                   "without them, each custodian is asked in turn.")
@click.option("--custodian-key", "custodian_key_files", multiple=True, type=click.File("r"),
              help="The private key of the custodian whose --component comes at the same place.")
@click.option("--database", "database_url", default=None,
              help="Also require the master key this database records (its long check value).")
@_with_hsm_options
def master_key_restore(backup_file, component_files, custodian_key_files, database_url, hsm_module, token_label,
                       pin_file) -> None:
    """Restore the master key from a backup into a token that holds none: every
    custodian's component is needed, each opened with its custodian's private key. With
    --database, the restored key must also be the one that database records."""
    from keysvc import masterkey

    if len(component_files) != len(custodian_key_files):
        raise click.UsageError("give each --component with the --custodian-key that opens it")
    with _local_errors():
        backup = masterkey.MasterKeyBackup.from_json(backup_file.read())
        token = _local_token(hsm_module, token_label, pin_file)
        if token.has_master_key:
            raise _LocalCommandFailed("this token already holds a keysvc master key: restore into an empty token")
        click.echo(f"backup {backup.backup_id} of {backup.created_at}: master key check value "
                   f"{backup.master_check_value}; custodians {', '.join(c.name for c in backup.custodians)}")
        opened = []
        if component_files:
            for component_file, key_file in zip(component_files, custodian_key_files):
                component = masterkey.SealedComponent.from_json(component_file.read())
                one = masterkey.open_component(backup, component, masterkey.decode_private_key(key_file.read()))
                click.echo(f"component of {one.custodian}: check value {one.check_value}")
                opened.append(one)
        else:
            for custodian in backup.custodians:
                click.echo(f"custodian {custodian.name}:")
                component_path = click.prompt("  your sealed component file", type=click.Path(dir_okay=False))
                key_path = click.prompt("  your private key file", type=click.Path(dir_okay=False))
                try:
                    component = masterkey.SealedComponent.from_json(Path(component_path).read_text())
                    private_key = masterkey.decode_private_key(Path(key_path).read_text())
                except OSError as error:
                    raise _LocalCommandFailed(f"cannot read {error.filename}: {error.strerror}") from None
                one = masterkey.open_component(backup, component, private_key)
                if one.custodian != custodian.name:
                    raise _LocalCommandFailed(f"that component is {one.custodian}'s, not {custodian.name}'s")
                click.echo(f"  component check value {one.check_value}")
                click.confirm("  is it the check value on your record?", abort=True)
                opened.append(one)
        if database_url:
            with _database_engine(database_url) as engine:
                restored = masterkey.restore_master_key(token, backup, opened, engine)
        else:
            restored = masterkey.restore_master_key(token, backup, opened)
    click.echo(f"backup key check value {restored.backup_key_check_value}\n"
               f"restored: master key check value {restored.master_check_value} (the backup's: "
               f"{backup.master_check_value}), long check value {restored.master_long_check_value}")
    if restored.database_check_value:
        click.echo("matches the database's record")
    elif database_url:
        click.echo("the database records no master key yet")



if __name__ == "__main__":
    sys.exit(main())
