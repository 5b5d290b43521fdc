"""`fibemrss federation status`: the task, the current round, who submitted, the history;
`fibemrss federation histograms`: the federated histograms a hospital's agent released."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import DEFAULT_TASK
from fibemrss.tools.histogram_view import histogram_line, histograms_json
from fibemrss.tools.tls_args import add_tls_arguments, server_identity, tls_from_args


def add_parser(subparsers: Any) -> None:
    fed = subparsers.add_parser("federation", help="federation operations").add_subparsers(
        dest="fed_command", required=True
    )
    status = fed.add_parser("status", help="task, current round, who submitted, history")
    status.add_argument("--aggregator", required=True, help="HOST:PORT")
    status.add_argument("--task", default=DEFAULT_TASK)
    status.add_argument("--json", action="store_true")
    add_tls_arguments(status)
    status.set_defaults(func=run_status)
    hist = fed.add_parser(
        "histograms",
        help="the federated histograms of the numeric features, as a hospital's agent released them "
        "(bins below the task's minimum count merged)",
    )
    hist.add_argument("--agent", required=True, help="HOST:PORT of a hospital's agent")
    hist.add_argument("--task", default=DEFAULT_TASK)
    hist.add_argument("--json", action="store_true")
    add_tls_arguments(hist)
    hist.set_defaults(func=run_histograms)


def run_histograms(args: argparse.Namespace) -> int:
    with open_channel(args.agent, tls_from_args(args)) as ch:
        st = (
            federation_pb2_grpc.HospitalAgentServiceStub(ch)
            .GetAgentStatus(pb.GetAgentStatusRequest(task=args.task), timeout=10)
            .status
        )
    out = histograms_json(st)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if not out:
        print(f"{st.hospital}: no federated statistics yet (round 0 not decrypted)")
    for histogram in out:
        print(histogram_line(histogram))
    return 0


def run_status(args: argparse.Namespace) -> int:
    with open_channel(args.aggregator, tls_from_args(args), server_identity(args, "aggregator")) as ch:
        st = (
            federation_pb2_grpc.AggregatorServiceStub(ch)
            .GetFederationStatus(pb.GetFederationStatusRequest(task=args.task), timeout=10)
            .status
        )
    history: list[dict[str, Any]] = [
        {
            "round": r.round,
            "state": pb.RoundState.Name(r.state).removeprefix("ROUND_STATE_").lower(),
            "submitted": list(r.submitted),
            **({"attempt": r.attempt} if r.attempt > 1 else {}),
            **({"epsilon": r.epsilon} if r.epsilon else {}),
            **({"failure": r.failure} if r.failure else {}),
        }
        for r in st.history
    ]
    out: dict[str, Any] = {
        "task": st.task,
        "rounds": st.rounds,
        "quorum": st.quorum,
        "hospitals": list(st.hospitals),
        "pairwise_masking": st.pairwise_masking,
        "min_contributors": st.min_contributors,
        "study_hash": st.study_hash,
        "current_round": st.current.round,
        "done": st.current.federation_done,
        "history": history,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"task {out['task']}: round {out['current_round']} of {out['rounds']} "
        f"(quorum {st.quorum} of {len(st.hospitals)}, at least {st.min_contributors} contributors"
        f"{', pairwise masking' if st.pairwise_masking else ''})"
        f"{' - done' if out['done'] else ''}"
        + (f"\n  study {st.study_hash}" if st.study_hash else "\n  study: not pinned to a proposed document")
    )
    for h in history:
        print(
            f"  round {h['round']:>3}  {h['state']:<11}  submitted: {', '.join(h['submitted']) or '-'}"
            + (f"  attempt {h['attempt']}" if "attempt" in h else "")
            + (f"  epsilon {h['epsilon']:.3f}" if "epsilon" in h else "")
            + (f"  ({h['failure']})" if "failure" in h else "")
        )
    return 0
