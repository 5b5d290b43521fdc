"""Study proposals at the aggregator over real gRPC and PostgreSQL: stored with their hash and
audited, a federation pinned to a proposed hash, and uploads for another document refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import grpc
import numpy as np
import pytest

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.domain.study import study_hash, study_to_json
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.he.codec import UpdateEncryptor
from fibemrss.he.keys import load_hospital_key
from tests.integration.test_aggregator_rounds import HOSPITALS, Aggregator, keys, start_aggregator  # noqa: F401

# A name the aggregator knows no shape for, so a small test upload fits (cf. test_aggregator_rounds.py).
V1 = replace(HEART_DISEASE_V1, name="proposal-test", version=1, min_contributors=3, pairwise_masking=False)
V2 = replace(V1, version=2, rounds=V1.rounds + 1)


def doc(task) -> bytes:  # type: ignore[no-untyped-def]
    return json.dumps(study_to_json(task)).encode()


@pytest.fixture
def aggregator(fresh_database, keys) -> Iterator[Aggregator]:  # type: ignore[no-untyped-def]  # noqa: F811
    agg = start_aggregator(fresh_database("aggregator"), load_hospital_key(keys[0]), keys[1])
    yield agg
    agg.stop()


def upload(agg: Aggregator, hospital: str, digest: str) -> pb.SubmitUpdateResponse:
    chunks = UpdateEncryptor(agg.key).encrypt(np.ones(4), 5)
    return agg.stub.SubmitUpdate(
        iter(
            pb.SubmitUpdateRequest(
                task=V1.name,
                round=0,
                hospital=hospital,
                total_chunks=len(chunks),
                index=i,
                ciphertext=c,
                study_hash=digest if i == 0 else "",
            )
            for i, c in enumerate(chunks)
        ),
        timeout=30,
    )


def start(agg: Aggregator, digest: str = "") -> pb.FederationStatus:
    return agg.stub.StartFederation(
        pb.StartFederationRequest(
            task=V1.name, rounds=2, quorum=3, deadline_seconds=30, hospitals=HOSPITALS, min_contributors=3,
            study_hash=digest,
        ),
        timeout=30,
    ).status  # fmt: skip


def test_a_federation_trains_one_proposed_document_and_refuses_uploads_for_another(
    aggregator: Aggregator,
) -> None:
    with pytest.raises(grpc.RpcError) as none_yet:
        aggregator.stub.GetStudyProposal(pb.GetStudyProposalRequest(study=V1.name), timeout=10)
    assert none_yet.value.code() == grpc.StatusCode.NOT_FOUND
    first = aggregator.stub.ProposeStudy(pb.ProposeStudyRequest(document=doc(V1)), timeout=10)
    assert (first.duplicate, first.proposal.study_hash, first.proposal.version) == (False, study_hash(V1), 1)
    assert aggregator.stub.ProposeStudy(pb.ProposeStudyRequest(document=doc(V1)), timeout=10).duplicate
    aggregator.stub.ProposeStudy(pb.ProposeStudyRequest(document=doc(V2)), timeout=10)
    latest = aggregator.stub.GetStudyProposal(pb.GetStudyProposalRequest(study=V1.name), timeout=10).proposal
    assert (latest.version, latest.study_hash, bytes(latest.document)) == (2, study_hash(V2), doc(V2))

    assert start(aggregator).study_hash == study_hash(V2)  # no hash asked: the latest proposal
    with pytest.raises(grpc.RpcError) as repinned:
        start(aggregator, study_hash(V1))
    assert repinned.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"already trains {study_hash(V2)}" in (repinned.value.details() or "")
    for sent in (study_hash(V1), ""):
        with pytest.raises(grpc.RpcError) as foreign:
            upload(aggregator, "a", sent)
        assert foreign.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"the federation trains {study_hash(V2)}" in (foreign.value.details() or "")
    assert not upload(aggregator, "a", study_hash(V2)).duplicate
    status = aggregator.stub.GetFederationStatus(
        pb.GetFederationStatusRequest(task=V1.name), timeout=10
    ).status
    assert list(status.current.submitted) == ["a"] and status.current.study_hash == study_hash(V2)
    with aggregator.db.transaction() as cur:
        cur.execute("SELECT action, subject FROM audit_log ORDER BY id")
        assert [(a, s.split()[2]) for a, s in cur.fetchall()] == [
            ("propose_study", "1"),
            ("propose_study", "2"),
        ]
