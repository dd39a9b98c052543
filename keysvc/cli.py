"""`keysvc`: the service (`serve`) and its admin command line (a gRPC client).

Output is for people by default and JSON with --json. Exit codes: 0 success
(and a valid seal), 1 a seal that does not verify, 2 an error.
Secrets are read from files or standard input, never from arguments.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import sys

import click
import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from google.protobuf.json_format import MessageToDict

from keysvc import config as config_module
from keysvc.v1 import keys_pb2, keys_pb2_grpc, seals_pb2, seals_pb2_grpc, tokens_pb2, tokens_pb2_grpc

ALGORITHM_CHOICES = {
    "hmac-sha1": keys_pb2.KEY_ALGORITHM_HMAC_SHA1,
    "hmac-sha256": keys_pb2.KEY_ALGORITHM_HMAC_SHA256,
    "hmac-sha384": keys_pb2.KEY_ALGORITHM_HMAC_SHA384,
    "hmac-sha512": keys_pb2.KEY_ALGORITHM_HMAC_SHA512,
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


class Client:
    """The stubs over one channel, with the call timeout."""

    def __init__(self, server: str, timeout: float) -> None:
        self.channel = grpc.insecure_channel(server)
        self.keys = keys_pb2_grpc.KeyServiceStub(self.channel)
        self.seals = seals_pb2_grpc.SealServiceStub(self.channel)
        self.tokens = tokens_pb2_grpc.TokenServiceStub(self.channel)
        self.timeout = timeout


@click.group()
@click.option("--server", envvar="KEYSVC_SERVER", default=config_module.DEFAULT_LISTEN, show_default=True,
              help="Address of the keysvc server (env KEYSVC_SERVER).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--timeout", default=10.0, show_default=True, help="Deadline of each call, in seconds.")
@click.pass_context
def main(ctx: click.Context, server: str, as_json: bool, timeout: float) -> None:
    """keysvc: merchant keys and message seals in an HSM, behind gRPC."""
    ctx.obj = {"server": server, "json": as_json, "timeout": timeout}


def _client(ctx: click.Context) -> Client:
    if "client" not in ctx.obj:
        ctx.obj["client"] = Client(ctx.obj["server"], ctx.obj["timeout"])
    return ctx.obj["client"]


def _call(ctx: click.Context, method, request):
    try:
        return method(request, timeout=ctx.obj["timeout"])
    except grpc.RpcError as error:
        click.echo(f"error: {error.code().name}: {error.details()}", err=True)
        ctx.exit(EXIT_ERROR)


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
        f"purpose    {_enum_name(keys_pb2.KeyPurpose, key.purpose, 'KEY_PURPOSE_')}",
        f"primary    {key.primary_version}",
        f"{'VERSION':>7}  {'STATE':<11}  {'ORIGIN':<9}  {'KCV':<6}  CREATED",
    ]
    for version in key.versions:
        lines.append(
            f"{version.version:>7}  {_enum_name(keys_pb2.KeyVersionState, version.state, 'KEY_VERSION_STATE_'):<11}  "
            f"{_enum_name(keys_pb2.KeyOrigin, version.origin, 'KEY_ORIGIN_'):<9}  {version.check_value:<6}  "
            f"{version.create_time.ToDatetime().isoformat(timespec='seconds')}Z"
        )
    return "\n".join(lines)


# -- serve ----------------------------------------------------------------------------------


@main.command()
@click.option("--listen", envvar="KEYSVC_LISTEN", default=config_module.DEFAULT_LISTEN, show_default=True)
@click.option("--database", "database_url", envvar="KEYSVC_DATABASE_URL",
              default=config_module.DEFAULT_DATABASE_URL, show_default=True,
              help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
@click.option("--hsm-module", envvar="KEYSVC_HSM_MODULE", default=config_module.Settings.hsm_module,
              show_default=True, help="PKCS#11 module path.")
@click.option("--token-label", envvar="KEYSVC_TOKEN_LABEL", default=config_module.DEFAULT_TOKEN_LABEL,
              show_default=True)
@click.option("--pin-file", envvar="KEYSVC_HSM_PIN_FILE", default=None,
              help="File holding the HSM user PIN (or set KEYSVC_HSM_PIN).")
@click.option("--workers", envvar="KEYSVC_WORKERS", default=1, show_default=True,
              help="Processes serving on the one port.")
@click.option("--reflection/--no-reflection", envvar="KEYSVC_REFLECTION", default=True, show_default=True)
@click.option("--allow-detokenize/--no-allow-detokenize", envvar="KEYSVC_ALLOW_DETOKENIZE", default=False,
              show_default=True, help="Let Detokenize return PANs (off: PERMISSION_DENIED).")
def serve(listen, database_url, hsm_module, token_label, pin_file, workers, reflection, allow_detokenize) -> None:
    """Run the keysvc gRPC server."""
    from keysvc import service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = config_module.validate(config_module.Settings(
            listen=listen, database_url=database_url, hsm_module=hsm_module, token_label=token_label,
            pin=config_module.read_pin(pin_file), workers=workers, reflection=reflection,
            allow_detokenize=allow_detokenize,
        ))
        service.serve(settings)
    except config_module.ConfigurationError as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # hsm and store set-up errors carry safe messages
        from hsm import HsmError
        from keysvc.errors import KeysvcError

        if isinstance(error, (HsmError, KeysvcError)):
            raise click.ClickException(str(error)) from None
        raise


# -- keys -------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Create, import, rotate and retire merchant keys."""


