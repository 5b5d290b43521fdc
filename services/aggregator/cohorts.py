"""Rounds under pairwise masking (pure): the key stage that fixes a cohort, and when a round
aggregates, restarts without its missing members, or fails.

A masked round's sum decrypts only if it holds every cohort member's upload, so:

- Key stage (cohort None): hospitals publish an X25519 public key for the round. The cohort is
  fixed as the hospitals whose key is in once every hospital has one, or `grace_seconds` after
  the `needed`-th key, or at the deadline (fail if fewer than `needed` keys by then).
- Submission stage: the round aggregates as soon as the whole cohort has submitted. When the
  deadline (or the grace after quorum) passes with members missing, the round restarts as the
  next attempt with the cohort reduced to the members that did submit; their uploads of the old
  attempt are deleted, and they upload again under masks bound to the new attempt. Fewer than
  `needed` survivors fail the round. No correction of anyone's masks is ever revealed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from fibemrss.domain.errors import FailedPrecondition
from services.aggregator.round_state import ACCEPTING, FederationSettings, Round

CohortDecision = Literal["fix", "fail", "wait"]
MaskedClose = Literal["aggregate", "restart", "fail", "wait"]


def decide_cohort(
    settings: FederationSettings, current: Round, key_times: list[datetime], now: datetime
) -> CohortDecision:
    """`key_times`: when each published key of the round arrived, in ascending order."""
    if current.state not in ACCEPTING or current.cohort is not None:
        return "wait"
    n = len(key_times)
    if n == len(settings.hospitals):
        return "fix"
    needed = settings.needed
    if n >= needed and now >= key_times[needed - 1] + timedelta(seconds=settings.grace_seconds):
        return "fix"
    if now >= current.deadline_at:
        return "fix" if n >= needed else "fail"
    return "wait"


def decide_masked_close(settings: FederationSettings, current: Round, now: datetime) -> MaskedClose:
    if current.state not in ACCEPTING or current.cohort is None:
        return "wait"
    if current.submitted == current.cohort:
        return "aggregate"
    late = now >= current.deadline_at or (
        current.quorum_at is not None and now >= current.quorum_at + timedelta(seconds=settings.grace_seconds)
    )
    if not late:
        return "wait"
    return "restart" if len(current.submitted) >= settings.needed else "fail"


def check_masked_submission(current: Round, hospital: str, attempt: int) -> None:
    """A masked upload fits only the cohort and attempt its masks were made for."""
    if current.cohort is None:
        raise FailedPrecondition(
            f"round {current.number} of {current.task} is still collecting mask keys; submit once its cohort is fixed"
        )
    if hospital not in current.cohort:
        raise FailedPrecondition(
            f"hospital {hospital!r} is not in the cohort of round {current.number} (attempt {current.attempt})"
        )
    if attempt != current.attempt:
        raise FailedPrecondition(
            f"the upload is masked for attempt {attempt} of round {current.number}; "
            f"the current attempt is {current.attempt}"
        )
