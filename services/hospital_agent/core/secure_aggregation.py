"""The agent's secure aggregation over ports (no gRPC, no database): drives this hospital's
part of each round (fibemrss.he.secagg.SecAggMember) through the aggregator, and checks and
unmasks every round's sum before it is used.

Per round: advertise (signed keys and a seed commitment) early, before training; once the cohort
is fixed, check it and send the encrypted shares; once the share stage closes, upload exactly
once (masked, encrypted, signed over the chunk digests); then sign the survivor set and reveal.
The round's keys and seeds live in this process only: an agent restarted mid-round sits the rest
of that round out (its peers recover from its shares) and never uploads to it again.

Every sum is checked before use (`verified_sum`): the signed cohort, the signed survivor set
with at least the threshold of signatures, the signed reveals, and the served ciphertext against
the sum of the signed uploads of the survivors, recomputed here for every chunk up to
SAMPLE_CHUNKS, else for SAMPLE_CHUNKS chunks this hospital picks at random. A forged, partial or
replayed sum is refused naming the aggregator.

After the sum, the acceptance vote (`vote`, with the study's validation gate): each survivor posts
its signed vote on the candidate the sum makes and its tally of the vote set as shown, relayed on
the closed round; the round is published by every hospital or by none (fibemrss.he.secagg.votes).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fibemrss.domain.errors import FailedPrecondition
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.he.chunk_format import ChunkKind, unpack_header
from fibemrss.he.codec import slot_count
from fibemrss.he.errors import HeError
from fibemrss.he.mask_signatures import MaskKeySigner, MaskKeyVerifier
from fibemrss.he.secagg.protocol import (
    ProtocolRefused,
    RoundContext,
    RoundTranscript,
    SecAggMember,
    Signatures,
    Signed,
    chunk_digests_statement,
    cohort_digest,
    unmask_correction,
)
from fibemrss.he.secagg.votes import (
    VoteOutcome,
    count_votes,
    decide,
    tally_statement,
    valid_votes,
    vote_payload,
    vote_set_digest,
    vote_statement,
)
from services.hospital_agent.core.aggregate_bounds import AggregateRejected
from services.hospital_agent.core.ports import AggregatorPort, CodecPort, PeerRefused, RoundView, StageView

log = logging.getLogger(__name__)

# Chunks of a sum recomputed from the signed uploads: every chunk of a model up to this many
# (the built-in models: one or two), else this many chosen at random by each hospital. A sum
# forged in f of C chunks escapes one hospital with probability C(C-f, s) / C(C, s).
SAMPLE_CHUNKS = 8


@dataclass(frozen=True)
class VerifiedSum:
    chunks: list[bytes]
    correction: np.ndarray
    survivors: frozenset[str]  # U3, checked against its signatures: the round's voters


class SecureAggregation:
    def __init__(
        self,
        hospital: str,
        task: TaskSpec,
        study_hash: str,
        aggregator: AggregatorPort,
        codec: CodecPort,
        signer: MaskKeySigner | None = None,
        verifier: MaskKeyVerifier | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        """`warn` is told what the operator should know that does not stop the round (a peer's
        shares that did not open)."""
        self._warn = warn or (lambda message: log.warning(message))
        self._hospital = hospital
        self._task = task
        self._study_hash = study_hash
        self._aggregator = aggregator
        self._codec = codec
        self._sig = Signatures(signer, verifier)
        self._roster = frozenset(task.sites) if task.sites else None
        # The threshold's roster: the study's sites, else its quorum (both in the approved document).
        self._roster_size = len(task.sites) if task.sites else max(task.quorum, task.min_contributors)
        self._members: dict[tuple[bytes, int], SecAggMember] = {}
        self._random = random.SystemRandom()
        # The vote set this hospital tallied per (federation, round): it never signs a second.
        self._tallied: dict[tuple[bytes, int], bytes] = {}
        self._signed_votes: dict[tuple[bytes, int, str], tuple[bytes, Signed]] = {}

    def check_federation(self, info: RoundView) -> None:
        """The task spec, not the aggregator, decides whether uploads are masked."""
        if not info.pairwise_masking:
            raise PeerRefused(
                f"task {self._task.name} requires secure aggregation, but the aggregator's federation "
                "does not use it; refusing to upload an unmasked update"
            )

    def _ctx(self, federation_id: bytes, round_number: int) -> RoundContext:
        return RoundContext(federation_id, self._task.name, self._study_hash, round_number)

    def member(self, info: RoundView) -> SecAggMember | None:
        return self._members.get((info.federation_id, info.round))

    # -- taking part -----------------------------------------------------------------------------
    def advertise(self, info: RoundView) -> bool:
        """Publishes this process's advertisement for the round, early; False when the cohort was
        fixed without it (or with an advertisement of an earlier process): sit the round out."""
        self.check_federation(info)
        key = (info.federation_id, info.round)
        if info.cohort is not None:
            return self._hospital in info.cohort and key in self._members
        self._members = {k: m for k, m in self._members.items() if k[1] >= info.round - 1}
        member = self._members.setdefault(
            key,
            SecAggMember(
                self._hospital,
                self._ctx(info.federation_id, info.round),
                self._sig,
                self._roster,
                self._task.min_contributors,
                self._codec.params.plain_modulus,
                self._roster_size,
            ),
        )
        try:
            self._aggregator.publish_mask_key(info.round, member.signed_advert())
        except PeerRefused:
            now = self._aggregator.current_round(None)
            if now.round == info.round and now.cohort is not None and self._hospital not in now.cohort:
                log.info("the cohort was fixed without this hospital", extra={"round": info.round})
                return False
            raise
        return True

    def share(self, info: RoundView, stop: threading.Event) -> SecAggMember | None:
        """Checks the cohort and sends this hospital's encrypted shares; the member once the share
        stage closed with it, or None when it must sit the round out."""
        member = self.member(info)
        if member is None:
            return None
        view = self._wait_cohort(info, stop)
        if view is None or view.cohort is None or self._hospital not in view.cohort:
            return None
        if member.u2 is None:
            try:
                member.accept_cohort(self._aggregator.mask_keys(info.round))
                if not self._post(info, "shares", sorted(member.share_boxes().items()), b"", Signed()):
                    return None
            except ProtocolRefused as refused:
                raise PeerRefused(f"round {info.round}: refusing to take part: {refused}") from None
            stage = self._wait_stage(info, "shares", stop)
            if stage is None:
                return None
            try:
                member.accept_shares(stage.members, {s: m[0] for s, m in stage.messages.items()})
            except ProtocolRefused as refused:
                raise PeerRefused(f"round {info.round}: refusing to upload: {refused}") from None
            for peer, problem in sorted(member.refused_boxes.items()):
                self._warn(f"{problem}; this hospital holds no share of {peer}")
        if self._hospital not in (member.u2 or frozenset()):
            return None
        return member

    def upload(
        self,
        info: RoundView,
        kind: ChunkKind,
        n_values: int,
        encrypt: Callable[[np.ndarray], list[bytes]],
        epsilon: float,
        stop: threading.Event,
    ) -> bool:
        """Masks, encrypts, signs and uploads once, then signs the survivor set and reveals.
        False when this hospital takes no part in the round."""
        member = self.share(info, stop)
        if member is None:
            return False
        shown = self._aggregator.round_stage(info.round, "uploads", wait=False)
        if shown.closed and self._hospital not in shown.members:
            log.warning(
                "a stage closed without this hospital", extra={"round": info.round, "stage": "uploads"}
            )
            return False
        if member.upload is None:
            # Made once: a retry after a lost answer sends these very bytes again, never a second
            # update under the same masks (their difference would unmask both).
            chunks = encrypt(member.mask(slot_count(kind, n_values, self._codec.params)))
            member.upload = (chunks, member.sign_upload(chunks), epsilon)
        if not shown.closed:  # closed with it: uploaded before a lost answer, nothing to send again
            chunks, signed, sent_epsilon = member.upload
            self._aggregator.submit(info.round, chunks, 1, sent_epsilon, signed.signature, signed.certificate)
        self.finish(info, stop)
        return True

    def resend(self, info: RoundView, stop: threading.Event) -> bool:
        """True when this process already made its upload to the round (a step failed after it):
        the same bytes go again and the round is finished, with no new training."""
        member = self.member(info)
        if member is None or member.upload is None:
            return False
        self.upload(info, ChunkKind.WEIGHTED_UPDATE, 0, lambda mask: [], 0.0, stop)
        return True

    def finish(self, info: RoundView, stop: threading.Event) -> None:
        """After the upload: sign the survivor set as shown, then reveal once enough agree. Run
        again after a failed step (UNAVAILABLE while waiting, an answer lost), it posts the same
        signed messages where they are missing and goes on past those the stages already hold."""
        member = self.member(info)
        if member is None:
            return
        uploads = self._wait_stage(info, "uploads", stop)
        if uploads is None or self._hospital not in uploads.members:
            return
        try:
            if not self._post(info, "survivors", [], b"", member.sign_survivors(uploads.members)):
                return
            survivors = self._wait_stage(info, "survivors", stop)
            if survivors is None or self._hospital not in survivors.members:
                return
            payload, signed = member.reveal(uploads.members, {s: m[1] for s, m in survivors.messages.items()})
        except ProtocolRefused as refused:
            raise PeerRefused(f"round {info.round}: {refused}") from None
        self._post(info, "reveals", [], payload, signed)

    def _post(
        self, info: RoundView, stage: str, envelopes: list[tuple[str, bytes]], payload: bytes, signed: Signed
    ) -> bool:
        """Posts this hospital's one message of a stage (made once: the same bytes on a retry)
        unless the stage closed already. Closed holding it (posted before a lost answer or a step
        that failed after the post): nothing to send, go on (True). Closed without it (too slow):
        it is out of the rest of the round, which goes on without it (False)."""
        shown = self._aggregator.round_stage(info.round, stage, wait=False)
        if shown.closed:
            if self._hospital in shown.members:
                return True
            log.warning("a stage closed without this hospital", extra={"round": info.round, "stage": stage})
            return False
        self._aggregator.post_message(
            info.round, stage, envelopes, payload, signed.signature, signed.certificate
        )
        return True

    def _wait_cohort(self, info: RoundView, stop: threading.Event) -> RoundView | None:
        while not stop.is_set():
            view = self._aggregator.wait_for_cohort()
            if view.round != info.round or not view.accepting:
                return None
            if view.cohort is not None:
                return view
        return None

    def _wait_stage(self, info: RoundView, stage: str, stop: threading.Event) -> StageResult | None:
        while not stop.is_set():
            result: StageView = self._aggregator.round_stage(info.round, stage, wait=True)
            if result.closed:
                return StageResult(result.members, result.messages)
            now = self._aggregator.current_round(None)
            if now.round != info.round or not now.accepting:
                return None
        return None

    # -- checking a sum ----------------------------------------------------------------------------
    def verified_sum(
        self, federation_id: bytes, round_number: int, served: Sequence[bytes], kind: ChunkKind, n_values: int
    ) -> VerifiedSum:
        """The round's sum as recomputed from the signed uploads (sampled for large models) and
        the masks left in it, or AggregateRejected naming what the aggregator got wrong."""
        ctx = self._ctx(federation_id, round_number)
        agg = self._aggregator
        try:
            adverts = agg.mask_keys(round_number)
            stages = {
                s: agg.round_stage(round_number, s, wait=False)
                for s in ("shares", "uploads", "survivors", "reveals")
            }
            if not all(r.closed for r in stages.values()):
                raise AggregateRejected(
                    f"round {round_number}: the aggregator serves a sum before its stages closed"
                )
            transcript = RoundTranscript(
                adverts,
                stages["shares"].members,
                stages["uploads"].members,
                {s: m[1] for s, m in stages["survivors"].messages.items()},
                dict(stages["reveals"].messages),
            )
            correction = unmask_correction(
                ctx,
                transcript,
                self._sig,
                self._roster,
                self._task.min_contributors,
                slot_count(kind, n_values, self._codec.params),
                self._codec.params.plain_modulus,
                self._roster_size,
            )
        except ProtocolRefused as refused:
            raise AggregateRejected(
                f"the aggregator's transcript of round {round_number} is refused: {refused}"
            ) from None
        survivors = sorted(transcript.u3)
        total = len(served)
        indexes = (
            list(range(total))
            if total <= SAMPLE_CHUNKS
            else sorted(self._random.sample(range(total), SAMPLE_CHUNKS))
        )
        cohort = cohort_digest({n: k.public_key for n, k in adverts.items()})
        by_owner: dict[str, dict[int, bytes]] = {}
        for owner in survivors:
            digests, signature, certificate, chunks = agg.fetch_upload(round_number, owner, indexes)
            parts = [digests[i : i + 32] for i in range(0, len(digests), 32)]
            statement = chunk_digests_statement(ctx, cohort, owner, parts)
            try:
                self._sig.check(owner, statement, Signed(signature, certificate), "the upload")
            except ProtocolRefused as refused:
                raise AggregateRejected(
                    f"round {round_number}: {refused} (relayed by the aggregator)"
                ) from None
            if len(parts) != total or sorted(chunks) != indexes:
                raise AggregateRejected(
                    f"round {round_number}: the aggregator's sum has {total} chunks, the signed upload of "
                    f"{owner} {len(parts)}, or it withheld some of them"
                )
            for i, chunk in chunks.items():
                if hashlib.sha256(chunk).digest() != parts[i]:
                    raise AggregateRejected(
                        f"round {round_number}: chunk {i} of {owner}'s upload as relayed by the aggregator "
                        "is not the one its hospital signed"
                    )
            by_owner[owner] = chunks
        recomputed = list(served)
        try:
            for i in indexes:
                mine = self._codec.add([by_owner[o][i] for o in survivors])
                # The same sum serializes to the same bytes (addition modulo q is exact, SEAL's
                # serialization deterministic): then nothing needs decrypting. Bytes that differ
                # (another SEAL build's compression, or a forgery) are compared by what they decrypt to.
                if mine != served[i] and (
                    unpack_header(served[i]).parties != len(survivors)
                    or not np.array_equal(self._codec.chunk_slots(mine), self._codec.chunk_slots(served[i]))
                ):
                    raise AggregateRejected(
                        f"round {round_number}: the aggregator's sum is not the sum of the signed uploads of "
                        f"the {len(survivors)} survivors (chunk {i}): forged, partial or replayed; refused"
                    )
                recomputed[i] = mine
        except HeError as exc:
            raise AggregateRejected(
                f"round {round_number}: the aggregator's sum is unreadable: {exc}"
            ) from None
        return VerifiedSum(recomputed, correction, transcript.u3)

    # -- the acceptance vote ---------------------------------------------------------------------------
    def vote(
        self,
        federation_id: bytes,
        round_number: int,
        survivors: frozenset[str] | None,
        candidate: bytes,
        accept: bool,
        stop: threading.Event,
    ) -> VoteOutcome:
        """Posts this hospital's signed vote on round `round_number`'s candidate (when it is one of
        the round's survivors and the votes are still open), then its tally of the vote set as
        shown, and returns the round's outcome by the study's rule (fibemrss.he.secagg.votes).
        `survivors` is the round's checked U3 (None when this hospital's own check of the sum
        failed: it refuses, and reads U3 as relayed to sign its refusal). A restarted agent reads
        the closed stages and reaches the same outcome."""
        ctx = self._ctx(federation_id, round_number)
        if survivors is None:
            shown = self._aggregator.round_stage(round_number, "uploads", wait=False)
            survivors = shown.members if shown.closed else frozenset()
        key = (federation_id, round_number)
        if self._hospital in survivors:
            payload = vote_payload(candidate, accept)
            self._post_once(
                key,
                "votes",
                payload,
                lambda: self._sig.sign(vote_statement(ctx, survivors, self._hospital, payload)),
            )
        if not accept:
            return VoteOutcome(False, refused_by=(self._hospital,))
        votes = self._wait_closed(round_number, "votes", stop)
        if votes is None:
            return VoteOutcome(False, tally_problem="stopped before the votes closed")
        valid = valid_votes(ctx, survivors, votes.messages, self._sig)
        if self._hospital in votes.members:
            shown_set = vote_set_digest(valid)
            # One tally per round: a second, different vote set shown later is not signed.
            first = self._tallied.setdefault(key, shown_set)
            if first == shown_set:
                self._post_once(
                    key,
                    "tally",
                    shown_set,
                    lambda: self._sig.sign(tally_statement(ctx, survivors, self._hospital, shown_set)),
                )
        if not count_votes(candidate, survivors, valid).accepted:
            return count_votes(candidate, survivors, valid)
        tallies = self._wait_closed(round_number, "tally", stop)
        if tallies is None:
            return VoteOutcome(False, tally_problem="stopped before the tallies closed")
        return decide(ctx, survivors, candidate, votes.messages, tallies.messages, self._sig)

    def _post_once(
        self, key: tuple[bytes, int], stage: str, payload: bytes, sign: Callable[[], Signed]
    ) -> None:
        """Posts a message of a vote stage unless the stage closed (too late: counted as missing);
        signed once, so a retry after a lost answer sends the identical message."""
        round_number = key[1]
        if self._aggregator.round_stage(round_number, stage, wait=False).closed:
            return
        if (*key, stage) not in self._signed_votes:
            self._signed_votes = {k: v for k, v in self._signed_votes.items() if k[1] >= round_number - 2}
            self._signed_votes[(*key, stage)] = (payload, sign())
        made = self._signed_votes[(*key, stage)]
        if made[0] != payload:
            return  # never a second, different message in one stage
        signed = made[1]
        try:
            self._aggregator.post_message(
                round_number, stage, [], payload, signed.signature, signed.certificate
            )
        except (PeerRefused, FailedPrecondition) as refused:
            log.warning(
                "vote not posted", extra={"round": round_number, "stage": stage, "reason": str(refused)}
            )

    def _wait_closed(self, round_number: int, stage: str, stop: threading.Event) -> StageResult | None:
        """A stage of a closed round (votes, tally): waits until the aggregator closes it (every
        voter posted, or its deadline passed)."""
        while not stop.is_set():
            result: StageView = self._aggregator.round_stage(round_number, stage, wait=True)
            if result.closed:
                return StageResult(result.members, result.messages)
        return None


@dataclass(frozen=True)
class StageResult:
    members: frozenset[str]
    messages: dict[str, tuple[bytes, Signed]]
