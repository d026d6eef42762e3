"""A small certificate authority for a dist-exec deployment (``dist-exec certs``).

Every certificate carries its holder's name in the common name (and as a DNS subject
alternative name, so the master can check it is talking to the worker it registered) and its
role in the organizational unit: ``master``, ``worker``, or a client role (``admin``,
``submit``, ``read``). Keys are EC P-256; files are PEM, keys written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dist_exec.security.private_files import open_private

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CERT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
CERT_ROLES = ("master", "worker", "workers", "admin", "submit", "read", "client")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


class CertError(Exception):
    """A certificate could not be made or read; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class Issued:
    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    # At most 0644, even under umask 0: anyone may read a certificate, only its owner replace it.
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


_CA_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True,
    crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def init_ca(directory: Path, name: str = "dist-exec CA", days: int = 3650) -> Issued:
    """Create ``ca.crt`` and ``ca.key`` in ``directory``; refuses to overwrite an existing CA."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        raise CertError(f"a CA already exists in {directory}; remove it first to make a new one")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return Issued(cert_path, key_path)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise CertError(
            f"cannot read the CA in {directory} ({exc}); create it with 'dist-exec certs init'"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{directory / CA_KEY} is not an EC key made by 'dist-exec certs init'")
    return cert, key


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(
    ca_dir: Path,
    name: str,
    role: str,
    out_dir: Path,
    hosts: tuple[str, ...] = (),
    days: int = 825,
    not_before: datetime.datetime | None = None,
    replace: bool = False,
) -> Issued:
    """Issue ``NAME.crt``/``NAME.key`` for ``name`` with ``role``, signed by the CA in ``ca_dir``.

    The certificate names ``name`` and every host in ``hosts`` (plus localhost and the loopback
    addresses) as subject alternative names, and serves as both a server and a client
    certificate. ``days`` may be negative (an already expired certificate, for tests). Existing
    files of that name are replaced only with ``replace`` (a renewal), and never the CA's."""
    if role not in CERT_ROLES:
        raise CertError(f"unknown role {role!r}: use one of {', '.join(CERT_ROLES)}")
    if not CERT_NAME.fullmatch(name):
        raise CertError(
            f"invalid name {name!r}: use ASCII letters, digits, '-', '.' or '_' (at most 253, "
            "starting with a letter or digit)"
        )
    issued = Issued(out_dir / f"{name}.crt", out_dir / f"{name}.key")
    ca_files = {(ca_dir / CA_CERT).resolve(), (ca_dir / CA_KEY).resolve()}
    if {issued.cert.resolve(), issued.key.resolve()} & ca_files:
        raise CertError(f"{name!r} would replace the CA's own files in {ca_dir}: use another name")
    if not replace and (existing := [p for p in (issued.cert, issued.key) if p.exists()]):
        raise CertError(
            f"{existing[0]} exists; remove it, or give --replace to issue {name!r} again"
        )
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days)
    if days < 0:
        start, end = end - datetime.timedelta(days=1), end
    names: list[x509.GeneralName] = []
    for host in (name, *hosts, *DEFAULT_HOSTS):
        alt = _alt_name(host)
        if alt not in names:
            names.append(alt)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_key(issued.key, key)
    _write_cert(issued.cert, cert)
    return issued


def identity_of(pem: bytes) -> tuple[str, str]:
    """(name, role) of a PEM certificate: its common name and organizational unit."""
    cert = x509.load_pem_x509_certificate(pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    name = str(cn[0].value) if cn else ""
    role = str(ou[0].value) if ou else ""
    return name, role
