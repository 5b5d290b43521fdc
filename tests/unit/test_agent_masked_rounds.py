"""The agent's masked, differentially private protocol with fakes and the real codec: four
hospitals publish round keys, mask, and upload; one dies after publishing its key, the round
restarts without it and the others upload the same update again under fresh masks; a fresh agent
for it re-derives its key from its secret and joins the next round. Every hospital ends with the
same model and the DP spend of the rounds it trained."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from fibemrss.domain.errors import FailedPrecondition, Unavailable
from fibemrss.domain.feature_encoding import numeric_features
from fibemrss.domain.privacy_accounting import epsilon_after_rounds
from fibemrss.domain.study import study_hash
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.tasks import HEART_DISEASE_V1_DP
from fibemrss.he.codec import ChunkAccumulator, UpdateCodec, UpdateDecryptor
from fibemrss.he.keys import AggregatorKey, HospitalKey, generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.mask_signatures import SignedMaskKey
from services.hospital_agent.ports import Phase, RoundView
from services.hospital_agent.protocol import Participation
from tests.unit.test_agent_protocol import FakeGateway, FakeModelStore, synthetic_examples

TASK: TaskSpec = dataclasses.replace(HEART_DISEASE_V1_DP, rounds=2)
HOSPITALS = ("a", "b", "c", "d")
FEDERATION = b"\x05" * 16


class MaskedAggregator:
    """Key stage, cohort, attempts: the aggregator's masked rounds in miniature."""

    def __init__(self, key: AggregatorKey, rounds: int) -> None:
        self._key = key
        self._rounds = rounds
        self.lock = threading.Condition()
        self.current = 0
        self.phase: dict[int, Phase] = {0: Phase.OPEN}
        self.attempt = 1
        self.keys: dict[str, bytes] = {}
        self.cohort: frozenset[str] | None = None
        self.uploads: dict[str, list[bytes]] = {}
        self.captured: list[tuple[str, int, int, list[bytes]]] = []
        self.sums: dict[int, list[bytes]] = {}

    def info(self) -> RoundView:
        closed = [r for r, p in self.phase.items() if p == Phase.CLOSED and r < self.current]
        phase = self.phase[self.current]
        return RoundView(
            round=self.current,
            phase=phase,
            base_round=max(closed) if closed else -1,
            submitted=frozenset(self.uploads),
            federation_done=self.current == self._rounds and phase == Phase.CLOSED,
            pairwise_masking=True,
            attempt=self.attempt,
            cohort=self.cohort,
            federation_id=FEDERATION,
            study_hash=study_hash(TASK),
        )

    def restart_without_missing(self) -> None:
        with self.lock:
            assert self.cohort is not None
            self.cohort = frozenset(self.uploads)
            self.uploads = {}
            self.attempt += 1
            self.lock.notify_all()

    def publish(self, hospital: str, number: int, key: bytes) -> RoundView:
        with self.lock:
            if number != self.current or (self.cohort is not None and self.keys.get(hospital) != key):
                raise FailedPrecondition("too late for a key")
            self.keys[hospital] = key
            if self.cohort is None and set(self.keys) == set(HOSPITALS):
                self.cohort = frozenset(self.keys)
            self.lock.notify_all()
            return self.info()

    def submit(self, hospital: str, number: int, chunks: Sequence[bytes], attempt: int) -> None:
        with self.lock:
            if number != self.current or self.cohort is None or hospital not in self.cohort:
                raise FailedPrecondition("not in the cohort")
            if attempt != self.attempt:
                raise FailedPrecondition("stale attempt")
            self.captured.append((hospital, number, attempt, list(chunks)))
            self.uploads[hospital] = list(chunks)
            if set(self.uploads) == self.cohort:
                uploads = list(self.uploads.values())
                total = []
                for i in range(len(uploads[0])):
                    acc = ChunkAccumulator(self._key)
                    for u in uploads:
                        acc.add(u[i])
                    total.append(acc.result())
                self.sums[number] = total
                self.phase[number] = Phase.CLOSED
                if number < self._rounds:
                    self.current += 1
                    self.phase[self.current] = Phase.OPEN
                    self.attempt, self.keys, self.cohort, self.uploads = 1, {}, None, {}
            self.lock.notify_all()


class View:
    def __init__(self, agg: MaskedAggregator, hospital: str) -> None:
        self._agg, self._hospital = agg, hospital
        self.crash_in_round: tuple[int, type[Exception]] | None = None  # fails that wait once

    def current_round(self, wait_for: int | None) -> RoundView:
        with self._agg.lock:
            if wait_for is not None:
                start = self._agg.attempt
                self._agg.lock.wait_for(
                    lambda: (
                        self._agg.current >= wait_for
                        or self._agg.attempt != start
                        or self._agg.info().federation_done
                    ),
                    timeout=5,
                )
            return self._agg.info()

    def submit(
        self, round_number: int, chunks: Sequence[bytes], attempt: int = 0, epsilon: float = 0.0
    ) -> None:
        self._agg.submit(self._hospital, round_number, chunks, attempt)

    def fetch_aggregate(self, round_number: int) -> list[bytes]:
        with self._agg.lock:
            return list(self._agg.sums[round_number])

    def closed_rounds(self) -> list[int]:
        with self._agg.lock:
            return sorted(self._agg.sums)

    def publish_mask_key(self, round_number: int, key: SignedMaskKey) -> RoundView:
        return self._agg.publish(self._hospital, round_number, key.public_key)

    def wait_for_cohort(self) -> RoundView:
        if self.crash_in_round is not None and self.crash_in_round[0] == self._agg.current:
            error, self.crash_in_round = self.crash_in_round[1], None
            raise error()
        with self._agg.lock:
            start = (self._agg.current, self._agg.attempt)
            self._agg.lock.wait_for(
                lambda: self._agg.cohort is not None or (self._agg.current, self._agg.attempt) != start,
                timeout=5,
            )
            return self._agg.info()

    def mask_keys(self, round_number: int) -> dict[str, SignedMaskKey]:
        with self._agg.lock:
            assert self._agg.cohort is not None
            return {h: SignedMaskKey(k) for h, k in self._agg.keys.items() if h in self._agg.cohort}


