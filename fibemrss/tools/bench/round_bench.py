"""`fibemrss bench round`: wall time of a full encrypted round with a real aggregator on loopback.

Four hospital processes each encrypt an update of n parameters, stream it to the aggregator
process (which stores it in PostgreSQL and adds the ciphertexts), fetch the encrypted sum and
decrypt it. No local training. A round's time runs from the first hospital starting to encrypt
to the last one holding the decrypted average.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.he.codec import ChunkAccumulator, UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import load_hospital_key
from fibemrss.platform.channels import open_channel
from fibemrss.tools.bench.flower_round import flower_bin, run_flower_rounds
from fibemrss.tools.local_cluster import LocalCluster

TASK = "bench-round"


def _hospital(name: str, address: str, key_path: str, n_params: int, rounds: int, out: Any) -> None:
    _hospital_in_studies(name, address, key_path, n_params, rounds, [TASK], out)


def _hospital_in_studies(
    name: str, address: str, key_path: str, n_params: int, rounds: int, tasks: list[str], out: Any
) -> None:
    """One hospital process taking part in every study of `tasks` at once, each study's rounds in
    its own thread over one channel, as the agent's supervisor runs them."""
    key = load_hospital_key(Path(key_path).read_bytes())
    channel = open_channel(address)
    stub = federation_pb2_grpc.AggregatorServiceStub(channel)
    threads = [
        threading.Thread(target=_rounds, args=(task, name, stub, key, n_params, rounds, out))
        for task in tasks
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()


def _rounds(
    task: str,
    name: str,
    stub: federation_pb2_grpc.AggregatorServiceStub,
    key: Any,
    n_params: int,
    rounds: int,
    out: Any,
) -> None:
    encryptor, decryptor = UpdateEncryptor(key), UpdateDecryptor(key)
    values = np.random.default_rng(abs(hash((name, task))) % 2**32).normal(0, 0.1, n_params)
    for r in range(rounds):
        stub.GetRound(pb.GetRoundRequest(task=task, wait_for_round=r, wait_seconds=30), timeout=60)
        began = time.time()
        chunks = encryptor.encrypt(values, 100)
        encrypted = time.time()

        def requests(r: int = r, chunks: list[bytes] = chunks) -> Iterator[pb.SubmitUpdateRequest]:
            for i, data in enumerate(chunks):
                yield pb.SubmitUpdateRequest(
                    task=task, round=r, hospital=name, total_chunks=len(chunks), index=i, ciphertext=data
                )

        stub.SubmitUpdate(requests(), timeout=120)
        submitted = time.time()
        stub.GetRound(pb.GetRoundRequest(task=task, wait_for_round=r + 1, wait_seconds=60), timeout=90)
        closed = time.time()
        summed = [c.ciphertext for c in stub.FetchAggregate(pb.FetchAggregateRequest(task=task, round=r))]
        fetched = time.time()
        decryptor.decrypt_average(summed, n_params)
        done = time.time()
        phases = {
            "encrypt": encrypted - began,
            "upload": submitted - encrypted,
            "wait_for_close": closed - submitted,
            "fetch": fetched - closed,
            "decrypt": done - fetched,
        }
        out.put((name, r, began, done, phases) if task == TASK else (task, name, r, began, done))


def compute_floor(key_path: Path, n_params: int, hospitals: int) -> dict[str, float]:
    """The round's HE work alone, in this process, one core: one hospital's encryption (they run in
    parallel), the aggregator adding every upload, one decryption. No network, no database."""
    key = load_hospital_key(key_path.read_bytes())
    values = np.random.default_rng(0).normal(0, 0.1, n_params)
    began = time.perf_counter()
    upload = UpdateEncryptor(key).encrypt(values, 100)
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
    UpdateDecryptor(key).decrypt_average(summed, n_params)
    decrypt_s = time.perf_counter() - began
    return {
        "encrypt_s": round(encrypt_s, 3),
        "aggregate_s": round(add_s, 3),
        "decrypt_s": round(decrypt_s, 3),
        "total_s": round(encrypt_s + add_s + decrypt_s, 3),
    }


def run_round_bench(
    n_params: int = 1_000_000,
    hospitals: int = 4,
    rounds: int = 5,
    workdir: Path | None = None,
    flower: str = "auto",
) -> dict[str, Any]:
    """Ours, and Flower's round in the same run: `flower` is "auto" (if its venv exists), "on"
    (build the venv with scripts/flower_venv.sh if needed) or "off"."""

    names = [f"h{i}" for i in range(hospitals)]
    with tempfile.TemporaryDirectory(prefix="fibemrss-bench-") as scratch:
        tmp = str(workdir or scratch)  # a given workdir keeps the services' logs for a look afterwards
        # Plaintext loopback, like the Flower figure it is compared with.
        cluster = LocalCluster(Path(tmp), hospitals=(), tls=False)
        endpoints = cluster.start()
        try:
            with open_channel(endpoints["aggregator"]) as ch:
                federation_pb2_grpc.AggregatorServiceStub(ch).StartFederation(
                    pb.StartFederationRequest(
                        task=TASK, rounds=rounds, quorum=hospitals, deadline_seconds=600, hospitals=names
                    )
                )
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            key = str(Path(tmp) / "keys" / "hospital.he")
            procs = [
                ctx.Process(target=_hospital, args=(n, endpoints["aggregator"], key, n_params, rounds, queue))
                for n in names
            ]
            for p in procs:
                p.start()
            results = [queue.get(timeout=600) for _ in range(hospitals * rounds)]
            for p in procs:
                p.join(timeout=60)
            floor = compute_floor(Path(key), n_params, hospitals)
        finally:
            cluster.stop()
    per_round = []
    for r in range(rounds):
        rows = [x for x in results if x[1] == r]
        per_round.append(max(x[3] for x in rows) - min(x[2] for x in rows))
    ours = statistics.median(per_round)
    # Where a round's time goes: each phase's median over hospitals and rounds.
    phase_names = list(results[0][4])
    phases = {name: round(statistics.median(x[4][name] for x in results), 3) for name in phase_names}
    flower_seconds: list[float] | None = None
    flower_note = "not run (--flower off)"
    if flower != "off":
        bin_dir = flower_bin(build=flower == "on")
        if bin_dir is None:
            flower_note = "flwr is not installed (scripts/flower_venv.sh builds it; then --flower on or auto)"
        else:
            flower_seconds = run_flower_rounds(bin_dir, n_params, hospitals, rounds)
            flower_note = (
                "flwr 1.42.0: a SuperLink and one SuperNode per hospital on loopback, plaintext FedAvg"
            )
    flower_median = statistics.median(flower_seconds) if flower_seconds else None
    return {
        "params": n_params,
        "transport": "gRPC over loopback, no TLS",
        "hospitals": hospitals,
        "rounds": rounds,
        "round_seconds": [round(s, 3) for s in per_round],
        "ours_median_s": round(ours, 3),
        "flower_round_seconds": [round(s, 3) for s in flower_seconds] if flower_seconds else None,
        "flower_median_s": round(flower_median, 3) if flower_median else None,
        "ratio": round(ours / flower_median, 3) if flower_median else None,
        "flower_note": flower_note,
        "phases_median_s": phases,
        "phases_note": "per hospital: encrypt; upload (stream until the aggregator stored it); "
        "wait_for_close (the others' uploads and the aggregator's sum); fetch; decrypt",
        "compute_floor": floor,
        "ratio_to_compute_floor": round(ours / floor["total_s"], 3) if floor["total_s"] else None,
        "goals": {
            "ratio_to_flower_at_most_0.2": (ours / flower_median <= 0.2) if flower_median else None,
            "ratio_to_compute_floor_at_most_1.5": ours <= 1.5 * floor["total_s"],
        },
    }


def _federate(
    address: str, key: str, tasks: list[str], names: list[str], n_params: int, rounds: int
) -> dict[str, list[float]]:
    """Starts a federation per task and runs every hospital (a process each) in all of them at
    once; each task's round times (first hospital starting to encrypt to the last one decrypted)."""
    with open_channel(address) as ch:
        stub = federation_pb2_grpc.AggregatorServiceStub(ch)
        for task in tasks:
            stub.StartFederation(
                pb.StartFederationRequest(
                    task=task, rounds=rounds, quorum=len(names), deadline_seconds=600, hospitals=names
                )
            )
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_hospital_in_studies, args=(n, address, key, n_params, rounds, tasks, queue))
        for n in names
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=900) for _ in range(len(names) * rounds * len(tasks))]
    for p in procs:
        p.join(timeout=60)
    out: dict[str, list[float]] = {}
    for task in tasks:
        rows = [x for x in results if x[0] == task]
        out[task] = [
            max(x[4] for x in rows if x[2] == r) - min(x[3] for x in rows if x[2] == r) for r in range(rounds)
        ]
    return out


