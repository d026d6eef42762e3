"""The call-token proofs between a master and a worker without TLS (pure logic)."""

from __future__ import annotations

import grpc
import pytest

from dist_exec.errors import Unauthenticated
from dist_exec.master.dispatcher import _Expected
from dist_exec.security.auth import Authenticator
from dist_exec.security.call_proof import ANSWER, PROOF, CallProof
from dist_exec.security.identity import Role

WORKER = CallProof("the-call-token", "instance-1")


def test_a_proof_and_its_answer_hold_both_ways() -> None:
    metadata, nonce = WORKER.request()
    assert [key for key, _ in metadata] == [PROOF]
    assert "the-call-token" not in metadata[0][1]
    assert WORKER.checked(metadata[0][1]) == nonce
    assert WORKER.answered(nonce, WORKER.answer(nonce))
    again, other = WORKER.request()
    assert other != nonce
    assert again != metadata


@pytest.mark.parametrize(
    "prover",
    [
        CallProof("another-token", "instance-1"),
        # The same token in a restarted worker (--call-token): a proof seen by whatever sat on
        # the old one's port is worth nothing there.
        CallProof("the-call-token", "instance-2"),
    ],
)
def test_a_proof_of_another_token_or_worker_process_fails(prover: CallProof) -> None:
    metadata, nonce = prover.request()
    assert WORKER.checked(metadata[0][1]) is None
    assert not WORKER.answered(nonce, prover.answer(nonce))


@pytest.mark.parametrize("value", ["", ".", "nonce", "nonce.", ".mac", "n.0" + "0" * 63, "é.é"])
def test_malformed_proofs_fail(value: str) -> None:
    assert WORKER.checked(value) is None


def test_an_answer_must_be_for_this_calls_nonce() -> None:
    _, nonce = WORKER.request()
    _, other = WORKER.request()
    assert not WORKER.answered(nonce, WORKER.answer(other))
    assert not WORKER.answered(nonce, ())
    assert not WORKER.answered(nonce, ((ANSWER, "0" * 64),))
    assert WORKER.answered(nonce, ((ANSWER, WORKER.answer(nonce)[0][1].encode()),))  # (bytes)


def test_a_worker_takes_the_masters_proof_or_its_token_by_hand() -> None:
    auth = Authenticator(None, tls=False, proof=WORKER)
    metadata, nonce = WORKER.request()
    identity = auth.by_metadata(metadata, "127.0.0.1:1")
    assert identity is not None
    assert (identity.role, identity.via) == (Role.MASTER, "proof")
    assert auth.answer(metadata) == WORKER.answer(nonce)
    by_hand = auth.by_metadata((("authorization", "Bearer the-call-token"),), "")
    assert by_hand is not None
    assert by_hand.role == Role.MASTER
    assert auth.answer((("authorization", "Bearer the-call-token"),)) == ()
    forged, _ = CallProof("another-token", "instance-1").request()
    with pytest.raises(Unauthenticated, match="its proof is not of the token it gave"):
        auth.by_metadata(forged, "")
    assert auth.answer(forged) == ()
    # A server with no call token of its own (a master) ignores the header.
    assert Authenticator(None, tls=False).answer(metadata) == ()


def test_only_a_peer_that_answered_wrongly_is_called_an_impostor() -> None:
    """A dead worker (nothing listens: UNAVAILABLE) is said as any unreachable worker is."""
    expected = _Expected(WORKER, "nonce", "127.0.0.1:1", 10.0)
    dead = expected.unproven((grpc.StatusCode.UNAVAILABLE, "Connection refused"))
    assert str(dead) == "worker 127.0.0.1:1: UNAVAILABLE: Connection refused"
    for said in [(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"), None]:
        assert "did not prove it is the worker" in str(expected.unproven(said))
