"""A hospital's part in a federation (no gRPC, no database: it runs against `ports`).

Statistics round, then per round: fetch the aggregate, decrypt, apply the strategy, check,
publish, train, encrypt, submit. The protocol keeps no state that matters across restarts:
every round it reads where the federation stands from the aggregator, and the global model is
the task's server strategy applied to the closed rounds' aggregates in order. The strategy's
state (FedAdam / FedYogi moments) lives in memory; a restarted or late agent rebuilds it by
replaying every closed aggregate from round 1, then joins the open round with the same model
as every other hospital. Under secure aggregation with the study's validation gate, a closed
round is folded and published only when every survivor's signed vote accepts it (the acceptance
vote, `_apply_voted`): every hospital publishes it, or none does.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fibemrss.domain.dataset_size import federation_weight
from fibemrss.domain.errors import DomainError, FailedPrecondition, NotFound, Unavailable
from fibemrss.domain.feature_encoding import (
    GlobalStats,
    global_histograms_from_average,
    global_stats_from_average,
    input_dim,
    input_names,
    local_stats_vector,
    stats_vector_length,
)
from fibemrss.domain.histograms import FeatureHistogram
from fibemrss.domain.model_params import accuracy_of_logits, layer_shapes
from fibemrss.domain.privacy_accounting import epsilon_after_rounds, noise_multiplier, steps_per_round
from fibemrss.domain.published_model import ModelVersion, PublishedModel
from fibemrss.domain.site_policy import approval_problem, policy_problems
from fibemrss.domain.strategies import StrategyState, strategy_from_hyper
from fibemrss.domain.study import study_hash
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.torch_models import initial_vector, is_builtin, logits_function, parameter_count
from fibemrss.he.chunk_format import ChunkKind
from fibemrss.he.errors import HeError
from fibemrss.he.mask_signatures import MaskKeySigner, MaskKeyVerifier
from fibemrss.he.params import DEFAULT_PARAMS
from fibemrss.he.secagg.votes import NO_CANDIDATE, candidate_digest
from services.hospital_agent.core.aggregate_bounds import (
    AggregateBounds,
    AggregateRejected,
    check_aggregate,
    check_model,
    contributors,
)
from services.hospital_agent.core.influence import Best, Verdict, check_influence, clip_update, gate
from services.hospital_agent.core.local_data import Example, LocalData
from services.hospital_agent.core.personalization import ValidationScore, personalize, score
from services.hospital_agent.core.ports import (
    AggregatorPort,
    ApprovalPort,
    CodecPort,
    GatewayPort,
    ModelStorePort,
    Phase,
    RoundView,
    SecretPort,
)
from services.hospital_agent.core.privacy_guard import LedgerPort, PrivacyGuard
from services.hospital_agent.core.secure_aggregation import SecureAggregation
from services.hospital_agent.core.training import train_local, train_local_dp

log = logging.getLogger(__name__)

TRAINING_PURPOSE = "federated training"
DATASET_SIZE_SECRET_NAME = "dataset-size-v1"


@dataclass
class Evaluation:
    round: int
    correct: int
    total: int
    model_version: int
    epsilon: float | None = None  # this hospital's DP-SGD spend in the federation through this round


@dataclass(frozen=True)
class PersonalizationReport:
    """The hospital's choice between the global and its personalized model, and why."""

    chosen: str  # "global" or "personalized"
    global_version: int
    personalized_version: int
    global_score: ValidationScore
    personalized_score: ValidationScore
    fit_examples: int


