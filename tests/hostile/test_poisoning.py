"""One hostile hospital of four poisons the model every hospital serves (issue 22).

Four agents run the real protocol over the in-memory secure-aggregation aggregator of
`tests/unit/test_agent_masked_rounds.py` with the real codec and masking. Hospital d is hostile
from round 3 on (rounds 1 and 2 are honest, so there is a fair model to keep): it holds the HE
key, so it encrypts whatever it likes, skipping its own caps and clipping, and votes to accept
every round; for label flipping it runs the honest protocol over three times the rows, every label
flipped. For each attack the same federation runs twice: with the study's defences unset (today's
code: only the codec's bounds) an honest hospital serves the poisoned model; with
`privacy.max_weight`, `privacy.max_update_norm` and `federation.validation_tolerance` set, every
survivor votes on each round's model (fibemrss.he.secagg.votes) and a round is published by all
four hospitals or by none: no honest hospital serves a model worse on its own validation rows than
the one it served, the hostile one serves what they serve, and each keeps a model as good as the
clean run's. Lying relays of the votes: tests/hostile/test_votes.py.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import numpy as np
import pytest

from fibemrss.domain.feature_extraction import TrainingExample
from fibemrss.domain.model_params import accuracy_of_logits
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.domain.torch_models import logits_function
from fibemrss.he.codec import UpdateCodec
from fibemrss.he.keys import AggregatorKey, HospitalKey
from fibemrss.he.params import DEFAULT_PARAMS
from services.hospital_agent.core.influence import Verdict
from services.hospital_agent.core.local_data import LocalData
from services.hospital_agent.core.personalization import ValidationScore
from services.hospital_agent.core.ports import RoundView
from services.hospital_agent.core.protocol import Participation
from tests.unit.test_agent_masked_rounds import HOSPITALS, SecAggAggregator, Secrets, View, keys
from tests.unit.test_agent_protocol import FakeGateway, FakeModelStore, synthetic_examples

__all__ = ["keys"]  # the module-scoped HE key fixture

ROUNDS = 5
ATTACK_FROM = 3  # rounds 1 and 2 are honest: the hospitals serve a fair model before the attack
UNDEFENDED: TaskSpec = dataclasses.replace(
    HEART_DISEASE_V1,
    rounds=ROUNDS,
    sites=HOSPITALS,
    personalization=None,
    hyper=dataclasses.replace(HEART_DISEASE_V1.hyper, server_options=(("eta", 0.1),)),
)
# Honest updates here are none clipped; about 240 training rows each (below the weight cap).
DEFENDED: TaskSpec = dataclasses.replace(
    UNDEFENDED, max_weight=320, max_update_norm=1.0, validation_tolerance=0.05
)
# The validation gate alone: the poisoned round is folded into the global model (every hospital
# alike), but no honest hospital serves it.
GATED: TaskSpec = dataclasses.replace(UNDEFENDED, validation_tolerance=0.05)
HONEST = ("a", "b", "c")
ROWS = 300  # per hospital: about 60 validation rows each

Attack = Callable[[np.ndarray, np.ndarray, int, int], tuple[np.ndarray, int]]


def _flip_target(base: np.ndarray, values: np.ndarray) -> np.ndarray:
    return -2.0 * values  # the honest model's signs flipped: about 1 - its accuracy


def _at_codec(values: np.ndarray) -> np.ndarray:
    """What the codec admits at most: a hostile hospital clips to it (or its upload is refused)."""
    return np.clip(values, -DEFAULT_PARAMS.max_abs_value, DEFAULT_PARAMS.max_abs_value)


ATTACKS: dict[str, Attack] = {
    # A weight at the codec's maximum (1,024) against the honest ~160: ~68% of the average.
    "inflated_weight": lambda base, values, weight, n: (
        _flip_target(base, values),
        DEFAULT_PARAMS.max_weight,
    ),
    # Model replacement: the chosen model, scaled by the cohort's size so the average lands on it.
    "scaled_replacement": lambda base, values, weight, n: (
        _at_codec(base + n * (np.full_like(values, 2.0) - base)),
        weight,
    ),
    # Sign flip: every coefficient of the average negated, a normal weight.
    "sign_flip": lambda base, values, weight, n: (-(2 * n - 1) * values, weight),
    # Every value at the codec's bound (8), against the honest model's signs.
    "codec_bounds": lambda base, values, weight, n: (-DEFAULT_PARAMS.max_abs_value * np.sign(values), weight),
}


class Hostile(Participation):
    """Holds the HE key and signs like any member; from ATTACK_FROM uploads what `attack` makes of
    its honest update, skipping its own weight cap and clipping."""

    attack: Attack

    def _capped(self, weight: int) -> int:
        return weight

    def _verdict(self, params: np.ndarray) -> tuple[Verdict | None, ValidationScore | None]:
        """It votes for whatever the round makes (its own attack above all)."""
        return None, None

    def _submit(
        self, info: RoundView, values: np.ndarray, weight: int, stop: threading.Event, epsilon: float = 0.0
    ) -> bool:
        if info.round >= ATTACK_FROM:
            values, weight = self.attack(self._global, values, weight, len(HOSPITALS))
        return super()._submit(info, values, weight, stop, epsilon)


def _examples(hospital: str, label_flip: bool) -> list[TrainingExample]:
    seed = HOSPITALS.index(hospital) + 1
    if hospital == "d" and label_flip:
        # Honest protocol, poisoned data: three times the rows, every label flipped.
        rows = synthetic_examples(seed, n=3 * ROWS)
        return [dataclasses.replace(e, label=None if e.label is None else 1.0 - e.label) for e in rows]
    return synthetic_examples(seed, n=ROWS)


@dataclasses.dataclass
class Outcome:
    agents: dict[str, Participation]
    stores: dict[str, FakeModelStore]

    def served(self, hospital: str) -> tuple[int, np.ndarray]:
        """The newest version the hospital published (what its inference serves)."""
        versions = self.stores[hospital].versions
        latest = max(versions)
        return latest, versions[latest].model.params

    def assert_every_hospital_serves_the_same(self) -> list[int]:
        """Under the acceptance vote a round is published by every hospital (the hostile one too)
        or by none: the same versions everywhere, each the same model. The versions published."""
        published = sorted(self.stores["a"].versions)
        for h in HOSPITALS:
            assert sorted(self.stores[h].versions) == published, (h, self.agents[h].progress.warnings)
            for v in published:
                np.testing.assert_array_equal(
                    self.stores[h].versions[v].model.params, self.stores["a"].versions[v].model.params
                )
        return published

    def accuracy(self, hospital: str, params: np.ndarray, rows: str = "test") -> float:
        agent = self.agents[hospital]
        data = agent._data  # noqa: SLF001 - the hospital's own rows
        assert data is not None
        chosen = (
            data.test
            if rows == "test"
            else data.fit_and_validation(agent.task, agent.task.validation_fraction)[1]
        )
        x, y = LocalData.matrix(agent.task, agent._global_stats(), chosen)  # noqa: SLF001
        fn = logits_function(agent.task.model, x.shape[1], params)
        return accuracy_of_logits(fn(x), y, agent.task.threshold).value


def federate(
    task: TaskSpec,
    key: tuple[HospitalKey, AggregatorKey],
    attack: str | None = None,
    view: Callable[[SecAggAggregator, str], View] = View,
    kinds: dict[str, type[Participation]] | None = None,
) -> Outcome:
    """Four agents over the in-memory aggregator; `view` relays for each hospital (a lying one in
    tests/hostile/test_votes.py), `kinds` picks an agent class per hospital."""
    hospital_key, aggregator_key = key
    agg = SecAggAggregator(aggregator_key, rounds=task.rounds, task=task)
    stores = {h: FakeModelStore() for h in HOSPITALS}
    agents: dict[str, Participation] = {}
    for h in HOSPITALS:
        hostile = h == "d" and attack in ATTACKS
        kind = (kinds or {}).get(h, Hostile if hostile else Participation)
        agents[h] = kind(
            h,
            task,
            FakeGateway(_examples(h, attack == "label_flip")),
            view(agg, h),
            UpdateCodec(hospital_key),
            stores[h],
            retry_delay=lambda _: 0.01,
            secrets=Secrets(h),
        )
        if isinstance(agents[h], Hostile) and attack is not None:
            agents[h].attack = ATTACKS[attack]  # type: ignore[attr-defined]  # narrowed just above
    threads = [
        threading.Thread(target=a.run, args=(threading.Event(),), daemon=True) for a in agents.values()
    ]
    for t in threads:
        t.start()
    for h, t in zip(HOSPITALS, threads, strict=True):
        t.join(timeout=120)
        assert not t.is_alive(), h
        assert agents[h].progress.done, (h, agents[h].progress.error)
    return Outcome(agents, stores)


@pytest.fixture(scope="module")
def clean(keys: tuple[HospitalKey, AggregatorKey]) -> dict[str, Outcome]:
    return {"undefended": federate(UNDEFENDED, keys), "defended": federate(DEFENDED, keys)}


def test_the_honest_federations_models_are_unchanged_by_the_defences(clean: dict[str, Outcome]) -> None:
    """Clipping, the weight cap, the aggregate's bounds, the validation gate and the acceptance
    vote leave an honest federation as it was: the same global model every round, no round
    refused or held back, no update clipped, every hospital publishing every round's model, the
    undefended federation's model of that round, with the same accuracy."""
    off, on = clean["undefended"], clean["defended"]
    assert on.assert_every_hospital_serves_the_same() == list(range(1, ROUNDS + 1))
    for h in HOSPITALS:
        assert sorted(off.stores[h].versions) == list(range(1, ROUNDS + 1))
        for v, version in on.stores[h].versions.items():
            np.testing.assert_array_equal(version.model.params, off.stores[h].versions[v].model.params)
        progress = on.agents[h].progress
        assert progress.rounds_refused == progress.rounds_clipped == progress.rounds_not_served == []
        np.testing.assert_array_equal(on.agents[h]._global, off.agents[h]._global)  # noqa: SLF001
        assert on.accuracy(h, on.served(h)[1]) == off.accuracy(h, off.served(h)[1])
    accuracy = [off.accuracy(h, off.served(h)[1]) for h in HOSPITALS]
    assert min(accuracy) > 0.65 and np.mean(accuracy) > 0.75  # a federation worth defending


