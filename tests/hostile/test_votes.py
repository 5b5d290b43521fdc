"""An aggregator that lies about the acceptance vote (fibemrss.he.secagg.votes) publishes nothing.

Four honest agents over the in-memory secure-aggregation aggregator of
tests/unit/test_agent_masked_rounds.py, with the real codec and masking, and the study's
validation gate (so every round is voted on). The aggregator relays every vote and tally; here it
lies while relaying round 2's: it drops one hospital's refusal, or shows one hospital a vote set
without one vote. Either way no hospital publishes round 2, every hospital publishes the same
versions, and the federation goes on from round 1's model. Without the rule that every survivor
votes, the dropped refusal would leave three signed accepts, at least the study's threshold of
contributors, and they would publish; without the tally, the hospitals shown the whole vote set
would. Forged and replayed votes (the signatures): tests/unit/test_secagg_votes.py.
"""

from __future__ import annotations

import threading

import numpy as np

from fibemrss.he.codec import UpdateCodec
from fibemrss.he.keys import AggregatorKey, HospitalKey
from fibemrss.he.secagg.votes import ACCEPT, REFUSE
from services.hospital_agent.core.influence import Best, Verdict
from services.hospital_agent.core.personalization import ValidationScore
from services.hospital_agent.core.ports import StageView
from services.hospital_agent.core.protocol import Participation
from tests.hostile.test_poisoning import GATED, HOSPITALS, ROUNDS, _examples, federate
from tests.unit.test_agent_masked_rounds import SecAggAggregator, Secrets, View, keys
from tests.unit.test_agent_protocol import FakeGateway, FakeModelStore

__all__ = ["keys"]  # the module-scoped HE key fixture

LIED_ROUND = 2


class RefusesRoundTwo(Participation):
    """An honest hospital whose validation rows find round 2's model worse than what it serves."""

    def _verdict(self, params: np.ndarray) -> tuple[Verdict | None, ValidationScore | None]:
        verdict, score = super()._verdict(params)
        if self._applied_round + 1 != LIED_ROUND or score is None:  # noqa: SLF001 - the round voted on
            return verdict, score
        return Verdict(False, score, Best(1.0, 0.0), 0.0), score


class DropsRefusals(View):
    """Relays round 2's votes to everyone without the refusals in them (members and messages)."""

    def round_stage(self, round_number: int, stage: str, wait: bool) -> StageView:
        shown = super().round_stage(round_number, stage, wait)
        if round_number != LIED_ROUND or stage != "votes" or not shown.closed:
            return shown
        kept = {s: m for s, m in shown.messages.items() if m[0][-1:] != REFUSE}
        return StageView(True, frozenset(kept), kept)


class HidesAVoteFromC(View):
    """Shows c round 2's vote set without a's vote; everyone else sees it whole."""

    def round_stage(self, round_number: int, stage: str, wait: bool) -> StageView:
        shown = super().round_stage(round_number, stage, wait)
        if self._hospital != "c" or round_number != LIED_ROUND or stage != "votes" or not shown.closed:
            return shown
        kept = {s: m for s, m in shown.messages.items() if s != "a"}
        return StageView(True, frozenset(kept), kept)


def _votes_shown(agg: SecAggAggregator, hospital: str) -> dict[str, bytes]:
    with agg.lock:
        posted = agg.data[LIED_ROUND].messages["votes"]
    return {s: parts[0][1] for s, parts in posted.items() if s != hospital}


def test_an_aggregator_that_drops_a_refusal_gets_no_hospital_to_publish_the_round(
    keys: tuple[HospitalKey, AggregatorKey],
) -> None:
    outcome = federate(GATED, keys, view=DropsRefusals, kinds={"b": RefusesRoundTwo})
    published = outcome.assert_every_hospital_serves_the_same()
    assert published == [r for r in range(1, ROUNDS + 1) if r != LIED_ROUND]
    for h in HOSPITALS:
        progress = outcome.agents[h].progress
        assert progress.rounds_refused == [LIED_ROUND], (h, progress.warnings)
    warnings = " ".join(outcome.agents["a"].progress.warnings)
    assert "round 2: refused by the hospitals' votes, published by none" in warnings
    assert "no valid vote of b as relayed by the aggregator" in warnings
    # What the liar showed a: three accepts of the same candidate, at least the study's threshold
    # of contributors. A rule counting the votes shown would have published it.
    agg = outcome.agents["a"]._aggregator._agg  # type: ignore[attr-defined]  # noqa: SLF001 - the test's relay
    shown = {s: p for s, p in _votes_shown(agg, "").items() if p[-1:] == ACCEPT}
    assert sorted(shown) == ["a", "c", "d"] and len({p[:32] for p in shown.values()}) == 1
    assert len(shown) >= GATED.min_contributors
    # A restarted agent (nothing in memory) replays the closed rounds and their closed votes: the
    # same round refused, the same model served and the same global model, posting nothing new.
    hospital_key, _ = keys
    store = FakeModelStore()
    fresh = Participation(
        "a",
        GATED,
        FakeGateway(_examples("a", False)),
        DropsRefusals(agg, "a"),
        UpdateCodec(hospital_key),
        store,
        retry_delay=lambda _: 0.01,
        secrets=Secrets("a"),
    )
    posted = {r: {s: dict(m) for s, m in d.messages.items()} for r, d in agg.data.items()}
    fresh.run(threading.Event())
    assert fresh.progress.done and fresh.progress.rounds_refused == [LIED_ROUND]
    np.testing.assert_array_equal(
        store.versions[ROUNDS].model.params, outcome.stores["a"].versions[ROUNDS].model.params
    )
    np.testing.assert_array_equal(fresh._global, outcome.agents["a"]._global)  # noqa: SLF001
    assert {r: {s: dict(m) for s, m in d.messages.items()} for r, d in agg.data.items()} == posted


def test_an_aggregator_that_shows_different_vote_sets_gets_no_hospital_to_publish_the_round(
    keys: tuple[HospitalKey, AggregatorKey],
) -> None:
    outcome = federate(GATED, keys, view=HidesAVoteFromC)
    published = outcome.assert_every_hospital_serves_the_same()
    assert published == [r for r in range(1, ROUNDS + 1) if r != LIED_ROUND]
    for h in HOSPITALS:
        progress = outcome.agents[h].progress
        assert progress.rounds_refused == [LIED_ROUND] and progress.rounds_not_served == [], (
            h,
            progress.warnings,
        )
    # c saw a's vote missing; a, b and d saw every survivor accept (without the tally they would
    # have published) and refuse only because c tallied another vote set.
    assert any("no valid vote of a" in w for w in outcome.agents["c"].progress.warnings)
    for h in ("a", "b", "d"):
        warnings = " ".join(outcome.agents[h].progress.warnings)
        assert "the vote set shown here is not the one tallied by c" in warnings, warnings
    # The federation went on from round 1's model: round 3 trained from it and was published.
    assert 3 in published
