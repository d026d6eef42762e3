"""TLS material of a master, worker or client, and the gRPC credentials made from it.

A master or worker with TLS serves mutual TLS only: every connection must present a certificate
signed by the deployment's CA (gRPC's Python API cannot ask for an optional client certificate),
and what the caller may do then depends on the role in that certificate (or on a bearer token).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from dist_exec.config import split_address
from dist_exec.models import NodeEndpoint

INSECURE_FLAG = "--insecure-no-tls-i-know-this-exposes-remote-execution"


class TlsConfigError(Exception):
    """TLS files are missing, unreadable or incomplete."""


PemFile = tuple[str, Path, bytes]  # the option that named it, its path, its bytes


def check_pem(ca: PemFile | None, cert: PemFile | None, key: PemFile | None) -> None:
    """Refuse (ValueError: one line naming the option and the file) what gRPC would only
    fail on later, with lines of its own log and a misleading status: a CA or certificate
    that is not PEM, a key that is not an unencrypted PEM private key, or not the key of
    the certificate."""
    from cryptography import x509  # (here: only a process given TLS files needs it)
    from cryptography.hazmat.primitives import serialization

    def fail(file: PemFile, what: str, exc: Exception) -> ValueError:
        return ValueError(f"{file[0]} {file[1]} is not {what} ({exc})")

    def spki(public_key: Any) -> bytes:
        return bytes(
            public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca[2])
        except ValueError as exc:
            raise fail(ca, "a PEM certificate", exc) from None
    certificate = private = None
    if cert is not None:
        try:
            certificate = x509.load_pem_x509_certificate(cert[2])
        except ValueError as exc:
            raise fail(cert, "a PEM certificate", exc) from None
    if key is not None:
        try:
            private = serialization.load_pem_private_key(key[2], password=None)
        except (ValueError, TypeError) as exc:
            raise fail(key, "an unencrypted PEM private key", exc) from None
    if (
        cert is not None
        and key is not None
        and certificate is not None
        and private is not None
        and spki(certificate.public_key()) != spki(private.public_key())
    ):
        raise ValueError(f"{key[0]} {key[1]} is not the key of {cert[0]} {cert[1]}")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM bytes: this process's certificate and key, and the CA that signs its peers."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def load(cls, cert: Path | None, key: Path | None, ca: Path | None) -> TlsFiles | None:
        """None when none of the three is given; all three, or an error."""
        given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
        if not any(given.values()):
            return None
        missing = [flag for flag, path in given.items() if path is None]
        if missing:
            raise TlsConfigError(f"TLS needs --tls-cert, --tls-key and --tls-ca; missing {missing}")
        data = {}
        for flag, path in given.items():
            assert path is not None
            try:
                data[flag] = path.read_bytes()
            except OSError as exc:
                raise TlsConfigError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
        assert cert is not None
        assert key is not None
        assert ca is not None
        try:
            check_pem(
                ("--tls-ca", ca, data["--tls-ca"]),
                ("--tls-cert", cert, data["--tls-cert"]),
                ("--tls-key", key, data["--tls-key"]),
            )
        except ValueError as exc:
            raise TlsConfigError(str(exc)) from None
        return cls(data["--tls-cert"], data["--tls-key"], data["--tls-ca"])

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


def is_loopback(address: str) -> bool:
    """True when ``address`` (HOST:PORT) binds only this machine's loopback interface."""
    host, _ = split_address(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (every interface), a host name, or an interface address


def peer_cert_pem(context: grpc.aio.ServicerContext[object, object]) -> bytes | None:
    """The verified certificate the caller presented, if the connection is TLS."""
    return next(iter(context.auth_context().get("x509_pem_cert", ())), None)


class WorkerDialer:
    """The master's channels to workers. With TLS, the master presents its own certificate and
    expects the worker's to carry the name of the certificate that registered the endpoint (a
    DNS subject alternative name), so a worker cannot pass another's address off as its own."""

    def __init__(self, tls: TlsFiles | None, options: list[tuple[str, int]]) -> None:
        self.tls = tls
        self.options = options
        self._credentials = tls.channel_credentials() if tls is not None else None

    def channel(self, endpoint: NodeEndpoint) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(endpoint.address, options=self.options)
        options: list[tuple[str, str | int]] = [*self.options]
        if endpoint.tls_name:
            options.append(("grpc.ssl_target_name_override", endpoint.tls_name))
        return grpc.aio.secure_channel(endpoint.address, self._credentials, options=options)
