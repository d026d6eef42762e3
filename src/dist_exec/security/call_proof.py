"""A worker's call token proved both ways, never sent (links without TLS).

A worker without TLS serves only the master it gave its call token to when it registered. Sent
as a bearer token, that token, and then every job's payload, would go to whatever listens at
the worker's address: once the worker has died, another local user can bind its port before
the master notices (heartbeats take seconds to miss), and would be sent the token, the jobs'
environment and stdin, and could answer with forged results. So, with a worker that registered
with ``call_proof``:

- the master sends ``x-dist-exec-proof: NONCE.MAC``, MAC = HMAC-SHA256 of the token over
  ("master", the worker's instance, NONCE), with a fresh random NONCE per call;
- the worker checks it, and answers in its initial metadata with
  ``x-dist-exec-worker-proof: MAC`` over ("worker", its instance, NONCE);
- the master sends nothing of a job on a call, and believes nothing it reads from it, before
  that answer has come back and matched.

The instance is new at each start of a worker process (it registers with it), so a proof seen
by an impostor on a dead worker's port is worth nothing anywhere else, even against a worker
restarted with the same ``--call-token``. On a link without TLS the proofs stop impostors, not
eavesdroppers: a process that can read the traffic (root, or a network in between with
``--insecure-...``) sees the jobs anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PROOF = "x-dist-exec-proof"  # master -> worker
ANSWER = "x-dist-exec-worker-proof"  # worker -> master, in its initial metadata
NONCE_BYTES = 16
Metadata = tuple[tuple[str, str], ...]


def header(metadata: Iterable[tuple[str, Any]] | None, key: str) -> str | None:
    value = next((v for k, v in metadata or () if k == key), None)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@dataclass(frozen=True)
class CallProof:
    """The token a worker gave its master, and the worker process's instance."""

    token: str
    instance: str

    def _mac(self, side: str, nonce: str) -> str:
        message = f"{side}\0{self.instance}\0{nonce}".encode()
        return hmac.new(self.token.encode(), message, hashlib.sha256).hexdigest()

    def request(self) -> tuple[Metadata, str]:
        """The master's side: metadata for one call, and its nonce (for ``answered``)."""
        nonce = secrets.token_hex(NONCE_BYTES)
        return ((PROOF, f"{nonce}.{self._mac('master', nonce)}"),), nonce

    def answered(self, nonce: str, initial_metadata: Iterable[tuple[str, Any]] | None) -> bool:
        """The master's side: whether the worker's answer to the call with ``nonce`` is right."""
        answer = header(initial_metadata, ANSWER)
        return answer is not None and hmac.compare_digest(
            answer.encode(), self._mac("worker", nonce).encode()
        )

    def checked(self, proof: str) -> str | None:
        """The worker's side: the nonce of a master's proof that is right, else None."""
        nonce, _, mac = proof.partition(".")
        if not nonce or not hmac.compare_digest(mac.encode(), self._mac("master", nonce).encode()):
            return None
        return nonce

    def answer(self, nonce: str) -> Metadata:
        """The worker's side: its initial metadata for a call whose proof was right."""
        return ((ANSWER, self._mac("worker", nonce)),)
