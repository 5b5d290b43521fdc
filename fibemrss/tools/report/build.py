"""`fibemrss report`: runs the benchmarks (or reads their JSON) and writes report.html (one file,
images inline), REPORT.md and the PNG plots into one folder."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fibemrss.domain.tasks import HEART_DISEASE_V1_DP
from fibemrss.tools.bench.curves import DEFAULT_SEEDS, run_quality_curves
from fibemrss.tools.bench.he_bench import run_he_bench
from fibemrss.tools.bench.inference_bench import run_inference_bench
from fibemrss.tools.bench.ingest_bench import run_ingest_bench
from fibemrss.tools.bench.poisoning_bench import PoisoningConfig, quick_config, run_poisoning_bench
from fibemrss.tools.bench.privacy_bench import dp_accuracy
from fibemrss.tools.bench.round_bench import run_round_bench
from fibemrss.tools.report import figures
from fibemrss.tools.report.figures import Figure


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


@dataclass(frozen=True)
class Bench:
    name: str  # data file stem
    title: str
    run: Callable[[Path | None, bool], dict[str, Any]]


def _curves(shared: Path | None, quick: bool) -> dict[str, Any]:
    return run_quality_curves(shared, seeds=DEFAULT_SEEDS)


def _he(shared: Path | None, quick: bool) -> dict[str, Any]:
    params = 200_000 if quick else 1_000_000
    return {**run_he_bench(params), "params": params}


def _round(shared: Path | None, quick: bool) -> dict[str, Any]:
    if quick:
        return run_round_bench((100_000,), 4, 1, None, "auto", (4, 16), 10_000)
    return run_round_bench()


def _ingest(shared: Path | None, quick: bool) -> dict[str, Any]:
    if shared is None or not (shared / "fhir_r4").is_dir():
        raise FileNotFoundError("the shared Synthea bundles (shared/data/fhir_r4) are not here")
    return run_ingest_bench(shared)


def _privacy(shared: Path | None, quick: bool) -> dict[str, Any]:
    """DP-SGD accuracy against epsilon; `--quick` runs a reduced grid (3 epsilons at 2 deltas,
    3 split seeds, the task's learning rate and clipping norm instead of the validation search) to
    stay inside its 5-minute budget, and the figure's caption says so."""
    if not quick:
        return {"dp_accuracy": dp_accuracy(shared)}
    # One point instead of the validation grid: the task's own learning rate and clipping norm.
    task = HEART_DISEASE_V1_DP
    assert task.dp is not None
    result = dp_accuracy(
        shared,
        task,
        learning_rates=(task.hyper.learning_rate,),
        clipping_norms=(task.dp.max_grad_norm,),
        epsilons=(0.5, 1.0, 4.0, None),
        split_seeds=(43, 44, 45),
    )
    return {"dp_accuracy": {**result, "reduced": True}}


def _inference(shared: Path | None, quick: bool) -> dict[str, Any]:
    return run_inference_bench(duration=1.0 if quick else 3.0, concurrency=(1, 8) if quick else (1, 8, 32))


def _poisoning(shared: Path | None, quick: bool) -> dict[str, Any]:
    """The attacker from round 5 (after four honest rounds): from round 1 the crude attacks leave
    nothing served at all, which plots as nothing (`fibemrss bench poisoning` gives both)."""
    config = quick_config() if quick else PoisoningConfig(attack_from=5)
    return run_poisoning_bench(
        shared if shared is not None and (shared / "heart_disease").is_dir() else None, config
    )


BENCHES = (
    Bench("curves", "accuracy per round, per hospital, ROC, calibration (5 split seeds)", _curves),
    Bench("he", "HE codec next to FLARE's CKKS", _he),
    Bench(
        "round",
        "the deployed round next to Flower and the floor, 1M to 10M parameters, 4 to 128 hospitals",
        _round,
    ),
    Bench("ingest", "gateway ingest next to COPY", _ingest),
    Bench("inference", "Diagnose and ModelInfer", _inference),
    Bench("privacy", "DP-SGD accuracy against epsilon", _privacy),
    Bench("poisoning", "one hostile hospital: served accuracy under five attacks", _poisoning),
)
FIGURES: dict[str, list[Callable[[dict[str, Any], Path, str], Figure | list[Figure]]]] = {
    "curves": [
        figures.accuracy_per_round,
        figures.accuracy_per_hospital,
        figures.final_per_hospital,
        figures.roc,
        figures.calibration_plot,
        figures.encryption_gap,
    ],
    "he": [figures.he_cost],
    "round": [figures.round_parameter_scaling, figures.round_hospital_scaling],
    "ingest": [figures.ingest],
    "inference": [figures.inference],
    "privacy": [figures.privacy_utility],
    "poisoning": [figures.poisoning],
}


def collect(
    data_dir: Path, shared: Path | None, quick: bool, from_dir: Path | None, log: Callable[[str], None]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each benchmark's JSON (with the machine and time it was measured), and why any is missing."""
    data_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, dict[str, Any]] = {}
    missing: dict[str, str] = {}
    for bench in BENCHES:
        source = from_dir / f"{bench.name}.json" if from_dir is not None else None
        if source is not None:
            if source.is_file():
                found[bench.name] = json.loads(source.read_text())
            else:
                missing[bench.name] = f"{source} not found"
            continue
        log(f"running {bench.name}: {bench.title}")
        started = time.perf_counter()
        try:
            result = bench.run(shared, quick)
        except Exception as exc:  # noqa: BLE001 - one failed benchmark leaves the rest of the report
            missing[bench.name] = f"{type(exc).__name__}: {exc}"
            log(f"  {bench.name} failed: {missing[bench.name]}")
            continue
        result["measured"] = {**machine(), "seconds": round(time.perf_counter() - started, 1), "quick": quick}
        (data_dir / f"{bench.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        found[bench.name] = result
    return found, missing


def _when(result: dict[str, Any]) -> str:
    m = result.get("measured") or {}
    if not m:
        return ""
    mode = ", quick settings" if m.get("quick") else ""
    return (
        f"Measured {m.get('at')} on {m.get('cores')} cores ({m.get('cpu')}), Python {m.get('python')}{mode}."
    )


def make_figures(data: dict[str, dict[str, Any]], out: Path) -> tuple[list[Figure], dict[str, str]]:
    made: list[Figure] = []
    failed: dict[str, str] = {}
    for name, builders in FIGURES.items():
        if name not in data:
            continue
        for build in builders:
            try:
                result = build(data[name], out, _when(data[name]))
            except (KeyError, TypeError, ValueError) as exc:
                failed[f"{name}:{build.__name__}"] = f"{type(exc).__name__}: {exc}"
                continue
            made.extend(result if isinstance(result, list) else [result])
    return made, failed


def write_report(
    out: Path, made: list[Figure], data: dict[str, dict[str, Any]], missing: dict[str, str]
) -> None:
    summary = _summary(data)
    md = ["# FIBEMRSS results", "", f"Written {machine()['at']} by `fibemrss report`.", ""]
    md += [f"- {line}" for line in summary] + [""]
    for f in made:
        md += [f"## {f.title}", "", f"![{f.title}]({f.file})", "", f.caption, ""]
    if missing:
        md += ["## Not measured in this report", ""] + [f"- {k}: {v}" for k, v in missing.items()] + [""]
    (out / "REPORT.md").write_text("\n".join(md))
    parts = [
        "<!doctype html><html lang=en><meta charset=utf-8><title>FIBEMRSS results</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;"
        "color:#222}figure{margin:2em 0}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.9em;"
        "color:#444}li{margin:.2em 0}</style>",
        "<h1>FIBEMRSS results</h1>",
        f"<p>Written {html.escape(machine()['at'])} by <code>fibemrss report</code>.</p><ul>",
        *[f"<li>{html.escape(line)}</li>" for line in summary],
        "</ul>",
    ]
    for f in made:
        encoded = base64.b64encode((out / f.file).read_bytes()).decode()
        parts.append(
            f"<figure><h2>{html.escape(f.title)}</h2><img alt='{html.escape(f.title)}' "
            f"src='data:image/png;base64,{encoded}'><figcaption>{html.escape(f.caption)}</figcaption></figure>"
        )
    if missing:
        parts.append("<h2>Not measured in this report</h2><ul>")
        parts += [f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in missing.items()]
        parts.append("</ul>")
    (out / "report.html").write_text("\n".join(parts) + "\n")


def _summary(data: dict[str, dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    if "curves" in data:
        c = data["curves"]
        final = c["final_pooled_test_accuracy"]
        key = f"{c['task_strategy']}_encrypted"
        lines.append(
            f"Pooled test accuracy after {c['rounds']} encrypted {c['task_strategy']} rounds: "
            f"{final[key]['mean']:.3f} ± {final[key]['sd']:.3f} over {len(c['seeds'])} split seeds "
            f"(pooled training {final['pooled_training']['mean']:.3f} ± {final['pooled_training']['sd']:.3f}; "
            f"FedAvg encrypted {final['fedavg_encrypted']['mean']:.3f} ± {final['fedavg_encrypted']['sd']:.3f})."
        )
    if "he" in data:
        h = data["he"]["ours"]
        lines.append(
            f"HE upload {h['upload_bytes_per_param']:.2f} B/parameter ({h['upload_bytes_per_param'] / 4:.2f}x float32); "
            f"encrypt + decrypt {h['encrypt_s_per_million'] + h['decrypt_s_per_million']:.2f} s per million."
        )
    if "round" in data:
        for size in data["round"].get("parameter_scaling", []):
            if not size.get("round_s"):
                continue
            ratio = (
                f", {size['ratio_to_flower']} of Flower's plaintext round"
                if size.get("ratio_to_flower")
                else ""
            )
            lines.append(
                f"Deployed round ({size['params']:,} parameters, {size['hospitals']} hospitals): median "
                f"{size['round_s']['median']} s{ratio}, {size['ratio_to_floor']}x the compute floor."
            )
    if "ingest" in data:
        i = data["ingest"]
        lines.append(f"Ingest {i['resources_per_s']:,.0f} FHIR resources/s, {i['ratio']} of COPY's rows/s.")
    if "inference" in data and "8" in data["inference"].get("diagnose", {}):
        d = data["inference"]["diagnose"]["8"]
        lines.append(f"Diagnose at 8 clients: {d['rps']:,.0f} req/s, p99 {d['p99_ms']} ms.")
    if "privacy" in data:
        rows = data["privacy"]["dp_accuracy"]["results"]
        at_1 = next((r for r in rows if r["epsilon_target"] == 1.0 and r["delta"] == 1e-3), None)
        no_dp = next(r for r in rows if r["epsilon_target"] is None)
        if at_1 is not None:
            lines.append(
                f"DP-SGD at epsilon 1, delta 1e-3: pooled test accuracy {at_1['pooled_test_accuracy']['mean']:.3f} "
                f"± {at_1['pooled_test_accuracy']['sd']:.3f} (no DP {no_dp['pooled_test_accuracy']['mean']:.3f})."
            )
    if "poisoning" in data:
        p = data["poisoning"]
        worst = [
            gap
            for figures_ in p["strategies"].values()
            for entry in figures_["attacks"].values()
            if (gap := entry["defended"]["worst_gap_to_clean"]["pooled"]) is not None
        ]
        today = [
            gap
            for figures_ in p["strategies"].values()
            for entry in figures_["attacks"].values()
            if (gap := entry["today"]["worst_gap_to_clean"]["pooled"]) is not None
        ]
        lines.append(
            f"Poisoning (one hostile hospital of four, from round {p['config']['attack_from']}): the served "
            f"models' pooled accuracy falls at most {max(worst):.3f} below the clean run with the study's "
            f"defences, {max(today):.3f} with today's."
        )
    return lines


def build_report(
    out: Path, shared: Path | None, quick: bool, from_dir: Path | None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data, missing = collect(out / "data", shared, quick, from_dir, log)
    made, failed = make_figures(data, out)
    missing.update(failed)
    write_report(out, made, data, missing)
    return {
        "html": str(out / "report.html"),
        "markdown": str(out / "REPORT.md"),
        "figures": [f.file for f in made],
        "missing": missing,
        "seconds": round(time.perf_counter() - started, 1),
    }