@keys.command("create")
@click.argument("key_id")
@click.option("--algorithm", type=click.Choice(list(ALGORITHM_CHOICES)), default="hmac-sha256", show_default=True)
@click.pass_context
def keys_create(ctx, key_id, algorithm) -> None:
    """Create KEY_ID (MERCHANT_ID/NAME) with a version 1 generated in the HSM."""
    merchant_id, name = _split_key_id(key_id)
    response = _call(ctx, _client(ctx).keys.CreateKey, keys_pb2.CreateKeyRequest(
        merchant_id=merchant_id, name=name, purpose=keys_pb2.KEY_PURPOSE_SEAL,
        algorithm=ALGORITHM_CHOICES[algorithm]))
    _print(ctx, response.key, describe_key(response.key))


def read_secret(secret_file, secret_format: str) -> bytes:
    raw = secret_file.read()
    if secret_format == "text":
        # As banks hand them out: the UTF-8 bytes of the string (a final newline is not part of it).
        return raw.rstrip(b"\r\n")
    try:
        text = raw.decode("ascii").strip()
        return bytes.fromhex(text) if secret_format == "hex" else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):  # UnicodeDecodeError too; its text would quote the secret
        raise click.BadParameter(f"the secret is not {secret_format}", param_hint="--secret-file") from None


@keys.command("import")
@click.argument("key_id")
@click.option("--secret-file", type=click.File("rb"), required=True,
              help="File holding the secret the bank handed out ('-' for standard input).")
@click.option("--secret-format", type=click.Choice(["text", "hex", "base64"]), default="text", show_default=True,
              help="text: the secret string's UTF-8 bytes, as SIPS uses it.")
