"""The report's plots, one function per figure: benchmark JSON in, a PNG and its caption out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
import numpy as np  # noqa: E402

from fibemrss.tools.report.metrics import auc, bootstrap_auc_interval, calibration, roc_curve  # noqa: E402

COLORS = {"fedavg": "#1f77b4", "fedyogi": "#d62728", "fedadam": "#2ca02c", "fedprox": "#9467bd"}


@dataclass(frozen=True)
class Figure:
    file: str
    title: str
    caption: str


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _mean_sd(rows: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(rows, dtype=np.float64)
    sd = a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1])
    return a.mean(axis=0), sd


def accuracy_per_round(curves: dict[str, Any], out: Path, when: str) -> Figure:
    runs = curves["runs"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rounds = np.arange(1, curves["rounds"] + 1)
    for key in runs[0]["curves"]:
        strategy, mode = key.rsplit("_", 1)
        mean, sd = _mean_sd([r["curves"][key]["pooled"] for r in runs])
        style = "-" if mode == "encrypted" else ":"
        ax.plot(rounds, mean, style, color=COLORS.get(strategy, "k"), label=f"{strategy} ({mode})")
        if mode == "encrypted":
            ax.fill_between(rounds, mean - sd, mean + sd, color=COLORS.get(strategy, "k"), alpha=0.15)
    pooled = curves["final_pooled_test_accuracy"]["pooled_training"]["mean"]
    ax.axhline(pooled, color="grey", ls="--", lw=1, label=f"pooled training {pooled:.3f}")
    for name, value in curves["flamby_published_pooled_test_accuracy"].items():
        ax.axhline(value, color="black", ls="-.", lw=0.6, alpha=0.5)
        ax.annotate(f"FLamby {name} {value}", (rounds[-1], value), fontsize=7, ha="right", va="bottom")
    ax.set_xlabel("federated round")
    ax.set_ylabel("pooled test accuracy")
    ax.set_ylim(0.5, 0.9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    name = _save(fig, out, "accuracy_per_round.png")
    final = curves["final_pooled_test_accuracy"]
    text = ", ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" for k, v in final.items())
    return Figure(
        name,
        "Pooled test accuracy per round",
        f"Mean over {len(runs)} split seeds ({', '.join(map(str, curves['seeds']))}); band: ± 1 sd of the "
        f"encrypted runs; dotted: the same strategy in plaintext. Final round: {text}. FLamby's published "
        f"figures are pooled test accuracy on their own 740-patient split (metric as named in the bench "
        f"JSON), shown for orientation, not as a same-run comparison. {when}",
    )


def accuracy_per_hospital(curves: dict[str, Any], out: Path, when: str) -> Figure:
    runs = curves["runs"]
    strategy = curves["task_strategy"]
    hospitals = list(runs[0]["local_only"])
    fig, axes = plt.subplots(2, 2, figsize=(8, 5.5), sharex=True, sharey=True)
    rounds = np.arange(1, curves["rounds"] + 1)
    for ax, h in zip(axes.ravel(), hospitals, strict=False):
        for key, color in (
            (f"{strategy}_encrypted", COLORS.get(strategy, "r")),
            ("fedavg_encrypted", COLORS["fedavg"]),
        ):
            mean, sd = _mean_sd([r["curves"][key]["per_hospital"][h] for r in runs])
            ax.plot(rounds, mean, color=color, label=key.replace("_", " "))
            ax.fill_between(rounds, mean - sd, mean + sd, color=color, alpha=0.12)
        local = curves["final_per_hospital_test_accuracy"][h]["local_only"]["mean"]
        ax.axhline(local, color="grey", ls="--", lw=1, label=f"local only {local:.3f}")
        ax.set_title(h, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    for ax in axes[1]:
        ax.set_xlabel("round")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    name = _save(fig, out, "accuracy_per_hospital.png")
    return Figure(
        name,
        "Test accuracy per hospital per round",
        f"Each hospital's own held-out patients, mean ± sd over {len(runs)} split seeds; dashed: the "
        f"hospital trained alone with the same epoch budget. {when}",
    )


def final_per_hospital(curves: dict[str, Any], out: Path, when: str) -> Figure:
    per = curves["final_per_hospital_test_accuracy"]
    hospitals = list(per)
    strategy = curves["task_strategy"]
    methods = ["local_only", "fedavg_encrypted", f"{strategy}_encrypted", "pooled_training"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.2
    for i, m in enumerate(methods):
        means = [per[h][m]["mean"] for h in hospitals]
        sds = [per[h][m]["sd"] for h in hospitals]
        ax.bar(
            np.arange(len(hospitals)) + (i - 1.5) * width,
            means,
            width,
            yerr=sds,
            capsize=2,
            label=m.replace("_", " "),
        )
    ax.set_xticks(np.arange(len(hospitals)), hospitals)
    ax.set_ylabel("test accuracy (final round)")
    ax.set_ylim(0.4, 1.0)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    name = _save(fig, out, "final_per_hospital.png")
    return Figure(
        name,
        "Final accuracy per hospital: alone, federated, pooled",
        f"Mean ± sd over {len(curves['seeds'])} split seeds. Pooled training sees every hospital's rows in one "
        f"place (what federation avoids) and is the reference. {when}",
    )


def roc(curves: dict[str, Any], out: Path, when: str) -> Figure:
    runs = curves["runs"]
    first = runs[0]["scores"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    per_seed: dict[str, list[float]] = {h: [] for h in first}
    for r in runs:
        for h, s in r["scores"].items():
            per_seed[h].append(auc(np.array(s["y"]), np.array(s["p"])))
    notes = []
    for h, s in first.items():
        y, p = np.array(s["y"]), np.array(s["p"])
        fpr, tpr = roc_curve(y, p)
        low, high = bootstrap_auc_interval(y, p)
        ax.plot(fpr, tpr, label=f"{h}: AUC {auc(y, p):.3f} [{low:.3f}, {high:.3f}]")
        values = [v for v in per_seed[h] if v == v]
        notes.append(f"{h} {np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    name = _save(fig, out, "roc.png")
    return Figure(
        name,
        f"ROC per hospital ({curves['task_strategy']}, encrypted, final model)",
        f"Curves and 95% bootstrap intervals (1,000 resamples of the test patients) for split seed "
        f"{curves['seeds'][0]}; AUC over all {len(runs)} seeds, mean ± sd: {'; '.join(notes)}. {when}",
    )


def calibration_plot(curves: dict[str, Any], out: Path, when: str) -> Figure:
    y = np.concatenate([np.array(s["y"]) for r in curves["runs"] for s in r["scores"].values()])
    p = np.concatenate([np.array(s["p"]) for r in curves["runs"] for s in r["scores"].values()])
    cal = calibration(y, p, bins=10)
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    filled = cal.counts > 0
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
    ax.plot(cal.mean_predicted[filled], cal.observed_rate[filled], "o-", label="federated model")
    ax.set_ylabel("observed disease rate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    hist.bar((cal.bin_edges[:-1] + cal.bin_edges[1:]) / 2, cal.counts, width=0.09, color="#999")
    hist.set_xlabel("predicted probability")
    hist.set_ylabel("patients")
    name = _save(fig, out, "calibration.png")
    return Figure(
        name,
        "Calibration (reliability diagram)",
        f"Final {curves['task_strategy']} encrypted model, test patients of every hospital and seed pooled "
        f"({len(y)} predictions), 10 equal-width bins; expected calibration error "
        f"{cal.expected_calibration_error:.3f}. {when}",
    )


def encryption_gap(curves: dict[str, Any], out: Path, when: str) -> Figure:
    runs = curves["runs"]
    labels = list(runs[0]["max_abs_param_diff_encrypted_vs_plain"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, label in enumerate(labels):
        values = [r["max_abs_param_diff_encrypted_vs_plain"][label] for r in runs]
        ax.scatter(
            np.full(len(values), i) + np.linspace(-0.1, 0.1, len(values)),
            values,
            color=COLORS.get(label, "k"),
        )
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("max |encrypted − plaintext| parameter")
    ax.grid(alpha=0.3)
    name = _save(fig, out, "encryption_gap.png")
    gaps = {
        k: max(
            abs(a - b)
            for a, b in zip(
                r["curves"][f"{k}_encrypted"]["pooled"], r["curves"][f"{k}_plain"]["pooled"], strict=True
            )
        )
        for r in runs
        for k in labels
    }
    return Figure(
        name,
        "What encryption costs in accuracy",
        f"Largest parameter difference between the encrypted and the plaintext run of the same strategy "
        f"after the last round, one dot per split seed (fixed-point encoding in BFV is the only source). "
        f"Largest pooled-accuracy difference in any round: "
        f"{', '.join(f'{k} {v:.4f}' for k, v in gaps.items())}. {when}",
    )


def he_cost(he: dict[str, Any], out: Path, when: str) -> list[Figure]:
    ours, flare = he["ours"], he["flare_ckks"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = ["upload_bytes_per_param", "download_bytes_per_param"]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [ours[n] for n in names], 0.4, label="FIBEMRSS BFV")
    ax.bar(x + 0.2, [flare[n] for n in names], 0.4, label="NVIDIA FLARE CKKS")
    ax.axhline(4.0, color="grey", ls="--", lw=1, label="float32 (4 B)")
    ax.set_xticks(x, ["upload", "download"])
    ax.set_ylabel("bytes per parameter")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    bytes_fig = _save(fig, out, "he_bytes.png")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    phases = ["encrypt_s_per_million", "aggregate_s_per_million", "decrypt_s_per_million"]
    bottom_o = bottom_f = 0.0
    for phase in phases:
        ax.bar(0, ours[phase], 0.5, bottom=bottom_o, label=phase.split("_")[0])
        ax.bar(1, flare[phase], 0.5, bottom=bottom_f, color=ax.patches[-1].get_facecolor())
        bottom_o += ours[phase]
        bottom_f += flare[phase]
    ax.set_xticks([0, 1], ["FIBEMRSS BFV", "FLARE CKKS"])
    ax.set_ylabel("seconds per million parameters")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    time_fig = _save(fig, out, "he_seconds.png")
    n = he.get("params", "")
    return [
        Figure(
            bytes_fig,
            "HE upload and download size",
            f"Bytes per model parameter of one hospital's upload and the aggregate it downloads, ours "
            f"({ours['upload_bytes_per_param']:.2f} B up) next to FLARE's CKKS settings "
            f"({flare['upload_bytes_per_param']:.1f} B up), {n} parameters, same run. {when}",
        ),
        Figure(
            time_fig,
            "HE compute per million parameters",
            f"Encrypt, aggregate (4 uploads) and decrypt seconds per million parameters on one core, same "
            f"run: ours {sum(ours[p] for p in phases):.2f} s, FLARE CKKS {sum(flare[p] for p in phases):.2f} s. {when}",
        ),
    ]


def round_parameter_scaling(rnd: dict[str, Any], out: Path, when: str) -> Figure:
    """`fibemrss bench round`: the deployed round against parameters, beside Flower and the floor,
    and where each size's round goes."""
    sizes = [s for s in rnd.get("parameter_scaling", []) if s.get("round_s")]
    fig, (ax, phases_ax) = plt.subplots(1, 2, figsize=(9.5, 3.9), gridspec_kw={"width_ratios": [1, 1.2]})
    params = [s["params"] for s in sizes]
    ours = [s["round_s"]["median"] for s in sizes]
    low = [s["round_s"]["median"] - s["round_s"]["min"] for s in sizes]
    high = [s["round_s"]["max"] - s["round_s"]["median"] for s in sizes]
    ax.errorbar(
        params, ours, yerr=[low, high], fmt="o-", color=COLORS["fedyogi"], label="ours (deployed, mTLS)"
    )
    flower = [(s["params"], (s["flower"].get("spread") or {}).get("median")) for s in sizes]
    flower = [(p, f) for p, f in flower if f]
    if flower:
        ax.plot(*zip(*flower, strict=True), "s-", color=COLORS["fedavg"], label="Flower plaintext (TLS)")
    ax.plot(params, [s["floor"]["total_s"] for s in sizes], "--", color="grey", label="HE compute floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("seconds per round")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    names = [
        "advertise",
        "shares",
        "upload",
        "survivors",
        "reveals",
        "wait_for_close",
        "fetch",
        "verify",
        "decrypt",
    ]
    for i, s in enumerate(sizes):
        left = 0.0
        for j, phase in enumerate(names):
            seconds = s["phases_median_s"].get(phase, 0.0)
            phases_ax.barh(i, seconds, left=left, color=plt.cm.tab10(j), label=phase if i == 0 else None)
            left += seconds
    phases_ax.set_yticks(range(len(sizes)), [f"{p:,}" for p in params])
    phases_ax.set_xlabel("seconds (median over runs)")
    phases_ax.set_title("where the round goes", fontsize=9)
    if sizes:
        phases_ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=5)
    name = _save(fig, out, "round_parameter_scaling.png")
    parts = []
    for s in sizes:
        goals = s["goals"]
        flower_text = f"{s['ratio_to_flower']} of Flower" if s.get("ratio_to_flower") else "Flower not run"
        parts.append(
            f"{s['params']:,} parameters: median {s['round_s']['median']} s over {s['round_s']['runs']} rounds "
            f"(min {s['round_s']['min']}, max {s['round_s']['max']}), {flower_text}, {s['ratio_to_floor']}x the "
            f"floor ({s['floor']['total_s']} s); most time beyond the floor in {goals['phase_holding_it']}"
        )
    load = rnd.get("machine", {}).get("load_average_start")
    return Figure(
        name,
        "Round against parameters",
        f"The deployed round ({len(sizes) and sizes[0]['hospitals']} hospitals, {rnd.get('transport', '')}): "
        + "; ".join(parts)
        + f". Load average at the start {load}. {when}",
    )


