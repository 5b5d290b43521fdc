"""The agent's whole participation protocol, with fakes for the transports and the model store
and the real HE codec: statistics round, training rounds, a failed round, an agent restarted in
the middle that replays, a peer that restarts, a peer that refuses."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pytest

from fibemrss.api.federation.v1 import federation_pb2
from fibemrss.domain.errors import FailedPrecondition, NotFound, Unavailable
from fibemrss.domain.feature_encoding import global_stats_from_average, input_dim, local_stats_vector
from fibemrss.domain.feature_extraction import FeatureValue, TrainingExample
from fibemrss.domain.published_model import ModelVersion
from fibemrss.domain.study import study_hash
from fibemrss.domain.task_spec import PersonalizationSpec, TaskSpec
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.domain.torch_models import initial_vector
from fibemrss.he.codec import ChunkAccumulator, UpdateCodec
from fibemrss.he.keys import AggregatorKey, HospitalKey, generate_keys, load_aggregator_key, load_hospital_key
from services.hospital_agent.core.local_data import Example, LocalData, is_test
from services.hospital_agent.core.personalization import ValidationScore, choose, personalize
from services.hospital_agent.core.ports import PeerRefused, Phase, RoundView
from services.hospital_agent.core.protocol import TRAINING_PURPOSE, Participation
from services.hospital_agent.edges.grpc_servicer import HospitalAgentServicer

# FedYogi keeps server moments across rounds: a restarted agent must replay to get them back.
# Unmasked, two hospitals: the round logic alone (masked rounds: test_agent_masked_rounds.py).
TASK: TaskSpec = dataclasses.replace(
    HEART_DISEASE_V1,
    hyper=dataclasses.replace(HEART_DISEASE_V1.hyper, strategy="fedyogi", server_options=(("eta", 0.05),)),
    pairwise_masking=False,
    min_contributors=2,
    weighting="examples",
    personalization=None,
)
HOSPITALS = ("a", "b")


@pytest.fixture(scope="module")
def keys() -> tuple[HospitalKey, AggregatorKey]:
    hospital, aggregator = generate_keys()
    return load_hospital_key(hospital), load_aggregator_key(aggregator)


def synthetic_examples(seed: int, n: int = 60) -> list[TrainingExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        values: list[FeatureValue] = []
        for f in TASK.features:
            if f.categories:
                values.append(str(rng.choice(f.categories)) if rng.random() > 0.1 else None)
            else:
                values.append(float(rng.normal(f.scale, f.scale / 4)) if rng.random() > 0.1 else None)
        age = values[0] if isinstance(values[0], float) else 50.0
        label = 1.0 if age + rng.normal(0, 5) > 52 else 0.0
        out.append(TrainingExample(f"{seed}-{i:03d}", tuple(values), label))
    out.append(TrainingExample(f"{seed}-unlabelled", tuple(None for _ in TASK.features), None))
    return out


class FakeAggregator:
    """The aggregator's round logic in miniature, adding real ciphertexts with its public key.

    Every hospital must submit before a round ends; the rounds in `failing` end FAILED with no
    sum, as a round past its deadline without quorum does."""

    def __init__(
        self,
        key: AggregatorKey,
        rounds: int,
        failing: set[int],
        hostile: dict[int, list[bytes]] | None = None,
        task: TaskSpec | None = None,
    ) -> None:
        """`hostile` adds a further upload to a round's sum, as a hospital holding the key could;
        the federation trains `task` (default TASK), pinned by its hash."""
        self._study_hash = study_hash(task or TASK)
        self._key = key
        self._rounds = rounds
        self._failing = failing
        self._hostile = hostile or {}
        self._lock = threading.Condition()
        self.current = 0
        self.phase = {0: Phase.OPEN}
        self.uploads: dict[int, dict[str, list[bytes]]] = {0: {}}
        self.sums: dict[int, list[bytes]] = {}

    def view(self, hospital: str) -> HospitalView:
        return HospitalView(self, hospital)

    def info(self) -> RoundView:
        closed = [r for r, p in self.phase.items() if p == Phase.CLOSED and r < self.current]
        phase = self.phase[self.current]
        return RoundView(
            round=self.current,
            phase=phase,
            base_round=max(closed) if closed else -1,
            submitted=frozenset(self.uploads[self.current]),
            federation_done=self.current == self._rounds and phase in (Phase.CLOSED, Phase.FAILED),
            study_hash=self._study_hash,
        )

    def wait_for(self, number: int | None) -> RoundView:
        with self._lock:
            if number is not None:
                self._lock.wait_for(lambda: self.current >= number or self.info().federation_done, timeout=5)
            return self.info()

    def submit(self, hospital: str, number: int, chunks: Sequence[bytes]) -> None:
        with self._lock:
            if number != self.current or self.phase[number] not in (Phase.OPEN, Phase.COLLECTING):
                raise FailedPrecondition(f"round {number} is not open")
            self.uploads[number][hospital] = list(chunks)
            self.phase[number] = Phase.COLLECTING
            if set(self.uploads[number]) == set(HOSPITALS):
                self._close(number)
            self._lock.notify_all()

    def _close(self, number: int) -> None:
        if number in self._failing:
            self.phase[number] = Phase.FAILED
        else:
            uploads = list(self.uploads[number].values())
            if number in self._hostile:
                uploads.append(self._hostile[number])
            sums = []
            for i in range(len(uploads[0])):
                acc = ChunkAccumulator(self._key)
                for chunks in uploads:
                    acc.add(chunks[i])
                sums.append(acc.result())
            self.sums[number] = sums
            self.phase[number] = Phase.CLOSED
        if number < self._rounds:
            self.current = number + 1
            self.phase[self.current] = Phase.OPEN
            self.uploads[self.current] = {}

    def fetch(self, number: int) -> list[bytes]:
        with self._lock:
            if number not in self.sums:
                raise FailedPrecondition(f"round {number} has no sum")
            return list(self.sums[number])

    def closed(self) -> list[int]:
        with self._lock:
            return [r for r, p in self.phase.items() if p == Phase.CLOSED]


class HospitalView:
    """The aggregator port of one hospital; `trip` makes one call fail once, as a fault would."""

    def __init__(self, aggregator: FakeAggregator, hospital: str) -> None:
        self._agg = aggregator
        self._hospital = hospital
        self.trip: tuple[str, int, Callable[[], Exception]] | None = None  # (method, round, error)
        self.calls: list[tuple[str, int | None]] = []

    def _maybe_trip(self, method: str, number: int | None) -> None:
        self.calls.append((method, number))
        if self.trip is not None and self.trip[0] == method and self.trip[1] == number:
            make_error, self.trip = self.trip[2], None
            raise make_error()

    def current_round(self, wait_for: int | None) -> RoundView:
        info = self._agg.wait_for(wait_for)
        self._maybe_trip("current_round", info.round)
        return info

    def submit(
        self, round_number: int, chunks: Sequence[bytes], attempt: int = 0, epsilon: float = 0.0
    ) -> None:
        self._maybe_trip("submit", round_number)
        self._agg.submit(self._hospital, round_number, chunks)

    def fetch_aggregate(self, round_number: int) -> list[bytes]:
        self._maybe_trip("fetch_aggregate", round_number)
        return self._agg.fetch(round_number)

    def closed_rounds(self) -> list[int]:
        return self._agg.closed()


class FakeGateway:
    def __init__(self, examples: list[TrainingExample]) -> None:
        self._examples = examples
        self.purposes: list[str] = []

    def training_examples(self, purpose: str) -> Iterable[TrainingExample]:
        self.purposes.append(purpose)
        return list(self._examples)


class FakeModelStore:
    def __init__(self) -> None:
        self.versions: dict[int, ModelVersion] = {}
        self.attempts: list[tuple[ModelVersion, str]] = []
        self.choices: dict[int, str] = {}

    def publish(self, mv: ModelVersion, actor: str, choice: str = "") -> bool:
        self.attempts.append((mv, actor))
        if mv.version in self.versions:
            return False
        self.versions[mv.version] = mv
        if choice:
            self.choices[mv.version] = choice
        return True


def participation(
    hospital: str, view: HospitalView, store: FakeModelStore, key: HospitalKey, seed: int
) -> tuple[Participation, FakeGateway]:
    gateway = FakeGateway(synthetic_examples(seed))
    return (
        Participation(hospital, TASK, gateway, view, UpdateCodec(key), store, retry_delay=lambda _: 0.01),
        gateway,
    )


def run_in_thread(p: Participation, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=p.run, args=(stop,), daemon=True)
    thread.start()
    return thread


def test_two_hospitals_federate_through_a_failed_round_and_a_restarted_agent_replays(
    keys: tuple[HospitalKey, AggregatorKey],
) -> None:
    hospital_key, aggregator_key = keys
    agg = FakeAggregator(aggregator_key, rounds=3, failing={2})
    store_a, store_b = FakeModelStore(), FakeModelStore()
    view_a, view_b1 = agg.view("a"), agg.view("b")
    a, gateway_a = participation("a", view_a, store_a, hospital_key, seed=1)
    b1, _ = participation("b", view_b1, store_b, hospital_key, seed=2)
    stop_a, stop_b1 = threading.Event(), threading.Event()
    # The aggregator restarts under a's submission of round 1: a retries and carries on.
    view_a.trip = ("submit", 1, lambda: Unavailable("UNAVAILABLE: aggregator restarting"))

    # b's process dies when it first sees round 2 open: its stop is set as the call fails.
    class Crash(Unavailable):
        def __init__(self) -> None:
            stop_b1.set()
            super().__init__("process killed")

    view_b1.trip = ("current_round", 2, Crash)
    thread_a, thread_b1 = run_in_thread(a, stop_a), run_in_thread(b1, stop_b1)
    thread_b1.join(timeout=60)
    assert not thread_b1.is_alive()
    assert b1.progress.last_submitted_round == 1 and not b1.progress.done
    assert agg.current == 2 and "b" not in agg.uploads[2]

    # A fresh agent for b (nothing in memory) replays round 1 and joins round 2.
    view_b2 = agg.view("b")
    b2, _ = participation("b", view_b2, store_b, hospital_key, seed=2)
    thread_b2 = run_in_thread(b2, threading.Event())
    thread_a.join(timeout=120)
    thread_b2.join(timeout=120)
    assert not thread_a.is_alive() and not thread_b2.is_alive()

    for p in (a, b2):
        assert p.progress.done and p.progress.error == ""
        assert p.progress.last_submitted_round == 3
        assert p.progress.train_examples + p.progress.test_examples == 60  # the unlabelled one is skipped
    assert agg.phase == {0: Phase.CLOSED, 1: Phase.CLOSED, 2: Phase.FAILED, 3: Phase.CLOSED}
    assert ("fetch_aggregate", 1) in view_b2.calls  # the replay
    assert gateway_a.purposes == [TRAINING_PURPOSE]
    # Versions follow the closed rounds only; both hospitals publish the same model for each.
    assert sorted(store_a.versions) == sorted(store_b.versions) == [1, 3]
    for version in (1, 3):
        pa, pb = store_a.versions[version].model, store_b.versions[version].model
        np.testing.assert_array_equal(pa.params, pb.params)
        assert pa.stats == pb.stats
        assert store_a.versions[version].federated_round == version
    assert {actor for _, actor in store_a.attempts} == {"agent@a"}
    assert not np.array_equal(store_a.versions[1].model.params, store_a.versions[3].model.params)

    # Without the replay, FedYogi's moments are lost: one step from round 1 alone differs.
    fresh = Participation(
        "a", TASK, FakeGateway([]), agg.view("a"), UpdateCodec(hospital_key), FakeModelStore()
    )
    fresh._data = a._data  # the same local data, so only the strategy state can differ
    g1 = fresh._global_params(1).copy()
    np.testing.assert_array_equal(g1, store_a.versions[1].model.params)
    moments_after_1 = fresh._strategy_state
    average3, _ = UpdateCodec(hospital_key).decrypt_average(agg.fetch(3), len(g1))
    without_moments, _ = fresh._strategy.step(type(moments_after_1)(), g1, average3)
    assert not np.allclose(without_moments, store_a.versions[3].model.params)

    # A restart after the end replays both closed rounds and arrives at the same final model.
    store_c = FakeModelStore()
    c, _ = participation("a", agg.view("a"), store_c, hospital_key, seed=1)
    c.run(threading.Event())
    assert c.progress.done
    np.testing.assert_array_equal(store_c.versions[3].model.params, store_a.versions[3].model.params)


def test_a_refusing_peer_is_reported_and_retried_until_it_accepts_and_no_federation_yet_is_waited_out(
    keys: tuple[HospitalKey, AggregatorKey],
) -> None:
    hospital_key, aggregator_key = keys
    agg = FakeAggregator(aggregator_key, rounds=1, failing=set())
    view = agg.view("a")
    health: list[str] = []
    gateway = FakeGateway(synthetic_examples(3))
    a = Participation(
        "a",
        TASK,
        gateway,
        view,
        UpdateCodec(hospital_key),
        FakeModelStore(),
        retry_delay=lambda _: 0.01,
        on_health=health.append,
    )
    view.trip = ("current_round", 0, lambda: NotFound("NOT_FOUND: no federation of the task"))
    # Waiting for the federation swallows NOT_FOUND; a refused upload is reported and retried.
    original = view.submit
    refusals = iter(range(2))

    def refuse(round_number: int, chunks: Sequence[bytes], attempt: int = 0, epsilon: float = 0.0) -> None:
        if round_number == 0 and next(refusals, None) is not None:
            assert a.progress.consecutive_failures == (0 if not health else 1)
            raise PeerRefused("PERMISSION_DENIED: caller agent@a may not act for hospital 'x'")
        original(round_number, chunks)

    view.submit = refuse  # type: ignore[method-assign]  # a fake's method swapped for one call path
    done = threading.Event()

    def second_hospital() -> None:
        b, _ = participation("b", agg.view("b"), FakeModelStore(), hospital_key, seed=4)
        b.run(threading.Event())
        done.set()

    threading.Thread(target=second_hospital, daemon=True).start()
    a.run(threading.Event())
    assert done.wait(60)
    reason = "PERMISSION_DENIED: caller agent@a may not act for hospital 'x'"
    assert health == [reason, reason, ""]  # shown while failing, cleared once a step worked
    assert a.progress.done and a.progress.error == "" and a.progress.consecutive_failures == 0
    assert view.calls[0] == ("current_round", 0)


def test_capped_backoff_grows_to_its_cap_with_jitter() -> None:
    from services.hospital_agent.core.protocol import capped_backoff

    delays = [[capped_backoff(n) for n in range(1, 12)] for _ in range(20)]
    for run in delays:
        assert 0.25 <= run[0] <= 0.5 and all(15.0 <= d <= 30.0 for d in run[7:])
    assert len({run[3] for run in delays}) > 1  # jittered


def test_a_replay_interrupted_by_an_aggregator_restart_resumes_without_applying_a_round_twice(
    keys: tuple[HospitalKey, AggregatorKey],
) -> None:
    """deploy-e2e: an agent restarted late replays every closed aggregate; the aggregator restarting
    under that replay failed one fetch, and the retry folded the rounds before it in a second time
    (FedYogi is stateful), so that hospital published another final model than the others."""
    hospital_key, aggregator_key = keys
    agg = FakeAggregator(aggregator_key, rounds=4, failing=set())
    store_a, store_b = FakeModelStore(), FakeModelStore()
    a, _ = participation("a", agg.view("a"), store_a, hospital_key, seed=1)
    b, _ = participation("b", agg.view("b"), store_b, hospital_key, seed=2)
    threads = [run_in_thread(p, threading.Event()) for p in (a, b)]
    for t in threads:
        t.join(timeout=120)
    assert a.progress.done and b.progress.done
    np.testing.assert_array_equal(store_a.versions[4].model.params, store_b.versions[4].model.params)

    # b restarts (nothing in memory, its model store emptied) and replays rounds 1..4; the
    # aggregator goes away as it fetches round 3, after rounds 1 and 2 are folded in.
    view = agg.view("b")
    view.trip = ("fetch_aggregate", 3, lambda: Unavailable("UNAVAILABLE: Socket closed"))
    store_b2 = FakeModelStore()
    b2, _ = participation("b", view, store_b2, hospital_key, seed=2)
    b2.run(threading.Event())
    assert b2.progress.done and b2.progress.error == ""
    assert (
        view.trip is None
        and [c for c in view.calls if c[0] == "fetch_aggregate"].count(("fetch_aggregate", 3)) == 2
    )  # the failed fetch, then the retry
    assert sorted(store_b2.versions) == [4]
    np.testing.assert_array_equal(store_b2.versions[4].model.params, store_a.versions[4].model.params)


# -- personalized local models ---------------------------------------------------------------------
TASK_P: TaskSpec = dataclasses.replace(
    TASK,
    rounds=2,
    personalization=PersonalizationSpec(local_epochs=5, learning_rate=0.05, validation_fraction=0.3),
)


def inverted(examples: list[TrainingExample]) -> list[TrainingExample]:
    """A hospital whose patients follow the opposite rule: the federation's model fits it badly."""
    return [dataclasses.replace(e, label=None if e.label is None else 1.0 - e.label) for e in examples]


