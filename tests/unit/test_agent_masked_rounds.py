"""The agent's secure aggregation with DP, over an in-memory aggregator and the real codec: four
hospitals advertise keys, share their secrets, mask and upload once; one dies after sharing, at its
upload, and the round's stages close without it: the survivors reveal its mask key's shares, and
every hospital unmasks and checks the exact sum of the three (nobody uploads twice; there is no
restart). A fresh agent for it (new keys) joins the next round. Every hospital ends with the same
model and the DP spend of the rounds it trained."""

from __future__ import annotations

import dataclasses
import hashlib
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
from fibemrss.he.chunk_format import pack_chunk, unpack_chunk, unpack_header
from fibemrss.he.codec import ChunkAccumulator, UpdateCodec, UpdateDecryptor
from fibemrss.he.keys import AggregatorKey, HospitalKey, generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.mask_signatures import SignedMaskKey
from fibemrss.he.secagg.protocol import Signed
from services.hospital_agent.core.aggregate_bounds import AggregateBounds, check_aggregate
from services.hospital_agent.core.ports import Phase, RoundView, StageView
from services.hospital_agent.core.protocol import Participation
from tests.unit.test_agent_protocol import FakeGateway, FakeModelStore, synthetic_examples

TASK: TaskSpec = dataclasses.replace(HEART_DISEASE_V1_DP, rounds=2, sites=("a", "b", "c", "d"))
HOSPITALS = ("a", "b", "c", "d")
FEDERATION = b"\x05" * 16
STAGES = ("shares", "uploads", "survivors", "reveals")
# Relayed on a closed round (the acceptance vote, fibemrss.he.secagg.votes): each after the one before.
VOTE_STAGES = ("votes", "tally")


@dataclasses.dataclass
class RoundData:
    keys: dict[str, SignedMaskKey] = dataclasses.field(default_factory=dict)
    cohort: frozenset[str] | None = None
    closed: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    messages: dict[str, dict[str, list[tuple[str, bytes, Signed]]]] = dataclasses.field(default_factory=dict)
    uploads: dict[str, tuple[list[bytes], Signed]] = dataclasses.field(default_factory=dict)


