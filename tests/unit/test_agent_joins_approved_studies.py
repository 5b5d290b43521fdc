"""An agent joins only a federation of its own study document (by hash) that its hospital
approved, and imports a study's model factory only then: a factory module whose import writes
a marker file shows that a refused, unapproved or disallowed study never imports it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fibemrss.domain.errors import Unavailable
from fibemrss.domain.site_policy import DEFAULT_POLICY, SitePolicy, StudyDecision
from fibemrss.domain.study import study_hash
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.he.codec import UpdateCodec
from fibemrss.he.keys import AggregatorKey, HospitalKey
from services.hospital_agent.core.ports import Phase, RoundView
from services.hospital_agent.core.protocol import Participation
from tests.unit.test_agent_protocol import TASK, FakeGateway, FakeModelStore, keys, synthetic_examples  # noqa: F401

FACTORY = """
from pathlib import Path
Path({marker!r}).write_text("imported")

def build(input_dim):
    import torch
    return torch.nn.Linear(input_dim, 1)
"""


class OneRoundAggregator:
    """Says round 0 is open for a federation pinning `study_hash`; anything further is refused."""

    def __init__(self, study_hash: str) -> None:
        self.study_hash = study_hash
        self.calls: list[str] = []

    def current_round(self, wait_for: int | None) -> RoundView:
        self.calls.append("current_round")
        return RoundView(0, Phase.OPEN, -1, frozenset(), False, study_hash=self.study_hash)

    def submit(
        self, round_number: int, chunks: Sequence[bytes], attempt: int = 0, epsilon: float = 0.0
    ) -> None:
        self.calls.append("submit")
        raise Unavailable("this fake takes no upload")

    def fetch_aggregate(self, round_number: int) -> list[bytes]:
        raise Unavailable("no aggregate")

    def publish_mask_key(self, round_number: int, public_key: bytes) -> RoundView:
        self.calls.append("publish_mask_key")
        raise Unavailable("no keys")

    def wait_for_cohort(self) -> RoundView:
        raise Unavailable("no cohort")

    def mask_keys(self, round_number: int) -> dict[str, bytes]:
        raise Unavailable("no keys")

    def closed_rounds(self) -> list[int]:
        return []


class Approvals:
    def __init__(self, decision: str | None, policy: SitePolicy = DEFAULT_POLICY) -> None:
        self.decision, self.policy = decision, policy

    def latest_decision(self, study: str, digest: str) -> StudyDecision | None:
        if self.decision is None:
            return None
        return StudyDecision(
            study, digest, 1, self.decision, "ethics board", None, "operator@a", datetime.now(UTC).isoformat()
        )

    def site_policy(self) -> tuple[SitePolicy, bool]:
        return self.policy, True


def one_step(
    task: TaskSpec, federation_hash: str, approvals: Approvals, key: HospitalKey
) -> tuple[Participation, FakeGateway, OneRoundAggregator]:
    """Runs the agent until its first failed step (a refusal, or the fake's refused upload)."""
    stop = threading.Event()
    gateway = FakeGateway(synthetic_examples(1))
    aggregator = OneRoundAggregator(federation_hash)
    p = Participation(
        "a",
        task,
        gateway,
        aggregator,
        UpdateCodec(key),
        FakeModelStore(),
        retry_delay=lambda _: stop.set() or 0.0,
        approvals=approvals,
    )
    p.run(stop)
    return p, gateway, aggregator


@pytest.fixture
def factory_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[TaskSpec, Path]:
    module = f"marker_factory_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported.marker"
    (tmp_path / f"{module}.py").write_text(FACTORY.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    return replace(TASK, model=f"{module}:build"), marker


def test_a_factory_is_imported_only_for_an_approved_study_the_site_policy_allows(
    factory_task: tuple[TaskSpec, Path],
    keys: tuple[HospitalKey, AggregatorKey],  # noqa: F811
) -> None:
    task, marker = factory_task
    own = study_hash(task)
    allows = SitePolicy(model_factories=(task.model,))
    refusals = [
        (own, Approvals(None, allows), f"study {task.name} {own} is not approved at hospital a"),
        (own, Approvals("refused", allows), "was refused at hospital a by operator@a: ethics board"),
        (own, Approvals("approved"), f"site policy model_factories: model {task.model} is not allowed here"),
        ("sha256:" + "0" * 64, Approvals("approved", allows), f"this hospital holds {own}: not taking part"),
    ]
    for federation_hash, approvals, reason in refusals:
        p, gateway, aggregator = one_step(task, federation_hash, approvals, keys[0])
        assert reason in p.progress.error
        assert not marker.exists()
        assert gateway.purposes == [] and aggregator.calls == ["current_round"]  # nothing read, nothing sent
    # Approved and allowed: the factory is imported (so the marker above would have shown an import).
    p, gateway, aggregator = one_step(task, own, Approvals("approved", allows), keys[0])
    assert marker.exists()
    assert gateway.purposes != [] and "submit" in aggregator.calls
