"""`fibemrss bench secagg`: what secure aggregation against a lying aggregator costs, per stage.

For each cohort size and dropout rate: a real aggregator process (mutual TLS from a PKI made for
the run, its own database on an embedded PostgreSQL) and n hospitals (a process each up to 16, a
thread each of this process above: the driver's `hospitals_as`), each with its own gRPC channel
under its own `agent@<h>` certificate, driving the
deployed protocol's state machine (`fibemrss.he.secagg.SecAggMember`) through the agent's own gRPC
adapter (`GrpcAggregator`), signing with `MaskKeySigner` and checking with `MaskKeyVerifier`.
One round: advertise (and check the cohort), shares, upload (mask, encrypt, sign, stream),
survivors (sign U3), reveals; dropped members share and then never upload, so their masks are
removed from the survivors' shares. Then one survivor checks the served sum (`verified_sum`:
the transcript, every signature, the sum recomputed from the signed uploads) and decrypts it,
and the decrypted average is compared with the survivors' weighted average.

Measured per member and stage: the protobuf bytes it sends and receives (requests and responses
as serialized, without gRPC/HTTP2/TLS framing), its CPU seconds (its process's, gRPC's threads
included, when it is a process; its thread's, `time.thread_time`, when it is a thread, with the
driver's whole-process CPU beside it; `thread_cpu_s` is the member's own thread either way) and
retries of refused-as-busy calls; the aggregator process's CPU (and PostgreSQL's) per stage
window and its peak RSS; the round's wall time. Fits: per-member CPU and bytes against log2 n,
the aggregator's CPU against n log2 n (least squares, R^2).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.embedded import EmbeddedPostgres
from fibemrss.he.codec import UpdateCodec
from fibemrss.he.keys import HospitalKey, load_hospital_key, write_key_files
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import TlsFiles
from fibemrss.tools.bench.secagg_driver import (
    DEADLINE_SECONDS,
    MIN_CONTRIBUTORS,
    PROCESS_HOSPITALS_MAX,
    Member,
    Sampler,
    fit,
    run_one,
    start_aggregator,
    stats,
)
from fibemrss.tools.certs import init_pki

FULL_SIZES = (4, 16, 64, 128)
QUICK_SIZES = (4, 16)
FULL_PARAMS = 100_000
QUICK_PARAMS = 10_000


def _plain_member(m: Member, codec: UpdateCodec, start: threading.Barrier, out: dict[str, Any]) -> None:
    """An encrypted round without secure aggregation: encrypt, upload, wait for the sum."""
    start.wait()
    cpu, wall = time.thread_time(), time.monotonic()
    info = m._retry(lambda: m.agg.current_round(None))
    chunks = codec.encrypt(m.values(), m.weight)
    m._retry(lambda: m.agg.submit(info.round, chunks))
    while True:
        now = m._retry(lambda: m.agg.current_round(info.round + 1))
        if now.round > info.round or now.federation_done:
            break
    out[m.name] = (time.thread_time() - cpu, time.monotonic() - wall)


def run_plain(
    work: Path, pg: EmbeddedPostgres, keys: Path, pki: Path, key: HospitalKey, n: int, n_params: int
) -> dict[str, Any]:
    """The same members, aggregator and sizes in one encrypted round without secure aggregation
    (pairwise_masking false): the baseline the protocol's overhead is measured against."""
    names = [f"h{i:03d}" for i in range(n)]
    task = f"bench-plain-{n}"
    rng = np.random.default_rng(n * 1000 + 7)
    codec = UpdateCodec(key)
    agg = start_aggregator(work / task, pg, task.replace("-", "_"), keys, pki, n)
    tls = TlsFiles(str(pki / "ca.crt"), str(pki / "operator@central.crt"), str(pki / "operator@central.key"))
    operator = open_channel(agg.address, tls, "aggregator@central")
    members = [
        Member(h, agg.address, pki, key, task, frozenset(names), n_params, int(w), int(sd), False)
        for h, w, sd in zip(names, rng.integers(50, 500, n), rng.integers(0, 2**31, n), strict=True)
    ]
    sampler = Sampler(agg.process.pid if agg.process else 0, None)
    timings: dict[str, tuple[float, float]] = {}
    try:
        federation_pb2_grpc.AggregatorServiceStub(operator).StartFederation(
            pb.StartFederationRequest(
                task=task,
                rounds=1,
                quorum=n,
                grace_seconds=1.0,
                deadline_seconds=DEADLINE_SECONDS,
                hospitals=names,
                pairwise_masking=False,
                min_contributors=MIN_CONTRIBUTORS,
            ),
            timeout=60,
        )
        barrier = threading.Barrier(n + 1)
        threads = [
            threading.Thread(target=_plain_member, args=(m, codec, barrier, timings), daemon=True)
            for m in members
        ]
        for t in threads:
            t.start()
        sampler.start()
        barrier.wait()
        t0 = time.monotonic()
        for t in threads:
            t.join(timeout=4 * DEADLINE_SECONDS)
        closed_at = time.monotonic()
        first = members[0]
        cpu = time.thread_time()
        served = first._retry(lambda: first.agg.fetch_aggregate(0))
        average, total = codec.decrypt_average(served, n_params, MIN_CONTRIBUTORS)
        fetch_decrypt_cpu = time.thread_time() - cpu
        ended = time.monotonic()
        sampler.stop()
    finally:
        sampler.stop()
        operator.close()
        for m in members:
            m.channel.close()
        agg.stop()
    expected = sum(m.weight * m.values() for m in members) / sum(m.weight for m in members)
    (c0, _), (c1, _) = sampler.at(t0), sampler.at(ended)
    return {
        "hospitals": n,
        "wall_s": round(ended - t0, 3),
        "round_closed_s": round(closed_at - t0, 3),
        "member_cpu_s": stats([c for c, _ in timings.values()]),
        "fetch_and_decrypt_cpu_s": round(fetch_decrypt_cpu, 4),
        "aggregator_cpu_s": round(c1 - c0, 3),
        "member_sent_bytes": stats([sum(m.result.meter.sent.values()) for m in members[1:]], 1),
        "exact": bool(
            float(np.max(np.abs(average - expected))) <= key.params.average_error_bound
            and total == sum(m.weight for m in members)
        ),
    }