class SecAggAggregator:
    """The aggregator's secure-aggregation rounds in miniature: a stage closes once everyone
    expected posted, or when the test says its deadline passed (`close_stage`)."""

    def __init__(self, key: AggregatorKey, rounds: int, task: TaskSpec = TASK) -> None:
        self._key = key
        self._rounds = rounds
        self._study_hash = study_hash(task)
        self.lock = threading.Condition()
        self.current = 0
        self.phase: dict[int, Phase] = {0: Phase.OPEN}
        self.data: dict[int, RoundData] = {0: RoundData()}
        self.captured: list[tuple[str, int, list[bytes]]] = []
        self.sums: dict[int, list[bytes]] = {}

    @property
    def now(self) -> RoundData:
        return self.data[self.current]

    def info(self) -> RoundView:
        closed = [r for r, p in self.phase.items() if p == Phase.CLOSED and r < self.current]
        phase = self.phase[self.current]
        return RoundView(
            round=self.current,
            phase=phase,
            base_round=max(closed) if closed else -1,
            submitted=frozenset(self.now.uploads),
            federation_done=self.current == self._rounds and phase == Phase.CLOSED,
            pairwise_masking=True,
            cohort=self.now.cohort,
            federation_id=FEDERATION,
            study_hash=self._study_hash,
        )

    def publish(self, hospital: str, number: int, key: SignedMaskKey) -> RoundView:
        with self.lock:
            d = self.now
            if number != self.current or (d.cohort is not None and d.keys.get(hospital) != key):
                raise FailedPrecondition("too late for a key")
            d.keys[hospital] = key
            if d.cohort is None and set(d.keys) == set(HOSPITALS):
                d.cohort = frozenset(d.keys)
            self.lock.notify_all()
            return self.info()

    def _expected(self, stage: str) -> frozenset[str]:
        i = STAGES.index(stage)
        return (self.now.cohort or frozenset()) if i == 0 else self.now.closed.get(STAGES[i - 1], frozenset())

    def _posted(self, stage: str) -> frozenset[str]:
        if stage == "uploads":
            return frozenset(self.now.uploads)
        return frozenset(self.now.messages.get(stage, {}))

    def _vote_expected(self, number: int, stage: str) -> frozenset[str]:
        d = self.data[number]
        return d.closed.get("uploads" if stage == "votes" else "votes", frozenset())

    def post_vote(
        self, hospital: str, number: int, stage: str, parts: list[tuple[str, bytes, Signed]]
    ) -> None:
        """A vote or tally on closed round `number`: the stage closes once every expected voter posted."""
        with self.lock:
            d = self.data[number]
            previous = "uploads" if stage == "votes" else "votes"
            if self.phase.get(number) != Phase.CLOSED or stage in d.closed or previous not in d.closed:
                raise FailedPrecondition(f"no open {stage} stage")
            if hospital not in self._vote_expected(number, stage):
                raise FailedPrecondition("not expected")
            d.messages.setdefault(stage, {})[hospital] = parts
            if set(d.messages[stage]) >= self._vote_expected(number, stage):
                d.closed[stage] = frozenset(d.messages[stage])
            self.lock.notify_all()

    def close_vote_stage(self, number: int, stage: str) -> None:
        """A vote stage's deadline passes: it closes with whoever posted."""
        with self.lock:
            d = self.data[number]
            d.closed[stage] = frozenset(d.messages.get(stage, {}))
            self.lock.notify_all()

    def post(self, hospital: str, number: int, stage: str, parts: list[tuple[str, bytes, Signed]]) -> None:
        if stage in VOTE_STAGES:
            self.post_vote(hospital, number, stage, parts)
            return
        with self.lock:
            i = STAGES.index(stage)
            if (
                number != self.current
                or stage in self.now.closed
                or (i and STAGES[i - 1] not in self.now.closed)
            ):
                raise FailedPrecondition(f"no open {stage} stage")
            if hospital not in self._expected(stage):
                raise FailedPrecondition("not expected")
            self.now.messages.setdefault(stage, {})[hospital] = parts
            self._advance()

    def submit(self, hospital: str, number: int, chunks: Sequence[bytes], signed: Signed) -> None:
        with self.lock:
            if (
                number != self.current
                or "uploads" in self.now.closed
                or hospital not in self._expected("uploads")
            ):
                raise FailedPrecondition("not in U2, or the upload stage is closed")
            if hospital in self.now.uploads:
                return
            self.captured.append((hospital, number, list(chunks)))
            self.now.uploads[hospital] = (list(chunks), signed)
            self._advance()

    def close_stage(self, stage: str) -> None:
        """The stage's deadline passes: it closes with whoever posted."""
        with self.lock:
            self.now.closed[stage] = self._posted(stage)
            self._advance()

    def _advance(self) -> None:
        d = self.now
        for stage in STAGES:
            if stage in d.closed:
                continue
            if self._posted(stage) >= self._expected(stage):
                d.closed[stage] = self._posted(stage)
                continue
            break
        else:
            uploads = [d.uploads[h][0] for h in sorted(d.closed["uploads"])]
            total = []
            for i in range(len(uploads[0])):
                acc = ChunkAccumulator(self._key)
                for u in uploads:
                    acc.add(u[i])
                total.append(acc.result())
            self.sums[self.current] = total
            self.phase[self.current] = Phase.CLOSED
            if self.current < self._rounds:
                self.current += 1
                self.phase[self.current] = Phase.OPEN
                self.data[self.current] = RoundData()
        self.lock.notify_all()


class View:
    def __init__(self, agg: SecAggAggregator, hospital: str) -> None:
        self._agg, self._hospital = agg, hospital
        self.crash_at_upload: tuple[int, type[Exception]] | None = None  # fails that upload once

    def current_round(self, wait_for: int | None) -> RoundView:
        with self._agg.lock:
            if wait_for is not None:
                self._agg.lock.wait_for(
                    lambda: self._agg.current >= wait_for or self._agg.info().federation_done, timeout=5
                )
            return self._agg.info()

    def submit(
        self,
        round_number: int,
        chunks: Sequence[bytes],
        attempt: int = 0,
        epsilon: float = 0.0,
        signature: bytes = b"",
        certificate: bytes = b"",
    ) -> None:
        if self.crash_at_upload is not None and self.crash_at_upload[0] == round_number:
            error, self.crash_at_upload = self.crash_at_upload[1], None
            raise error()
        self._agg.submit(self._hospital, round_number, chunks, Signed(signature, certificate))

    def fetch_aggregate(self, round_number: int) -> list[bytes]:
        with self._agg.lock:
            return list(self._agg.sums[round_number])

    def closed_rounds(self) -> list[int]:
        with self._agg.lock:
            return sorted(self._agg.sums)

    def publish_mask_key(self, round_number: int, key: SignedMaskKey) -> RoundView:
        return self._agg.publish(self._hospital, round_number, key)

    def wait_for_cohort(self) -> RoundView:
        with self._agg.lock:
            start = self._agg.current
            self._agg.lock.wait_for(
                lambda: self._agg.now.cohort is not None or self._agg.current != start, timeout=5
            )
            return self._agg.info()

    def mask_keys(self, round_number: int) -> dict[str, SignedMaskKey]:
        with self._agg.lock:
            d = self._agg.data[round_number]
            assert d.cohort is not None
            return {h: k for h, k in d.keys.items() if h in d.cohort}

    def post_message(
        self,
        round_number: int,
        stage: str,
        envelopes: Sequence[tuple[str, bytes]],
        payload: bytes,
        signature: bytes,
        certificate: bytes,
    ) -> None:
        signed = Signed(signature, certificate)
        parts = (
            [(to, data, signed) for to, data in envelopes] if stage == "shares" else [("", payload, signed)]
        )
        self._agg.post(self._hospital, round_number, stage, parts)

    def round_stage(self, round_number: int, stage: str, wait: bool) -> StageView:
        with self._agg.lock:
            d = self._agg.data[round_number]
            if wait:
                self._agg.lock.wait_for(lambda: stage in d.closed, timeout=5)
            if stage not in d.closed:
                return StageView(False, frozenset(), {})
            messages = {
                sender: (data, signed)
                for sender, parts in d.messages.get(stage, {}).items()
                for to, data, signed in parts
                if to == (self._hospital if stage == "shares" else "")
            }
            return StageView(True, d.closed[stage], messages)

    def fetch_upload(
        self, round_number: int, hospital: str, indexes: Sequence[int]
    ) -> tuple[bytes, bytes, bytes, dict[int, bytes]]:
        with self._agg.lock:
            chunks, signed = self._agg.data[round_number].uploads[hospital]
        digests = b"".join(hashlib.sha256(c).digest() for c in chunks)
        return digests, signed.signature, signed.certificate, {i: chunks[i] for i in indexes}


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


