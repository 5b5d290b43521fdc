"""Server-side federated strategies that every hospital applies to the same decrypted average (pure).

The aggregator only adds ciphertexts, so it cannot run a server optimizer. Instead every hospital
decrypts the same weighted average of the local models and applies the same deterministic step to
it: float64 numpy, element-wise operations only, no randomness. Hospitals that start from the same
initial model and see the same sequence of averages therefore hold bit-identical global models,
and a restarted agent rebuilds its state by replaying the closed aggregates in order (`replay`).

FedAvg and FedProx take the average as the new global model (FedProx differs on the client side
only: the proximal term of `train_local`). FedAdagrad, FedAdam and FedYogi follow Reddi et al.
2021, "Adaptive Federated Optimization", Algorithm 2: the pseudo-gradient is
delta = average - previous global, m = beta1 m + (1 - beta1) delta, v is updated per optimizer,
and global = previous global + eta m / (sqrt(v) + tau), with m_0 = 0, v_0 = tau^2 and no bias
correction, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fibemrss.domain.errors import InvalidArgument


def _zeros() -> np.ndarray:
    return np.zeros(0, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class StrategyState:
    """What a server optimizer carries from one round to the next: plain data, JSON-serializable.

    `rounds` counts the averages applied so far; m and v are empty for stateless strategies.
    """

    rounds: int = 0
    m: np.ndarray = field(default_factory=_zeros)
    v: np.ndarray = field(default_factory=_zeros)

    def to_json(self) -> dict[str, Any]:
        # Python writes floats as the shortest repr that reads back to the same double, so the
        # round trip is exact and a restored agent stays bit-identical to the others.
        return {"rounds": self.rounds, "m": self.m.tolist(), "v": self.v.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StrategyState:
        m = np.asarray(data.get("m", []), dtype=np.float64)
        v = np.asarray(data.get("v", []), dtype=np.float64)
        rounds = data.get("rounds", 0)
        if not isinstance(rounds, int) or rounds < 0 or m.ndim != 1 or v.ndim != 1:
            raise InvalidArgument("strategy state needs a non-negative round count and 1-D m and v")
        return cls(rounds, m, v)

    def same_as(self, other: StrategyState) -> bool:
        """Bit-for-bit equality, what 'every hospital holds the same state' means."""
        return (
            self.rounds == other.rounds
            and self.m.tobytes() == other.m.tobytes()
            and self.v.tobytes() == other.v.tobytes()
        )


class ServerStrategy(Protocol):
    """One server step: (state, previous global, decrypted average) -> (new global, new state)."""

    @property
    def name(self) -> str: ...

    def step(
        self, state: StrategyState, previous_global: np.ndarray, average: np.ndarray
    ) -> tuple[np.ndarray, StrategyState]: ...


def _vectors(previous_global: np.ndarray, average: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(previous_global, dtype=np.float64)
    a = np.asarray(average, dtype=np.float64)
    if x.ndim != 1 or x.shape != a.shape:
        raise InvalidArgument(f"previous global {x.shape} and average {a.shape} must be 1-D and alike")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(a))):
        raise InvalidArgument("previous global and average must be finite")
    return x, a


@dataclass(frozen=True)
class FedAvg:
    """McMahan et al. 2017: the new global model is the weighted average of the local models."""

    name: str = "fedavg"

    def step(
        self, state: StrategyState, previous_global: np.ndarray, average: np.ndarray
    ) -> tuple[np.ndarray, StrategyState]:
        _, a = _vectors(previous_global, average)
        return a.copy(), StrategyState(state.rounds + 1)


@dataclass(frozen=True)
class FedProx(FedAvg):
    """Li et al. 2020: FedAvg on the server; clients add (mu / 2) |w - w_global|^2 to their loss."""

    name: str = "fedprox"
    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        if not (self.proximal_mu > 0 and math.isfinite(self.proximal_mu)):
            raise InvalidArgument(f"fedprox needs proximal_mu > 0, got {self.proximal_mu}")


@dataclass(frozen=True)
class _Adaptive:
    """The shared part of FedAdagrad, FedAdam and FedYogi; `_second_moment` is what differs."""

    eta: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        problems = []
        if not (self.eta > 0 and math.isfinite(self.eta)):
            problems.append(f"eta must be > 0, got {self.eta}")
        if not 0 <= self.beta1 < 1:
            problems.append(f"beta1 must lie in [0, 1), got {self.beta1}")
        if not 0 <= self.beta2 < 1:
            problems.append(f"beta2 must lie in [0, 1), got {self.beta2}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            problems.append(f"tau must be > 0, got {self.tau}")
        if problems:
            raise InvalidArgument("; ".join(problems))

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(
        self, state: StrategyState, previous_global: np.ndarray, average: np.ndarray
    ) -> tuple[np.ndarray, StrategyState]:
        x, a = _vectors(previous_global, average)
        if state.rounds == 0 or state.m.size == 0:
            m = np.zeros_like(x)
            v = np.full_like(x, self.tau * self.tau)
        else:
            m, v = state.m, state.v
            if m.shape != x.shape or v.shape != x.shape:
                raise InvalidArgument(f"strategy state holds {m.size} values, the model has {x.size}")
        delta = a - x
        m = self.beta1 * m + (1.0 - self.beta1) * delta
        v = self._second_moment(v, delta * delta)
        new_global = x + self.eta * m / (np.sqrt(v) + self.tau)
        return new_global, StrategyState(state.rounds + 1, m, v)


@dataclass(frozen=True)
class FedAdagrad(_Adaptive):
    name: str = "fedadagrad"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v + delta_sq


@dataclass(frozen=True)
class FedAdam(_Adaptive):
    name: str = "fedadam"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * delta_sq


@dataclass(frozen=True)
class FedYogi(_Adaptive):
    name: str = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        # Yogi moves v towards delta^2 by an additive step, so v cannot grow as fast as Adam's.
        return v - (1.0 - self.beta2) * delta_sq * np.sign(v - delta_sq)


_STRATEGIES: dict[str, type[Any]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}
STRATEGY_NAMES: tuple[str, ...] = tuple(_STRATEGIES)


def strategy_by_name(name: str, **hyper: float) -> ServerStrategy:
    """The strategy called `name`, with its hyper-parameters; an unknown name or option is refused."""
    cls = _STRATEGIES.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown strategy {name!r}; known: {', '.join(STRATEGY_NAMES)}")
    allowed = {f for f in cls.__dataclass_fields__ if f != "name"}
    unknown = sorted(set(hyper) - allowed)
    if unknown:
        raise InvalidArgument(
            f"strategy {name} takes {', '.join(sorted(allowed)) or 'no options'}, not {', '.join(unknown)}"
        )
    strategy: ServerStrategy = cls(**{k: float(v) for k, v in hyper.items()})
    return strategy


class TaskHyper(Protocol):
    """The part of a task's HyperParameters that names its strategy (fibemrss.domain.task_spec)."""

    @property
    def strategy(self) -> str: ...

    @property
    def server_options(self) -> tuple[tuple[str, float], ...]: ...

    @property
    def proximal_mu(self) -> float: ...


def strategy_from_hyper(hyper: TaskHyper) -> ServerStrategy:
    """The task's strategy; FedProx takes the task's proximal_mu, the one clients train with."""
    options = dict(hyper.server_options)
    if hyper.strategy == "fedprox":
        options.setdefault("proximal_mu", hyper.proximal_mu)
    return strategy_by_name(hyper.strategy, **options)


def client_proximal_mu(strategy: ServerStrategy) -> float:
    """The proximal weight clients must train with: mu for FedProx, 0 for every other strategy."""
    return strategy.proximal_mu if isinstance(strategy, FedProx) else 0.0


def replay(
    strategy: ServerStrategy, initial: np.ndarray, averages: Iterable[np.ndarray]
) -> tuple[np.ndarray, StrategyState]:
    """The global model and state after applying the averages of the closed rounds in order.

    A restarted or late agent calls this with the initial model and every closed aggregate
    1..r to rejoin with exactly the model and state the other hospitals hold.
    """
    params = np.asarray(initial, dtype=np.float64).copy()
    state = StrategyState()
    for average in averages:
        params, state = strategy.step(state, params, average)
    return params, state
