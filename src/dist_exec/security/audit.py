"""The master's audit log: one JSON object per line, appended, never rewritten.

Each record says when, who (identity, role, how authenticated), from where (peer address), what
(action, jobs, task summary) and the decision (allowed or denied, and why). Values of
environment variables and HTTP headers whose names look secret, and passwords in URLs, are
replaced by "<redacted>".

Durability: the file is opened with O_APPEND and each record goes out in one write(2), so
records never interleave and a crash of the master loses none already written; the file is
fsynced at most once a second (and on close), so a power loss can lose the last second.

Rotation: a record that would take the file past ``max_bytes`` first moves it to ``audit.log.1``
(``.1`` to ``.2`` and so on, the oldest beyond ``keep`` deleted), fsynced, and starts a new
one. ``max_bytes`` 0 never rotates (for logrotate's ``copytruncate``, which O_APPEND allows).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from yarl import URL

from dist_exec.security.identity import Identity
from dist_exec.security.private_files import open_private

SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSW|PWD|KEY|CREDENTIAL|AUTH|PRIVATE|COOKIE|SESSION|SIGNATURE", re.IGNORECASE
)
REDACTED = "<redacted>"
SYNC_EVERY_S = 1.0
MAX_FIELD_CHARS = 2000
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_KEEP = 10
log = logging.getLogger(__name__)


def redact(values: dict[str, str]) -> dict[str, str]:
    """A copy with the values of secret-looking names redacted."""
    return {k: (REDACTED if SECRET_NAME.search(k) else v) for k, v in values.items()}


def task_summary(task_type: str, payload: bytes) -> dict[str, Any]:
    """What a task runs, for the log: the command (or URL) and its env/headers redacted."""
    summary: dict[str, Any] = {"type": task_type}
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to be a task
        summary["payload_bytes"] = len(payload)
        return summary
    if not isinstance(body, dict):
        summary["payload_bytes"] = len(payload)
        return summary
    for key in ("command", "args", "shell", "working_dir", "url", "method"):
        if key in body:
            summary[key] = _cap(body[key])
    if isinstance(summary.get("url"), str):
        summary["url"] = _without_password(summary["url"])
    for key in ("env", "headers"):
        value = body.get(key)
        if isinstance(value, dict):
            summary[key] = {
                str(k): _cap(str(v))
                for k, v in redact({str(k): str(v) for k, v in value.items()}).items()
            }
    return summary


# Fields of a task's payload that hold data rather than say what runs (command, HTTP): a
# caller who may see a job but did not submit it (the read role) gets them redacted.
_MAPPING_FIELDS = ("env", "headers")


def redacted_payload(payload: bytes) -> bytes:
    """``payload`` with every value of its environment and headers, its stdin and its body
    redacted, and the password of its URL masked; what runs stays readable. A payload that
    is not a JSON object is redacted whole (empty)."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return b""
    if not isinstance(body, dict):
        return b""
    for key in _MAPPING_FIELDS:
        value = body.get(key)
        if value is not None:
            body[key] = dict.fromkeys(value, REDACTED) if isinstance(value, dict) else REDACTED
    base64_stdin = body.pop("stdin_base64", None)
    if "stdin" in body or base64_stdin is not None:
        body["stdin"] = REDACTED
    if "body" in body:
        body["body"] = REDACTED
    if isinstance(body.get("url"), str):
        body["url"] = _without_password(body["url"])
    return json.dumps(body).encode()


def _without_password(url: str) -> str:
    """A URL with the password it may carry replaced by *** (the user is kept: who, not how),
    and the values of its query parameters whose names look secret (``?access_token=``)
    replaced by *** too; also one that does not parse (a refused job is logged too)."""
    try:
        parsed = URL(url)
        if parsed.password is not None:
            parsed = parsed.with_password("***")
        if any(SECRET_NAME.search(name) for name in parsed.query):
            parsed = parsed.with_query(
                [(k, "***" if SECRET_NAME.search(k) else v) for k, v in parsed.query.items()]
            )
        return str(parsed) if parsed != URL(url) else url
    except (ValueError, TypeError):  # (UnicodeError too) not a URL the executor would take
        return _USERINFO_PASSWORD.sub(r"\1***@", url)


_USERINFO_PASSWORD = re.compile(r"(//[^/?#@:]*:)[^/?#@]*@")


def _cap(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return value[:MAX_FIELD_CHARS] + f"... ({len(value)} chars)"
    if isinstance(value, list):
        return [_cap(v) for v in value[:100]]
    return value


class AuditLog:
    """Append-only JSON lines. ``record`` never blocks on the disk for long (one write; a
    rotation, once per ``max_bytes``, also renames and fsyncs)."""

    def __init__(
        self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP
    ) -> None:
        if max_bytes < 0 or keep < 1:
            raise ValueError(f"audit log: max_bytes {max_bytes} < 0 or keep {keep} < 1")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = open_private(path, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()  # the fd, against a sync in a thread while it rotates
        self._syncer: asyncio.Task[None] | None = None

    def record(
        self,
        action: str,
        identity: Identity | None,
        decision: str,
        reason: str = "",
        peer: str = "",
        **details: Any,
    ) -> None:
        entry: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "action": action,
            "identity": identity.name if identity else None,
            "role": identity.role.value if identity else None,
            "auth": identity.via if identity else None,
            "peer": peer or (identity.peer if identity else ""),
            "decision": decision,
        }
        if reason:
            entry["reason"] = _cap(reason)
        entry.update(details)
        line = (json.dumps(entry, ensure_ascii=True, default=str) + "\n").encode()
        if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        os.write(self._fd, line)
        self._size += len(line)
        if self._syncer is None:
            with contextlib.suppress(RuntimeError):  # no running loop: synced on close
                self._syncer = asyncio.get_running_loop().create_task(self._sync_soon())

    def _rotate(self) -> None:
        """audit.log -> audit.log.1 -> ... -> audit.log.KEEP (deleted), then a new file. The
        old file is fsynced before it moves and the directory after, so a power loss leaves
        every record in one of the files."""
        with self._lock:
            self._size = 0  # (on a failure, tried again after as much again)
            try:
                os.fsync(self._fd)
                if self._open_file_is_the_log():  # (else a rotation failed after the renames)
                    # The oldest goes, and those a larger --audit-keep kept before.
                    oldest = itertools.count(self.keep)
                    while (gone := self._numbered(next(oldest))).exists() or gone.is_symlink():
                        os.unlink(gone)
                    for n in range(self.keep - 1, 0, -1):
                        with contextlib.suppress(FileNotFoundError):
                            os.rename(self._numbered(n), self._numbered(n + 1))
                    os.rename(self.path, self._numbered(1))
                fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
            except OSError as exc:  # records go on into the file open now, renamed or not
                log.error("cannot rotate the audit log %s: %s", self.path, exc)
                return
            old, self._fd = self._fd, fd
            os.close(old)
            with contextlib.suppress(OSError):
                _fsync_dir(self.path.parent)
        log.info("audit log rotated: the previous records are in %s", self._numbered(1))

    def _open_file_is_the_log(self) -> bool:
        here = os.fstat(self._fd)
        try:
            there = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def _numbered(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    async def _sync_soon(self) -> None:
        try:
            await asyncio.sleep(SYNC_EVERY_S)
            await asyncio.to_thread(self._sync)
        except OSError as exc:
            log.error("cannot fsync the audit log %s: %s", self.path, exc.strerror or exc)
        finally:
            self._syncer = None

    def _sync(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.cancel()
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