def test_masked_dp_rounds_recover_a_dropout_from_shares_and_nobody_uploads_twice(
    keys: tuple[HospitalKey, AggregatorKey],
) -> None:
    hospital_key, aggregator_key = keys
    agg = SecAggAggregator(aggregator_key, rounds=TASK.rounds)
    stores = {h: FakeModelStore() for h in HOSPITALS}
    views = {h: View(agg, h) for h in HOSPITALS}
    agents = {h: agent(h, views[h], stores[h], hospital_key, seed=i + 1) for i, h in enumerate(HOSPITALS)}
    stops = {h: threading.Event() for h in HOSPITALS}
    # d's process dies in round 1 after it shared its secrets, as it uploads.
    d_dies = stops["d"]

    class Crash(Unavailable):
        def __init__(self) -> None:
            d_dies.set()
            super().__init__("process killed")

    views["d"].crash_at_upload = (1, Crash)
    threads = {h: threading.Thread(target=agents[h].run, args=(stops[h],), daemon=True) for h in HOSPITALS}
    for t in threads.values():
        t.start()
    with agg.lock:
        assert agg.lock.wait_for(
            lambda: agg.current == 1 and set(agg.now.uploads) == {"a", "b", "c"} and d_dies.is_set(),
            timeout=90,
        )
        assert "d" in agg.now.closed["shares"]  # d shared: its pairwise masks are in the others' uploads
    threads["d"].join(timeout=30)
    assert not threads["d"].is_alive() and agents["d"].progress.last_submitted_round == 0

    # The upload stage's deadline passes: it closes with a, b, c; they sign U3 and reveal d's
    # mask-key shares (never its seed's), and the round's sum is unmasked exactly.
    agg.close_stage("uploads")
    with agg.lock:
        assert agg.lock.wait_for(lambda: agg.current == 2, timeout=60)
    first = {h: chunks for h, r, chunks in agg.captured if r == 1}
    assert sorted(first) == ["a", "b", "c"]
    decryptor = UpdateDecryptor(hospital_key)
    n = len(agents["a"]._global)  # noqa: SLF001 - the model size
    lone = decryptor.decrypt_slots(first["a"], n)
    assert abs(lone[0]) > 2**20  # the masked weight slot is no example count

    # A fresh agent for d (new keys, nothing in memory) joins round 2.
    views["d2"] = View(agg, "d")
    agents["d2"] = agent("d", views["d2"], stores["d"], hospital_key, seed=4)
    threads["d2"] = threading.Thread(target=agents["d2"].run, args=(threading.Event(),), daemon=True)
    threads["d2"].start()
    for h in ("a", "b", "c", "d2"):
        threads[h].join(timeout=120)
        assert not threads[h].is_alive(), h
        assert agents[h].progress.done and agents[h].progress.error == "", (h, agents[h].progress.error)

    assert sorted(agg.sums) == [0, 1, 2]
    # One upload per hospital per round, never a second.
    rounds_of = [(h, r) for h, r, _ in agg.captured]
    assert len(rounds_of) == len(set(rounds_of)) == 4 + 3 + 4
    # Round 0's federated histograms: the same at every hospital, no bin below the minimum count.
    released = agents["a"].progress.histograms
    assert len(released) == len(numeric_features(TASK)) and all(h.bins for h in released)
    assert all(agents[h].progress.histograms == released for h in ("b", "c", "d2"))
    assert min(b.count for h in released for b in h.bins) >= TASK.histogram_min_count
    for version in (1, 2):
        models = [stores[h].versions[version].model.params for h in HOSPITALS]
        for m in models[1:]:
            np.testing.assert_array_equal(m, models[0])
    dp = TASK.dp
    assert dp is not None
    for h in ("a", "b", "c"):
        assert agents[h].progress.epsilon_by_round == pytest.approx(
            {1: epsilon_after_rounds(TASK, dp, 1), 2: epsilon_after_rounds(TASK, dp, 2)}
        )
    assert agents["d2"].progress.epsilon_by_round == pytest.approx({2: epsilon_after_rounds(TASK, dp, 1)})
    assert stores["a"].versions[2].metrics["dp_epsilon"] == pytest.approx(epsilon_after_rounds(TASK, dp, 2))


