"""Bearer tokens: a JSON file on the master that holds only their SHA-256 hashes.

A token is 32 random bytes (``dxt_`` + URL-safe base64), so one SHA-256 is enough to make the
file useless to whoever reads it: nobody can find a token from its hash. ``dist-exec tokens add``
prints a new token once; the master re-reads the file when it changes (at most once a second),
so adding or revoking a token needs no restart. The file locks the master once it is there: a
master started without one is open (loopback only) until one appears, and from then on stays
locked, even if the file goes away (then no token is accepted until it is back).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dist_exec.security.identity import CLIENT_ROLES, WORKER_ROLES, Role

log = logging.getLogger(__name__)
TOKEN_PREFIX = "dxt_"
RELOAD_EVERY_S = 1.0


class TokenFileError(Exception):
    """The tokens file cannot be read or written; the message names it."""


@dataclass(frozen=True, slots=True)
class TokenEntry:
    name: str
    role: Role
    sha256: str
    created: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def read_tokens(path: Path) -> list[TokenEntry]:
    try:
        raw = json.loads(path.read_text())
        return [
            TokenEntry(str(t["name"]), Role(t["role"]), str(t["sha256"]), str(t.get("created", "")))
            for t in raw["tokens"]
        ]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenFileError(f"cannot read tokens file {path}: {exc}") from None


def _write_tokens(path: Path, entries: list[TokenEntry]) -> None:
    body = {
        "tokens": [
            {"name": e.name, "role": e.role.value, "sha256": e.sha256, "created": e.created}
            for e in entries
        ]
    }
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add_token(path: Path, name: str, role: Role) -> str:
    """Add an identity with a new token; returns the token (shown once, stored hashed)."""
    if role not in CLIENT_ROLES and role not in WORKER_ROLES:
        raise TokenFileError(f"a token cannot have the role {role.value}")
    if not name or len(name) > 128 or not name.isprintable():
        raise TokenFileError("a token's name must be 1-128 printable characters")
    entries = read_tokens(path)
    if any(e.name == name for e in entries):
        raise TokenFileError(f"{name!r} already has a token in {path}; revoke it first")
    token = new_token()
    created = datetime.now(UTC).isoformat(timespec="seconds")
    _write_tokens(path, [*entries, TokenEntry(name, role, hash_token(token), created)])
    return token


def revoke_token(path: Path, name: str) -> bool:
    entries = read_tokens(path)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        return False
    _write_tokens(path, kept)
    return True


class TokenStore:
    """The master's view of the tokens file, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_hash: dict[str, TokenEntry] = {}
        self._stamp: tuple[int, int] | None = None
        self._locked = False
        self._checked = time.monotonic()
        self.reload()

    @property
    def configured(self) -> bool:
        """A tokens file is there, or was: every caller must then authenticate."""
        self._refresh()
        return self._locked

    def reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._stamp is not None:
                log.error(
                    "tokens file %s is gone: no token is accepted until it is back (the master "
                    "stays locked; restart it to run without tokens)",
                    self.path,
                )
            self._by_hash, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._by_hash = {e.sha256: e for e in read_tokens(self.path)}
            self._stamp = stamp
            self._locked = True

    def lookup(self, token: str) -> TokenEntry | None:
        self._refresh()
        return self._by_hash.get(hash_token(token))

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked >= RELOAD_EVERY_S:
            self._checked = now
            # A broken file keeps the tokens last read (an editor may be rewriting it).
            with contextlib.suppress(TokenFileError):
                self.reload()
