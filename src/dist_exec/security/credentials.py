"""What a client (CLI, SDK, worker) presents to the master: a CA to verify it, a client
certificate, a bearer token; and where the CLI finds those of a local cluster.

``dist-exec up`` writes ``client.json`` (paths only, no secrets) into its data directory, and a
copy under the user's config directory keyed by the master address
(``~/.config/dist-exec/clusters/127.0.0.1_50051.json``), so ``dist-exec run`` finds the
credentials of the cluster it talks to without flags. The copy is removed when the cluster
stops, and ignored when the process that wrote it is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import platformdirs

from dist_exec.config import dial_address, split_address
from dist_exec.security.private_files import private_dir, write_private
from dist_exec.security.tls import check_pem, is_loopback

CLIENT_CONFIG = "client.json"
TOKEN_ENV = "DIST_EXEC_TOKEN"


class CredentialsError(Exception):
    """Credentials given on the command line or in a config file cannot be read."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """``ca`` turns TLS on (verifying the server); ``cert``/``key`` add a client certificate;
    ``token`` is sent as ``authorization: Bearer TOKEN`` on every call."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str = ""

    @classmethod
    def from_files(
        cls,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        token: str = "",
        token_file: Path | None = None,
    ) -> Credentials:
        if (cert is None) != (key is None):
            raise CredentialsError("--cert and --key go together")

        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as exc:
                raise CredentialsError(
                    f"cannot read {what} {path}: {exc.strerror or exc}"
                ) from None

        if not token and token_file is not None:
            token = (read(token_file, "token file") or b"").decode().strip()
        files = {"--ca": (ca, read(ca, "CA")), "--cert": (cert, read(cert, "certificate")),
                 "--key": (key, read(key, "key"))}  # fmt: skip
        given = {
            option: (option, path, data)
            for option, (path, data) in files.items()
            if path is not None and data is not None
        }
        try:
            check_pem(given.get("--ca"), given.get("--cert"), given.get("--key"))
        except ValueError as exc:
            raise CredentialsError(str(exc)) from None
        return cls(files["--ca"][1], files["--cert"][1], files["--key"][1], token)

    def check_target(self, address: str) -> None:
        """Refuse (CredentialsError) to send a token without TLS beyond this machine: anyone on
        the way would read it, and a server that is not the master (one that took its port
        while it was down) would collect it."""
        if self.token and self.ca is None and not is_loopback(dial_address(address)):
            raise CredentialsError(
                f"a token would go unencrypted to {address}: give the CA of its TLS "
                "certificate (--ca), or reach it on 127.0.0.1"
            )

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        self.check_target(address)
        interceptors = (
            [_TokenUnary(self.token), _TokenStream(self.token), _TokenBidi(self.token)]
            if self.token
            else None
        )
        if self.ca is None:
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        creds = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        return grpc.aio.secure_channel(address, creds, options=options, interceptors=interceptors)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add("authorization", f"Bearer {token}")
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _TokenUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_with_token(client_call_details, self.token), request)


class _TokenStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_with_token(client_call_details, self.token), request)


class _TokenBidi(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(_with_token(client_call_details, self.token), request_iterator)


# ---- local clusters ---------------------------------------------------------------------------


def _registry_dir() -> Path:
    return Path(platformdirs.user_config_dir("dist-exec")) / "clusters"


def _pointer(address: str) -> Path:
    """Where the local cluster serving ``address`` is registered (localhost is 127.0.0.1:
    the cluster's certificate names both)."""
    host, port = split_address(dial_address(address))
    if host.lower() == "localhost":
        host = "127.0.0.1"
    return _registry_dir() / f"{host.replace(':', '_')}_{port}.json"


def write_client_config(
    data_dir: Path, master: str, ca: Path, cert: Path, key: Path, token_file: Path
) -> Path:
    """Write ``client.json`` for the cluster in ``data_dir`` and register it under its address."""
    body = {
        "master": master,
        "ca": str(ca),
        "cert": str(cert),
        "key": str(key),
        "token_file": str(token_file),
        "pid": os.getpid(),
    }
    path = data_dir / CLIENT_CONFIG
    write_private(path, json.dumps(body, indent=2))
    with contextlib.suppress(OSError):  # no writable config dir: flags or --client-config
        pointer = _pointer(master)
        private_dir(pointer.parent)
        write_private(pointer, json.dumps(body, indent=2))
    return path


def remove_client_config(data_dir: Path, master: str) -> None:
    for path in (data_dir / CLIENT_CONFIG, _pointer(master)):
        with contextlib.suppress(OSError):
            path.unlink()


def load_client_config(path: Path) -> tuple[str, Credentials]:
    """(master address, credentials) from a ``client.json``."""
    try:
        body = json.loads(path.read_text())
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        return str(body["master"]), Credentials.from_files(
            Path(body["ca"]), Path(body["cert"]), Path(body["key"]),
            token_file=Path(body["token_file"]),
        )  # fmt: skip
    except KeyError as exc:
        raise CredentialsError(f"cannot use client config {path}: it has no {exc} field") from None
    except (OSError, ValueError, TypeError) as exc:
        raise CredentialsError(f"cannot use client config {path}: {exc}") from None


def discover(address: str) -> Credentials | None:
    """The credentials of the local cluster (``dist-exec up``) serving ``address``, if any."""
    try:
        pointer = _pointer(address)
        body = json.loads(pointer.read_text())
        pid = int(body["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # left behind by a cluster that did not stop cleanly
    except PermissionError:
        pass
    try:
        return load_client_config(pointer)[1]
    except CredentialsError:
        return None
