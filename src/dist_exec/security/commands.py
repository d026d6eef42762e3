"""``dist-exec certs ...`` and ``dist-exec tokens ...``: make a CA, certificates and tokens."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from dist_exec.config import default_data_dir
from dist_exec.security import certs
from dist_exec.security.identity import Role
from dist_exec.security.tokens import TokenFileError, add_token, read_tokens, revoke_token

TOKENS_FILE = "tokens.json"


def _fail(message: str) -> NoReturn:
    click.echo(f"dist-exec: {message}", err=True)
    sys.exit(1)


@click.group(name="certs")
def certs_group() -> None:
    """A small CA and the certificates a deployment needs (mutual TLS).

    \b
      dist-exec certs init --dir pki
      dist-exec certs issue master --role master --dir pki --host master.example
      dist-exec certs issue node-1 --role worker --dir pki --host 10.0.0.5
      dist-exec certs issue alice --role submit --dir pki
    """


@certs_group.command(name="init")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True)
def certs_init(directory: Path, days: int) -> None:
    """Create a CA (ca.crt, ca.key) in --dir."""
    try:
        issued = certs.init_ca(directory, days=days)
    except certs.CertError as exc:
        _fail(str(exc))
    click.echo(f"CA certificate: {issued.cert}\nCA key (keep it secret): {issued.key}")


@certs_group.command(name="issue")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(certs.CERT_ROLES),
    required=True,
    help="master, worker (NAME is its worker id), workers (a pool sharing one certificate, "
    "e.g. a Kubernetes Deployment: worker ids NAME-*), a client role (admin, submit, read), "
    "or client (transport only: the identity comes from a token).",
)
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where NAME.crt and NAME.key go (default: --dir).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="A DNS name or IP address the holder is reached at (repeatable; servers).",
)
@click.option("--days", type=click.IntRange(1, 36500), default=825, show_default=True)
@click.option(
    "--replace", is_flag=True, help="Replace an existing NAME.crt and NAME.key (a renewal)."
)
def certs_issue(
    name: str,
    role: str,
    directory: Path,
    out: Path | None,
    hosts: tuple[str, ...],
    days: int,
    replace: bool,
) -> None:
    """Issue a certificate for NAME, signed by the CA in --dir."""
    try:
        issued = certs.issue(directory, name, role, out or directory, hosts, days, replace=replace)
    except certs.CertError as exc:
        _fail(str(exc))
    click.echo(f"certificate: {issued.cert}\nkey: {issued.key}")


def _tokens_file(data_dir: Path | None, file: Path | None) -> Path:
    return file or (data_dir or default_data_dir()) / TOKENS_FILE


_tokens_options = [
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="DIST_EXEC_DATA_DIR",
        default=None,
        help="The master's data directory (its tokens file is DATA_DIR/tokens.json).",
    ),
    click.option(
        "--file", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="The tokens file itself (the master's --tokens-file).",
    ),
]  # fmt: skip


def tokens_options(fn: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(_tokens_options):
        fn = option(fn)
    return fn


@click.group(name="tokens")
def tokens_group() -> None:
    """Bearer tokens of the master (stored as SHA-256 hashes; shown once)."""


@tokens_group.command(name="add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["admin", "submit", "read", "worker", "workers"]),
    required=True,
    help="submit: run jobs, see and cancel its own; read: see all jobs; admin: everything; "
    "worker: register as the worker NAME; workers: a pool, register as NAME or NAME-*.",
)
@tokens_options
def tokens_add(name: str, role: str, data_dir: Path | None, file: Path | None) -> None:
    """Create a token for NAME and print it (once)."""
    try:
        token = add_token(_tokens_file(data_dir, file), name, Role(role))
    except TokenFileError as exc:
        _fail(str(exc))
    click.echo(token)


@tokens_group.command(name="list")
@tokens_options
def tokens_list(data_dir: Path | None, file: Path | None) -> None:
    """The identities that have a token (not the tokens: only their hashes are kept)."""
    try:
        entries = read_tokens(_tokens_file(data_dir, file))
    except TokenFileError as exc:
        _fail(str(exc))
    for entry in entries:
        click.echo(f"{entry.name:<24}  {entry.role.value:<7}  {entry.created}")


@tokens_group.command(name="revoke")
@click.argument("name")
@tokens_options
def tokens_revoke(name: str, data_dir: Path | None, file: Path | None) -> None:
    """Remove NAME's token; the master stops accepting it within a second."""
    try:
        removed = revoke_token(_tokens_file(data_dir, file), name)
    except TokenFileError as exc:
        _fail(str(exc))
    if not removed:
        _fail(f"{name!r} has no token")
    click.echo(f"revoked the token of {name}")
