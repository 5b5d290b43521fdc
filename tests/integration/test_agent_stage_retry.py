"""An honest agent whose stage post was stored but whose answer it never got (UNAVAILABLE: the
aggregator's database pool exhausted under several studies at once) retries the step and stays in
the round.

The aggregator is the real one (coordinator, store on PostgreSQL, servicer) behind mutual TLS, so
every protocol message is signed with the site's ECDSA key (a fresh signature each time it is
made); the agents are the real protocol over gRPC. The servicer answers agent c UNAVAILABLE once
per round at one point of the survivor or reveal stage, after doing the work (as the store's pool
does when the commit went through but a later call of the same step found no connection). Before
the fix, c re-signed its survivor set on the retry and posted it again: refused FAILED_PRECONDITION
("the survivors stage ... is closed") on every retry until the deadline, and the round failed
short of its members' reveals; a lost reveal answer left c's reveal unsent for good.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import pytest

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.db.pool import Database
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.he.keys import generate_keys
from fibemrss.platform.identity import caller_identity
from fibemrss.tools.certs import init_pki
from services.aggregator.adapters.store import AggregatorStore
from services.aggregator.core.round_state import RoundState
from services.aggregator.edges.grpc_servicer import AggregatorServicer
from services.hospital_agent.core.protocol import Participation
from tests.hostile.test_signed_mask_keys import Setup as SignedSetup
from tests.hostile.test_signed_mask_keys import federate as federate_signed
from tests.hostile.test_signed_mask_keys import serve_aggregator

HOSPITALS = ("a", "b", "c")
TASK = dataclasses.replace(HEART_DISEASE_V1, rounds=1, min_contributors=3)
LOST = "database connection pool exhausted; retry"


class LossyAggregator(AggregatorServicer):
    """The real servicer; agent c is answered UNAVAILABLE once per round at `fault[task]`
    (a post of the survivors or reveals stage stored, then its answer lost; or the wait on the
    survivors stage after c posted in it)."""

    fault: dict[str, str] = {}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]  # passed through unchanged
        self.lost: list[tuple[str, int]] = []
        self._posted: set[tuple[str, int]] = set()

    def _lose_once(self, task: str, number: int, context: grpc.ServicerContext) -> None:
        if (task, number) not in self.lost:
            self.lost.append((task, number))
            context.abort(grpc.StatusCode.UNAVAILABLE, LOST)

    def PostRoundMessage(
        self, request: pb.PostRoundMessageRequest, context: grpc.ServicerContext
    ) -> pb.PostRoundMessageResponse:
        response = super().PostRoundMessage(request, context)  # stored: the work is done
        fault = self.fault.get(request.task, "")
        if caller_identity(context) == "agent@c":
            if request.stage == pb.ROUND_STAGE_SURVIVORS:
                self._posted.add((request.task, request.round))
            if (fault, request.stage) in (
                ("survivors-answer", pb.ROUND_STAGE_SURVIVORS),
                ("reveals-answer", pb.ROUND_STAGE_REVEALS),
            ):
                self._lose_once(request.task, request.round, context)
        return response

    def GetRoundStage(
        self, request: pb.GetRoundStageRequest, context: grpc.ServicerContext
    ) -> pb.GetRoundStageResponse:
        if (
            self.fault.get(request.task) == "survivors-wait"
            and caller_identity(context) == "agent@c"
            and request.stage == pb.ROUND_STAGE_SURVIVORS
            and (request.task, request.round) in self._posted
        ):
            # The answer the agent needs after its post: the pool had no connection for it.
            super().GetRoundStage(request, context)
            self._lose_once(request.task, request.round, context)
        return super().GetRoundStage(request, context)


@dataclasses.dataclass
class Setup(SignedSetup):
    """The signed-keys test's setup (its `federate` runs the agents), and the aggregator's store."""

    store: AggregatorStore


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, postgres_server: str) -> Iterator[Setup]:
    from fibemrss.db.admin import ensure_database
    from fibemrss.db.migrate import migrate

    root = tmp_path_factory.mktemp("stage-retry")
    init_pki(root / "pki", ["aggregator@central", "operator@central", *(f"agent@{h}" for h in HOSPITALS)])
    url = ensure_database(postgres_server, "t_agent_stage_retry")
    migrate(url, "aggregator")
    db = Database(url)
    hospital_key, aggregator_key = generate_keys()
    pki = root / "pki"
    served = serve_aggregator("lossy-aggregator", db, aggregator_key, pki, LossyAggregator)
    yield Setup(pki, served.address, served.servicer, hospital_key, served.store)
    served.stop()
    db.close()


def federate(setup: Setup, task: str) -> dict[str, Participation]:
    def over(agents: dict[str, Participation]) -> bool:
        return all(p.progress.done for p in agents.values()) or any(
            r.state == RoundState.FAILED for r in setup.store.rounds(task)
        )

    return federate_signed(setup, task, over, deadline_seconds=10, timeout=90)  # type: ignore[arg-type]


@pytest.mark.parametrize("fault", ["survivors-answer", "survivors-wait", "reveals-answer"])
def test_an_agent_that_retries_after_unavailable_stays_in_every_round(setup: Setup, fault: str) -> None:
    task = f"retry-{fault}"
    LossyAggregator.fault[task] = fault
    agents = federate(setup, task)
    # The fault happened in both rounds (statistics and training) ...
    assert sorted(n for t, n in setup.servicer.lost if t == task) == [0, 1]
    # ... and no round failed or went on without c: it signed the survivor set and revealed in each.
    for r in setup.store.rounds(task):
        assert r.state == RoundState.CLOSED, (r.number, r.state, setup.store.failure(task, r.number))
        stages = setup.store.stages(task, r.number)
        for stage in ("uploads", "survivors", "reveals"):
            assert stages[stage] == frozenset(HOSPITALS), (r.number, stage, stages[stage])
    for h, p in agents.items():
        assert p.progress.done and p.progress.error == "", (h, p.progress.error)
        assert p.progress.last_submitted_round == 1, h