def round_hospital_scaling(rnd: dict[str, Any], out: Path, when: str) -> Figure:
    """`fibemrss bench round`: round time and the aggregator's memory against hospitals."""
    scaling = rnd.get("hospital_scaling", {})
    sizes = [s for s in scaling.get("sizes", []) if "refused" not in s]
    refused = [s for s in scaling.get("sizes", []) if "refused" in s]
    fig, (ax, mem_ax) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    ns = [s["hospitals"] for s in sizes]
    ax.plot(ns, [s["round_s"] for s in sizes], "o", color=COLORS["fedyogi"], label="round (closed)")
    fitted = (scaling.get("fit") or {}).get("round_s_vs_n")
    if fitted and ns:
        xs = np.linspace(min(ns), max(ns), 50)
        ax.plot(
            xs,
            fitted["intercept"] + fitted["slope"] * xs,
            ":",
            color="grey",
            label=f"fit {fitted['intercept']:.2f} + {fitted['slope']:.3f} n (R² {fitted['r2']})",
        )
    for s in refused:
        ax.axvline(s["hospitals"], color="black", ls="--", lw=0.8)
        ax.annotate(
            f"{s['hospitals']}: refused",
            (s["hospitals"], ax.get_ylim()[1]),
            fontsize=7,
            ha="right",
            va="top",
            rotation=90,
        )
    ax.set_xlabel("hospitals")
    ax.set_ylabel("seconds per round")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    grown = [s["memory"].get("peak_over_idle_mb") for s in sizes]
    goal = [s["memory"].get("goal_mb") for s in sizes]
    mem_ax.plot(ns, grown, "o-", color=COLORS["fedyogi"], label="aggregator peak RSS over idle")
    mem_ax.plot(ns, goal, "--", color="grey", label="goal: 3 uploads + the sum")
    mem_ax.set_xlabel("hospitals")
    mem_ax.set_ylabel("MiB")
    mem_ax.legend(fontsize=7)
    mem_ax.grid(alpha=0.3)
    name = _save(fig, out, "round_hospital_scaling.png")
    goals = scaling.get("goals", {})
    refused_text = "; ".join(
        f"{s['hospitals']} refused ({s['refused']['code']}: {s['refused']['details']})" for s in refused
    )
    return Figure(
        name,
        "Round against hospitals",
        f"The deployed round at {scaling.get('params', 0):,} parameters with the aggregator's default pool: "
        f"every round closed {goals.get('every_round_closed')}, no honest upload refused "
        f"{goals.get('no_honest_upload_refused')}, memory within 3 uploads + the sum "
        f"{goals.get('memory_within_3_uploads_plus_sum')}. {refused_text} {when}",
    )


