"""The master's audit log: one JSON object per line, appended, never rewritten.

Each record says when, who (identity, role, how authenticated), from where (peer address), what
(action, jobs, task summary) and the decision (allowed or denied, and why). Values of
environment variables and HTTP headers whose names look secret, and passwords in URLs, are
replaced by "<redacted>".

Durability: the file is opened with O_APPEND and each record goes out in one write(2), so
records never interleave and a crash of the master loses none already written; the file is
fsynced at most once a second (and on close), so a power loss can lose the last second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
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
    """Append-only JSON lines. ``record`` never blocks on the disk for long (one write)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = open_private(path, os.O_WRONLY | os.O_APPEND)
        self._dirty = False
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
        line = json.dumps(entry, ensure_ascii=True, default=str) + "\n"
        os.write(self._fd, line.encode())
        self._dirty = True
        if self._syncer is None:
            with contextlib.suppress(RuntimeError):  # no running loop: synced on close
                self._syncer = asyncio.get_running_loop().create_task(self._sync_soon())

    async def _sync_soon(self) -> None:
        try:
            await asyncio.sleep(SYNC_EVERY_S)
            self._dirty = False
            await asyncio.to_thread(os.fsync, self._fd)
        finally:
            self._syncer = None

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.cancel()
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
