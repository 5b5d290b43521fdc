"""The round state machine, without a database or a network."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fibemrss.domain.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.aggregator.core.round_state import (
    FederationSettings,
    Round,
    RoundState,
    decide_close,
    decide_submission,
    next_round_number,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SETTINGS = FederationSettings(
    "t", rounds=3, quorum=2, grace_seconds=10, deadline_seconds=60, hospitals=("a", "b", "c")
)


def round_(
    state: RoundState = RoundState.COLLECTING,
    submitted: tuple[str, ...] = (),
    quorum_at=None,
    deadline=NOW + timedelta(seconds=60),
    number: int = 1,
) -> Round:
    return Round("t", number, state, deadline, quorum_at, frozenset(submitted))


def test_first_submission_is_accepted_and_a_repeat_is_a_duplicate() -> None:
    assert decide_submission(SETTINGS, round_(RoundState.OPEN), 1, "a") == "accept"
    assert decide_submission(SETTINGS, round_(submitted=("a",)), 1, "a") == "duplicate"


def test_a_repeat_after_the_round_closed_is_still_a_duplicate_not_an_error() -> None:
    assert decide_submission(SETTINGS, round_(RoundState.AGGREGATING, ("a", "b")), 1, "a") == "duplicate"


def test_late_wrong_round_and_stranger_are_refused() -> None:
    with pytest.raises(FailedPrecondition):
        decide_submission(SETTINGS, round_(RoundState.AGGREGATING, ("a", "b")), 1, "c")
    with pytest.raises(FailedPrecondition):
        decide_submission(SETTINGS, round_(), 0, "a")
    with pytest.raises(PermissionDenied):
        decide_submission(SETTINGS, round_(), 1, "mallory")


def test_round_closes_when_everyone_submitted_even_inside_the_grace_period() -> None:
    assert decide_close(SETTINGS, round_(submitted=("a", "b", "c"), quorum_at=NOW), NOW) == "aggregate"


def test_quorum_waits_for_the_grace_period_then_closes() -> None:
    r = round_(submitted=("a", "b"), quorum_at=NOW)
    assert decide_close(SETTINGS, r, NOW + timedelta(seconds=5)) == "wait"
    assert decide_close(SETTINGS, r, NOW + timedelta(seconds=10)) == "aggregate"


def test_deadline_fails_a_round_without_quorum_and_closes_one_with_it() -> None:
    late = NOW + timedelta(seconds=61)
    assert decide_close(SETTINGS, round_(submitted=("a",)), late) == "fail"
    assert decide_close(SETTINGS, round_(submitted=("a", "b")), late) == "aggregate"
    assert decide_close(SETTINGS, round_(submitted=("a",)), NOW) == "wait"


def test_closed_and_failed_rounds_never_close_again() -> None:
    for state in (RoundState.CLOSED, RoundState.FAILED, RoundState.AGGREGATING):
        assert decide_close(SETTINGS, round_(state, ("a", "b", "c")), NOW + timedelta(days=1)) == "wait"


def test_rounds_run_from_statistics_round_0_to_the_last_training_round() -> None:
    assert next_round_number(SETTINGS, 0) == 1
    assert next_round_number(SETTINGS, 2) == 3
    assert next_round_number(SETTINGS, 3) is None


def test_settings_validation_names_each_bad_field() -> None:
    bad = FederationSettings("t", rounds=0, quorum=5, grace_seconds=-1, deadline_seconds=0, hospitals=("a",))
    with pytest.raises(InvalidArgument) as error:
        bad.validate()
    assert {v.field for v in error.value.violations} == {
        "rounds",
        "quorum",
        "grace_seconds",
        "deadline_seconds",
    }


def test_base_round_is_the_latest_closed_round_before_a_failed_one() -> None:
    from services.aggregator.core.round_state import base_round

    rounds = [
        round_(RoundState.CLOSED, number=0),
        round_(RoundState.CLOSED, number=1),
        round_(RoundState.FAILED, number=2),
        round_(RoundState.OPEN, number=3),
    ]
    assert base_round(rounds, 3) == 1
    assert base_round(rounds, 1) == 0
    assert base_round(rounds, 0) == -1
