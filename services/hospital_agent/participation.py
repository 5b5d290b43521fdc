"""A hospital's part in a federation: statistics round, then train / encrypt / submit each round,
decrypt each aggregate, evaluate on held-out patients and publish the model version.

The loop keeps no state that matters across restarts: every round it reads where the federation
stands from the aggregator, and the global model is the task's server strategy applied to the
closed rounds' aggregates in order. The strategy's state (FedAdam / FedYogi moments) lives in
memory; a restarted or late agent rebuilds it by replaying every closed aggregate from round 1,
then joins the round that is open with the same model as every other hospital.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from fibemrss.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.errors import Unavailable
from fibemrss.feature_encoding import (
    GlobalStats,
    global_stats_from_average,
    input_dim,
    input_names,
    local_stats_vector,
    stats_vector_length,
)
from fibemrss.federation.v1 import federation_pb2 as fpb
from fibemrss.federation.v1 import federation_pb2_grpc
from fibemrss.he.codec import UpdateDecryptor, UpdateEncryptor
from fibemrss.model_params import accuracy_of_logits, layer_shapes
from fibemrss.model_store import ModelStore, ModelVersion
from fibemrss.strategies import FedAvg, StrategyState, strategy_from_hyper
from fibemrss.task_spec import TaskSpec
from fibemrss.torch_models import initial_vector, is_builtin, logits_function, parameter_count
from services.hospital_agent.local_data import Example, LocalData
from services.hospital_agent.training import train_local

log = logging.getLogger(__name__)

ACCEPTING = (fpb.ROUND_STATE_OPEN, fpb.ROUND_STATE_COLLECTING)
# A restarting aggregator or gateway shows up as these; the loop waits and carries on.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class Evaluation:
    round: int
    correct: int
    total: int
    model_version: int


@dataclass
class AgentProgress:
    """What the agent's status RPC reports; written by the loop, read by the servicer."""

    last_submitted_round: int = -1
    evaluations: list[Evaluation] = field(default_factory=list)
    done: bool = False
    error: str = ""
    train_examples: int = 0
    test_examples: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Participation:
    def __init__(
        self,
        hospital: str,
        task: TaskSpec,
        gateway: grpc.Channel,
        aggregator: grpc.Channel,
        encryptor: UpdateEncryptor,
        decryptor: UpdateDecryptor,
        models: ModelStore,
    ) -> None:
        self.hospital = hospital
        self.task = task
        self._gateway = emr_pb2_grpc.EmrGatewayServiceStub(gateway)
        self._aggregator = federation_pb2_grpc.AggregatorServiceStub(aggregator)
        self._encryptor = encryptor
        self._decryptor = decryptor
        self._models = models
        self.progress = AgentProgress()
        self._stats: GlobalStats | None = None
        self._data: LocalData | None = None
        self._n_params = parameter_count(task.model, input_dim(task))
        self._strategy = strategy_from_hyper(task.hyper)
        self._reset_global()

    def _reset_global(self) -> None:
        """Round 0: the seeded initial model, no strategy state, no aggregate applied yet."""
        self._global = initial_vector(self.task.model, input_dim(self.task))
        self._strategy_state = StrategyState()
        self._applied_round = 0

    # -- data ----------------------------------------------------------------------------------
    def _load_examples(self) -> LocalData:
        examples: list[Example] = []
        stream = self._gateway.StreamTrainingExamples(
            emr_pb2.StreamTrainingExamplesRequest(task=self.task.name, purpose="federated training")
        )
        for batch in stream:
            for ex in batch.examples:
                if not ex.HasField("label"):
                    continue  # no outcome recorded: cannot train or evaluate on it
                values = tuple(
                    fv.number
                    if fv.WhichOneof("value") == "number"
                    else fv.category
                    if fv.WhichOneof("value") == "category"
                    else None
                    for fv in ex.features
                )
                examples.append(Example(ex.patient_key, values, ex.label))
        data = LocalData.split(self.task, examples)
        with self.progress.lock:
            self.progress.train_examples, self.progress.test_examples = len(data.train), len(data.test)
        log.info("examples loaded", extra={"train": len(data.train), "test": len(data.test)})
        return data

    # -- aggregator ------------------------------------------------------------------------------
    def _round(self, wait_for: int | None) -> fpb.RoundInfo:
        request = fpb.GetRoundRequest(task=self.task.name)
        if wait_for is not None:
            request.wait_for_round = wait_for
            request.wait_seconds = 20.0
        return self._aggregator.GetRound(request, timeout=60).round

    def _submit(self, round_number: int, values: np.ndarray, weight: int) -> None:
        chunks = self._encryptor.encrypt(values, weight)

        def requests() -> Iterator[fpb.SubmitUpdateRequest]:
            for i, data in enumerate(chunks):
                if i == 0:
                    yield fpb.SubmitUpdateRequest(
                        task=self.task.name,
                        round=round_number,
                        hospital=self.hospital,
                        total_chunks=len(chunks),
                        index=0,
                        ciphertext=data,
                    )
                else:
                    yield fpb.SubmitUpdateRequest(index=i, ciphertext=data)

        self._aggregator.SubmitUpdate(requests(), timeout=120)
        with self.progress.lock:
            self.progress.last_submitted_round = round_number

    def _decrypt_round(self, round_number: int, n_values: int) -> np.ndarray:
        chunks = [
            c.ciphertext
            for c in self._aggregator.FetchAggregate(
                fpb.FetchAggregateRequest(task=self.task.name, round=round_number, hospital=self.hospital),
                timeout=120,
            )
        ]
        average, _total_weight = self._decryptor.decrypt_average(chunks, n_values)
        return average

    def _global_stats(self) -> GlobalStats:
        if self._stats is None:
            self._stats = global_stats_from_average(
                self.task, self._decrypt_round(0, stats_vector_length(self.task))
            )
        return self._stats

    def _closed_rounds(self, after: int, upto: int) -> list[int]:
        status = self._aggregator.GetFederationStatus(
            fpb.GetFederationStatusRequest(task=self.task.name), timeout=60
        ).status
        return sorted(
            r.round for r in status.history if r.state == fpb.ROUND_STATE_CLOSED and after < r.round <= upto
        )

    def _global_params(self, base_round: int) -> np.ndarray:
        """The global model after the closed rounds up to base_round, identical at every hospital.

        Every hospital folds the same decrypted aggregates, in round order, through the same
        deterministic strategy step; a failed round has no aggregate and is skipped by all alike.
        """
        if base_round < self._applied_round:
            self._reset_global()  # rounds only move forward: this is a new federation of the task
        if base_round > self._applied_round:
            rounds = self._closed_rounds(self._applied_round, base_round)
            if isinstance(self._strategy, FedAvg):
                rounds = rounds[-1:]  # stateless: the last average is the model, no replay needed
            for r in rounds:
                average = self._decrypt_round(r, self._n_params)
                self._global, self._strategy_state = self._strategy.step(
                    self._strategy_state, self._global, average
                )
            self._applied_round = base_round
        if base_round > 0:
            self._publish(base_round, self._global)
        return self._global

    # -- model versions ----------------------------------------------------------------------------
    def _publish(self, round_number: int, params: np.ndarray) -> None:
        assert self._data is not None
        stats = self._global_stats()
        x, y = LocalData.matrix(self.task, stats, self._data.test)
        logits = logits_function(self.task.model, input_dim(self.task), params)(x)
        acc = accuracy_of_logits(logits, y, self.task.threshold)
        with self.progress.lock:
            if not any(e.round == round_number for e in self.progress.evaluations):
                self.progress.evaluations.append(
                    Evaluation(round_number, acc.correct, acc.total, round_number)
                )
        self._models.publish(
            ModelVersion(
                task=self.task.name,
                version=round_number,
                federated_round=round_number,
                model={
                    "model": self.task.model,
                    "input_names": input_names(self.task),
                    # Built-in models are served by a numpy forward pass over these layer shapes;
                    # a custom torch model (None here) is rebuilt by name with torch.
                    "shapes": layer_shapes(self.task.model, input_dim(self.task))
                    if is_builtin(self.task.model)
                    else None,
                    "input_dim": input_dim(self.task),
                    "params": params.tolist(),
                    "stats": stats.to_json(),
                    "threshold": self.task.threshold,
                },
                metrics={"local_test_accuracy": acc.value, "local_test_examples": acc.total},
            ),
            actor=f"agent@{self.hospital}",
        )

    # -- the loop ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Takes part until the federation is done; rides out peers and databases that restart."""
        while not stop.is_set():
            try:
                self._run(stop)
                return
            except Unavailable as exc:
                # Its own PostgreSQL restarted (the model store): resume once it is back; a
                # version published before the loss is not published twice.
                log.warning("database unavailable, retrying", extra={"reason": str(exc)})
                stop.wait(1.0)
                continue
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code in RETRYABLE:
                    log.warning("peer unavailable, retrying", extra={"code": code.name})
                    stop.wait(1.0)
                    continue
                with self.progress.lock:
                    self.progress.error = f"{code.name}: {exc.details()}"  # type: ignore[attr-defined]
                log.error("federation stopped", extra={"code": code.name})
                return

    def _run(self, stop: threading.Event) -> None:
        info = self._wait_for_federation(stop)
        if info is None:
            return
        if self._data is None:
            self._data = self._load_examples()
        wanted: int | None = None
        while not stop.is_set():
            info = self._round(wanted)
            if info.federation_done:
                self._global_params(info.round if info.state == fpb.ROUND_STATE_CLOSED else info.base_round)
                with self.progress.lock:
                    self.progress.done = True
                log.info("federation finished", extra={"task": self.task.name})
                return
            if info.state not in ACCEPTING or self.hospital in info.submitted:
                wanted = info.round + 1
                continue
            self._take_part(info)
            wanted = info.round + 1

    def _wait_for_federation(self, stop: threading.Event) -> fpb.RoundInfo | None:
        while not stop.is_set():
            try:
                return self._round(None)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):  # type: ignore[attr-defined]
                    raise
            stop.wait(0.5)
        return None

    def _take_part(self, info: fpb.RoundInfo) -> None:
        assert self._data is not None
        n_train = len(self._data.train)
        if info.round == 0:
            vector = local_stats_vector(self.task, [e.values for e in self._data.train])
            self._submit(0, vector, n_train)
            return
        start = time.perf_counter()
        params = self._global_params(info.base_round)
        x, y = LocalData.matrix(self.task, self._global_stats(), self._data.train)
        new_params = train_local(self.task.model, params, x, y, self.task.hyper, seed=int(info.round))
        self._submit(int(info.round), new_params, n_train)
        log.info(
            "round submitted", extra={"round": info.round, "seconds": round(time.perf_counter() - start, 3)}
        )
