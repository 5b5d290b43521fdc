"""`fibemrss bench round`: the round we run, timed phase by phase, next to Flower and the floor.

Every round is the deployed protocol (fibemrss/tools/bench/secagg_driver.py, shared with `bench
secagg`): a real aggregator process with mutual TLS and its own PostgreSQL database, and hospitals
(a process each up to 16 of them, so that they encrypt at once as the floor assumes; threads of
this process above; each with its own channel and agent certificate) that advertise signed
round keys, exchange shares, mask, encrypt, sign and stream their uploads, sign the survivors,
reveal, wait for the round to close, then fetch the sum and check it (`verified_sum`: the
transcript, every signature, the sum recomputed from the signed uploads) and decrypt it; the
decrypted average is compared with the plaintext weighted average.

Two parts, in one run on one machine:
- parameter scaling: at each size (1M and 10M by default) and 4 hospitals, `runs` rounds, each
  against a fresh aggregator, beside Flower's plaintext FedAvg round (SuperLink and SuperNodes on
  loopback with TLS on, benchmarks/flower_round) and the compute floor (one hospital's encryption,
  the aggregator adding every upload, one decryption, in one process without network or
  database). Ratios to Flower and to the floor per size; where the time goes, phase by phase.
- hospital scaling: 4, 16, 64 and 128 hospitals at 100,000 parameters with the aggregator's default
  database pool (8 connections): whether every round closes, whether any honest upload was refused
  (a refused call is retried and counted), the aggregator's memory against one upload plus the sum,
  and the fit of round time against hospitals. A size the aggregator refuses (more hospitals than
  the HE codec's max_parties) is reported as refused, with the refusal's code and message.

Phases (seconds from the start barrier; each stage's end is the first hospital to see it close):
advertise (keys, cohort), shares, upload (mask, encrypt, sign, stream until every upload is
stored), survivors, reveals, wait_for_close (the aggregator closes the round: the sum), then one
hospital's fetch, verify (verified_sum) and decrypt.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fibemrss.db.embedded import EmbeddedPostgres
from fibemrss.he.codec import ChunkAccumulator, UpdateCodec
from fibemrss.he.keys import HospitalKey, load_hospital_key, write_key_files
from fibemrss.tools.bench.flower_round import flower_bin, run_flower_rounds
from fibemrss.tools.bench.secagg_driver import MIN_CONTRIBUTORS, PROCESS_HOSPITALS_MAX, fit, run_one
from fibemrss.tools.certs import init_pki

PARAM_SIZES = (1_000_000, 10_000_000)
HOSPITAL_SIZES = (4, 16, 64, 128)
SCALING_PARAMS = 100_000
QUICK_ROUND_PARAMS = 10_000
GOAL_TO_FLOWER = 0.2
GOAL_TO_FLOOR = 1.5
GOAL_MEMORY_UPLOADS = 3.0
PHASES = (
    "advertise",
    "shares",
    "upload",
    "survivors",
    "reveals",
    "wait_for_close",
    "fetch",
    "verify",
    "decrypt",
)


def compute_floor(key: HospitalKey, n_params: int, hospitals: int) -> dict[str, float]:
    """The round's HE work alone, in this process, one core: one hospital's encryption (they run
    in parallel), the aggregator adding every upload, one decryption. No masks, network, database,
    signatures or transcript checks: what no implementation of this round can avoid."""
    codec = UpdateCodec(key)
    values = np.random.default_rng(0).normal(0, 0.1, n_params)
    began = time.perf_counter()
    upload = codec.encrypt(values, 100)
    encrypt_s = time.perf_counter() - began
    aggregator = key.aggregator_key()
    began = time.perf_counter()
    summed = []
    for chunk in upload:
        acc = ChunkAccumulator(aggregator)
        for _ in range(hospitals):
            acc.add(chunk)
        summed.append(acc.result())
    add_s = time.perf_counter() - began
    began = time.perf_counter()
    codec.decrypt_average(summed, n_params, 1)
    decrypt_s = time.perf_counter() - began
    return {
        "encrypt_s": round(encrypt_s, 3),
        "aggregate_s": round(add_s, 3),
        "decrypt_s": round(decrypt_s, 3),
        "total_s": round(encrypt_s + add_s + decrypt_s, 3),
        # Every hospital's encryption one after another: hospitals that share one core (threads
        # of one process, or more processes than the machine has cores) come close to it.
        "total_with_serial_encryption_s": round(hospitals * encrypt_s + add_s + decrypt_s, 3),
        # Hospitals as processes on this machine: their encryptions in waves of one per core.
        "total_on_this_machine_s": round(
            math.ceil(hospitals / (os.cpu_count() or 1)) * encrypt_s + add_s + decrypt_s, 3
        ),
        "upload_bytes": sum(len(c) for c in upload),
        "sum_bytes": sum(len(c) for c in summed),
    }


def spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "stdev": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
        "runs": len(values),
    }


def phases_of(run: dict[str, Any]) -> dict[str, float]:
    """A run's phases (see the module docstring) from its timeline and its verifier's timings."""
    at = run["round"]["stage_closed_at_s"]
    marks = [("advertise", "cohort"), ("shares", "shares"), ("upload", "uploads")]
    marks += [("survivors", "survivors"), ("reveals", "reveals"), ("wait_for_close", "round")]
    out: dict[str, float] = {}
    last = 0.0
    for phase, event in marks:
        if event in at:
            out[phase] = round(at[event] - last, 3)
            last = at[event]
    verify = run.get("verify") or {}
    for phase, field in (
        ("fetch", "fetch_aggregate_s"),
        ("verify", "verified_sum_s"),
        ("decrypt", "decrypt_s"),
    ):
        if field in verify:
            out[phase] = verify[field]
    return out


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    """What the round bench keeps of one driver run (the whole run stays under `detail`)."""
    members = run["members"]
    upload_stage = members["per_stage"].get("upload", {})
    retries = {stage: row["retries"] for stage, row in members["per_stage"].items() if row["retries"]}
    agg = run["aggregator"]
    return {
        "hospitals": run["hospitals"],
        "hospitals_as": run["hospitals_as"],
        "member_processes": members["member_processes"],
        "closed": run["round"]["closed"],
        "failure": run["round"]["failure"],
        "round_s": run["round"]["wall_with_verify_s"],
        "phases_s": phases_of(run),
        "upload_encrypt_s": (members.get("upload_encrypt_s") or {}).get("mean"),
        "sum_exact": run["check"].get("exact"),
        "max_abs_error": run["check"].get("max_abs_error"),
        "member_errors": members["errors"],
        "honest_members_left_out": run["round"]["honest_members_left_out"],
        "uploads_refused_then_retried": upload_stage.get("retries", 0),
        "retries_by_stage": retries,
        "upload_bytes": run["upload"]["ciphertext_bytes"],
        "sum_bytes": (run.get("verify") or {}).get("aggregate_bytes"),
        "aggregator_cpu_s": agg["cpu_s"],
        "postgres_cpu_s": agg["postgres_cpu_s"],
        "aggregator_rss_before_mb": agg.get("rss_before_round_mb"),
        "aggregator_peak_rss_mb": agg["peak_rss_mb"],
        "aggregator_peak_rss_by_window_mb": {
            stage: row.get("peak_rss_mb") for stage, row in agg.get("by_window", {}).items()
        },
        "load_average_before": run.get("load_average_before"),
    }


def _memory(summary: dict[str, Any]) -> dict[str, Any]:
    """The aggregator's growth over its idle size against one upload plus the sum."""
    upload, total = summary["upload_bytes"], summary["sum_bytes"] or summary["upload_bytes"]
    before, peak = summary["aggregator_rss_before_mb"], summary["aggregator_peak_rss_mb"]
    if not upload or before is None or not peak:
        return {"why": "not measured"}
    grown = (peak - before) * 2**20
    budget = GOAL_MEMORY_UPLOADS * upload + total
    return {
        "peak_over_idle_mb": round(grown / 2**20, 1),
        "one_upload_mb": round(upload / 2**20, 2),
        "sum_mb": round(total / 2**20, 2),
        "in_uploads_plus_sum": round((grown - total) / upload, 2),
        "goal_mb": round(budget / 2**20, 2),
        "met": grown <= budget,
        "note": "peak RSS (VmHWM) minus the RSS before the round, against 3 uploads plus the sum",
    }


