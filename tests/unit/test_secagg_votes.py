"""The acceptance vote's rule (fibemrss.he.secagg.votes) with real signatures from the federation's
PKI tool, the aggregator played as an attacker relaying the votes: it cannot turn a refusal into an
accept, sign a vote for a hospital, replay a vote of another round or candidate, or hide a vote or
a tally; each lie ends in a refused round, never in an accepted one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fibemrss.he.mask_signatures import MaskKeySigner, MaskKeyVerifier
from fibemrss.he.secagg.protocol import RoundContext, Signatures, Signed
from fibemrss.he.secagg.votes import (
    candidate_digest,
    decide,
    tally_statement,
    valid_votes,
    vote_payload,
    vote_set_digest,
    vote_statement,
)
from fibemrss.tools.certs import init_pki

NAMES = ("a", "b", "c", "d")
U3 = frozenset(NAMES)
CTX = RoundContext(b"f" * 16, "t", "sha256:" + "0" * 64, 2)
CANDIDATE = candidate_digest(b"the round's model")

Relayed = dict[str, tuple[bytes, Signed]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    init_pki(folder, [f"agent@{n}" for n in NAMES] + ["aggregator@central"])
    return folder


def signatures(pki: Path, identity: str) -> Signatures:
    signer = MaskKeySigner((pki / f"{identity}.crt").read_bytes(), (pki / f"{identity}.key").read_bytes())
    return Signatures(signer, MaskKeyVerifier((pki / "ca.crt").read_bytes()))


def cast(pki: Path, refusing: frozenset[str] = frozenset(), ctx: RoundContext = CTX) -> Relayed:
    votes = {}
    for n in NAMES:
        payload = vote_payload(CANDIDATE, n not in refusing)
        votes[n] = (payload, signatures(pki, f"agent@{n}").sign(vote_statement(ctx, U3, n, payload)))
    return votes


def tally(pki: Path, votes: Relayed, names: tuple[str, ...] = NAMES) -> Relayed:
    checker = signatures(pki, "agent@a")
    shown = vote_set_digest(valid_votes(CTX, U3, votes, checker))
    return {n: (shown, signatures(pki, f"agent@{n}").sign(tally_statement(CTX, U3, n, shown))) for n in names}


def test_every_survivor_accepting_and_tallying_the_same_votes_accepts(pki: Path) -> None:
    votes = cast(pki)
    outcome = decide(CTX, U3, CANDIDATE, votes, tally(pki, votes), signatures(pki, "agent@a"))
    assert outcome.accepted, outcome.describe()


def test_a_refusal_refuses_the_round_naming_the_hospital(pki: Path) -> None:
    votes = cast(pki, frozenset({"b"}))
    outcome = decide(CTX, U3, CANDIDATE, votes, tally(pki, votes), signatures(pki, "agent@a"))
    assert not outcome.accepted and outcome.refused_by == ("b",)


def test_no_lie_of_the_relay_turns_a_refusal_or_a_missing_vote_into_an_accept(pki: Path) -> None:
    checker = signatures(pki, "agent@a")
    honest = cast(pki, frozenset({"b"}))
    accepting = vote_payload(CANDIDATE, True)
    lies: dict[str, Relayed] = {
        # b's refusal with its bit flipped, under b's own signature
        "bit flipped": {**honest, "b": (accepting, honest["b"][1])},
        # an accept for b signed by the aggregator's own certificate
        "signed by the aggregator": {
            **honest,
            "b": (
                accepting,
                signatures(pki, "aggregator@central").sign(vote_statement(CTX, U3, "b", accepting)),
            ),
        },
        # an accept for b signed with a's key and certificate
        "signed by another hospital": {
            **honest,
            "b": (accepting, signatures(pki, "agent@a").sign(vote_statement(CTX, U3, "b", accepting))),
        },
        # b's accept of round 1 replayed into round 2
        "replayed from another round": {
            **honest,
            "b": cast(pki, ctx=dataclasses.replace(CTX, round=1))["b"],
        },
        # b's refusal dropped
        "dropped": {n: v for n, v in honest.items() if n != "b"},
    }
    for lie, votes in lies.items():
        forged_tallies = tally(pki, votes)
        outcome = decide(CTX, U3, CANDIDATE, votes, forged_tallies, checker)
        assert not outcome.accepted, lie
        assert outcome.missing == ("b",) or outcome.refused_by == ("b",), (lie, outcome)
    # A vote for another candidate (b computed another model) is a refusal, named.
    other = vote_payload(candidate_digest(b"another model"), True)
    votes = {**cast(pki), "b": (other, signatures(pki, "agent@b").sign(vote_statement(CTX, U3, "b", other)))}
    assert decide(CTX, U3, CANDIDATE, votes, tally(pki, votes), checker).refused_by == ("b",)


def test_a_vote_set_not_tallied_alike_by_every_survivor_is_refused(pki: Path) -> None:
    checker = signatures(pki, "agent@a")
    votes = cast(pki)
    tallies = tally(pki, votes)
    # c was shown the votes without d's: it tallied that set.
    partial = {n: v for n, v in votes.items() if n != "d"}
    tallies_c = tally(pki, partial, ("c",))
    for lie, relayed in {
        "a tally of another vote set": {**tallies, **tallies_c},
        "a tally withheld": {n: t for n, t in tallies.items() if n != "c"},
        "a tally forged by the aggregator": {
            **tallies,
            "c": (
                tallies["a"][0],
                signatures(pki, "aggregator@central").sign(tally_statement(CTX, U3, "c", tallies["a"][0])),
            ),
        },
    }.items():
        outcome = decide(CTX, U3, CANDIDATE, votes, relayed, checker)
        assert not outcome.accepted and "tallied by c" in outcome.tally_problem, (lie, outcome)