def ingest(ing: dict[str, Any], out: Path, when: str) -> Figure:
    fig, (ax, phases_ax) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1.2, 1]})
    names = ["resources_per_s", "stored_rows_per_s", "copy_rows_per_s"]
    ax.bar(range(3), [ing[n] for n in names], color=["#1f77b4", "#1f77b4", "#7f7f7f"])
    ax.set_xticks(
        range(3), ["FHIR resources/s\n(gRPC Ingest)", "stored rows/s", "PostgreSQL COPY\nrows/s (limit)"]
    )
    ax.set_yscale("log")
    ax.set_ylabel("per second")
    ax.grid(axis="y", alpha=0.3)
    phases = (ing.get("phases") or {}).get("seconds") or {}
    left = 0.0
    for phase, seconds in phases.items():
        phases_ax.barh(0, seconds, left=left, label=f"{phase.removesuffix('_s')} {seconds:.2f} s")
        left += seconds
    transport = (ing.get("phases") or {}).get("grpc_transport_and_servicer_s")
    if transport:
        phases_ax.barh(0, transport, left=left, color="#bbb", label=f"gRPC and servicer {transport:.2f} s")
    phases_ax.set_yticks([])
    phases_ax.set_xlabel(f"seconds for the {ing['bundles']} bundles")
    phases_ax.set_title("where the time goes (in process, same run)", fontsize=9)
    if phases:
        phases_ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    name = _save(fig, out, "ingest.png")
    split = (
        "; in process: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in phases.items())
        if phases
        else ""
    )
    return Figure(
        name,
        "Gateway ingest next to PostgreSQL COPY",
        f"The {ing['bundles']} shared Synthea bundles through one gateway over gRPC: {ing['resources_per_s']:,.0f} "
        f"resources/s; COPY of the same rows {ing['copy_rows_per_s']:,.0f} rows/s; ratio {ing['ratio']} "
        f"(goal 0.25){split}. {when}",
    )