def with_test_rows_perturbed(examples: list[TrainingExample]) -> list[TrainingExample]:
    """Every test row's label flipped and its numbers shifted; training and validation rows kept."""
    out = []
    for e in examples:
        if e.label is not None and is_test(TASK_P, e.patient_key):
            values = tuple(v + 30.0 if isinstance(v, float) else v for v in e.values)
            e = dataclasses.replace(e, values=values, label=1.0 - e.label)
        out.append(e)
    return out


def federate_personalized(
    key: tuple[HospitalKey, AggregatorKey], examples_a: list[TrainingExample], rounds: int = 2
) -> tuple[Participation, FakeModelStore]:
    """Two hospitals, `rounds` rounds, personalization after the last: hospital a's examples given."""
    hospital_key, aggregator_key = key
    agg = FakeAggregator(aggregator_key, rounds=rounds, failing=set(), task=TASK_P)
    store_a = FakeModelStore()
    gateways = {"a": FakeGateway(examples_a), "b": FakeGateway(synthetic_examples(2))}
    parts = {
        h: Participation(
            h, TASK_P, gateways[h], agg.view(h), UpdateCodec(hospital_key),
            store_a if h == "a" else FakeModelStore(), retry_delay=lambda _: 0.01,
        )
        for h in HOSPITALS
    }  # fmt: skip
    threads = [run_in_thread(p, threading.Event()) for p in parts.values()]
    for t in threads:
        t.join(timeout=120)
    assert all(p.progress.done and p.progress.error == "" for p in parts.values())
    return parts["a"], store_a