def run_studies_round_bench(
    n_params: int = 100_000,
    hospitals: int = 4,
    rounds: int = 3,
    studies: int = 2,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Round time per study with `studies` studies at once at the same hospitals (one aggregator,
    each hospital a process taking part in all of them, a thread per study), beside one study alone
    in the same run, on the same aggregator: what a hospital's second, third... study costs the others."""
    names = [f"h{i}" for i in range(hospitals)]
    with tempfile.TemporaryDirectory(prefix="fibemrss-bench-") as scratch:
        tmp = str(workdir or scratch)
        # Every study's uploads arrive at once: the aggregator's connections grow with them
        # (FIBEMRSS_DB_POOL_SIZE, docs/runbook.md), else it answers UNAVAILABLE under the load.
        pool = str(max(8, 2 * hospitals * studies))
        cluster = LocalCluster(Path(tmp), hospitals=(), tls=False, extra_env={"FIBEMRSS_DB_POOL_SIZE": pool})
        endpoints = cluster.start()
        key = str(Path(tmp) / "keys" / "hospital.he")
        try:
            alone = _federate(endpoints["aggregator"], key, ["bench-alone"], names, n_params, rounds)[
                "bench-alone"
            ]
            together = _federate(
                endpoints["aggregator"],
                key,
                [f"bench-study-{i}" for i in range(studies)],
                names,
                n_params,
                rounds,
            )
        finally:
            cluster.stop()
    alone_median = statistics.median(alone)
    per_study = {task: round(statistics.median(times), 3) for task, times in together.items()}
    worst = max(per_study.values())
    return {
        "params": n_params,
        "transport": "gRPC over loopback, no TLS",
        "hospitals": hospitals,
        "rounds": rounds,
        "studies": studies,
        "alone_round_seconds": [round(s, 3) for s in alone],
        "alone_median_s": round(alone_median, 3),
        "together_round_seconds": {task: [round(s, 3) for s in times] for task, times in together.items()},
        "together_median_s_per_study": per_study,
        "slowest_study_to_alone": round(worst / alone_median, 3) if alone_median else None,
        "aggregator_db_pool_size": int(pool),
        "note": "each study's round: from the first hospital starting to encrypt to the last one holding "
        "the decrypted average; together, the studies' rounds run at once and share the hospitals' CPUs "
        "and the aggregator",
    }
