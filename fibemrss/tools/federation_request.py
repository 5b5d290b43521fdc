"""The StartFederation request for a task spec: its masking and minimum of contributors travel
with it, so the aggregator runs the rounds the hospitals' task spec expects."""

from __future__ import annotations

from collections.abc import Sequence

from fibemrss.api.federation.v1 import federation_pb2 as fpb
from fibemrss.domain.task_spec import TaskSpec


def start_request(
    task: TaskSpec,
    hospitals: Sequence[str],
    rounds: int,
    quorum: int | None = None,
    grace_seconds: float = 0.0,
    deadline_seconds: float = 120.0,
    study_hash: str = "",
) -> fpb.StartFederationRequest:
    """`study_hash`: the proposed document every party must train ("" takes the latest proposal)."""
    return fpb.StartFederationRequest(
        task=task.name,
        rounds=rounds,
        quorum=len(hospitals) if quorum is None else quorum,
        grace_seconds=grace_seconds,
        deadline_seconds=deadline_seconds,
        hospitals=list(hospitals),
        pairwise_masking=task.pairwise_masking,
        min_contributors=task.min_contributors,
        study_hash=study_hash,
    )
