"""The agent's pairwise-masking step (against ports: no gRPC, no database).

Per round: publish this hospital's X25519 public key for the round (derived from a secret kept
in the hospital's database, so a restarted agent publishes the same key), signed with this
agent's mutual-TLS certificate, wait until the aggregator fixes the round's cohort, check it,
fetch the cohort's public keys, check every peer's signature and certificate against the
federation CA (fibemrss.he.mask_signatures: a key the aggregator swapped or stripped makes this
agent refuse the round, naming the peer), and build the mask that this hospital adds to its
encoded update (fibemrss.he.masking). The aggregator stores the public keys only; the private
key exists in this process's memory, re-derived when needed.

Without mutual TLS (loopback tests and benchmarks) there is no identity to sign with: keys
travel unsigned and peers' keys are not checked. An agent with TLS always signs and checks.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from fibemrss.domain.task_spec import TaskSpec
from fibemrss.he.chunk_format import ChunkKind
from fibemrss.he.codec import slot_count
from fibemrss.he.errors import HeKeyError
from fibemrss.he.mask_signatures import MaskKeySigner, MaskKeyVerifier, SignedMaskKey
from fibemrss.he.masking import MaskContext, MaskKeyPair, cohort_mask, round_key_seed
from services.hospital_agent.ports import AggregatorPort, PeerRefused, RoundView, SecretPort

log = logging.getLogger(__name__)

MASK_SECRET_NAME = "pairwise-masking-v1"


@dataclass(frozen=True)
class MaskedUpload:
    attempt: int
    mask: np.ndarray


class KeyExchange:
    def __init__(
        self,
        hospital: str,
        task: TaskSpec,
        aggregator: AggregatorPort,
        secrets: SecretPort,
        modulus: int,
        signer: MaskKeySigner | None = None,
        verifier: MaskKeyVerifier | None = None,
    ) -> None:
        if (signer is None) != (verifier is None):
            raise ValueError("mask keys are signed and checked together, or neither (no TLS)")
        self._signer = signer
        self._verifier = verifier
        self._hospital = hospital
        self._task = task
        self._aggregator = aggregator
        self._secrets = secrets
        self._modulus = modulus

    def check_federation(self, info: RoundView) -> None:
        """The task spec, not the aggregator, decides whether uploads are masked."""
        if not info.pairwise_masking:
            raise PeerRefused(
                f"task {self._task.name} requires pairwise masking, but the aggregator's federation "
                "does not use it; refusing to upload an unmasked update"
            )

    def _key_pair(self, info: RoundView) -> MaskKeyPair:
        context = MaskContext(info.federation_id, self._task.name, info.round, info.attempt)
        return MaskKeyPair(round_key_seed(self._secrets.secret(MASK_SECRET_NAME), context))

    def publish_key(self, info: RoundView) -> bool:
        """Publishes the round's public key early, before training, so the key stage can end;
        False when the cohort was fixed without this hospital in the meantime (sit it out)."""
        self.check_federation(info)
        if info.cohort is not None:
            return self._hospital in info.cohort
        try:
            self._aggregator.publish_mask_key(info.round, self._signed(info, self._key_pair(info).public_key))
        except PeerRefused:
            now = self._aggregator.current_round(None)
            if now.round == info.round and now.cohort is not None and self._hospital not in now.cohort:
                log.info("the cohort was fixed without this hospital", extra={"round": info.round})
                return False
            raise
        return True

    def _signed(self, info: RoundView, public_key: bytes) -> SignedMaskKey:
        if self._signer is None:
            return SignedMaskKey(public_key)
        return self._signer.sign(info.federation_id, self._task.name, info.round, self._hospital, public_key)

    def _check_peers(self, view: RoundView, keys: dict[str, SignedMaskKey]) -> None:
        """Every peer's key must be its own agent's, for this federation and round."""
        if self._verifier is None:
            return
        for peer, key in sorted(keys.items()):
            if peer == self._hospital:
                continue
            try:
                self._verifier.check(view.federation_id, self._task.name, view.round, peer, key)
            except HeKeyError as refused:
                log.error(
                    "a relayed mask key is refused; not uploading to the round",
                    extra={"round": view.round, "peer": peer, "reason": str(refused)},
                )
                raise PeerRefused(
                    f"round {view.round}: refusing to upload, {refused} (substituted by the aggregator "
                    "or on the way?)"
                ) from None

    def mask_for(
        self, info: RoundView, kind: ChunkKind, n_values: int, stop: threading.Event
    ) -> MaskedUpload | None:
        """The mask for this hospital's upload to the round, or None when it must not upload: the
        round moved on, this hospital is not in the cohort, or the cohort is too small."""
        self.check_federation(info)
        while True:  # fresh each time: training may have outlasted the key stage or an attempt
            if stop.is_set():
                return None
            view = self._aggregator.wait_for_cohort()
            if view.round != info.round or not view.accepting:
                return None
            if view.cohort is not None:
                break
        cohort = view.cohort
        if self._hospital not in cohort:
            log.info("not in the round's cohort; waiting for the next round", extra={"round": view.round})
            return None
        if len(cohort) < self._task.min_contributors:
            log.warning(
                "cohort below the task's minimum of contributors; not uploading",
                extra={"round": view.round, "cohort": len(cohort), "minimum": self._task.min_contributors},
            )
            return None
        keys = self._aggregator.mask_keys(view.round)
        if set(keys) != set(cohort):
            raise PeerRefused(f"the aggregator's mask keys of round {view.round} do not match its cohort")
        self._check_peers(view, keys)
        pair = self._key_pair(view)
        if keys[self._hospital].public_key != pair.public_key:
            # Published before a restart with another secret (a wiped database): sit this round out.
            log.warning(
                "the cohort holds another key of this hospital; not uploading", extra={"round": view.round}
            )
            return None
        context = MaskContext(view.federation_id, self._task.name, view.round, view.attempt)
        try:
            public = {h: k.public_key for h, k in keys.items()}
            mask = cohort_mask(
                pair, self._hospital, public, context, slot_count(kind, n_values), self._modulus
            )
        except HeKeyError as exc:
            raise PeerRefused(f"a mask key of round {view.round} is invalid: {exc}") from None
        return MaskedUpload(view.attempt, mask)
