"""Throwaway TLS material for tests: a CA, a server and a client certificate.

Everything is generated in-process with ``cryptography`` (EC P-256 keys: fast to make)
and lives for a day, so nothing real is ever trusted and nothing is kept.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LIFETIME = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the CA that signed both leaves, and each leaf's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True, slots=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def make_tls_files(directory: Path, *, host: str = "127.0.0.1") -> TlsFiles:
    """Write a fresh CA, a server certificate for ``host`` (and ``localhost``) and a
    client certificate into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _issue("forge-test-ca", None, ca=True)
    server = _issue(
        "forge-test-server", ca, sans=_sans(host), usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    client = _issue("forge-test-client", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = TlsFiles(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    _write_cert(files.ca_cert, ca)
    _write_cert(files.server_cert, server)
    _write_key(files.server_key, server)
    _write_cert(files.client_cert, client)
    _write_key(files.client_key, client)
    return files


def _sans(host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    return names


def _issue(
    common_name: str,
    issuer: _Issued | None,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> _Issued:
    """A certificate for ``common_name`` signed by ``issuer`` (self-signed when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A little slack backwards: the server's clock is this machine's, but be safe.
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _LIFETIME)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    signer = issuer.key if issuer else key
    return _Issued(builder.sign(signer, hashes.SHA256()), key)


def _write_cert(path: Path, issued: _Issued) -> None:
    path.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, issued: _Issued) -> None:
    pem = issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)
