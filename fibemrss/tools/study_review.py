"""Study proposal, review and approval as a client runs them: `fibemrss study propose|review|
approve|refuse`, the demo, LocalCluster and the deploy harness all go through these functions.

operator@central proposes a document at the aggregator; each hospital's operator fetches the
proposal, has the hospital's own gateway review it (eligible patients, site policy) and records
the decision there. Nothing here imports a study's model: it is shown by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.api.federation.v1 import federation_pb2 as fpb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.domain.study import parse_study, study_hash, study_to_json
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.platform.channels import open_channel

TIMEOUT = 60.0


def propose(aggregator: grpc.Channel, document: bytes) -> fpb.ProposeStudyResponse:
    return federation_pb2_grpc.AggregatorServiceStub(aggregator).ProposeStudy(
        fpb.ProposeStudyRequest(document=document), timeout=TIMEOUT
    )


def proposal(aggregator: grpc.Channel, study: str) -> fpb.StudyProposal:
    return (
        federation_pb2_grpc.AggregatorServiceStub(aggregator)
        .GetStudyProposal(fpb.GetStudyProposalRequest(study=study), timeout=TIMEOUT)
        .proposal
    )


def review(gateway: grpc.Channel, document: bytes) -> emr_pb2.ReviewStudyResponse:
    return emr_pb2_grpc.EmrGatewayServiceStub(gateway).ReviewStudy(
        emr_pb2.ReviewStudyRequest(document=document), timeout=TIMEOUT
    )


def decide(gateway: grpc.Channel, document: bytes, approve: bool, reason: str) -> emr_pb2.StudyDecision:
    return (
        emr_pb2_grpc.EmrGatewayServiceStub(gateway)
        .DecideStudy(
            emr_pb2.DecideStudyRequest(document=document, approve=approve, reason=reason), timeout=TIMEOUT
        )
        .decision
    )


def _feature_line(task: TaskSpec, i: int) -> str:
    f = task.features[i]
    if f.source == "age":
        what = "age in years"
    elif f.source == "sex":
        what = f"sex ({', '.join(f.categories)})"
    elif f.source == "numeric":
        what = f"observation {f.system} {f.code} in {f.unit}"
    elif f.source == "coded":
        what = f"coded observation {f.system} {f.code}: {', '.join(f.categories)}"
    else:
        window = f" within {f.within_days} days" if f.within_days else ""
        what = f"condition {f.system} {f.code} present/absent{window}"
    return f"    {f.name:<26} {what}"


def review_to_dict(r: emr_pb2.ReviewStudyResponse, task: TaskSpec) -> dict[str, Any]:
    return {
        "study": r.study,
        "version": r.version,
        "hash": r.study_hash,
        "features": [_feature_line(task, i).strip() for i in range(len(task.features))],
        "label": _label(task),
        "cohort": _cohort(task),
        "patients": r.patients,
        "eligible": r.eligible,
        "consent_excluded": r.consent_excluded,
        "model": r.model,
        "code_systems": list(r.code_systems),
        "epsilon": r.epsilon if r.HasField("epsilon") else None,
        "policy": json.loads(r.policy_json),
        "policy_set": r.policy_set,
        "problems": [{"rule": p.rule, "description": p.description} for p in r.problems],
        "decision": None
        if not r.HasField("decision")
        else {"decision": r.decision.decision, "by": r.decision.decided_by, "at": r.decision.decided_at},
    }


def _label(task: TaskSpec) -> str:
    lab = task.label
    if lab.kind == "condition":
        return f"condition {lab.system} {lab.code} recorded" + (
            f" within {lab.within_days} days" if lab.within_days else ""
        )
    return f"observation {lab.system} {lab.code} above {lab.positive_above:g}"


def _cohort(task: TaskSpec) -> str:
    c = task.cohort
    parts = []
    if c.min_age is not None and c.max_age is not None:
        parts.append(f"age {c.min_age:g} to {c.max_age:g}")
    elif c.min_age is not None:
        parts.append(f"age {c.min_age:g} and older")
    elif c.max_age is not None:
        parts.append(f"age up to {c.max_age:g}")
    parts += [f"has {s} {k}" for s, k in c.required]
    return ", ".join(parts) or "every patient"


def format_review(r: emr_pb2.ReviewStudyResponse, task: TaskSpec, hospital: str = "") -> str:
    d = review_to_dict(r, task)
    policy = d["policy"]
    where = f" at {hospital}" if hospital else ""
    lines = [
        f"study {r.study} version {r.version}  {r.study_hash}",
        f"  reads{where} ({len(task.features)} features):",
        *(_feature_line(task, i) for i in range(len(task.features))),
        f"  label: {d['label']}",
        f"  cohort: {d['cohort']}",
        f"  eligible here: {r.eligible} of {r.patients} patients"
        + (f" ({r.consent_excluded} more left out by their research Consent)" if r.consent_excluded else ""),
        f"  model code: {r.model}"
        + ("  (built in)" if ":" not in r.model else "  (a torch factory: imported only once approved)"),
        f"  rounds {task.rounds}, strategy {task.hyper.strategy}, quorum {task.quorum}, "
        f"pairwise masking {'on' if task.pairwise_masking else 'off'}, min contributors {task.min_contributors}",
        "  privacy: "
        + (
            f"DP-SGD, epsilon {d['epsilon']:.3g} at delta {task.dp.target_delta:g} over all rounds"
            if d["epsilon"] is not None and task.dp is not None
            else "no patient-level DP (encrypted, masked aggregation only)"
        ),
        f"  code systems: {', '.join(d['code_systems'])}",
        f"  site policy{' (default: none set)' if not r.policy_set else ''}: "
        f"models {', '.join(['logistic_regression', 'mlp', *policy['model_factories']])}; "
        f"min eligible {policy['min_eligible']}; "
        f"max epsilon {policy['max_epsilon'] if policy['max_epsilon'] is not None else 'no limit'}; "
        f"DP {'required' if policy['require_dp'] else 'not required'}",
    ]
    if d["problems"]:
        lines.append("  breaks the site policy (cannot be approved):")
        lines += [f"    {p['rule']}: {p['description']}" for p in d["problems"]]
    else:
        lines.append("  meets the site policy")
    if d["decision"]:
        lines.append(
            f"  decision: {d['decision']['decision']} by {d['decision']['by']} at {d['decision']['at']}"
        )
    else:
        lines.append("  decision: none yet (fibemrss study approve|refuse)")
    return "\n".join(lines)


def propose_and_approve(
    endpoints: dict[str, Any],
    hospitals: Sequence[str],
    document: bytes,
    tls_for: Any,
    reason: str = "approved by the demo federation's operator",
) -> tuple[str, dict[str, emr_pb2.StudyDecision]]:
    """The whole flow for a federation whose operators approve (the demo, LocalCluster, the
    deploy harness): operator@central proposes; each hospital's operator reviews the proposal
    at its gateway and approves it. The proposal's hash, and each hospital's decision."""
    with open_channel(
        endpoints["aggregator"], tls_for(endpoints, "operator@central"), "aggregator@central"
    ) as ch:
        proposed = propose(ch, document).proposal
    decisions: dict[str, emr_pb2.StudyDecision] = {}
    for h in hospitals:
        tls = tls_for(endpoints, f"operator@{h}")
        with open_channel(endpoints["aggregator"], tls, "aggregator@central" if tls else None) as ch:
            doc = proposal(ch, proposed.study).document
        with open_channel(endpoints["hospitals"][h]["gateway"], tls, f"gateway@{h}" if tls else None) as ch:
            review(ch, doc)
            decisions[h] = decide(ch, doc, True, reason)
    return proposed.study_hash, decisions


def document_of(task: TaskSpec) -> bytes:
    """A document for a study known by name (its canonical JSON: the same hash)."""
    doc = json.dumps(study_to_json(task), indent=2).encode()
    assert study_hash(parse_study(doc)) == study_hash(task)
    return doc