def inference(inf: dict[str, Any], out: Path, when: str) -> Figure:
    fig, (rps_ax, p99_ax) = plt.subplots(1, 2, figsize=(8, 3.6))
    for key, color in (("diagnose", COLORS["fedyogi"]), ("model_infer", COLORS["fedavg"])):
        clients = sorted(inf[key], key=int)
        rps_ax.plot(
            [int(c) for c in clients], [inf[key][c]["rps"] for c in clients], "o-", color=color, label=key
        )
        p99_ax.plot(
            [int(c) for c in clients], [inf[key][c]["p99_ms"] for c in clients], "o-", color=color, label=key
        )
    rps_ax.axhline(4000, color="grey", ls="--", lw=1, label="goal 4,000/s at 8 clients")
    ceiling = inf.get("empty_handler_ceiling_8_clients")
    if ceiling:
        rps_ax.scatter(
            [8], [ceiling["rps"]], marker="_", s=400, color="black", label="empty handler, 8 clients"
        )
    aio = inf.get("empty_aio_handler_ceiling_8_clients")
    if aio:
        rps_ax.scatter(
            [8], [aio["rps"]], marker="x", s=60, color="black", label="empty grpc.aio handler, 8 clients"
        )
    p99_ax.axhline(5, color="grey", ls="--", lw=1, label="goal p99 5 ms")
    for ax, label in ((rps_ax, "requests/s"), (p99_ax, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    name = _save(fig, out, "inference.png")
    eight = inf["diagnose"].get("8")
    figure = f"at 8 clients Diagnose {eight['rps']:,.0f} req/s, p99 {eight['p99_ms']} ms" if eight else ""
    mixed = inf.get("interleaved_8_clients", {})
    for key, label in (("diagnose", "Diagnose"), ("model_infer", "ModelInfer")):
        entry = mixed.get(key)
        if entry:
            r = entry["ratio_to_empty_handler"]
            figure += (
                f"; {label} / the empty handler, interleaved windows at 8 clients: {r['median']} "
                f"(min {r['min']}, max {r['max']})"
            )
    if aio:
        figure += f"; an empty grpc.aio handler, same run: {aio['rps']:,.0f} req/s"
    phases = inf.get("diagnose_phases")
    if phases and "server_cpu_us" in phases:
        figure += (
            f". Server CPU per Diagnose request at 8 clients: {phases['server_cpu_us']} µs (in process "
            f"{phases['in_process_us']}: decode {phases['decode_us']}, read {phases.get('read_us')}, model "
            f"{phases['model_us']}, encode {phases['encode_us']}); the empty handler's "
            f"{phases['empty_handler_server_cpu_us']} µs"
        )
    return Figure(
        name,
        "Inference throughput and tail latency",
        f"Single-patient Diagnose and KServe ModelInfer over loopback gRPC; {figure}; forward pass "
        f"{inf.get('forward_pass_ms', '?')} ms. {when}",
    )


def privacy_utility(priv: dict[str, Any], out: Path, when: str) -> Figure:
    """Accuracy against epsilon per delta, the no-DP line, and FLamby's published DP points on
    their own metric (mean per-center accuracy), which ours is also plotted in."""
    dp = priv["dp_accuracy"] if "dp_accuracy" in priv else priv
    rows = dp["results"]
    no_dp = next(r for r in rows if r["epsilon_target"] is None)
    deltas = sorted({r["delta"] for r in rows if r["delta"] is not None}, reverse=True)
    fig, (pooled_ax, center_ax) = plt.subplots(1, 2, figsize=(9.5, 4), sharex=True, sharey=True)
    markers = ["o", "s", "^", "D"]
    for ax, metric in ((pooled_ax, "pooled_test_accuracy"), (center_ax, "mean_per_center_test_accuracy")):
        for i, delta in enumerate(deltas):
            points = sorted(
                (r for r in rows if r["delta"] == delta), key=lambda r: float(r["epsilon_target"])
            )
            eps = [r["epsilon_target"] for r in points]
            mean = np.array([r[metric]["mean"] for r in points])
            sd = np.array([r[metric]["sd"] for r in points])
            ax.errorbar(
                eps, mean, yerr=sd, marker=markers[i % 4], capsize=3, label=f"DP-SGD, delta {delta:.0e}"
            )
        base = no_dp[metric]["mean"]
        ax.axhline(base, color="grey", ls="--", lw=1, label=f"no DP {base:.3f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epsilon (whole training)")
        ax.grid(alpha=0.3)
    flamby = dp.get("flamby_published") or {}
    flamby_eps = sorted(
        (float(k.removeprefix("epsilon_")), float(v)) for k, v in flamby.items() if k.startswith("epsilon_")
    )
    if flamby_eps:
        center_ax.plot(
            [e for e, _ in flamby_eps],
            [a for _, a in flamby_eps],
            "kx",
            ms=8,
            mew=2,
            label="FLamby DP (published)",
        )
    if "no_dp" in flamby:
        center_ax.axhline(
            flamby["no_dp"], color="black", ls="-.", lw=0.8, label=f"FLamby no DP {flamby['no_dp']}"
        )
    ticks = sorted({float(r["epsilon_target"]) for r in rows if r["epsilon_target"] is not None})
    ticks = sorted(set(ticks) | {e for e, _ in flamby_eps})
    pooled_ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    pooled_ax.minorticks_off()
    center_ax.minorticks_off()
    pooled_ax.set_ylabel("test accuracy")
    pooled_ax.set_title("pooled test accuracy", fontsize=9)
    center_ax.set_title("mean of the 4 hospitals' test accuracy (FLamby's metric)", fontsize=9)
    for ax in (pooled_ax, center_ax):
        ax.legend(fontsize=7, loc="lower right")
    name = _save(fig, out, "privacy_utility.png")
    at_1 = next((r for r in rows if r["epsilon_target"] == 1.0 and deltas and r["delta"] == deltas[0]), None)
    at_1_text = (
        f"at epsilon 1, delta {deltas[0]:g}: pooled {at_1['pooled_test_accuracy']['mean']:.3f} ± "
        f"{at_1['pooled_test_accuracy']['sd']:.3f}, mean per center "
        f"{at_1['mean_per_center_test_accuracy']['mean']:.3f}; "
        if at_1
        else ""
    )
    grid = dp.get("grid") or {}
    reduced = (
        f" Reduced grid for --quick: epsilon {', '.join(f'{e:g}' for e in grid.get('epsilons', []))} "
        f"at delta {', '.join(f'{d:g}' for d in grid.get('deltas', []))}, {len(dp['split_seeds'])} split seeds, "
        "the task's learning rate and clipping norm (the full bench: 5 epsilons, 2 deltas, 5 seeds, both "
        "chosen on validation rows)."
        if dp.get("reduced")
        else ""
    )
    return Figure(
        name,
        "Privacy against utility (DP-SGD)",
        f"Task {dp['task']}, patient-level DP-SGD in every hospital's local training, epsilon over all "
        f"rounds; mean ± sd over split seeds {', '.join(map(str, dp['split_seeds']))}; {at_1_text}"
        f"no DP: pooled {no_dp['pooled_test_accuracy']['mean']:.3f}. FLamby's points ({flamby.get('metric', '')}; "
        f"{flamby.get('source', '')}) are on their own split, plotted beside ours on the same metric, for "
        f"orientation, not a same-run comparison.{reduced} {when}",
    )


Builder = Callable[[dict[str, Any], Path, str], Figure | list[Figure]]


def poisoning(result: dict[str, Any], out: Path, when: str) -> Figure:
    """Pooled test accuracy of the models the honest hospitals serve, round by round, per strategy:
    the clean run, each attack with today's defences (dotted) and the study's (solid); a gap is
    a round in which some honest hospital serves nothing yet."""
    strategies = result["strategies"]
    fig, axes = plt.subplots(1, len(strategies), figsize=(5 * len(strategies), 4), sharey=True, squeeze=False)
    palette = plt.get_cmap("tab10")
    lines = []
    for ax, (label, figures_) in zip(axes[0], strategies.items(), strict=True):
        clean = figures_["clean"]["pooled"]
        rounds = np.arange(1, len(clean) + 1)

        def curve(values: list[float | None]) -> np.ndarray:
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

        ax.plot(rounds, curve(clean), color="black", lw=2, label="clean")
        for i, (attack, entry) in enumerate(figures_["attacks"].items()):
            color = palette(i % 10)
            ax.plot(rounds, curve(entry["today"]["served_accuracy"]["pooled"]), color=color, ls=":", lw=1.2)
            ax.plot(
                rounds,
                curve(entry["defended"]["served_accuracy"]["pooled"]),
                color=color,
                lw=1.2,
                label=attack,
            )
            gap = entry["defended"]["worst_gap_to_clean"]["pooled"]
            lines.append(
                f"{label} {attack}: worst gap {gap:.3f}" if gap is not None else f"{label} {attack}: -"
            )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("pooled test accuracy of the served models")
    axes[0][0].legend(fontsize=7, loc="lower right")
    name = _save(fig, out, "poisoning.png")
    config = result["config"]
    caption = (
        f"One hostile hospital ({config['attacker']}) of four, attacking from round {config['attack_from']}, "
        f"{config['rounds']} rounds, {len(config['seeds'])} split seeds; dotted: today's defences (the "
        f"codec's bounds), solid: privacy.max_weight {config['privacy.max_weight']}, max_update_norm "
        f"{config['privacy.max_update_norm']}, validation_tolerance {config['federation.validation_tolerance']}. "
        f"Worst loss of the served models against the clean run, defended: {'; '.join(lines)}. {when}"
    )
    return Figure(name, "Poisoning: what the honest hospitals serve under one hostile hospital", caption)
