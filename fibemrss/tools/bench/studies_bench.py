"""`fibemrss bench round --studies N`: one hospital in several studies at once (issue 25).

The round time of each study when N studies run together at the same hospitals (one aggregator
process, each hospital a process taking part in all of them with a thread per study, as the
agent's supervisor runs them), beside one study alone in the same run on the same aggregator. It
measures what a hospital's second, third... study costs the others, with the plain encrypted round
(no secure-aggregation stages: those are measured by `fibemrss bench round` without --studies).
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
from fibemrss.he.codec import UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import load_hospital_key
from fibemrss.platform.channels import open_channel
from fibemrss.tools.local_cluster import LocalCluster


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

        def requests(r: int = r, chunks: list[bytes] = chunks) -> Iterator[pb.SubmitUpdateRequest]:
            for i, data in enumerate(chunks):
                yield pb.SubmitUpdateRequest(
                    task=task, round=r, hospital=name, total_chunks=len(chunks), index=i, ciphertext=data
                )

        stub.SubmitUpdate(requests(), timeout=120)
        stub.GetRound(pb.GetRoundRequest(task=task, wait_for_round=r + 1, wait_seconds=60), timeout=90)
        summed = [c.ciphertext for c in stub.FetchAggregate(pb.FetchAggregateRequest(task=task, round=r))]
        decryptor.decrypt_average(summed, n_params)
        done = time.time()
        out.put((task, name, r, began, done))


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
