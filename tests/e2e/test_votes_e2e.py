"""The acceptance vote end to end: the UCI heart-disease study with `federation.validation_tolerance`
set, through real service processes over mutual TLS (each vote and tally signed with its agent's
site key and checked by every other agent against the federation CA): every hospital votes on
every round, the last one included, after the aggregator closed it; the aggregator relays the
votes and tallies on the closed rounds, every round is accepted and every hospital serves the same
model, built on the last round."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from fibemrss.tools.demo import run_demo

pytestmark = pytest.mark.e2e
STUDIES = resources.files("fibemrss.domain") / "studies"
ROUNDS = 3


def test_every_hospital_votes_on_every_round_through_the_aggregator_and_serves_the_same_model(
    tmp_path: Path,
) -> None:
    document = (STUDIES / "heart-disease-v1.yaml").read_text()
    voted = document.replace("study: heart-disease-v1\n", "study: heart-disease-votes-v1\n").replace(
        "federation: {rounds: 15, quorum: 4}",
        f"federation: {{rounds: {ROUNDS}, quorum: 4, validation_tolerance: 0.02}}",
    )
    assert voted.count("heart-disease-votes-v1") == 1 and "validation_tolerance" in voted
    study = tmp_path / "votes.yaml"
    study.write_text(voted)
    work = tmp_path / "work"
    result = run_demo(work, None, None, quiet=True, study_file=study)
    assert [r["round"] for r in result.rounds] == list(range(1, ROUNDS + 1))
    served = result.final["served"]
    assert len(served) == 4 and {m.get("base_version", m["version"]) for m in served.values()} == {ROUNDS}
    closed = [
        line
        for line in (
            json.loads(raw)
            for raw in (work / "logs" / "aggregator@central.log").read_text().splitlines()
            if raw
        )
        if line.get("message") == "vote stage closed"
    ]
    assert sorted((c["round"], c["stage"]) for c in closed) == [
        (r, s) for r in range(1, ROUNDS + 1) for s in ("tally", "votes")
    ]
    assert all(c["missing"] == [] and c["refusals"] == [] for c in closed), closed
