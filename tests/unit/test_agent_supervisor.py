"""The agent's supervisor: one hospital in several studies at once, each study its own runner.

Two hospitals take part in two studies through the protocol's own round logic (the in-memory
aggregator of test_agent_protocol.py, one federation per study, real ciphertexts): both studies
finish with their own models while one study's gateway fails at one hospital for a while (the
other study's rounds go on meanwhile); a study approved while the supervisor runs is joined
without a restart, and one whose approval is withdrawn is retired (its runner stops, no further
upload); a status request must name the study once there are several.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from datetime import UTC, datetime

import pytest

from fibemrss.domain.errors import InvalidArgument, NotFound, Unavailable
from fibemrss.domain.feature_extraction import TrainingExample
from fibemrss.domain.site_policy import DEFAULT_POLICY, SitePolicy, StudyDecision
from fibemrss.domain.study import study_hash
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.he.codec import UpdateCodec
from fibemrss.he.keys import AggregatorKey, HospitalKey
from services.hospital_agent.core.ports import RoundView
from services.hospital_agent.core.protocol import Participation
from services.hospital_agent.core.supervisor import Supervisor
from tests.unit.test_agent_protocol import (  # noqa: F401
    TASK,
    FakeAggregator,
    FakeGateway,
    FakeModelStore,
    keys,
    synthetic_examples,
)
from tests.waiting import wait_until

ROUNDS = 3
# A second study of the same hospitals: another name, another model size, its own federation.
OTHER: TaskSpec = dataclasses.replace(TASK, name="second-study", features=TASK.features[:5])
THIRD: TaskSpec = dataclasses.replace(TASK, name="third-study", features=TASK.features[:4])


class Decisions:
    """A hospital's study decisions, changed by the test as its operator would."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str], str] = {}
        self.documents: dict[str, TaskSpec] = {}
        self.lock = threading.Lock()

    def decide(self, task: TaskSpec, decision: str) -> None:
        with self.lock:
            self.latest[task.name, study_hash(task)] = decision
            self.documents[task.name] = task

    def approved_studies(self) -> list[TaskSpec]:
        with self.lock:
            return [t for n, t in self.documents.items() if self.latest.get((n, study_hash(t))) == "approved"]

    def latest_decision(self, study: str, digest: str) -> StudyDecision | None:
        with self.lock:
            decision = self.latest.get((study, digest))
        if decision is None:
            return None
        return StudyDecision(
            study, digest, 1, decision, "board", None, "operator@h", datetime.now(UTC).isoformat()
        )

    def site_policy(self) -> tuple[SitePolicy, bool]:
        return DEFAULT_POLICY, False


class NamedFederation(FakeAggregator):
    """A federation with an id, as the aggregator gives each StartFederation."""

    def __init__(self, key: AggregatorKey, task: TaskSpec, federation_id: bytes) -> None:
        super().__init__(key, ROUNDS, set(), task=task)
        self.federation_id = federation_id

    def info(self) -> RoundView:
        return dataclasses.replace(super().info(), federation_id=self.federation_id)


class FlakyGateway(FakeGateway):
    """Refuses (as a gateway restarting would) until `healed` is set."""

    def __init__(self, examples: list[TrainingExample]) -> None:
        super().__init__(examples)
        self.healed = threading.Event()

    def training_examples(self, purpose: str) -> Iterable[TrainingExample]:
        if not self.healed.is_set():
            self.purposes.append("refused")
            raise Unavailable("the gateway is restarting")
        return super().training_examples(purpose)