def test_the_personalized_model_is_chosen_on_validation_only_and_published_beside_the_global_one(
    keys: tuple[HospitalKey, AggregatorKey],
) -> None:
    examples = inverted(synthetic_examples(1))
    a, store = federate_personalized(keys, examples)
    report = a.progress.personalization
    assert report is not None and report.chosen == "personalized"
    assert report.personalized_score.log_loss < report.global_score.log_loss
    assert (report.global_version, report.personalized_version) == (2, 3)
    assert sorted(store.versions) == [1, 2, 3]
    personal = store.versions[3]
    assert (personal.kind, personal.base_version, personal.standby) == ("personalized", 2, False)
    assert store.versions[2].kind == "global"
    assert personal.metrics["chosen"] == "personalized"
    assert personal.metrics["personalized_validation_log_loss"] == report.personalized_score.log_loss
    assert "serves the personalized model" in store.choices[3]
    # The validation rows are training rows held back from fine-tuning, never test rows.
    assert a._data is not None
    fit, validation = a._data.fit_and_validation(TASK_P, 0.3)
    assert report.global_score.examples == len(validation) > 0 and report.fit_examples == len(fit)
    assert not {e.patient_key for e in validation} & {e.patient_key for e in a._data.test}
    status = HospitalAgentServicer(a).GetAgentStatus(federation_pb2.GetAgentStatusRequest(), None)  # type: ignore[arg-type]  # the servicer reads no context
    shown = status.status.personalization
    assert (shown.chosen, shown.global_version, shown.personalized_version) == ("personalized", 2, 3)
    assert shown.personalized_validation_log_loss == report.personalized_score.log_loss

    # The same federation with hospital a's test rows perturbed (labels flipped, values moved):
    # the choice, both validation scores and the personalized model do not change; only the
    # test accuracy reported beside them does.
    b, store_b = federate_personalized(keys, with_test_rows_perturbed(examples))
    assert b.progress.personalization == report
    np.testing.assert_array_equal(store_b.versions[3].model.params, personal.model.params)
    assert store_b.versions[3].metrics["local_test_accuracy"] != personal.metrics["local_test_accuracy"]


