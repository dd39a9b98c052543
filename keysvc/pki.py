"""A development PKI for mutual TLS, and caller identities taken from certificates.

`make run` creates, once, under the data folder: a CA, a server certificate for
localhost, one client certificate per role (identity `spiffe://keysvc.dev/<role>` as a
SAN URI) and a policy granting each its role. Production brings its own CA,
certificates and policy; only `identity_of` matters there.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keysvc.authz import ROLES

DEV_TRUST_DOMAIN = "keysvc.dev"
_VALIDITY = datetime.timedelta(days=825)


def dev_identity(role: str) -> str:
    return f"spiffe://{DEV_TRUST_DOMAIN}/{role}"


def identity_of(certificate_pem: bytes) -> str:
    """The caller's identity: the certificate's first SAN URI, else its common name."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = names.get_values_for_type(x509.UniformResourceIdentifier)
        if uris:
            return uris[0]
    except x509.ExtensionNotFound:
        pass
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common_names[0].value) if common_names else ""


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, public_key, issuer_name: x509.Name, issuer_key, *, ca: bool,
                 names: list[x509.GeneralName], usage: list, now: datetime.datetime,
                 validity: datetime.timedelta = _VALIDITY) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def issue_client_certificate(directory: Path, name: str, identity: str, *,
                             validity: datetime.timedelta = _VALIDITY) -> tuple[Path, Path]:
    """A client certificate (and key) for `identity`, issued by the directory's CA."""
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    ca_certificate = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    return _issue_client_certificate(directory, name, identity, ca_key, ca_certificate.subject, validity)


def _issue_client_certificate(directory: Path, name: str, identity: str, ca_key, ca_name: x509.Name,
                              validity: datetime.timedelta = _VALIDITY) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = _certificate(name, key.public_key(), ca_name, ca_key, ca=False,
                               names=[x509.UniformResourceIdentifier(identity)],
                               usage=[ExtendedKeyUsageOID.CLIENT_AUTH], now=now, validity=validity)
    key_path, certificate_path = directory / f"{name}.key", directory / f"{name}.crt"
    _write_private(key_path, _key_pem(key))
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate_path, key_path


def make_dev_pki(directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> bool:
    """Creates the development CA, server and client certificates and policy in
    `directory` unless its CA exists; returns whether it created them."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (directory / "ca.crt").exists():
        return False
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keysvc development CA")])
    ca = _certificate("keysvc development CA", ca_key.public_key(), ca_name, ca_key, ca=True, names=[], usage=[],
                      now=now)
    _write_private(directory / "ca.key", _key_pem(ca_key))
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = _certificate("keysvc server", server_key.public_key(), ca_name, ca_key, ca=False, names=names,
                          usage=[ExtendedKeyUsageOID.SERVER_AUTH], now=now)
    _write_private(directory / "server.key", _key_pem(server_key))
    (directory / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    grants = []
    for role in ROLES:
        _issue_client_certificate(directory, f"client-{role}", dev_identity(role), ca_key, ca_name)
        grants.append(f'[[grant]]\nidentity = "{dev_identity(role)}"\nroles = ["{role}"]\n')
    (directory / "policy.toml").write_text(
        "# Who may call what: one [[grant]] per identity (its certificate's SAN URI, else CN).\n"
        "# Optional: merchants = [...] and domains = [...] limit a grant to those merchants / token domains.\n\n"
        + "\n".join(grants)
    )
    # Last: its presence means the set is complete.
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return True
