"""What the agent's federated protocol needs from the outside world, as small ports.

The protocol (`protocol.py`) runs against these; `grpc_adapters.py` implements the aggregator
and gateway ports over gRPC, `fibemrss.db.model_store.ModelStore` the model store, and the HE
codec (`fibemrss.he`) the codec. Unit tests run the protocol with fakes of the transports and
the store and a real codec. Failures come back as domain errors: `Unavailable` (a peer or the
database is down; retried), `NotFound` (no federation of the task yet), `PeerRefused` (a peer
said no; the agent stops and reports it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fibemrss.domain.errors import DomainError
from fibemrss.domain.feature_extraction import TrainingExample
from fibemrss.domain.published_model import ModelVersion
from fibemrss.domain.site_policy import SitePolicy, StudyDecision
from fibemrss.he.mask_signatures import SignedMaskKey
from fibemrss.he.params import HeParams
from fibemrss.he.secagg.protocol import Signed


class Phase(enum.StrEnum):
    OPEN = "open"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(frozen=True)
class RoundView:
    """Where the federation of the task stands, as the aggregator reports it."""

    round: int
    phase: Phase
    base_round: int  # the latest closed round before this one: its sum is this round's start
    submitted: frozenset[str]
    federation_done: bool
    # Pairwise masking (docs/he-codec.md): the round's attempt, its cohort once fixed (None
    # during the key stage) and the federation id every mask is bound to.
    pairwise_masking: bool = False
    attempt: int = 1
    cohort: frozenset[str] | None = None
    federation_id: bytes = b""
    # The study document's hash the federation trains (the aggregator's; "" if it pins none).
    study_hash: str = ""

    @property
    def accepting(self) -> bool:
        return self.phase in (Phase.OPEN, Phase.COLLECTING)


@dataclass(frozen=True)
class StageView:
    """A stage of a secure-aggregation round as the aggregator relays it."""

    closed: bool
    members: frozenset[str]
    # sender -> (data, its signature): the shares addressed to the reader; signatures, reveals
    messages: dict[str, tuple[bytes, Signed]]


class PeerRefused(DomainError):
    """A peer answered with an error that retrying will not fix (the message names the code)."""


class AggregatorPort(Protocol):
    def current_round(self, wait_for: int | None) -> RoundView:
        """The current round; with `wait_for`, waits (bounded) until that round is current."""
        ...

    def submit(
        self,
        round_number: int,
        chunks: Sequence[bytes],
        attempt: int = 0,
        epsilon: float = 0.0,
        signature: bytes = b"",
        certificate: bytes = b"",
    ) -> None:
        """`epsilon`: the DP spend in the federation after this round (public, from the task
        spec); `signature`/`certificate`: secure aggregation's signature over the chunks."""
        ...

    def fetch_aggregate(self, round_number: int) -> list[bytes]: ...

    def publish_mask_key(self, round_number: int, key: SignedMaskKey) -> RoundView: ...

    def wait_for_cohort(self) -> RoundView:
        """The current round once its cohort is fixed, its attempt changes or it moves on (bounded)."""
        ...

    def mask_keys(self, round_number: int) -> dict[str, SignedMaskKey]:
        """The public keys of the round's cohort, by hospital, as their agents signed them."""
        ...

    def post_message(
        self,
        round_number: int,
        stage: str,
        envelopes: Sequence[tuple[str, bytes]],
        payload: bytes,
        signature: bytes,
        certificate: bytes,
    ) -> None:
        """This hospital's message of a secure-aggregation stage ("shares", "survivors", "reveals")."""
        ...

    def round_stage(self, round_number: int, stage: str, wait: bool) -> StageView:
        """A stage of a round; with `wait`, waits (bounded) until it closes."""
        ...

    def fetch_upload(
        self, round_number: int, hospital: str, indexes: Sequence[int]
    ) -> tuple[bytes, bytes, bytes, dict[int, bytes]]:
        """(digests, signature, certificate, {index: chunk}) of a hospital's upload to a round."""
        ...

    def closed_rounds(self) -> list[int]:
        """Every closed round of the federation, in any order."""
        ...


class ApprovalPort(Protocol):
    """The hospital's own study decisions and site policy (fibemrss.db.study_approvals)."""

    def latest_decision(self, study: str, digest: str) -> StudyDecision | None: ...

    def site_policy(self) -> tuple[SitePolicy, bool]: ...


class GatewayPort(Protocol):
    def training_examples(self, purpose: str) -> Iterable[TrainingExample]: ...


class ModelStorePort(Protocol):
    def publish(self, mv: ModelVersion, actor: str, choice: str = "") -> bool:
        """Once per version; `choice` (with a personalized version) is audited with it."""
        ...


class SecretPort(Protocol):
    def secret(self, name: str) -> bytes:
        """A 32-byte secret of this hospital that survives restarts and never leaves it."""
        ...


class CodecPort(Protocol):
    @property
    def params(self) -> HeParams: ...

    def encrypt(self, values: np.ndarray, weight: int, mask: np.ndarray | None = None) -> list[bytes]: ...

    def decrypt_average(
        self,
        chunks: Sequence[bytes],
        n_values: int,
        min_parties: int = 1,
        correction: np.ndarray | None = None,
    ) -> tuple[np.ndarray, int]: ...

    def add(self, parts: Sequence[bytes]) -> bytes: ...

    def chunk_slots(self, chunk: bytes) -> np.ndarray: ...
