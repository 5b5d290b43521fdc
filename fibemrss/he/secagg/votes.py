"""The acceptance vote on a round's model, relayed by an aggregator that may lie (pure).

After a round's verified sum every hospital computes the same candidate global model; each
survivor of the round (U3: the hospitals whose uploads are in the sum) scores it on its own
validation rows against the model it serves and posts one signed vote. Two stages, both relayed
by the aggregator on the closed round, like the survivor set and the reveals before them:

1. votes: each survivor signs (round context, U3, the candidate's SHA-256 digest, one bit:
   accept or refuse). The vote reveals that one bit of the hospital's validation figures and
   nothing else (the figures stay in its own status); the digest only names the candidate every
   hospital already computes from the decrypted sum.
2. tally: each voter signs the digest of the vote set as the aggregator showed it (every vote's
   sender and payload), so an aggregator that shows different vote sets to different hospitals
   is caught: their tallies disagree.

The acceptance rule (`decide`): a vote from **every** survivor of the round, each signed by its
site, each an accept of the very candidate this hospital computed, and every survivor's tally of
that same vote set. "At least the threshold" of votes is not enough against this aggregator: it
could drop an honest refusal, and the others, who cannot know it was cast, would publish while the
refuser does not. Requiring every survivor turns each lie into a refusal: a dropped vote is a
missing vote, a forged or replayed one fails its signature (bound to round, U3 and candidate),
different vote sets give different tallies; every case ends with no publication (fail safe). The
rule needs nothing new in the study (U3 holds at least `min_contributors`, so at least the
threshold always votes). What it cannot stop: an aggregator that withholds the last tallies from
some hospitals of a round every survivor accepted; those few stay a round behind (see
docs/security.md, "Poisoning").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fibemrss.he.secagg.protocol import RoundContext, Signatures, Signed, names_digest

DIGEST_BYTES = 32
VOTE_BYTES = DIGEST_BYTES + 1
ACCEPT, REFUSE = b"\x01", b"\x00"
# The candidate digest of a hospital that has no candidate (its own check refused the sum).
NO_CANDIDATE = bytes(DIGEST_BYTES)


def candidate_digest(params_bytes: bytes) -> bytes:
    """The digest every hospital computes of the same candidate model (its float64 bytes)."""
    return hashlib.sha256(b"fibemrss-candidate-v1" + params_bytes).digest()


def vote_payload(candidate: bytes, accept: bool) -> bytes:
    if len(candidate) != DIGEST_BYTES:
        raise ValueError("a candidate digest is 32 bytes")
    return candidate + (ACCEPT if accept else REFUSE)


def vote_statement(ctx: RoundContext, survivors: Iterable[str], hospital: str, payload: bytes) -> bytes:
    return ctx.digest(b"fibemrss-secagg-vote-v1", names_digest(survivors), hospital.encode(), payload)


def vote_set_digest(votes: Mapping[str, bytes]) -> bytes:
    """The vote set as shown: every sender with its payload, in name order."""
    h = hashlib.sha256(b"fibemrss-secagg-vote-set-v1")
    for name in sorted(votes):
        for part in (name.encode(), votes[name]):
            h.update(len(part).to_bytes(4, "little") + part)
    return h.digest()


def tally_statement(ctx: RoundContext, survivors: Iterable[str], hospital: str, vote_set: bytes) -> bytes:
    return ctx.digest(b"fibemrss-secagg-tally-v1", names_digest(survivors), hospital.encode(), vote_set)


@dataclass(frozen=True)
class VoteOutcome:
    """What this hospital concludes of a round's votes: `accepted`, else why not."""

    accepted: bool
    refused_by: tuple[str, ...] = ()  # survivors whose signed vote refuses (or names another candidate)
    missing: tuple[str, ...] = ()  # survivors without a valid signed vote as relayed
    tally_problem: str = ""  # the vote set is not the one every survivor tallied

    def describe(self) -> str:
        if self.accepted:
            return "every survivor accepted"
        parts = []
        if self.refused_by:
            parts.append(f"refused by {', '.join(self.refused_by)}")
        if self.missing:
            parts.append(f"no valid vote of {', '.join(self.missing)} as relayed by the aggregator")
        if self.tally_problem:
            parts.append(self.tally_problem)
        return "; ".join(parts)


def valid_votes(
    ctx: RoundContext,
    survivors: frozenset[str],
    votes: Mapping[str, tuple[bytes, Signed]],
    signatures: Signatures,
) -> dict[str, bytes]:
    """The payloads of the survivors' votes whose signature holds (others are as if missing)."""
    return {
        name: payload
        for name, (payload, signed) in votes.items()
        if name in survivors
        and len(payload) == VOTE_BYTES
        and signatures.valid(name, vote_statement(ctx, survivors, name, payload), signed)
    }


def count_votes(candidate: bytes, survivors: frozenset[str], valid: Mapping[str, bytes]) -> VoteOutcome:
    """The votes alone: every survivor's valid vote must accept `candidate`."""
    missing = tuple(sorted(survivors - set(valid)))
    refused = tuple(
        sorted(n for n, p in valid.items() if p[DIGEST_BYTES:] != ACCEPT or p[:DIGEST_BYTES] != candidate)
    )
    return VoteOutcome(not missing and not refused, refused, missing)


def decide(
    ctx: RoundContext,
    survivors: frozenset[str],
    candidate: bytes,
    votes: Mapping[str, tuple[bytes, Signed]],
    tallies: Mapping[str, tuple[bytes, Signed]],
    signatures: Signatures,
) -> VoteOutcome:
    """The round's outcome at this hospital: accepted only when every survivor's signed vote
    accepts `candidate` and every survivor signed the tally of this very vote set."""
    valid = valid_votes(ctx, survivors, votes, signatures)
    outcome = count_votes(candidate, survivors, valid)
    if not outcome.accepted:
        return outcome
    shown = vote_set_digest(valid)
    disagreeing = sorted(
        name
        for name in survivors
        if name not in tallies
        or tallies[name][0] != shown
        or not signatures.valid(name, tally_statement(ctx, survivors, name, shown), tallies[name][1])
    )
    if disagreeing:
        return VoteOutcome(
            False,
            tally_problem=(
                f"the vote set shown here is not the one tallied by {', '.join(disagreeing)} "
                "(the aggregator showed different vote sets, or withheld a tally)"
            ),
        )
    return outcome