class Secrets:
    def __init__(self, hospital: str) -> None:
        self._hospital = hospital

    def secret(self, name: str) -> bytes:
        return (self._hospital + name).encode().ljust(32, b"\0")[:32]


@pytest.fixture(scope="module")
def keys() -> tuple[HospitalKey, AggregatorKey]:
    hospital, aggregator = generate_keys()
    return load_hospital_key(hospital), load_aggregator_key(aggregator)


def agent(hospital: str, view: View, store: FakeModelStore, key: HospitalKey, seed: int) -> Participation:
    return Participation(
        hospital,
        TASK,
        FakeGateway(synthetic_examples(seed)),
        view,
        UpdateCodec(key),
        store,
        retry_delay=lambda _: 0.01,
        secrets=Secrets(hospital),
    )


def test_masked_dp_rounds_survive_a_dropout_and_a_restarted_agent(
    keys: tuple[HospitalKey, AggregatorKey],
) -> None:
    hospital_key, aggregator_key = keys
    agg = MaskedAggregator(aggregator_key, rounds=TASK.rounds)
    stores = {h: FakeModelStore() for h in HOSPITALS}
    views = {h: View(agg, h) for h in HOSPITALS}
    agents = {h: agent(h, views[h], stores[h], hospital_key, seed=i + 1) for i, h in enumerate(HOSPITALS)}
    stops = {h: threading.Event() for h in HOSPITALS}
    # d's process dies in round 1 after publishing its key, while waiting for the cohort.
    d_dies = stops["d"]

    class Crash(Unavailable):
        def __init__(self) -> None:
            d_dies.set()
            super().__init__("process killed")

    views["d"].crash_in_round = (1, Crash)
    threads = {h: threading.Thread(target=agents[h].run, args=(stops[h],), daemon=True) for h in HOSPITALS}
    for t in threads.values():
        t.start()
    with agg.lock:
        assert agg.lock.wait_for(lambda: set(agg.uploads) == {"a", "b", "c"} and d_dies.is_set(), timeout=60)
    threads["d"].join(timeout=30)
    assert not threads["d"].is_alive() and agents["d"].progress.last_submitted_round == 0
    first_attempt = {h: chunks for h, r, a, chunks in agg.captured if r == 1 and a == 1}

    # The deadline passes: round 1 restarts as attempt 2 with a, b, c.
    agg.restart_without_missing()
    with agg.lock:
        assert agg.lock.wait_for(lambda: agg.current == 2, timeout=60)
    second_attempt = {h: chunks for h, r, a, chunks in agg.captured if r == 1 and a == 2}
    assert set(second_attempt) == {"a", "b", "c"}
    # The same update under independent masks: the uploads differ.
    assert all(first_attempt[h] != second_attempt[h] for h in second_attempt)
    # The sum of three is their exact average; a single upload decrypts to noise.
    decryptor = UpdateDecryptor(hospital_key)
    n = len(agents["a"]._global)  # noqa: SLF001 - the model size
    lone = decryptor.decrypt_slots(second_attempt["a"], n)
    assert abs(lone[0]) > 2**20  # the masked weight slot is no example count

    # A fresh agent for d (nothing in memory) re-derives its keys and joins round 2.
    views["d2"] = View(agg, "d")
    agents["d2"] = agent("d", views["d2"], stores["d"], hospital_key, seed=4)
    threads["d2"] = threading.Thread(target=agents["d2"].run, args=(threading.Event(),), daemon=True)
    threads["d2"].start()
    for h in ("a", "b", "c", "d2"):
        threads[h].join(timeout=120)
        assert not threads[h].is_alive(), h
        assert agents[h].progress.done and agents[h].progress.error == "", (h, agents[h].progress.error)

    assert sorted(agg.sums) == [0, 1, 2]
    # Round 0's federated histograms: the same at every hospital, no bin below the minimum count.
    released = agents["a"].progress.histograms
    assert len(released) == len(numeric_features(TASK)) and all(h.bins for h in released)
    assert all(agents[h].progress.histograms == released for h in ("b", "c", "d2"))
    assert min(b.count for h in released for b in h.bins) >= TASK.histogram_min_count
    for version in (1, 2):
        models = [stores[h].versions[version].model.params for h in HOSPITALS]
        for m in models[1:]:
            np.testing.assert_array_equal(m, models[0])
    # DP: a, b, c trained rounds 1 and 2 once each (the restart re-sent the same update).
    dp = TASK.dp
    assert dp is not None
    for h in ("a", "b", "c"):
        assert agents[h].progress.epsilon_by_round == pytest.approx(
            {1: epsilon_after_rounds(TASK, dp, 1), 2: epsilon_after_rounds(TASK, dp, 2)}
        )
    assert agents["d2"].progress.epsilon_by_round == pytest.approx({2: epsilon_after_rounds(TASK, dp, 1)})
    assert stores["a"].versions[2].metrics["dp_epsilon"] == pytest.approx(epsilon_after_rounds(TASK, dp, 2))