def _dominant(phases: dict[str, float], floor: dict[str, float] | None = None) -> str | None:
    """The phase holding the most time (beyond its share of the floor, where one is given)."""
    if not phases:
        return None
    excess = dict(phases)
    if floor:
        excess["upload"] = excess.get("upload", 0.0) - floor["encrypt_s"]
        excess["wait_for_close"] = excess.get("wait_for_close", 0.0) - floor["aggregate_s"]
        excess["decrypt"] = excess.get("decrypt", 0.0) - floor["decrypt_s"]
    return max(excess, key=lambda k: excess[k])


def _one(
    work: Path,
    pg: EmbeddedPostgres,
    keys: Path,
    pki: Path,
    key: HospitalKey,
    n: int,
    n_params: int,
    label: str,
    hospitals_as: str | None = None,
) -> dict[str, Any]:
    """One round; a size the aggregator refuses comes back as {"refused": ...}."""
    try:
        # pool_size 0: the aggregator's default pool, so a cohort larger than it must queue.
        return run_one(
            work,
            pg,
            keys,
            pki,
            key,
            n,
            0.0,
            n_params,
            1.0,
            label=label,
            pool_size=0,
            hospitals_as=hospitals_as,
        )
    except grpc.RpcError as exc:
        code = exc.code()
        return {"hospitals": n, "refused": {"code": code.name if code else None, "details": exc.details()}}