class LyingView(View):
    """The aggregator serves every hospital something else than round 1's sum."""

    def __init__(self, agg: SecAggAggregator, hospital: str, forge: str, key: HospitalKey) -> None:
        super().__init__(agg, hospital)
        self._forge, self._key = forge, key

    def fetch_aggregate(self, round_number: int) -> list[bytes]:
        if round_number != 1:
            return super().fetch_aggregate(round_number)
        with self._agg.lock:
            d = self._agg.data[1]
            if self._forge == "partial":  # a and b only, with the party count it claims
                uploads = [d.uploads[h][0] for h in ("a", "b")]
                acc = ChunkAccumulator(self._agg._key)  # noqa: SLF001 - the aggregator's own key
                for u in uploads:
                    acc.add(u[0])
                return [acc.result()]
            if self._forge == "replayed":  # round 0's genuine sum
                return list(self._agg.sums[0])
            # "forged": a model of its choosing, encrypted with the key it holds
            n = len(self._agg.sums[1]) and _model_size(self._agg)
            chosen = UpdateCodec(self._key).encrypt(np.full(n, 3.0), 4 * 250)
            # As a sum (SEAL's form: a compact chunk holds one party), and the chunk header's party
            # count is not authenticated: it claims the four hospitals.
            acc = ChunkAccumulator(self._agg._key)  # noqa: SLF001 - the aggregator's own key
            acc.add(chosen[0])
            header, blobs = unpack_chunk(acc.result())
            assert isinstance(blobs, list)
            return [pack_chunk(dataclasses.replace(header, parties=4), blobs)]


def _model_size(agg: SecAggAggregator) -> int:
    return unpack_header(agg.sums[1][0]).n_values


@pytest.mark.parametrize("forge", ["forged", "partial", "replayed"])
def test_a_forged_partial_or_replayed_sum_is_refused_naming_the_aggregator(
    keys: tuple[HospitalKey, AggregatorKey], forge: str
) -> None:
    """Every hospital recomputes the sum from the signed uploads and the revealed shares: what the
    aggregator serves instead of round 1's sum is refused, nobody publishes round 1, and the
    federation goes on to round 2 with every hospital on the same model. The old defence, a check
    of the decrypted sum against the codec's bounds, passes the forged model."""
    hospital_key, aggregator_key = keys
    agg = SecAggAggregator(aggregator_key, rounds=TASK.rounds)
    stores = {h: FakeModelStore() for h in HOSPITALS}
    views = {h: LyingView(agg, h, forge, hospital_key) for h in HOSPITALS}
    agents = {h: agent(h, views[h], stores[h], hospital_key, seed=i + 1) for i, h in enumerate(HOSPITALS)}
    threads = {
        h: threading.Thread(target=agents[h].run, args=(threading.Event(),), daemon=True) for h in HOSPITALS
    }
    for t in threads.values():
        t.start()
    for h in HOSPITALS:
        threads[h].join(timeout=180)
        assert not threads[h].is_alive(), h
        assert agents[h].progress.done, (h, agents[h].progress.error)
        warnings = " ".join(agents[h].progress.warnings)
        assert "round 1: aggregate rejected" in warnings and "aggregator" in warnings, (h, warnings)
        assert 1 not in stores[h].versions and 2 in stores[h].versions
    models = [stores[h].versions[2].model.params for h in HOSPITALS]
    for m in models[1:]:
        np.testing.assert_array_equal(m, models[0])
    if forge == "forged":
        forged = views["a"].fetch_aggregate(1)
        average, weight = UpdateCodec(hospital_key).decrypt_average(
            forged, _model_size(agg), TASK.min_contributors
        )
        check_aggregate(
            average, weight, 4, AggregateBounds.of(hospital_key.params)
        )  # passes: the old code took it
