"""`fibemrss diagnose`: asks a hospital's inference service for one patient's diagnosis reference."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from fibemrss.api.emr.v1 import emr_pb2
from fibemrss.api.inference.v1 import inference_pb2, inference_pb2_grpc
from fibemrss.platform.channels import open_channel
from fibemrss.platform.status_mapping import field_violations
from fibemrss.tools.tls_args import add_tls_arguments, server_identity, tls_from_args
from services.inference.core.fhir_reference import ReferenceView, risk_assessment


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers `diagnose` on the `fibemrss` sub-command parsers."""
    p = subparsers.add_parser(
        "diagnose",
        help="a diagnosis reference for one patient from a hospital's inference service",
        description="Reads a shared-schema PatientRecord in protobuf JSON form (fibemrss.emr.v1) and "
        "prints the reference: probability, label, risk band, the largest feature contributions "
        "and the imputed features.",
    )
    p.add_argument("--inference", required=True, help="the inference service, HOST:PORT")
    p.add_argument("--patient", required=True, type=Path, help="PatientRecord JSON file")
    p.add_argument("--task", default="", help="default: the task the service serves")
    p.add_argument("--model-version", type=int, default=0, help="pin a model version (default: newest)")
    p.add_argument("--json", action="store_true", help="print the reference as JSON")
    p.add_argument(
        "--fhir",
        action="store_true",
        help="print the reference as a FHIR R4 RiskAssessment (JSON) about --fhir-patient",
    )
    p.add_argument("--fhir-patient", default="", help="the Patient id the RiskAssessment names (subject)")
    add_tls_arguments(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds")
    p.set_defaults(func=cmd_diagnose)
    return p


def read_patient(path: Path) -> Any:
    try:
        return json_format.Parse(path.read_text(), emr_pb2.PatientRecord())
    except json_format.ParseError as exc:
        raise ValueError(f"{path} is not a PatientRecord in protobuf JSON form: {exc}") from None


def reference_to_dict(r: Any) -> dict[str, Any]:
    return {
        "probability": r.probability,
        "label": r.label,
        "risk_band": r.risk_band,
        "threshold": r.threshold,
        "model": r.model_name,
        "model_version": r.model_version,
        "model_kind": r.model_kind or "global",
        **({"base_model_version": r.base_model_version} if r.base_model_version else {}),
        "federated_round": r.federated_round,
        "top_contributions": [
            {"feature": c.feature, "contribution": c.contribution} for c in r.top_contributions
        ],
        "imputed_features": list(r.imputed_features),
        "caveat": r.caveat,
    }


def format_reference(ref: dict[str, Any]) -> str:
    lines = [
        f"{ref['label']}: probability {ref['probability']:.3f} ({ref['risk_band']} risk; "
        f"threshold {ref['threshold']:g})",
        f"model {ref['model']} {ref['model_kind']} version {ref['model_version']}"
        + (
            f" (fine-tuned from global version {ref['base_model_version']})"
            if "base_model_version" in ref
            else ""
        )
        + f" (federated round {ref['federated_round']})",
        "largest contributions to the logit:",
        *(f"  {c['feature']:<28} {c['contribution']:+.3f}" for c in ref["top_contributions"]),
    ]
    if ref["imputed_features"]:
        lines.append("imputed (not in the record): " + ", ".join(ref["imputed_features"]))
    lines.append(ref["caveat"])
    return "\n".join(lines)


def cmd_diagnose(args: argparse.Namespace) -> int:

    patient = read_patient(args.patient)
    request = inference_pb2.DiagnoseRequest(task=args.task, patient=patient, model_version=args.model_version)
    with open_channel(args.inference, tls_from_args(args), server_identity(args, "inference")) as channel:
        try:
            response = inference_pb2_grpc.DiagnosisServiceStub(channel).Diagnose(
                request, timeout=args.timeout
            )
        except grpc.RpcError as exc:
            violations = field_violations(exc)
            if not violations:
                raise
            print(f"fibemrss: {exc.code().name}: {exc.details()}", file=sys.stderr)
            for field, why in violations:
                print(f"  {field}: {why}", file=sys.stderr)
            return 1
    ref = reference_to_dict(response)
    if args.fhir:
        print(json.dumps(risk_assessment(reference_view(response), args.fhir_patient), indent=2))
        return 0
    print(json.dumps(ref, indent=2) if args.json else format_reference(ref))
    return 0


def reference_view(r: inference_pb2.DiagnoseResponse) -> ReferenceView:
    return ReferenceView(
        task=r.model_name,
        model_version=r.model_version,
        federated_round=r.federated_round,
        model_kind=r.model_kind or "global",
        base_model_version=r.base_model_version,
        probability=r.probability,
        risk_band=r.risk_band,
        contributions=[(c.feature, c.contribution) for c in r.top_contributions],
        imputed=list(r.imputed_features),
        caveat=r.caveat,
    )