def run_round_bench(
    param_sizes: Sequence[int] = PARAM_SIZES,
    hospitals: int = 4,
    runs: int = 3,
    workdir: Path | None = None,
    flower: str = "auto",
    scaling: Sequence[int] = HOSPITAL_SIZES,
    scaling_params: int = SCALING_PARAMS,
    hospitals_as: str | None = None,
) -> dict[str, Any]:
    """`flower`: "auto" (if its venv exists), "on" (build it with scripts/flower_venv.sh if
    needed) or "off". `scaling` empty skips the hospital scaling, `param_sizes` empty the rest.
    `hospitals_as`: "processes" or "threads" for every round; None: a process per hospital up to
    PROCESS_HOSPITALS_MAX hospitals, threads above."""
    if hospitals < MIN_CONTRIBUTORS or any(n < MIN_CONTRIBUTORS for n in scaling):
        raise ValueError(f"every size must be at least min_contributors ({MIN_CONTRIBUTORS})")
    began = time.monotonic()
    load_start = os.getloadavg()
    by_params: list[dict[str, Any]] = []
    by_hospitals: list[dict[str, Any]] = []
    bin_dir = None if flower == "off" else flower_bin(build=flower == "on")
    with tempfile.TemporaryDirectory(prefix="fibemrss-bench-round-") as scratch:
        work = Path(workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        keys, pki = work / "keys", work / "pki"
        write_key_files(keys)
        key = load_hospital_key((keys / "hospital.he").read_bytes())
        names = [f"h{i:03d}" for i in range(max([hospitals, *scaling]))]
        init_pki(pki, ["aggregator@central", "operator@central", *(f"agent@{h}" for h in names)])
        pg = EmbeddedPostgres(work / "postgres")
        pg.start()
        try:
            for n_params in param_sizes:
                entry: dict[str, Any] = {"params": n_params, "hospitals": hospitals}
                rounds = [
                    _one(
                        work, pg, keys, pki, key, hospitals, n_params, f"round-{n_params}-r{i}", hospitals_as
                    )
                    for i in range(runs)
                ]
                entry["runs"] = [_summary(r) for r in rounds if "refused" not in r]
                for summary in entry["runs"]:
                    summary["memory"] = _memory(summary)
                entry["floor"] = compute_floor(key, n_params, hospitals)
                entry["flower"] = _flower(bin_dir, flower, n_params, hospitals, runs)
                by_params.append(_score(entry))
                (work / "parameter_scaling.json").write_text(json.dumps(by_params, indent=1, default=str))
            for n in scaling:
                run = _one(work, pg, keys, pki, key, n, scaling_params, "scale", hospitals_as)
                if "refused" in run:
                    by_hospitals.append({**run, "max_parties": key.params.max_parties})
                    continue
                summary = _summary(run)
                summary["memory"] = _memory(summary)
                by_hospitals.append(summary)
                # Each size as it ends, so a later failure loses none of them.
                (work / "scaling.json").write_text(json.dumps(by_hospitals, indent=1, default=str))
        finally:
            pg.stop()
    return {
        "protocol": "the deployed round: mutual TLS, signed round keys, shares, masked encrypted signed "
        "uploads, survivors, reveals, verified_sum and decryption by a hospital",
        "transport": "gRPC over loopback with mutual TLS; one aggregator process per round (its own "
        "database on one embedded PostgreSQL); "
        + {
            None: f"each hospital a process of its own up to {PROCESS_HOSPITALS_MAX} hospitals, "
            "threads of this process above",
            "processes": "each hospital a process of its own",
            "threads": "hospitals are threads of this process",
        }[hospitals_as]
        + " (each round's hospitals_as says which)",
        "hospitals_as_max_processes": PROCESS_HOSPITALS_MAX if hospitals_as is None else None,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "parameter_scaling": by_params,
        "hospital_scaling": {
            "params": scaling_params,
            "aggregator_db_pool": "the default (FIBEMRSS_DB_POOL_SIZE unset: 8 connections)",
            "sizes": by_hospitals,
            "fit": _hospital_fit(by_hospitals),
            "goals": _hospital_goals(by_hospitals),
        },
        "phases_note": "seconds from the start barrier to the first hospital seeing each stage close "
        "(advertise .. wait_for_close), then one hospital's fetch, verify (verified_sum) and decrypt",
        "bench_seconds": round(time.monotonic() - began, 1),
    }


def _flower(bin_dir: Path | None, flower: str, n_params: int, hospitals: int, runs: int) -> dict[str, Any]:
    if flower == "off":
        return {"note": "not run (--flower off)"}
    if bin_dir is None:
        return {"note": "flwr is not installed (make flower-venv builds it; then --flower on or auto)"}
    try:
        seconds = run_flower_rounds(bin_dir, n_params, hospitals, runs, tls=True)
    except (RuntimeError, OSError) as exc:
        return {"note": f"Flower's run failed: {exc}"[:2000]}
    return {
        "round_seconds": [round(s, 3) for s in seconds],
        "spread": spread(seconds),
        "note": "flwr 1.42.0: a SuperLink and one SuperNode per hospital on loopback with TLS, plaintext "
        "FedAvg without training; the rounds of one run",
    }


def _score(entry: dict[str, Any]) -> dict[str, Any]:
    """Ratios to Flower and to the floor, the goals and by how much each is missed."""
    closed = [r for r in entry["runs"] if r["closed"]]
    ours = [r["round_s"] for r in closed]
    entry["hospitals_as"] = sorted({r["hospitals_as"] for r in entry["runs"]})
    entry["round_s"] = spread(ours)
    entry["phases_median_s"] = {
        p: round(statistics.median(r["phases_s"][p] for r in closed if p in r["phases_s"]), 3)
        for p in PHASES
        if any(p in r["phases_s"] for r in closed)
    }
    entry["all_closed_and_exact"] = bool(entry["runs"]) and all(
        r["closed"] and r["sum_exact"] for r in entry["runs"]
    )
    floor = entry["floor"]
    median = statistics.median(ours) if ours else None
    flower = (entry["flower"].get("spread") or {}).get("median")
    entry["ratio_to_flower"] = round(median / flower, 3) if median and flower else None
    entry["ratio_to_floor"] = round(median / floor["total_s"], 3) if median and floor["total_s"] else None
    holder = _dominant(entry["phases_median_s"], floor)
    entry["goals"] = {
        "ratio_to_flower_at_most": GOAL_TO_FLOWER,
        "ratio_to_flower_met": None
        if entry["ratio_to_flower"] is None
        else entry["ratio_to_flower"] <= GOAL_TO_FLOWER,
        "ratio_to_flower_missed_by": None
        if entry["ratio_to_flower"] is None
        else round(entry["ratio_to_flower"] / GOAL_TO_FLOWER, 2),
        "ratio_to_floor_at_most": GOAL_TO_FLOOR,
        "ratio_to_floor_met": None
        if entry["ratio_to_floor"] is None
        else entry["ratio_to_floor"] <= GOAL_TO_FLOOR,
        "ratio_to_floor_missed_by": None
        if entry["ratio_to_floor"] is None
        else round(entry["ratio_to_floor"] / GOAL_TO_FLOOR, 2),
        "phase_holding_it": holder,
        "note": "missed_by: the measured ratio over the goal (1.0 or less: met); the phase holding it "
        "is the one with the most time beyond its share of the floor",
    }
    return entry


def _hospital_fit(sizes: list[dict[str, Any]]) -> dict[str, Any] | None:
    rows = [s for s in sizes if "refused" not in s and s["closed"]]
    if len(rows) < 2:
        return None
    ns = [float(s["hospitals"]) for s in rows]
    ys = [float(s["round_s"]) for s in rows]
    return {
        "hospitals": [int(n) for n in ns],
        "round_s": ys,
        "round_s_vs_n": fit(ns, ys),
        "round_s_vs_n_log2n": fit([n * math.log2(n) for n in ns], ys),
        "round_s_vs_n_squared": fit([n * n for n in ns], ys),
    }


def _hospital_goals(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    measured = [s for s in sizes if "refused" not in s]
    return {
        "every_round_closed": bool(measured) and all(s["closed"] for s in measured),
        "no_honest_upload_refused": all(
            s["uploads_refused_then_retried"] == 0 and not s["member_errors"] for s in measured
        ),
        "memory_within_3_uploads_plus_sum": all(s["memory"].get("met") for s in measured),
        "sizes_refused": [s["hospitals"] for s in sizes if "refused" in s],
    }