class Hospital:
    def __init__(
        self,
        name: str,
        seed: int,
        aggregators: dict[str, FakeAggregator],
        key: HospitalKey,
        named: list[TaskSpec],
        decisions: Decisions,
        follow: bool = False,
        flaky: frozenset[str] = frozenset(),
    ) -> None:
        """`flaky`: the studies whose gateway refuses until healed."""
        self.name = name
        self.stores: dict[str, FakeModelStore] = {}
        self.gateways: dict[str, FakeGateway] = {}
        self.flaky = flaky
        self.made: list[str] = []

        def make(task: TaskSpec) -> Participation:
            self.made.append(task.name)
            examples = synthetic_examples(seed)
            width = len(task.features)
            examples = [TrainingExample(e.patient_key, e.values[:width], e.label) for e in examples]
            gateway = FlakyGateway(examples) if task.name in self.flaky else FakeGateway(examples)
            self.gateways[task.name] = gateway
            self.stores[task.name] = FakeModelStore()
            return Participation(
                name,
                task,
                gateway,
                aggregators[task.name].view(name),
                UpdateCodec(key),
                self.stores[task.name],
                retry_delay=lambda _: 0.05,
                approvals=decisions,
            )

        def federation_of(task: TaskSpec) -> bytes:
            return aggregators[task.name].info().federation_id

        self.supervisor = Supervisor(
            named, make, decisions, follow_approved=follow, poll_seconds=0.05, federation_of=federation_of
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.supervisor.run, args=(self.stop,), daemon=True)

    def start(self) -> Hospital:
        self.thread.start()
        return self

    def done(self, study: str) -> bool:
        try:
            return self.supervisor.participation(study).progress.done
        except NotFound:
            return False

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


def federations(key: AggregatorKey, *tasks: TaskSpec) -> dict[str, FakeAggregator]:
    return {t.name: FakeAggregator(key, ROUNDS, set(), task=t) for t in tasks}


def test_two_studies_run_side_by_side_and_one_failing_does_not_hold_back_the_other(
    keys: tuple[HospitalKey, AggregatorKey],  # noqa: F811
) -> None:
    aggregators = federations(keys[1], TASK, OTHER)
    decisions = Decisions()
    decisions.decide(TASK, "approved")
    decisions.decide(OTHER, "approved")
    # Study OTHER's gateway refuses at hospital a until healed.
    a = Hospital("a", 1, aggregators, keys[0], [TASK, OTHER], decisions, flaky=frozenset({OTHER.name}))
    b = Hospital("b", 2, aggregators, keys[0], [TASK, OTHER], decisions)
    hospitals = [a.start(), b.start()]
    try:
        # TASK's federation finishes at both hospitals while OTHER is stuck at hospital a.
        wait_until(lambda: a.done(TASK.name) and b.done(TASK.name), timeout=60, what=f"{TASK.name} finished")
        stuck = a.supervisor.participation(OTHER.name).progress
        assert stuck.consecutive_failures > 0 and "restarting" in stuck.error
        assert aggregators[OTHER.name].current == 0  # OTHER's round 0 still waits for hospital a
        a.gateways[OTHER.name].healed.set()  # type: ignore[attr-defined]
        wait_until(
            lambda: a.done(OTHER.name) and b.done(OTHER.name), timeout=60, what=f"{OTHER.name} finished"
        )
        for h in hospitals:
            for task in (TASK, OTHER):
                versions = h.stores[task.name].versions
                assert sorted(versions) == list(range(1, ROUNDS + 1))
                # Each study's model is its own: its inputs are its own features.
                assert versions[ROUNDS].task == task.name
                assert versions[ROUNDS].model.input_dim != 0
        dims = {t.name: a.stores[t.name].versions[ROUNDS].model.input_dim for t in (TASK, OTHER)}
        assert dims[TASK.name] != dims[OTHER.name]
        assert a.supervisor.participation(OTHER.name).progress.error == ""
    finally:
        for h in hospitals:
            h.close()


def test_a_study_approved_while_running_is_joined_and_a_withdrawn_one_is_retired(
    keys: tuple[HospitalKey, AggregatorKey],  # noqa: F811
) -> None:
    aggregators = federations(keys[1], TASK, THIRD)
    decisions = Decisions()
    decisions.decide(TASK, "approved")
    # Hospital b holds up TASK's federation after round 0 (it is not running yet), so the
    # withdrawal below lands mid-federation.
    a = Hospital("a", 1, aggregators, keys[0], [], decisions, follow=True).start()
    try:
        wait_until(lambda: a.supervisor.names() == [TASK.name], timeout=10, what="the approved study joined")
        wait_until(
            lambda: "a" in aggregators[TASK.name].uploads[0], timeout=30, what="hospital a's first upload"
        )
        # A study approved while running: joined without a restart (no new supervisor).
        decisions.decide(THIRD, "approved")
        wait_until(
            lambda: THIRD.name in a.supervisor.names(), timeout=10, what="the newly approved study joined"
        )
        wait_until(lambda: "a" in aggregators[THIRD.name].uploads[0], timeout=30, what="its first upload")
        # The operator withdraws TASK: its runner is stopped, named as retired, sends nothing more.
        decisions.decide(TASK, "refused")
        wait_until(
            lambda: TASK.name not in a.supervisor.names(), timeout=10, what="the withdrawn study retired"
        )
        with pytest.raises(NotFound, match="retired"):
            a.supervisor.participation(TASK.name)
        b = Hospital("b", 2, aggregators, keys[0], [TASK, THIRD], decisions).start()
        try:
            wait_until(
                lambda: aggregators[THIRD.name].current >= 1, timeout=60, what="THIRD's round 0 closed"
            )
            # Retired: a's runner of TASK has left (its thread ended), and none was made again.
            wait_until(lambda: a.supervisor.leaving() == [], timeout=10, what="the retired runner stopped")
            assert a.made.count(TASK.name) == 1
            assert a.supervisor.names() == [THIRD.name]
        finally:
            b.close()
    finally:
        a.close()