@pytest.mark.parametrize("defence", ["bounded", "gated"])
@pytest.mark.parametrize("attack", [*ATTACKS, "label_flip"])
def test_one_hostile_hospital_cannot_make_the_others_serve_a_poisoned_model(
    keys: tuple[HospitalKey, AggregatorKey], clean: dict[str, Outcome], attack: str, defence: str
) -> None:
    """`bounded`: the study's weight cap, norm bound and validation gate together; `gated`: the
    validation gate alone. Both with the acceptance vote: a round an honest hospital refuses is
    published by no hospital, the hostile one included."""
    # Today's code: an honest hospital serves the poisoned model.
    before = _undefended(keys, attack)
    reference = clean["undefended"]
    drops = {
        h: reference.accuracy(h, reference.served(h)[1]) - before.accuracy(h, before.served(h)[1])
        for h in HONEST
    }
    assert max(drops.values()) > 0.15, drops
    assert all(before.served(h)[0] == ROUNDS for h in HONEST)  # served the last round's model

    task = DEFENDED if defence == "bounded" else GATED
    after = federate(task, keys, attack)
    tolerance = task.validation_tolerance
    assert tolerance is not None
    published = after.assert_every_hospital_serves_the_same()
    refused = sorted(set(range(1, ROUNDS + 1)) - set(published))
    # The refused rounds are the same at every hospital, each said in its status and warnings.
    assert refused
    for h in HOSPITALS:
        progress = after.agents[h].progress
        assert sorted(progress.rounds_refused) == refused, (h, progress.warnings)
        assert all(
            any(
                f"round {r}: refused by the hospitals' votes, published by none" in w
                for w in progress.warnings
            )
            for r in refused
        ), progress.warnings
    # Honest hospitals' gates refused what was refused (with the bounds: their checks first).
    refusers = {h: set(after.agents[h].progress.rounds_not_served) for h in HONEST}
    if defence == "gated":
        assert set().union(*refusers.values()) and set().union(*refusers.values()) <= set(refused), refusers
    elif attack == "label_flip":
        # Capped at W, the flipped rows pass the honest gates; the flipping hospital's own gate
        # (its rows are flipped) refuses every round: the federation stalls, serving nothing.
        assert any("refused by d" in w for w in after.agents["a"].progress.warnings)
    else:
        assert refused == list(range(ATTACK_FROM, ROUNDS + 1))
        assert any("aggregate rejected" in w for w in after.agents["a"].progress.warnings)
    for h in HONEST:
        versions = after.stores[h].versions
        # Every version served is no worse on the hospital's validation rows than any before it.
        scores = [after.accuracy(h, versions[v].model.params, "validation") for v in sorted(versions)]
        assert all(s >= max(scores[:i]) - tolerance - 1e-9 for i, s in enumerate(scores) if i), (h, scores)
        if defence == "bounded" and versions:
            # And as good on its test rows as what the clean federation served in that round.
            # (The gate alone promises the validation rows only: early models are weak, and a
            # poisoned one can score like them on a few dozen rows while its test rows differ.)
            version, params = after.served(h)
            good = clean["defended"].stores[h].versions[version].model.params
            assert after.accuracy(h, params) >= after.accuracy(h, good) - tolerance, h
    if attack == "label_flip" and defence == "bounded":
        # The poisoned hospital runs the honest protocol: its own agent caps its weight.
        assert any("privacy.max_weight" in w for w in after.agents["d"].progress.warnings)
    # Every hospital keeps the same global model (refusals are decided alike).
    models = [after.agents[h]._global for h in HOSPITALS]  # noqa: SLF001
    for m in models[1:]:
        np.testing.assert_array_equal(m, models[0])


_UNDEFENDED_RUNS: dict[str, Outcome] = {}


def _undefended(keys: tuple[HospitalKey, AggregatorKey], attack: str) -> Outcome:
    """Today's code under `attack`, run once for both defences."""
    if attack not in _UNDEFENDED_RUNS:
        _UNDEFENDED_RUNS[attack] = federate(UNDEFENDED, keys, attack)
    return _UNDEFENDED_RUNS[attack]
