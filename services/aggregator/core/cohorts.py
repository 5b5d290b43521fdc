"""Rounds under secure aggregation (pure): the key stage that fixes a cohort, and when each later
stage closes, or the round fails.

A masked round's sum decrypts only if it holds every cohort member's upload, so:

- Key stage (cohort None): hospitals publish an X25519 public key for the round. The cohort is
  fixed as the hospitals whose key is in once every hospital has one, or `grace_seconds` after
  the `needed`-th key, or at the deadline (fail if fewer than `needed` keys by then).
- Then the stages of secure aggregation (fibemrss.he.secagg): shares, uploads, survivors and
  reveals, each closing with whoever posted in it (`decide_stage`); the round's sum is the sum of
  the uploads of U3, those who uploaded. Each hospital submits once; a dropout is recovered from
  the survivors' revealed shares, never by a second upload (there is no restart).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from services.aggregator.core.round_state import ACCEPTING, FederationSettings, Round

CohortDecision = Literal["fix", "fail", "wait"]


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


STAGES = ("shares", "uploads", "survivors", "reveals")
StageDecision = Literal["close", "fail", "wait"]


def decide_stage(
    settings: FederationSettings,
    current: Round,
    expected: frozenset[str],
    posted: frozenset[str],
    opened_at: datetime | None,
    now: datetime,
) -> StageDecision:
    """An open stage of a secure-aggregation round (shares, uploads, survivors, reveals) closes as
    soon as every member expected in it has posted, or `grace_seconds` after it opened once
    `needed` have, or at the deadline; with fewer than `needed` by the deadline the round fails.
    Nobody is ever asked to post again: a member missing from a stage has dropped out."""
    if current.state not in ACCEPTING:
        return "wait"
    arrived = posted & expected
    if arrived == expected:
        return "close"
    enough = len(arrived) >= settings.needed
    if enough and opened_at is not None and now >= opened_at + timedelta(seconds=settings.grace_seconds):
        return "close"
    if now >= current.deadline_at:
        return "close" if enough else "fail"
    return "wait"


# The acceptance vote on a closed round (fibemrss.he.secagg.votes): relayed after the round closed,
# each stage after the one before (votes: by U3; tally: by those who voted).
VOTE_STAGES = ("votes", "tally")
VOTE_PREVIOUS = {"votes": "uploads", "tally": "votes"}


def decide_vote_stage(
    settings: FederationSettings,
    expected: frozenset[str],
    posted: frozenset[str],
    opened_at: datetime | None,
    now: datetime,
) -> StageDecision:
    """A vote stage closes once every expected voter posted, else at its deadline with whoever did:
    never early with a quorum, since a missing vote refuses the round at every hospital (a vote
    closed without an honest refusal would look like consent). It never fails a round: the round's
    sum stands, the hospitals decide whether to publish it."""
    if posted >= expected:
        return "close"
    if opened_at is not None and now >= opened_at + timedelta(seconds=settings.deadline_seconds):
        return "close"
    return "wait"