def test_status_must_name_the_study_once_there_are_several(
    keys: tuple[HospitalKey, AggregatorKey],  # noqa: F811
) -> None:
    decisions = Decisions()
    one = Hospital("a", 1, federations(keys[1], TASK), keys[0], [TASK], decisions)
    assert one.supervisor.participation("").task == TASK  # one study: the name may be left out
    two = Hospital("a", 1, federations(keys[1], TASK, OTHER), keys[0], [TASK, OTHER], decisions)
    with pytest.raises(InvalidArgument) as which:
        two.supervisor.participation("")
    [problem] = which.value.violations
    assert problem.field == "task" and TASK.name in problem.description and OTHER.name in problem.description
    with pytest.raises(NotFound, match="not 'no-such-study'"):
        two.supervisor.participation("no-such-study")
    assert two.supervisor.participation(OTHER.name).task == OTHER


def test_a_new_federation_of_a_finished_study_is_joined_without_a_restart(
    keys: tuple[HospitalKey, AggregatorKey],  # noqa: F811
) -> None:
    aggregators: dict[str, FakeAggregator] = {TASK.name: NamedFederation(keys[1], TASK, b"first")}
    decisions = Decisions()
    decisions.decide(TASK, "approved")
    hospitals = [Hospital(h, i, aggregators, keys[0], [TASK], decisions).start() for i, h in enumerate("ab")]
    try:
        wait_until(lambda: all(h.done(TASK.name) for h in hospitals), timeout=60, what="the first federation")
        firsts = [h.supervisor.participation(TASK.name) for h in hospitals]
        # The operator starts the study again: a new federation (another id) at the aggregator.
        aggregators[TASK.name] = NamedFederation(keys[1], TASK, b"second")

        def second_done() -> bool:
            now = [h.supervisor.participation(TASK.name) for h in hospitals]
            return all(p is not f and p.progress.done for p, f in zip(now, firsts, strict=True))

        wait_until(second_done, timeout=60, what="the second federation, by fresh runners")
        again = hospitals[0].supervisor.participation(TASK.name)
        assert again is not firsts[0] and again.federation_id == b"second"
        assert sorted(aggregators[TASK.name].sums) == list(range(ROUNDS + 1))  # every round of it closed
        assert [h.made.count(TASK.name) for h in hospitals] == [2, 2]
    finally:
        for h in hospitals:
            h.close()


def test_the_agents_metrics_carry_one_series_per_study(
    keys: tuple[HospitalKey, AggregatorKey],  # noqa: F811
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from services.hospital_agent.__main__ import StudyMetrics

    hospital = Hospital("a", 1, federations(keys[1], TASK, OTHER), keys[0], [TASK, OTHER], Decisions())
    other = hospital.supervisor.participation(OTHER.name).progress
    other.rounds_refused.append(2)
    other.consecutive_failures = 3
    registry = CollectorRegistry()
    registry.register(StudyMetrics(hospital.supervisor))
    text = generate_latest(registry).decode()
    assert f'fibemrss_agent_rounds_refused{{task="{OTHER.name}"}} 1.0' in text
    assert f'fibemrss_agent_rounds_refused{{task="{TASK.name}"}} 0.0' in text
    assert f'fibemrss_agent_consecutive_failures{{task="{OTHER.name}"}} 3.0' in text
    assert f'fibemrss_agent_last_submitted_round{{task="{TASK.name}"}} -1.0' in text