@click.option("--algorithm", type=click.Choice(list(ALGORITHM_CHOICES)), default="hmac-sha256", show_default=True)
@click.option("--version", type=int, default=0, help="The bank's version number (default: the next).")
@click.option("--make-primary", is_flag=True, help="Seal with this version from now on.")
@click.pass_context
def keys_import(ctx, key_id, secret_file, secret_format, algorithm, version, make_primary) -> None:
    """Import a bank-issued secret as a version of KEY_ID, wrapped for the HSM in transit.

    A secret shorter than the digest is zero-padded to the digest length before
    wrapping (HMAC gives the same tags). The printed check value is compared with
    one computed here from the secret.
    """
    merchant_id, name = _split_key_id(key_id)
    secret = read_secret(secret_file, secret_format)
    if not secret:
        raise click.BadParameter("the secret is empty", param_hint="--secret-file")
    algorithm_number = ALGORITHM_CHOICES[algorithm]
    digest_size, hash_function = DIGESTS[algorithm_number]
    expected_check_value = hmac.new(secret, bytes(16), hash_function).digest()[:3].hex().upper()
    client = _client(ctx)
    parameters = _call(ctx, client.keys.GetImportParameters, keys_pb2.GetImportParametersRequest())
    public_key = serialization.load_pem_public_key(parameters.public_key_pem.encode())
    wrapped = public_key.encrypt(
        secret.ljust(digest_size, b"\0"),
        padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
    )
    response = _call(ctx, client.keys.ImportKey, keys_pb2.ImportKeyRequest(
        merchant_id=merchant_id, name=name, purpose=keys_pb2.KEY_PURPOSE_SEAL, algorithm=algorithm_number,
        wrapped_secret=wrapped, import_key_id=parameters.import_key_id, version=version,
        make_primary=make_primary))
    if response.check_value != expected_check_value:
        click.echo(f"error: the HSM's check value {response.check_value} differs from the secret's "
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
    _print(ctx, response, f"new primary version {response.version}\n" + describe_key(response.key))


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
@click.argument("version", type=int)
@click.argument("state", type=click.Choice(list(STATE_CHOICES)))
@click.pass_context
def keys_set_state(ctx, key_id, version, state) -> None:
    """Set a version ENABLED, VERIFY-ONLY (retired) or DISABLED."""
    response = _call(ctx, _client(ctx).keys.SetKeyVersionState, keys_pb2.SetKeyVersionStateRequest(
        key_id=key_id, version=version, state=STATE_CHOICES[state]))
    _print(ctx, response.key, describe_key(response.key))


@keys.command("set-primary")
@click.argument("key_id")
@click.argument("version", type=int)
@click.pass_context
def keys_set_primary(ctx, key_id, version) -> None:
    """Seal with VERSION from now on."""
    response = _call(ctx, _client(ctx).keys.SetPrimaryVersion, keys_pb2.SetPrimaryVersionRequest(
        key_id=key_id, version=version))
    _print(ctx, response.key, describe_key(response.key))


@keys.command("destroy")
@click.argument("key_id")
@click.argument("version", type=int)
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


def _message(message: str | None, message_file) -> bytes:
    if (message is None) == (message_file is None):
        raise click.UsageError("give exactly one of --message and --message-file")
    return message.encode() if message is not None else message_file.read()


_message_options = [
    click.option("--message", default=None, help="The message, as UTF-8 text."),
    click.option("--message-file", type=click.File("rb"), default=None, help="The message bytes ('-': stdin)."),
    click.option("--encoding", type=click.Choice(list(ENCODING_CHOICES)), default="hex", show_default=True),
    click.option("--version", type=int, default=0, help="A given version (default: primary / all)."),
]


def _with_message_options(command):
    for option in reversed(_message_options):
        command = option(command)
    return command


@seal.command("compute")
@click.argument("key_id")
@_with_message_options
@click.pass_context
def seal_compute(ctx, key_id, message, message_file, encoding, version) -> None:
    """Print the seal of a message under KEY_ID."""
    response = _call(ctx, _client(ctx).seals.Seal, seals_pb2.SealRequest(
        key_id=key_id, message=_message(message, message_file), encoding=ENCODING_CHOICES[encoding],
        version=version))
    _print(ctx, response, response.seal)


@seal.command("verify")
@click.argument("key_id")
@click.argument("seal_text", metavar="SEAL")
@_with_message_options
@click.pass_context
def seal_verify(ctx, key_id, seal_text, message, message_file, encoding, version) -> None:
    """Check SEAL over a message; exit 0 when valid, 1 when not."""
    response = _call(ctx, _client(ctx).seals.Verify, seals_pb2.VerifyRequest(
        key_id=key_id, message=_message(message, message_file), seal=seal_text,
        encoding=ENCODING_CHOICES[encoding], version=version))
    _print(ctx, response, f"valid (version {response.version})" if response.valid else "INVALID")
    if not response.valid:
        ctx.exit(EXIT_INVALID_SEAL)



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


if __name__ == "__main__":
    sys.exit(main())