@dataclass
class AgentProgress:
    """What the agent's status RPC reports; written by the protocol, read by the servicer."""

    last_submitted_round: int = -1
    evaluations: list[Evaluation] = field(default_factory=list)
    done: bool = False
    error: str = ""
    train_examples: int = 0
    test_examples: int = 0
    # Failures in a row since the last step that worked; `error` says the last one's reason.
    consecutive_failures: int = 0
    # Things the operator should know that did not stop the agent (a capped weight, a rejected
    # aggregate), each once.
    warnings: list[str] = field(default_factory=list)
    # Patient-level DP: the (epsilon, delta) this hospital has spent on the task in this
    # federation, after each training round it took part in.
    dp_delta: float = 0.0
    epsilon_by_round: dict[int, float] = field(default_factory=dict)
    # After the last round, when the task personalizes (None before, or without it).
    personalization: PersonalizationReport | None = None
    # The federation's histograms of the numeric features from round 0, as released (bins of at
    # least the task's minimum count; fibemrss.domain.histograms).
    histograms: tuple[FeatureHistogram, ...] = ()
    # Poisoning defences (docs/security.md): rounds whose aggregate every hospital refused (out of
    # the codec's or the study's bounds), rounds whose model this hospital did not serve (worse on
    # its validation rows than the model it served), rounds whose own update it clipped.
    rounds_refused: list[int] = field(default_factory=list)
    rounds_not_served: list[int] = field(default_factory=list)
    rounds_clipped: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def capped_backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds before retry `attempt` (1, 2, ...): exponential, capped, with jitter (between half
    and all of the step) so hospitals that failed together do not retry together."""
    step = min(cap, base * 2.0 ** min(attempt - 1, 30))
    return random.uniform(step / 2, step)


class Participation:
    def __init__(
        self,
        hospital: str,
        task: TaskSpec,
        gateway: GatewayPort,
        aggregator: AggregatorPort,
        codec: CodecPort,
        models: ModelStorePort,
        retry_delay: Callable[[int], float] = capped_backoff,
        bounds: AggregateBounds | None = None,
        on_health: Callable[[str], None] | None = None,
        secrets: SecretPort | None = None,
        ledger: LedgerPort | None = None,
        dataset: str = "emr",
        approvals: ApprovalPort | None = None,
        signer: MaskKeySigner | None = None,
        verifier: MaskKeyVerifier | None = None,
    ) -> None:
        """`bounds` are the codec's (AggregateBounds.of(key.params)); `on_health` is told the
        reason whenever a step fails ("" once one works again), for the service's health.
        `approvals`: the hospital's study decisions; with them (the service always wires them)
        the agent joins only a federation of this very document (its hash) approved here, and
        imports the study's model only then. `signer` / `verifier` sign this agent's round mask
        keys and check its peers' (with mutual TLS: the agent's certificate and the federation CA)."""
        self.hospital = hospital
        self.task = task
        self._gateway = gateway
        self._aggregator = aggregator
        self._codec = codec
        self._models = models
        self._retry_delay = retry_delay
        self._bounds = bounds or AggregateBounds.of(DEFAULT_PARAMS)
        self._on_health = on_health
        self.progress = AgentProgress()
        self._stats: GlobalStats | None = None
        self._data: LocalData | None = None
        self.study_hash = study_hash(task)
        self._approvals = approvals
        self._n_params = 0  # known once the model is prepared (_prepare_model), after the join check
        self._strategy = strategy_from_hyper(task.hyper)
        self._secagg: SecureAggregation | None = None
        self._federation_id = b""
        self._secrets = secrets
        if task.weighting == "noised" and secrets is None:
            raise ValueError("noised weights need the hospital's secret store")
        self._weights: dict[bytes, int] = {}
        self._guard = PrivacyGuard(hospital, task, dataset, ledger) if ledger is not None else None
        self._dp_rounds = 0  # without a ledger (tests), the spend is counted here
        # The acceptance vote (docs/security.md, "Poisoning"): with secure aggregation and the
        # study's validation gate, a round is published by every hospital or by none.
        self._votes = task.pairwise_masking and task.validation_tolerance is not None
        self._survivors: dict[int, frozenset[str]] = {}  # each round's checked U3: its voters
        self._stop_voting = threading.Event()  # set when the agent stops
        if task.pairwise_masking:
            self._secagg = SecureAggregation(
                hospital, task, self.study_hash, aggregator, codec, signer, verifier, warn=self._warn
            )

    def _join_problem(self, info: RoundView) -> str:
        """Why this hospital does not take part in the federation ("" when it may): the federation
        must train this very document, approved here, whose model the site policy still allows."""
        if info.study_hash != self.study_hash:
            return (
                f"the federation of {self.task.name} trains {info.study_hash or 'an unpinned study'}, "
                f"this hospital holds {self.study_hash}: not taking part"
            )
        if self._approvals is None:
            return ""
        name = self.task.name
        problem = approval_problem(
            self.hospital, name, self.study_hash, self._approvals.latest_decision(name, self.study_hash)
        )
        if problem:
            return problem
        policy, _ = self._approvals.site_policy()
        broken = policy_problems(policy, self.task)
        return "; ".join(f"site policy {p.field}: {p.description}" for p in broken)

    def _prepare_model(self) -> None:
        """Sizes (and for a factory, imports) the model: only once the study may be joined."""
        if not self._n_params:
            self._n_params = parameter_count(self.task.model, input_dim(self.task))
            self._reset_global()

    def _reset_global(self) -> None:
        """Round 0: the seeded initial model, no strategy state, no aggregate applied yet."""
        self._global = initial_vector(self.task.model, input_dim(self.task))
        self._strategy_state = StrategyState()
        self._applied_round = 0
        self._good_round = 0  # the latest round whose aggregate is in the model
        # The model this hospital serves and the round it came from (0: none yet): a good
        # round's model replaces it only through the validation gate (`_serve`).
        self._served = self._global
        self._served_round = 0
        # The best validation score of any model served so far: a candidate is held to it, so a
        # model cannot drift down by the tolerance round after round.
        self._best_served: Best | None = None

    # -- data ----------------------------------------------------------------------------------
    def _load_examples(self) -> LocalData:
        examples = [
            Example(e.patient_key, e.values, e.label)
            for e in self._gateway.training_examples(TRAINING_PURPOSE)
            if e.label is not None  # no outcome recorded: cannot train or evaluate on it
        ]
        data = LocalData.split(self.task, examples)
        if not data.train:
            raise FailedPrecondition("the gateway has no labelled training examples for this task yet")
        with self.progress.lock:
            self.progress.train_examples, self.progress.test_examples = len(data.train), len(data.test)
        log.info("examples loaded", extra={"train": len(data.train), "test": len(data.test)})
        return data

    # -- aggregates ------------------------------------------------------------------------------
    def _submit(
        self, info: RoundView, values: np.ndarray, weight: int, stop: threading.Event, epsilon: float = 0.0
    ) -> bool:
        """Uploads once (under secure aggregation: masked, signed, then the survivor set signed and
        the shares revealed); True when this hospital is done with the round."""
        epsilon = epsilon if math.isfinite(epsilon) else 0.0
        weight = self._capped(weight)
        if self._secagg is None:
            self._aggregator.submit(info.round, self._codec.encrypt(values, weight), 0, epsilon)
        elif not self._secagg.upload(
            info,
            ChunkKind.WEIGHTED_UPDATE,
            values.size,
            lambda mask: self._codec.encrypt(values, weight, mask),
            epsilon,
            stop,
        ):
            return True  # no part in this round
        self._submitted(info.round)
        return True

    def _submitted(self, round_number: int) -> None:
        """This hospital's upload to the round is in and its part done (also when a retried step
        finished it: the status must not show a hospital that took part as absent)."""
        with self.progress.lock:
            self.progress.last_submitted_round = round_number
        self._recovered()

    def _max_weight(self) -> int:
        """One hospital's weight at most: the codec's, or the study's `privacy.max_weight` below it."""
        study = self.task.max_weight
        return self._bounds.max_weight if study is None else min(study, self._bounds.max_weight)

    def _capped(self, weight: int) -> int:
        """The codec (and the study) bound one hospital's weight: beyond it, the update counts as
        that many."""
        bound = self._max_weight()
        if weight <= bound:
            return weight
        which = (
            "the codec's maximum" if bound == self._bounds.max_weight else "the study's privacy.max_weight"
        )
        self._warn(f"weight capped at {bound} ({which}) for {weight} training examples")
        return bound

    def _decrypt_round_weighted(self, round_number: int, n_values: int) -> tuple[np.ndarray, int]:
        average, total_weight, _ = self._decrypt_round_counted(round_number, n_values)
        return average, total_weight

    def _decrypt_round_counted(self, round_number: int, n_values: int) -> tuple[np.ndarray, int, int]:
        """The round's decrypted average, total weight and contributors, refused below the task's
        minimum of contributors and checked against the codec's bounds before any use."""
        chunks = self._aggregator.fetch_aggregate(round_number)
        correction = None
        if self._secagg is not None:
            verified = self._secagg.verified_sum(
                self._federation_id, round_number, chunks, ChunkKind.WEIGHTED_UPDATE, n_values
            )
            chunks, correction = verified.chunks, verified.correction
            self._survivors[round_number] = verified.survivors
        try:
            average, total_weight = self._codec.decrypt_average(
                chunks, n_values, self.task.min_contributors, correction
            )
        except HeError as exc:
            raise AggregateRejected(f"the aggregate of round {round_number} is refused: {exc}") from None
        parties = contributors(chunks)
        check_aggregate(average, total_weight, parties, self._bounds)
        return average, total_weight, parties

    def _global_stats(self) -> GlobalStats:
        if self._stats is None:
            average, total_weight = self._decrypt_round_weighted(0, stats_vector_length(self.task))
            self._stats = global_stats_from_average(self.task, average)
            histograms = global_histograms_from_average(self.task, average, total_weight)
            with self.progress.lock:
                self.progress.histograms = histograms
        return self._stats

    def _global_params(self, base_round: int) -> np.ndarray:
        """The global model after the closed rounds up to base_round, identical at every hospital.

        Every hospital folds the same decrypted aggregates, in round order, through the same
        deterministic strategy step; a failed round has no aggregate and is skipped by all alike.
        """
        self._prepare_model()
        if base_round < self._applied_round:
            self._reset_global()  # rounds only move forward: this is a new federation of the task
        if base_round > self._applied_round:
            rounds = sorted(
                r for r in self._aggregator.closed_rounds() if self._applied_round < r <= base_round
            )
            # In round order, FedAvg too: whether a round is refused depends on the model it
            # trained from (`check_influence`), and what is served on the models before it.
            for r in rounds:
                if self._votes:
                    self._apply_voted(r)
                elif self._apply(r):
                    self._serve(r)
                # Folded in (or skipped by all alike): when a later fetch fails (the aggregator
                # restarting under a replay), the retry resumes after this round instead of
                # folding the ones before it into the model a second time.
                self._applied_round = r
            self._applied_round = base_round
        if self._served_round > 0:
            # A rejected round keeps the last good model; one the gate refused, the served one.
            self._publish(self._served_round, self._served)
        return self._global

    def _apply(self, round_number: int) -> bool:
        """Folds one closed round's aggregate into the global model, unless it is out of bounds:
        then every hospital skips it alike and says why."""
        step = self._candidate(round_number)
        if step is None:
            return False
        self._global, self._strategy_state = step
        self._good_round = round_number
        return True

    def _candidate(self, round_number: int) -> tuple[np.ndarray, StrategyState] | None:
        """The global model and strategy state the round's aggregate would make, or None (said in
        the status) when it is out of bounds or its sum is refused."""
        try:
            average, total_weight, parties = self._decrypt_round_counted(round_number, self._n_params)
            check_influence(
                self.task, self._global, average, total_weight, parties, self._codec.params.frac_bits
            )
            new_global, new_state = self._strategy.step(self._strategy_state, self._global, average)
            check_model(new_global)
        except AggregateRejected as exc:
            log.error("aggregate rejected", extra={"round": round_number, "reason": str(exc)})
            self._warn(f"round {round_number}: aggregate rejected, not published: {exc}")
            self._refused(round_number)
            return None
        return new_global, new_state

    def _refused(self, round_number: int) -> None:
        with self.progress.lock:
            if round_number not in self.progress.rounds_refused:
                self.progress.rounds_refused.append(round_number)

    def _apply_voted(self, round_number: int) -> None:
        """Under the acceptance vote (secure aggregation with `federation.validation_tolerance`):
        this hospital scores the round's candidate against what it serves and votes; the round is
        folded into the global model and served only when every survivor of the round accepted it
        (fibemrss.he.secagg.votes), so every hospital publishes it, or none does. A refused round
        leaves the global model, the strategy's state (FedAdam / FedYogi moments) and the served
        model as they were: the next round trains from the last accepted model."""
        assert self._secagg is not None
        step = self._candidate(round_number)
        score: ValidationScore | None = None
        accept = step is not None
        if step is not None:
            verdict, score = self._verdict(step[0])
            if verdict is not None and not verdict.accept:
                accept = False
                log.error("candidate refused", extra={"round": round_number, "reason": verdict.describe()})
                self._warn(
                    f"round {round_number}: this hospital votes to refuse the model, worse than the models "
                    f"served (now round {self._served_round}): {verdict.describe()}"
                )
                with self.progress.lock:
                    if round_number not in self.progress.rounds_not_served:
                        self.progress.rounds_not_served.append(round_number)
        digest = (
            NO_CANDIDATE
            if step is None
            else candidate_digest(np.asarray(step[0], dtype=np.float64).tobytes())
        )
        outcome = self._secagg.vote(
            self._federation_id,
            round_number,
            self._survivors.get(round_number),
            digest,
            accept,
            self._stop_voting,
        )
        if self._stop_voting.is_set():
            raise Unavailable(f"round {round_number}: the agent stopped before the votes closed")
        if not outcome.accepted or step is None:
            log.error("round refused by vote", extra={"round": round_number, "reason": outcome.describe()})
            self._warn(
                f"round {round_number}: refused by the hospitals' votes, published by none (every hospital "
                f"stays on round {self._served_round}): {outcome.describe()}"
            )
            self._refused(round_number)
            return
        self._global, self._strategy_state = step
        self._good_round = round_number
        self._served, self._served_round = self._global, round_number
        if score is not None:
            first = Best(score.accuracy, score.log_loss)
            self._best_served = first if self._best_served is None else self._best_served.with_(score)

    def _validation_score(self, params: np.ndarray) -> ValidationScore | None:
        """The model's score on this hospital's validation rows (None without any)."""
        assert self._data is not None
        _, rows = self._data.fit_and_validation(self.task, self.task.validation_fraction)
        if not rows:
            return None
        x, y = LocalData.matrix(self.task, self._global_stats(), rows)
        return score(self.task, params, x, y)

    def _verdict(self, params: np.ndarray) -> tuple[Verdict | None, ValidationScore | None]:
        """The study's gate on a candidate model against the best served here (None: no gate, or
        no validation rows), and the candidate's validation score. The first good round is held
        to the initial model's figures."""
        tolerance = self.task.validation_tolerance
        candidate = None if tolerance is None else self._validation_score(params)
        if tolerance is not None and candidate is None:
            self._warn("no validation rows: every good round's model is served unchecked")
        best = self._best_served
        if best is None and candidate is not None:
            # Before any model is served, the candidate is held to the initial model's figures:
            # a first round an attacker steered is refused like any other.
            start = self._validation_score(initial_vector(self.task.model, input_dim(self.task)))
            best = None if start is None else Best(start.accuracy, start.log_loss)
        if tolerance is None or candidate is None or best is None:
            return None, candidate
        return gate(candidate, best, tolerance), candidate

    def _serve(self, round_number: int) -> None:
        """The global model after a good round becomes the served one unless the study's gate
        says it is worse on this hospital's validation rows than the best model served so far;
        then the served model stays, and the status says why. Deterministic in the rounds and the
        hospital's rows, so a restarted agent serves the same models. The first good round is held
        to the initial model's figures (never served itself)."""
        verdict, candidate = self._verdict(self._global)
        if verdict is not None and not verdict.accept:
            log.error("model not served", extra={"round": round_number, "reason": verdict.describe()})
            self._warn(
                f"round {round_number}: model not served, worse than the models served "
                f"(now round {self._served_round}): {verdict.describe()}"
            )
            with self.progress.lock:
                if round_number not in self.progress.rounds_not_served:
                    self.progress.rounds_not_served.append(round_number)
            return
        self._served, self._served_round = self._global, round_number
        if candidate is not None:
            served = self._best_served
            first = Best(candidate.accuracy, candidate.log_loss)
            self._best_served = first if served is None else served.with_(candidate)

    # -- model versions ----------------------------------------------------------------------------
    def _test_accuracy(self, params: np.ndarray) -> tuple[float, int, int]:
        """(accuracy, correct, total) on the hospital's test rows: reported, never chosen by."""
        assert self._data is not None
        x, y = LocalData.matrix(self.task, self._global_stats(), self._data.test)
        fn = logits_function(self.task.model, input_dim(self.task), params)
        acc = accuracy_of_logits(fn(x), y, self.task.threshold)
        return acc.value, acc.correct, acc.total

    def _published(self, params: np.ndarray) -> PublishedModel:
        dim = input_dim(self.task)
        return PublishedModel(
            model=self.task.model,
            input_names=tuple(input_names(self.task)),
            input_dim=dim,
            # Built-in models are served by a numpy forward pass over these layer shapes;
            # a custom torch model (None here) is rebuilt by name with torch.
            shapes=tuple(layer_shapes(self.task.model, dim)) if is_builtin(self.task.model) else None,
            params=np.asarray(params, dtype=np.float64),
            stats=self._global_stats(),
            threshold=self.task.threshold,
        )

    def _publish(self, round_number: int, params: np.ndarray) -> None:
        value, correct, total = self._test_accuracy(params)
        with self.progress.lock:
            if not any(e.round == round_number for e in self.progress.evaluations):
                self.progress.evaluations.append(
                    Evaluation(
                        round_number,
                        correct,
                        total,
                        round_number,
                        self.progress.epsilon_by_round.get(round_number),
                    )
                )
        self._models.publish(
            ModelVersion(
                task=self.task.name,
                version=round_number,
                federated_round=round_number,
                model=self._published(params),
                metrics={
                    "local_test_accuracy": value,
                    "local_test_examples": total,
                    **self._dp_metrics(round_number),
                },
            ),
            actor=f"agent@{self.hospital}",
        )

    @property
    def federation_id(self) -> bytes:
        """The federation this hospital last took part in (b"" before any)."""
        return self._federation_id

    def personalized_version(self, last_round: int) -> int:
        """The version number of the personalized model: above every round's (version = round),
        of the study's rounds and of a federation started with more."""
        return max(self.task.rounds, last_round) + 1

    def _personalize(self, last_round: int) -> None:
        """After the last round: fine-tune the final global model on this hospital's training rows,
        choose on validation, publish the personalized model (served when chosen, standby
        otherwise). Deterministic, so a restarted agent publishes the same version once."""
        spec = self.task.personalization
        if spec is None or self._served_round == 0 or self._data is None:
            return
        result = personalize(self.task, spec, self._global_stats(), self._served, self._data)
        if result is None:
            self._warn("no personalized model: too few training rows to fine-tune and validate")
            return
        version = self.personalized_version(last_round)
        g, p = result.global_score, result.personalized_score
        chosen = result.chosen
        tolerance = self.task.validation_tolerance
        best = self._best_served
        if chosen == "personalized" and tolerance is not None and best is not None:
            if not gate(p, best, tolerance).accept:
                chosen = "global"  # worse than the best model served, on this hospital's validation rows
        test_value, _, test_total = self._test_accuracy(result.params)
        choice = (
            f"serves the {chosen} model: validation log-loss global {g.log_loss:.4f} "
            f"personalized {p.log_loss:.4f}, accuracy global {g.accuracy:.4f} personalized "
            f"{p.accuracy:.4f} on {g.examples} validation rows"
        )
        self._models.publish(
            ModelVersion(
                task=self.task.name,
                version=version,
                federated_round=self._served_round,
                model=self._published(result.params),
                metrics={
                    "local_test_accuracy": test_value,
                    "local_test_examples": test_total,
                    "chosen": chosen,
                    "fine_tune_examples": result.fit_examples,
                    "validation_examples": g.examples,
                    "global_validation_accuracy": g.accuracy,
                    "global_validation_log_loss": g.log_loss,
                    "personalized_validation_accuracy": p.accuracy,
                    "personalized_validation_log_loss": p.log_loss,
                },
                kind="personalized",
                base_version=self._served_round,
                standby=chosen == "global",
            ),
            actor=f"agent@{self.hospital}",
            choice=choice,
        )
        with self.progress.lock:
            self.progress.personalization = PersonalizationReport(
                chosen, self._served_round, version, g, p, result.fit_examples
            )
        log.info("personalized model published", extra={"version": version, "chosen": chosen})

    def _dp_metrics(self, round_number: int) -> dict[str, float]:
        dp = self.task.dp
        with self.progress.lock:
            epsilon = self.progress.epsilon_by_round.get(round_number)
        if dp is None or epsilon is None:
            return {}
        return {"dp_epsilon": epsilon, "dp_delta": dp.target_delta, "dp_max_grad_norm": dp.max_grad_norm}

    # -- the loop ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Takes part until the federation is done. Every failure (a peer restarting or refusing,
        the database gone, a bug) is logged, reported in the progress and through `on_health`,
        and retried after `retry_delay`: the loop never dies while the process lives."""
        self._stop_voting = stop
        while not stop.is_set():
            try:
                self._run(stop)
                return
            except Exception as exc:  # noqa: BLE001 - reported and retried, whatever it is
                stop.wait(self._retry_delay(self._failed(exc)))

    def _failed(self, exc: Exception) -> int:
        # Domain errors carry no patient data by design; anything else is named by its type only.
        reason = (
            str(exc)
            if isinstance(exc, DomainError)
            else f"internal error ({type(exc).__name__}); see the log"
        )
        with self.progress.lock:
            self.progress.consecutive_failures += 1
            self.progress.error = reason
            attempt = self.progress.consecutive_failures
        if isinstance(exc, Unavailable | NotFound):
            log.warning("step failed, retrying", extra={"reason": reason, "attempt": attempt})
        else:
            log.error("step failed, retrying", extra={"reason": reason, "attempt": attempt}, exc_info=exc)
        if self._on_health is not None:
            self._on_health(reason)
        return attempt

    def _recovered(self) -> None:
        with self.progress.lock:
            failing = self.progress.consecutive_failures > 0
            self.progress.consecutive_failures = 0
            self.progress.error = ""
        if failing and self._on_health is not None:
            self._on_health("")

    def _warn(self, message: str) -> None:
        with self.progress.lock:
            if message not in self.progress.warnings:
                self.progress.warnings.append(message)
                log.warning(message)

    def _run(self, stop: threading.Event) -> None:
        info = self._wait_for_federation(stop)
        if info is None:
            return
        if problem := self._join_problem(info):
            raise FailedPrecondition(problem)  # reported in the status, checked again after backoff
        self._prepare_model()
        if self._data is None:
            self._data = self._load_examples()
        wanted: int | None = None
        while not stop.is_set():
            info = self._aggregator.current_round(wanted)
            self._federation_id = info.federation_id
            if self.hospital in info.submitted:
                # The aggregator holds its upload (also one whose step failed after it).
                with self.progress.lock:
                    self.progress.last_submitted_round = info.round
            if info.federation_done:
                self._global_params(info.round if info.phase == Phase.CLOSED else info.base_round)
                self._personalize(info.round)
                with self.progress.lock:
                    self.progress.done = True
                self._recovered()
                log.info("federation finished", extra={"task": self.task.name})
                return
            if self._secagg is not None and info.accepting and self.hospital in info.submitted:
                self._secagg.finish(info, stop)  # uploaded before a failed step: sign and reveal
                self._submitted(info.round)
            if not info.accepting or self.hospital in info.submitted or self._excluded(info):
                wanted = info.round + 1
                continue
            done_with_round = self._take_part(info, stop)
            wanted = info.round + 1 if done_with_round else None

    def _wait_for_federation(self, stop: threading.Event) -> RoundView | None:
        while not stop.is_set():
            try:
                return self._aggregator.current_round(None)
            except (NotFound, Unavailable):
                pass  # not started yet, or the aggregator is starting
            stop.wait(0.5)
        return None

    def _account(self, info: RoundView) -> float:
        """Checks the hospital's budget and records this round's spend (raises BudgetExceeded);
        the federation's DP-SGD epsilon after the round."""
        if self._guard is not None:
            return self._guard.before_round(info.federation_id, info.round).epsilon
        if info.round >= 1 and self.task.dp is not None:
            self._dp_rounds += 1
            return epsilon_after_rounds(self.task, self.task.dp, self._dp_rounds)
        return 0.0

    def _weight(self, info: RoundView) -> int:
        """This hospital's weight in the federation: fixed once per federation id."""
        assert self._data is not None
        if info.federation_id not in self._weights:
            secret = b"" if self._secrets is None else self._secrets.secret(DATASET_SIZE_SECRET_NAME)
            self._weights[info.federation_id] = federation_weight(
                len(self._data.train),
                secret,
                info.federation_id,
                self.task.name,
                self.task.weighting,
                self.task.weight_noise_scale,
                self.task.weight_quantum,
                self._codec.params.max_weight,
            )
        return self._weights[info.federation_id]

    def _excluded(self, info: RoundView) -> bool:
        """A masked round whose cohort is fixed without this hospital (or with an advertisement of
        an earlier process of it): wait for the next round."""
        if self._secagg is None or info.cohort is None:
            return False
        return self.hospital not in info.cohort or self._secagg.member(info) is None

    def _take_part(self, info: RoundView, stop: threading.Event) -> bool:
        assert self._data is not None
        if self._secagg is not None:
            if not self._secagg.advertise(info) or self._secagg.share(info, stop) is None:
                return True  # the cohort or the share stage closed without this hospital
            if self._secagg.resend(info, stop):
                self._submitted(info.round)  # uploaded before a step failed: the same bytes, no new training
                return True
        weight = self._weight(info)
        if info.round == 0:
            self._account(info)
            stats = local_stats_vector(self.task, [e.values for e in self._data.train])
            return self._submit(info, stats, weight, stop)
        start = time.perf_counter()
        epsilon = self._account(info)
        params = self._global_params(info.base_round)
        x, y = LocalData.matrix(self.task, self._global_stats(), self._data.train)
        dp = self.task.dp
        if dp is None:
            new_params = train_local(self.task.model, params, x, y, self.task.hyper, seed=info.round)
        else:
            sigma, steps = noise_multiplier(self.task, dp), steps_per_round(self.task, dp)
            new_params = train_local_dp(
                self.task.model, params, x, y, self.task.hyper, dp, sigma, steps, info.round
            )
            with self.progress.lock:
                self.progress.epsilon_by_round[info.round] = epsilon
                self.progress.dp_delta = dp.target_delta
        epsilon = epsilon if dp is not None else 0.0
        new_params, norm = clip_update(params, new_params, self.task.max_update_norm)
        if self.task.max_update_norm is not None and norm > self.task.max_update_norm:
            self._warn(
                f"updates clipped to the study's norm bound {self.task.max_update_norm:g} (privacy.max_update_norm)"
            )
            with self.progress.lock:
                self.progress.rounds_clipped.append(info.round)
        if not self._submit(info, new_params, weight, stop, epsilon):
            return False
        log.info(
            "round submitted", extra={"round": info.round, "seconds": round(time.perf_counter() - start, 3)}
        )
        return True