GRACE_RULE = (
    "without dropouts the quorum is the whole cohort, so every stage closes when the last member "
    "posts and the grace never applies; with dropouts the quorum is the members expected to "
    "survive and the grace is the larger of --grace and three times the slowest stage of the same "
    "size without dropouts plus 2 s, so that no honest member is cut out by a stage closing under load (the "
    "aggregator's grace runs from the stage's opening): the upload stage then waits for the grace"
)


def slowest_stage(run: dict[str, Any]) -> float:
    """The longest time between two stage closes of a run (from its start)."""
    marks = [0.0, *run["round"]["stage_closed_at_s"].values()]
    return max(b - a for a, b in zip(marks, marks[1:], strict=False)) if len(marks) > 1 else 0.0


# -- fits -------------------------------------------------------------------------------------------
def fits(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rate in sorted({r["dropout_rate"] for r in runs}):
        rows = sorted(
            (
                r
                for r in runs
                if r["dropout_rate"] == rate
                and r["members"]["survivor_total"]["thread_cpu_s"] is not None
                and r["members"]["survivor_total"]["thread_cpu_s_without_upload"] is not None
            ),
            key=lambda r: r["hospitals"],
        )
        ns = [float(r["hospitals"]) for r in rows]
        logn = [math.log2(n) for n in ns]
        nlogn = [n * math.log2(n) for n in ns]
        member_cpu = [r["members"]["survivor_total"]["thread_cpu_s"]["mean"] for r in rows]
        member_cpu_nu = [r["members"]["survivor_total"]["thread_cpu_s_without_upload"]["mean"] for r in rows]
        member_bytes = [r["members"]["survivor_total"]["sent_bytes"]["mean"] for r in rows]
        member_bytes_nu = [r["members"]["survivor_total"]["sent_bytes_without_upload"]["mean"] for r in rows]
        member_received = [r["members"]["survivor_total"]["received_bytes"]["mean"] for r in rows]
        agg_cpu = [r["aggregator"]["cpu_s"] for r in rows]
        entry: dict[str, Any] = {
            "hospitals": [int(n) for n in ns],
            "member_cpu_s": member_cpu,
            "member_cpu_vs_log2n": fit(logn, member_cpu),
            "member_cpu_vs_n": fit(ns, member_cpu),
            "member_cpu_without_upload_vs_log2n": fit(logn, member_cpu_nu),
            "member_cpu_without_upload_vs_n": fit(ns, member_cpu_nu),
            "member_sent_bytes_vs_log2n": fit(logn, member_bytes),
            "member_sent_bytes_without_upload_vs_log2n": fit(logn, member_bytes_nu),
            "member_received_bytes_vs_log2n": fit(logn, member_received),
            "member_received_bytes_vs_n": fit(ns, member_received),
            "aggregator_cpu_s": agg_cpu,
            "aggregator_cpu_vs_nlog2n": fit(nlogn, agg_cpu),
            "aggregator_cpu_vs_n": fit(ns, agg_cpu),
        }
        by_n = {int(r["hospitals"]): r for r in rows}
        if 16 in by_n and 128 in by_n:
            lo, hi = by_n[16], by_n[128]

            def growth(
                get: Callable[[dict[str, Any]], float], lo: dict[str, Any] = lo, hi: dict[str, Any] = hi
            ) -> float | None:
                return round(get(hi) / get(lo), 3) if get(lo) else None

            entry["growth_16_to_128"] = {
                "log2n": round(7 / 4, 3),
                "nlog2n": round(128 * 7 / (16 * 4), 3),
                "n": 8.0,
                "member_cpu": growth(lambda r: r["members"]["survivor_total"]["thread_cpu_s"]["mean"]),
                "member_cpu_without_upload": growth(
                    lambda r: r["members"]["survivor_total"]["thread_cpu_s_without_upload"]["mean"]
                ),
                "member_sent_bytes": growth(lambda r: r["members"]["survivor_total"]["sent_bytes"]["mean"]),
                "member_sent_bytes_without_upload": growth(
                    lambda r: r["members"]["survivor_total"]["sent_bytes_without_upload"]["mean"]
                ),
                "member_received_bytes": growth(
                    lambda r: r["members"]["survivor_total"]["received_bytes"]["mean"]
                ),
                "aggregator_cpu": growth(lambda r: r["aggregator"]["cpu_s"]),
            }
            g = entry["growth_16_to_128"]
            entry["goals"] = {
                "member_cost_grows_no_faster_than_log_n": g["member_cpu"] is not None
                and g["member_cpu"] <= g["log2n"],
                "aggregator_cost_grows_no_faster_than_n_log_n": g["aggregator_cpu"] is not None
                and g["aggregator_cpu"] <= g["nlog2n"],
            }
        out[f"dropout_{rate:g}"] = entry
    return out


def _fits_or_error(runs: list[dict[str, Any]]) -> dict[str, Any]:
    try:
        return fits(runs)
    except (TypeError, KeyError, ValueError) as exc:  # the runs' figures stay reported
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_secagg_bench(
    hospitals: tuple[int, ...] = FULL_SIZES,
    n_params: int = FULL_PARAMS,
    dropouts: tuple[float, ...] = (0.0, 0.1),
    grace: float = 1.0,
    workdir: Path | None = None,
    baseline: tuple[int, ...] = (4,),
) -> dict[str, Any]:
    """`baseline`: the sizes at which the same round also runs without secure aggregation."""
    if any(n < MIN_CONTRIBUTORS for n in hospitals):
        raise ValueError(f"every size must be at least min_contributors ({MIN_CONTRIBUTORS})")
    runs: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fibemrss-bench-secagg-") as scratch:
        work = Path(workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        keys, pki = work / "keys", work / "pki"
        write_key_files(keys)
        key = load_hospital_key((keys / "hospital.he").read_bytes())
        names = [f"h{i:03d}" for i in range(max(hospitals))]
        init_pki(pki, ["aggregator@central", "operator@central", *(f"agent@{h}" for h in names)])
        pg = EmbeddedPostgres(work / "postgres")
        pg.start()
        try:
            for n in hospitals:
                if n > key.params.max_parties:
                    # StartFederation refuses it: a sum of more parties would not decrypt exactly.
                    skipped.append(
                        {
                            "hospitals": n,
                            "why": f"the HE codec's sums decrypt exactly for at most "
                            f"{key.params.max_parties} parties (HeParams.max_parties); the aggregator "
                            "refuses a federation of more hospitals",
                        }
                    )
                    continue
                without: dict[str, Any] | None = None
                for rate in sorted(dropouts):
                    stage_grace = grace
                    if rate > 0 and without is not None:
                        stage_grace = max(grace, round(3 * slowest_stage(without) + 2.0, 1))
                    run = run_one(work, pg, keys, pki, key, n, rate, n_params, stage_grace)
                    run["settings"]["grace_rule"] = GRACE_RULE
                    if rate == 0:
                        without = run
                    elif without is not None:
                        run["round"]["wall_s_without_dropouts"] = without["round"]["wall_s"]
                    runs.append(run)
                    # Each run as it ends, so a later failure loses none of them.
                    (work / "runs.json").write_text(json.dumps(runs, indent=1, default=str))
                if n in baseline:
                    plain = run_plain(work, pg, keys, pki, key, n, n_params)
                    if without is not None:
                        plain["secagg_over_plain"] = {
                            "wall_with_verify_and_decrypt": round(
                                without["round"]["wall_with_verify_s"] / plain["wall_s"], 3
                            ),
                            "aggregator_cpu": round(
                                without["aggregator"]["cpu_s"] / plain["aggregator_cpu_s"], 3
                            )
                            if plain["aggregator_cpu_s"]
                            else None,
                            "member_cpu": round(
                                without["members"]["survivor_total"]["thread_cpu_s"]["mean"]
                                / plain["member_cpu_s"]["mean"],
                                3,
                            )
                            if plain["member_cpu_s"] and plain["member_cpu_s"]["mean"]
                            else None,
                        }
                    baselines.append(plain)
        finally:
            pg.stop()
    load = os.getloadavg()
    return {
        "params": n_params,
        "hospitals": list(hospitals),
        "dropouts": list(dropouts),
        "transport": "gRPC over loopback, mutual TLS; one aggregator process per run, one embedded "
        "PostgreSQL for all runs (a database each); members are processes of their own up to "
        f"{PROCESS_HOSPITALS_MAX}, threads of this process above (each run's hospitals_as), each "
        "with its own channel and agent@<h> certificate, signing and checking every message",
        "machine": {"cpus": os.cpu_count(), "load_average_after": [round(x, 2) for x in load]},
        "max_parties": key.params.max_parties,
        "sizes_refused": skipped,
        "runs": runs,
        "without_secure_aggregation": baselines,
        "without_secure_aggregation_note": "the same members and aggregator, one encrypted round with "
        "pairwise_masking false (encrypt, upload, the round closes; one member fetches and decrypts; "
        "its members are threads of this process at every size, so up to "
        f"{PROCESS_HOSPITALS_MAX} hospitals its wall time is set against processes'; member_cpu "
        "compares the members' own threads): "
        "the protocol's overhead is secagg_over_plain (the issue's goal of <= 15% at 4 hospitals "
        "was set against the masked round this protocol replaced, which no longer exists)",
        "fits": _fits_or_error(runs),
        "all_sums_exact": all(r["check"].get("exact") for r in runs if r["round"]["closed"]),
        "rounds_not_closed": [
            {"hospitals": r["hospitals"], "dropout_rate": r["dropout_rate"], "failure": r["round"]["failure"]}
            for r in runs
            if not r["round"]["closed"]
        ],
        "bench_seconds": round(time.monotonic() - began, 1),
    }
