"""Server strategies: FedAvg is the average, adaptive steps match the paper by hand, replays agree bit for bit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.strategies import (
    STRATEGY_NAMES,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    StrategyState,
    client_proximal_mu,
    replay,
    strategy_by_name,
    strategy_from_hyper,
)


def _averages(n_rounds: int, size: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 1.0, size) for _ in range(n_rounds)]


def test_fedavg_new_global_is_the_average() -> None:
    previous = np.array([1.0, -2.0, 3.0])
    average = np.array([0.5, 0.25, -1.0])
    new, state = FedAvg().step(StrategyState(), previous, average)
    assert new.tobytes() == average.tobytes()
    assert state.rounds == 1 and state.m.size == 0
    average[0] = 99.0  # the returned model must not alias the caller's array
    assert new[0] == 0.5


def test_fedprox_server_step_is_fedavg_and_clients_get_mu() -> None:
    strategy = strategy_by_name("fedprox", proximal_mu=0.1)
    new, _ = strategy.step(StrategyState(), np.zeros(2), np.array([0.3, -0.7]))
    assert new.tolist() == [0.3, -0.7]
    assert client_proximal_mu(strategy) == 0.1
    assert client_proximal_mu(FedAvg()) == 0.0
    with pytest.raises(InvalidArgument):
        FedProx(proximal_mu=0.0)


def test_fedadam_matches_a_hand_computed_step() -> None:
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = FedAdam(eta=eta, beta1=b1, beta2=b2, tau=tau)
    x0, a1, a2 = 0.5, 0.7, 0.4
    x1, s1 = strategy.step(StrategyState(), np.array([x0]), np.array([a1]))
    # Round 1 by hand: m_0 = 0, v_0 = tau^2.
    d1 = a1 - x0
    m1 = (1 - b1) * d1
    v1 = b2 * tau**2 + (1 - b2) * d1**2
    want1 = x0 + eta * m1 / (math.sqrt(v1) + tau)
    assert x1[0] == pytest.approx(want1, rel=1e-15)
    assert s1.m[0] == pytest.approx(m1) and s1.v[0] == pytest.approx(v1)
    # Round 2 from the server-optimized model, not from the previous average.
    x2, s2 = strategy.step(s1, x1, np.array([a2]))
    d2 = a2 - want1
    m2 = b1 * m1 + (1 - b1) * d2
    v2 = b2 * v1 + (1 - b2) * d2**2
    assert x2[0] == pytest.approx(want1 + eta * m2 / (math.sqrt(v2) + tau), rel=1e-15)
    assert s2.rounds == 2


def test_fedyogi_matches_a_hand_computed_step() -> None:
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-2
    strategy = FedYogi(eta=eta, beta1=b1, beta2=b2, tau=tau)
    x0 = np.array([0.0, 1.0])
    a1 = np.array([0.2, 1.0 + 1e-3])  # first: delta^2 > tau^2, second: delta^2 < tau^2
    x1, s1 = strategy.step(StrategyState(), x0, a1)
    d = a1 - x0
    v0 = tau**2
    want_v = [v0 - (1 - b2) * di**2 * np.sign(v0 - di**2) for di in d]
    assert want_v[0] > v0 and want_v[1] < v0  # Yogi moves v in both directions
    m = (1 - b1) * d
    want_x = [x0[i] + eta * m[i] / (math.sqrt(want_v[i]) + tau) for i in range(2)]
    assert s1.v.tolist() == pytest.approx(want_v, rel=1e-15)
    assert x1.tolist() == pytest.approx(want_x, rel=1e-15)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_two_independent_replays_are_bit_identical(name: str) -> None:
    """What every hospital does with the same closed aggregates: the same global model, bit for bit."""
    hyper = {"proximal_mu": 0.01} if name == "fedprox" else {}
    initial = np.zeros(31)
    averages = _averages(12, 31)
    hospital_a = replay(strategy_by_name(name, **hyper), initial, averages)
    # A second hospital: own strategy object, own copies of the decrypted averages.
    hospital_b = replay(strategy_by_name(name, **hyper), initial.copy(), [a.copy() for a in averages])
    assert hospital_a[0].tobytes() == hospital_b[0].tobytes()
    assert hospital_a[1].same_as(hospital_b[1])
    assert hospital_a[1].rounds == 12


def test_round_by_round_equals_replay_and_survives_json_restart() -> None:
    """An agent that restarts mid-federation from saved JSON state ends where the others end."""
    strategy = strategy_by_name("fedadam", eta=0.05)
    averages = _averages(10, 31, seed=3)
    params, state = np.zeros(31), StrategyState()
    for k, average in enumerate(averages):
        params, state = strategy.step(state, params, average)
        if k == 4:  # restart: state goes through JSON, parameters through a JSON list
            state = StrategyState.from_json(json.loads(json.dumps(state.to_json())))
            params = np.asarray(json.loads(json.dumps(params.tolist())), dtype=np.float64)
    replayed, replayed_state = replay(strategy, np.zeros(31), averages)
    assert params.tobytes() == replayed.tobytes()
    assert state.same_as(replayed_state)


def test_adaptive_strategies_differ_from_fedavg_and_converge_to_a_fixed_average() -> None:
    target = np.array([0.3, -0.2, 1.0])
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        params, _ = replay(strategy_by_name(name, eta=0.05), np.zeros(3), [target] * 5)
        assert not np.allclose(params, target)  # a server optimizer, not a copy of the average
    # With the clients always returning `target`, a damped Adam walks to it.
    strategy = strategy_by_name("fedadam", eta=0.02, beta1=0.0)
    params, state = np.zeros(3), StrategyState()
    for _ in range(400):
        params, state = strategy.step(state, params, target)
    assert np.allclose(params, target, atol=0.02)


def test_bad_names_options_and_shapes_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="unknown strategy"):
        strategy_by_name("fedsgd")
    with pytest.raises(InvalidArgument, match="not eta"):
        strategy_by_name("fedavg", eta=1.0)
    with pytest.raises(InvalidArgument, match="beta1"):
        strategy_by_name("fedadam", beta1=1.0)
    with pytest.raises(InvalidArgument, match="alike"):
        FedAvg().step(StrategyState(), np.zeros(3), np.zeros(4))
    with pytest.raises(InvalidArgument, match="finite"):
        FedAdam().step(StrategyState(), np.zeros(2), np.array([0.0, np.nan]))
    _, state = FedAdam().step(StrategyState(), np.zeros(3), np.ones(3))
    with pytest.raises(InvalidArgument, match="model has 4"):
        FedAdam().step(state, np.zeros(4), np.ones(4))
    with pytest.raises(InvalidArgument):
        StrategyState.from_json({"rounds": -1, "m": [], "v": []})


def test_strategy_from_task_hyper() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Hyper:
        strategy: str
        server_options: tuple[tuple[str, float], ...] = ()
        proximal_mu: float = 0.0

    yogi = strategy_from_hyper(Hyper("fedyogi", (("eta", 0.03),)))
    assert isinstance(yogi, FedYogi) and yogi.eta == 0.03
    prox = strategy_from_hyper(Hyper("fedprox", proximal_mu=0.1))
    assert client_proximal_mu(prox) == 0.1
    with pytest.raises(InvalidArgument):
        strategy_from_hyper(Hyper("fedprox"))  # FedProx without a proximal term is a mistake
