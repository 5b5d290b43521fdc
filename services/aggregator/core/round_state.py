"""The round state machine (pure): who may submit, when a round closes, what opens next.

States: OPEN (no submission yet) -> COLLECTING -> AGGREGATING -> CLOSED, or FAILED when the
deadline passes without quorum. Round 0 carries the federated statistics; rounds 1..R train.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from fibemrss.domain.errors import FailedPrecondition, FieldProblem, InvalidArgument, PermissionDenied
from fibemrss.domain.text import text_problem


class RoundState(enum.StrEnum):
    OPEN = "open"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    CLOSED = "closed"
    FAILED = "failed"


ACCEPTING = (RoundState.OPEN, RoundState.COLLECTING)


def is_finished(rounds: int, last_round: int, last_state: RoundState) -> bool:
    """A federation of `rounds` rounds is finished once its last round closed or failed: its study
    may then be run again, as a new federation."""
    return last_round >= rounds and last_state in (RoundState.CLOSED, RoundState.FAILED)


def archived_task(task: str, federation_id: bytes) -> str:
    """The name a finished federation's rounds keep once its study runs again (readable as any
    task's): unique per federation, since each has its own random id."""
    return f"{task}@{federation_id.hex()}"


MAX_SECONDS = 366 * 24 * 3600.0  # a deadline or grace period beyond a year is a typo (NaN fails too)


@dataclass(frozen=True)
class FederationSettings:
    task: str
    rounds: int  # training rounds after the statistics round 0
    quorum: int
    grace_seconds: float
    deadline_seconds: float
    hospitals: tuple[str, ...]
    # Pairwise masking (services/aggregator/core/cohorts.py): a key stage fixes each round's cohort,
    # and only the whole cohort's uploads make a sum.
    pairwise_masking: bool = False
    # No sum is produced of fewer submissions than this.
    min_contributors: int = 1
    federation_id: bytes = b""
    # The study document's hash every party trains (services/aggregator/core/proposals.py); "" only
    # for a federation started without a proposal (the aggregator's own tests).
    study_hash: str = ""

    @property
    def needed(self) -> int:
        """Submissions a round needs before it may produce a sum."""
        return max(self.quorum, self.min_contributors)

    def validate(self) -> None:
        problems = []
        if self.rounds < 1:
            problems.append(("rounds", "must be at least 1"))
        if not self.hospitals:
            problems.append(("hospitals", "name at least one hospital"))
        for i, name in enumerate(self.hospitals):
            if not name or name == "central" or "@" in name or text_problem(name):
                problems.append(
                    (f"hospitals[{i}]", "may not be empty, 'central' (the operator's site) or hold '@'")
                )
        if len(set(self.hospitals)) != len(self.hospitals):
            problems.append(("hospitals", "names a hospital twice"))
        if not 1 <= self.quorum <= max(len(self.hospitals), 1):
            problems.append(
                ("quorum", f"must be between 1 and the number of hospitals ({len(self.hospitals)})")
            )
        if not 1 <= self.min_contributors <= max(len(self.hospitals), 1):
            problems.append(
                (
                    "min_contributors",
                    f"must be between 1 and the number of hospitals ({len(self.hospitals)})",
                )
            )
        elif self.quorum < self.min_contributors:
            problems.append(("quorum", f"must be at least min_contributors ({self.min_contributors})"))
        if not 0 < self.deadline_seconds <= MAX_SECONDS:
            problems.append(("deadline_seconds", f"must be positive and at most {MAX_SECONDS:g}"))
        if not 0 <= self.grace_seconds <= MAX_SECONDS:
            problems.append(("grace_seconds", f"must lie between 0 and {MAX_SECONDS:g}"))
        if not self.task:
            problems.append(("task", "is required"))
        elif why := text_problem(self.task):
            problems.append(("task", why))
        if problems:
            raise InvalidArgument("invalid federation settings", [FieldProblem(f, d) for f, d in problems])


@dataclass(frozen=True)
class Round:
    task: str
    number: int
    state: RoundState
    deadline_at: datetime
    quorum_at: datetime | None
    submitted: frozenset[str]
    attempt: int = 1
    # With pairwise masking: the hospitals whose masks the round's uploads carry; None while the
    # key stage is open.
    cohort: frozenset[str] | None = None
    epsilon: float = 0.0  # the largest DP epsilon its submitters report (0 without DP)


SubmissionDecision = Literal["accept", "duplicate"]


def decide_submission(
    settings: FederationSettings, current: Round, round_number: int, hospital: str
) -> SubmissionDecision:
    """Whether `hospital` may submit to `round_number` now; raises with the reason if not."""
    if hospital not in settings.hospitals:
        raise PermissionDenied(f"hospital {hospital!r} is not part of the federation for {settings.task}")
    if round_number != current.number:
        raise FailedPrecondition(
            f"round {round_number} is not open; the current round of {settings.task} is {current.number} "
            f"({current.state})"
        )
    if hospital in current.submitted:
        return "duplicate"  # a retried upload after a lost response: idempotent
    if current.state not in ACCEPTING:
        raise FailedPrecondition(f"round {round_number} is {current.state}; the submission came too late")
    return "accept"


CloseDecision = Literal["aggregate", "fail", "wait"]


def decide_close(settings: FederationSettings, current: Round, now: datetime) -> CloseDecision:
    if current.state not in ACCEPTING:
        return "wait"
    n = len(current.submitted)
    if n == len(settings.hospitals):
        return "aggregate"  # everyone is in: no reason to wait for the grace period
    if current.quorum_at is not None and now >= current.quorum_at + timedelta(seconds=settings.grace_seconds):
        return "aggregate"
    if now >= current.deadline_at:
        return "aggregate" if n >= settings.needed else "fail"
    return "wait"


def next_round_number(settings: FederationSettings, closed_round: int) -> int | None:
    """The round to open after `closed_round` finished (closed or failed), or None when done."""
    return closed_round + 1 if closed_round < settings.rounds else None


def base_round(rounds: list[Round], number: int) -> int:
    """The latest closed round before `number` (its sum is the starting model of `number`), or -1."""
    closed = [r.number for r in rounds if r.number < number and r.state == RoundState.CLOSED]
    return closed[-1] if closed else -1
