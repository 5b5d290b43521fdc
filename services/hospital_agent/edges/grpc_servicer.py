"""The agent's gRPC servicer: reports the hospital's progress in the federation."""

from __future__ import annotations

import grpc

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.domain.errors import NotFound
from services.hospital_agent.core.protocol import Participation, PersonalizationReport


def _personalization(report: PersonalizationReport | None) -> pb.Personalization | None:
    if report is None:
        return None
    g, p = report.global_score, report.personalized_score
    return pb.Personalization(
        chosen=report.chosen,
        global_version=report.global_version,
        personalized_version=report.personalized_version,
        global_validation_accuracy=g.accuracy,
        personalized_validation_accuracy=p.accuracy,
        global_validation_log_loss=g.log_loss,
        personalized_validation_log_loss=p.log_loss,
        validation_examples=g.examples,
        fine_tune_examples=report.fit_examples,
    )


class HospitalAgentServicer(federation_pb2_grpc.HospitalAgentServiceServicer):
    def __init__(self, participation: Participation) -> None:
        self._p = participation

    def GetAgentStatus(
        self, request: pb.GetAgentStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetAgentStatusResponse:
        if request.task and request.task != self._p.task.name:
            raise NotFound(f"this agent takes part in {self._p.task.name}, not {request.task!r}")
        progress = self._p.progress
        with progress.lock:
            status = pb.AgentStatus(
                hospital=self._p.hospital,
                task=self._p.task.name,
                last_submitted_round=progress.last_submitted_round,
                evaluations=[
                    pb.Evaluation(
                        round=e.round,
                        correct=e.correct,
                        total=e.total,
                        model_version=e.model_version,
                        epsilon=e.epsilon or 0.0,
                    )
                    for e in progress.evaluations
                ],
                done=progress.done,
                error=progress.error,
                train_examples=progress.train_examples,
                test_examples=progress.test_examples,
                warnings=list(progress.warnings),
                consecutive_failures=progress.consecutive_failures,
                dp=self._p.task.dp is not None,
                epsilon=max(progress.epsilon_by_round.values(), default=0.0),
                delta=progress.dp_delta,
                personalization=_personalization(progress.personalization),
                histograms=[
                    pb.FeatureHistogram(
                        feature=h.feature,
                        bins=[pb.HistogramBin(low=b.low, high=b.high, count=b.count) for b in h.bins],
                        suppressed_bins=h.suppressed,
                    )
                    for h in progress.histograms
                ],
            )
        return pb.GetAgentStatusResponse(status=status)