def test_validation_keeps_the_global_model_when_fine_tuning_makes_it_worse() -> None:
    examples = [
        Example(e.patient_key, e.values, e.label) for e in synthetic_examples(5, n=120) if e.label is not None
    ]
    data = LocalData.split(TASK_P, examples)
    stats = global_stats_from_average(TASK_P, local_stats_vector(TASK_P, [e.values for e in data.train]))
    untrained = initial_vector(TASK_P.model, input_dim(TASK_P))
    fitted = personalize(TASK_P, PersonalizationSpec(20, 0.05, 0.3), stats, untrained, data)
    assert fitted is not None and fitted.chosen == "personalized"  # from an untrained start, it helps
    start = fitted.params  # a model already fitted to this hospital: a wild fine-tune only hurts
    wild = personalize(TASK_P, PersonalizationSpec(5, 50.0, 0.3), stats, start, data)
    assert wild is not None and wild.chosen == "global"
    assert wild.personalized_score.log_loss > wild.global_score.log_loss
    # A tie keeps the federation's model.
    same = ValidationScore(0.8, 0.4, 30)
    assert choose(same, same) == "global"


def test_a_federation_longer_than_the_study_publishes_the_personalized_model_after_every_round(
    keys: tuple[HospitalKey, AggregatorKey],
) -> None:
    a, store = federate_personalized(keys, inverted(synthetic_examples(1)), rounds=3)  # the study says 2
    assert sorted(store.versions) == [1, 2, 3, 4]
    assert [store.versions[v].kind for v in (1, 2, 3, 4)] == ["global"] * 3 + ["personalized"]
    assert store.versions[4].base_version == 3
    assert a.progress.personalization is not None and a.progress.personalization.personalized_version == 4
